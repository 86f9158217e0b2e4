"""`edgemoe inspect BUNDLE`: what a bundle holds, as a JSON-able report and a rich view.

Contract: `inspect_bundle(path)` opens the bundle (manifest parsed and checked, every file's size
stat'ed; nothing hashed: `Bundle.verify` is the checksum pass) and returns a plain dict: the model,
target and sizes; per MoE layer each expert's precision, bytes and validation; each trunk graph's
role, precision, bytes and validation; the policy that chose the precisions (uniform or auto, with
its measured error and budgets); and a validation summary per role (the worst relative errors and
max abs error over the graphs of that role). `render_bundle(report, console)` draws it for people.
Reads only the manifest: no onnx, no onnxruntime, no torch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgemoe.bundle import Bundle, FileEntry
from edgemoe.model.config import ModelConfig


def parse_metric(metric: str) -> dict[str, Any]:
    """The key=value fields after the first ';' of a metric string (export.validation writes them),
    numbers as floats: {"output": "h", "rel_rms": 0.031, "rel_max": 0.12, "allowed_rel_rms": 0.15, ...}."""
    out: dict[str, Any] = {}
    for part in metric.split(";")[1:]:
        key, _, value = part.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _validation(entry: FileEntry) -> dict[str, Any] | None:
    v = entry.validation
    if v is None:
        return None
    return {"max_abs_error": v.max_abs_error, "tolerance": v.tolerance, "passed": v.passed,
            "metric": v.metric.split(";")[0], **parse_metric(v.metric)}


def _graph(entry: FileEntry, size: int) -> dict[str, Any]:
    return {"path": entry.path, "role": entry.role, "layer": entry.layer, "precision": entry.precision,
            "bytes": size, "validation": _validation(entry)}


def _experts(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    layers: dict[int, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    for key, entry in m.experts().items():
        layers.setdefault(key.layer, []).append({"expert": key.expert, **_graph(entry, m.bytes_of(entry))})
        counts[entry.precision or "?"] = counts.get(entry.precision or "?", 0) + 1
    return {"counts": counts, "bytes": m.expert_bytes_total,
            "layers": [{"layer": n, "bytes": sum(e["bytes"] for e in es), "experts": es}
                       for n, es in sorted(layers.items())]}


def _summary_by_role(graphs: list[dict[str, Any]]) -> dict[str, Any]:
    roles: dict[str, dict[str, Any]] = {}
    for g in graphs:
        v = g["validation"]
        if v is None:
            continue
        r = roles.setdefault(g["role"], {"graphs": 0, "passed": True, "max_rel_rms": 0.0, "max_rel_max": 0.0,
                                         "max_abs_error": 0.0, "worst": None})
        r["graphs"] += 1
        r["passed"] = r["passed"] and v["passed"]
        r["max_abs_error"] = max(r["max_abs_error"], v["max_abs_error"])
        if v.get("rel_rms", 0.0) >= r["max_rel_rms"]:
            r["max_rel_rms"], r["worst"] = v.get("rel_rms", 0.0), g["path"]
        r["max_rel_max"] = max(r["max_rel_max"], v.get("rel_max", 0.0))
    return roles


def _policy(policy: dict[str, Any]) -> dict[str, Any]:
    auto = policy.get("auto") or {}
    plan = policy.get("plan") or {}
    return {"mode": policy.get("mode"), "precision": policy.get("precision"), "levels": plan.get("levels", []),
            "trunk": (plan.get("trunk") or {}).get("precision"), "vision": (plan.get("vision") or {}).get("precision"),
            "embed": (plan.get("embed") or {}).get("precision"), "notes": plan.get("notes", []),
            "error": auto.get("error"), "budget": auto.get("budget"), "size_budget": auto.get("size_budget"),
            "evaluations": auto.get("evaluations"), "calibration": policy.get("calibration"),
            "export_seconds": (policy.get("export") or {}).get("seconds")}


def inspect_bundle(path: Path | str) -> dict[str, Any]:
    """The report described in the module docstring."""
    bundle = Bundle.open(path)
    m = bundle.manifest
    trunk = [_graph(e, m.bytes_of(e)) for e in m.files if e.is_graph and e.role != "expert"]
    experts = _experts(bundle)
    every_graph = trunk + [e for layer in experts["layers"] for e in layer["experts"]]
    model = m.model
    config = ModelConfig.from_dict(model)
    return {
        "kind": "bundle", "path": str(path), "schema_version": m.schema_version,
        "edgemoe_version": m.edgemoe_version, "created_at": m.created_at, "target": m.target,
        "model_type": config.model_type, "family": model.get("family"),
        "num_layers": model.get("num_layers"), "moe_layers": (model.get("moe") or {}).get("layers", []),
        "total_bytes": m.total_bytes, "expert_bytes": experts["bytes"],
        "trunk_bytes": sum(g["bytes"] for g in trunk),
        "other_bytes": m.total_bytes - experts["bytes"] - sum(g["bytes"] for g in trunk),
        "kv_cache": {"values_per_position": config.kv_values_per_position, "value_bytes": m.kv_value_bytes,
                     "bytes_per_position": config.kv_values_per_position * m.kv_value_bytes,
                     "expanded_values_per_position": config.num_layers * config.expanded_kv_values},
        "files": len(m.files), "experts": experts, "trunk": trunk, "policy": _policy(m.policy),
        "validation": {"passed": all(g["validation"] is None or g["validation"]["passed"] for g in every_graph),
                       "by_role": _summary_by_role(every_graph)},
    }


# -- rendering ------------------------------------------------------------------------------------

def _mb(n: int) -> str:
    from edgemoe.offload.budget import format_bytes  # the one byte formatter of `inspect`

    return format_bytes(n)


def _short(path: str | None) -> str:
    """graphs/layer3.attn.onnx -> layer3.attn; experts/L2/E1.onnx -> L2/E1."""
    if not path:
        return ""
    return path.split("/", 1)[-1].removesuffix(".onnx")


def _mode(p: dict[str, Any]) -> str:
    return f"auto over {' > '.join(p['levels'])}" if p["mode"] == "auto" else f"uniform {p['precision']}"


def _overview(report: dict[str, Any]) -> Table:
    p = report["policy"]
    t = Table(title=f"bundle {report['path']}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    counts = ", ".join(f"{n} x {k}" for k, n in sorted(report["experts"]["counts"].items()))
    rows = [("model", f"{report['model_type']}, {report['num_layers']} layers, MoE on {len(report['moe_layers'])}"),
            ("target", report["target"]),
            ("size", f"{_mb(report['total_bytes'])} total: experts {_mb(report['expert_bytes'])}, "
                     f"trunk {_mb(report['trunk_bytes'])}, other {_mb(report['other_bytes'])}"),
            ("experts", counts),
            ("policy", f"{_mode(p)}; trunk {p['trunk']}, vision {p['vision']}, embed {p['embed']}"),
            ("KV cache", _kv_cache(report["kv_cache"]))]
    if p["mode"] == "auto" and p["error"]:
        e, b = p["error"], p["budget"] or {}
        rows.append(("measured", f"top-1 {e['top1_agreement']:.4f} (>= {b.get('min_top1')}), mean KL "
                                 f"{e['mean_kl']:.3g} (<= {b.get('max_kl')}) over {e['tokens']} tokens, "
                                 f"{p['evaluations']} evaluations"))
    rows += [("note", n) for n in p["notes"]]
    rows.append(("validation", "all graphs within tolerance" if report["validation"]["passed"] else "FAILED"))
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def _kv_cache(kv: dict[str, Any]) -> str:
    """The checkpoint's KV line (`inspect_report.kv_cache_line`) in the bundle's cache element type."""
    from edgemoe.inspect_report import kv_cache_line  # here: inspect_report imports this module lazily too

    return kv_cache_line(kv["values_per_position"], kv["expanded_values_per_position"], kv["value_bytes"])


PER_EXPERT_CELLS = 8  # up to this many experts a layer, each gets its own cell; beyond, one summary per layer


def _precision_mix(experts: list[dict[str, Any]]) -> str:
    """A layer's expert precisions: one word per expert for a few experts ("int8 int4 int4 int8"), else
    counts ("60 x int4, 4 x int8"), so 64 experts a layer still fit a terminal."""
    names = [str(e["precision"]) for e in experts]
    if len(names) <= PER_EXPERT_CELLS:
        return " ".join(names)
    counts = Counter(names)
    return ", ".join(f"{n} x {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _expert_table(report: dict[str, Any]) -> Table:
    """One row per MoE layer: its experts' precisions, the smallest and largest expert, the layer's bytes
    (every expert's own figures are in `inspect --json`)."""
    t = Table(title="experts: precision and size per layer")
    for col in ("layer", "experts", "precisions", "smallest", "largest", "layer total"):
        t.add_column(col, justify="left" if col == "precisions" else "right")
    for layer in report["experts"]["layers"]:
        sizes = [e["bytes"] for e in layer["experts"]] or [0]
        t.add_row(str(layer["layer"]), str(len(layer["experts"])), _precision_mix(layer["experts"]),
                  _mb(min(sizes)), _mb(max(sizes)), _mb(layer["bytes"]))
    return t


def _rel(v: dict[str, Any] | None, key: str) -> str:
    return "" if not v or key not in v else f"{v[key]:.2g}"


def _trunk_table(report: dict[str, Any]) -> Table:
    t = Table(title="trunk graphs")
    t.add_column("graph", no_wrap=True)
    for col in ("role", "precision", "size", "rel rms", "rel max", "max abs err"):
        t.add_column(col, justify="left" if col in ("role", "precision") else "right")
    for g in report["trunk"]:
        v = g["validation"]
        t.add_row(_short(g["path"]), g["role"], g["precision"] or "", _mb(g["bytes"]), _rel(v, "rel_rms"),
                  _rel(v, "rel_max"), "" if v is None else f"{v['max_abs_error']:.2g}")
    return t


def _validation_table(report: dict[str, Any]) -> Table:
    t = Table(title="validation against the torch reference (worst per role)")
    for col in ("role", "graphs", "max rel rms", "max rel max", "max abs err", "worst graph", "ok"):
        t.add_column(col, no_wrap=col == "worst graph")
    for role, r in sorted(report["validation"]["by_role"].items()):
        t.add_row(role, str(r["graphs"]), f"{r['max_rel_rms']:.2g}", f"{r['max_rel_max']:.2g}",
                  f"{r['max_abs_error']:.2g}", _short(r["worst"]), "yes" if r["passed"] else "NO")
    return t


def render_bundle(report: dict[str, Any], console: Console) -> None:
    for table in (_overview(report), _expert_table(report), _trunk_table(report), _validation_table(report)):
        console.print(table)
