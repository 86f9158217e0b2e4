"""`edgemoe inspect`: what a checkpoint (or bundle) holds, as a JSON-able report and a rich view.

Contract: `inspect_path(path)` opens a checkpoint directory (validating every tensor's name and
shape from the file headers, reading no weights) and returns a plain dict: the model summary plus
the files on disk. `render_inspection(report, console)` draws it for people. Bad input surfaces as
the loader's `EdgeMoEError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgemoe.errors import EdgeMoEError
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.summary import summarize_checkpoint
from edgemoe.offload.budget import format_bytes


def _files(directory: Path) -> dict[str, Any]:
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"weight_files": [p.name for p in weights], "weight_bytes": sum(p.stat().st_size for p in weights)}


def inspect_checkpoint(directory: Path) -> dict[str, Any]:
    ckpt = Checkpoint.open(directory)
    summary = summarize_checkpoint(ckpt.config, ckpt.tower)
    return {"kind": "checkpoint", "path": str(directory), **summary.to_dict(), **_files(directory)}


def inspect_path(path: Path) -> dict[str, Any]:
    """Report on a checkpoint directory or a bundle directory."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeMoEError(f"{path} is not a directory (expected a checkpoint or a bundle)")
    if (path / "manifest.json").is_file():
        from edgemoe.export.bundle_report import inspect_bundle  # noqa: PLC0415 - bundle side

        return inspect_bundle(path)
    return inspect_checkpoint(path)


def _billions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n:,}"


def _experts_line(report: dict[str, Any]) -> str:
    counts = ", ".join(map(str, sorted(set(report["experts_per_layer"]))))
    line = f"{counts} routed per MoE layer, top-{report['top_k']}"
    if report.get("shared_expert_params"):
        line += f", plus shared experts ({report['shared_expert_params']:,} params, always on)"
    dense = report.get("dense_layers") or ()
    if dense:
        line += f"; dense layer(s) {', '.join(map(str, dense))}"
    return line


def _image_tokens(report: dict[str, Any]) -> str:
    most = report.get("max_image_tokens", 0)
    return f"{report['image_tokens']}..{most} (tiled)" if most else str(report["image_tokens"])


def kv_cache_line(values: int, expanded: int, value_bytes: int = 4) -> str:
    """Bytes the runtime's cache takes per position at `value_bytes` a value (fp32 4, fp16 2), against
    the expanded form where MLA compresses (a checkpoint's line at fp32; a bundle's at its cache type)."""
    kind = "fp16" if value_bytes == 2 else "fp32"
    line = f"{values:,} values = {format_bytes(value_bytes * values)} per position ({kind})"
    if expanded and expanded != values:
        line += f"; uncompressed keys and values would be {expanded:,} = {format_bytes(value_bytes * expanded)}"
    return line


def render_inspection(report: dict[str, Any], console: Console) -> None:
    if report.get("kind") == "bundle":
        from edgemoe.export.bundle_report import render_bundle  # noqa: PLC0415

        render_bundle(report, console)
        return
    t = Table(title=f"{report['model_type']}  ({report['path']})", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    moe = report["moe_layers"]
    e = report["expert"]
    rows = [
        ("family", report["family"]),
        ("decoder layers", f"{report['num_layers']} (hidden {report['hidden_size']}, ffn {report['intermediate_size']})"),
        ("MoE layers", f"{len(moe)}: {', '.join(map(str, moe))}"),
        ("experts", _experts_line(report)),
        ("routing", report.get("routing") or f"top-{report['top_k']}"),
        ("attention", report.get("attention", "mha")),
        ("KV cache", kv_cache_line(report.get("kv_values_per_position", 0),
                                   report.get("expanded_kv_values_per_position", 0))),
        ("parameters", f"{report.get('all_params', 0):,} in all (LLM, vision tower, projector)"),
        ("LLM parameters", f"{_billions(report['total_params'])} total, {_billions(report['active_params'])} active, "
                           f"{_billions(report.get('token_params', 0))} read per decoded token"),
        ("one expert", f"{e['params']:,} params: fp16 {format_bytes(e['fp16_bytes'])}, "
                       f"int8 {format_bytes(e['int8_bytes'])}, int4 {format_bytes(e['int4_bytes'])}"),
        ("vision tower", f"{report['vision_tower']} ({report['vision_kind']}, {_billions(report['vision_params'])}, "
                         f"{_image_tokens(report)} image tokens)"),
        ("weights on disk", f"{len(report['weight_files'])} file(s), {format_bytes(report['weight_bytes'])}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
