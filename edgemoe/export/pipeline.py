"""`export_bundle`: a MoE-LLaVA checkpoint -> a validated bundle of per-graph, per-expert-precision ONNX files.

Contract: `export_bundle(checkpoint, out, options, progress)` is the one call behind `edgemoe export`:

  1. resolve the checkpoint (a directory, or a hub id: `hub.resolve_checkpoint`) and open it lazily;
  2. plan every graph's scheme (`options.plan_precisions`); build the calibration set;
  3. auto only: choose each expert's precision by measurement (`auto.choose_expert_precisions`);
  4. inside a `BundleWriter` (temp dir + rename: an error or Ctrl-C leaves nothing behind), write every
     graph validated against the torch reference (`graph_export.GraphExporter`), the routers as fp32
     arrays (`routers.safetensors`, canonical names `layers.N.router.weight`), the tokenizer files,
     and the manifest (model, vision, processor, prompt template, tokenizer, target, policy + stats).

Expert graphs are built once into a scratch directory (`ExpertGraphs`) and the bundle receives those
exact bytes, so what auto measured is what ships. The library reports progress through
`progress(phase, done, total, label)` with phases "measuring" (auto's evaluations) and "exporting"
(one step per graph) and never prints. Memory: one component at a time (see graph_export).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemoe.bundle import BundleWriter, Manifest
from edgemoe.export.auto import choose_expert_precisions, expert_keys
from edgemoe.export.calibration import CalibrationSet, calibration_set
from edgemoe.export.expert_graphs import ExpertGraphs
from edgemoe.export.graph_export import GraphExporter, GraphRecord, graph_count
from edgemoe.export.hub import resolve_checkpoint
from edgemoe.export.memory import return_freed_memory
from edgemoe.export.options import ExportOptions, PrecisionPlan, plan_precisions
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.prompt import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, template_for
from edgemoe.model.tokenizer import PHI_FILES, TIKTOKEN_SPECS, Tokenizer, load_tokenizer
from edgemoe.quant.policy import PolicyResult, uniform

log = logging.getLogger(__name__)

ExportProgress = Callable[[str, int, int, str], None]  # (phase, done, total, label)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   *PHI_FILES, *(s.filename for s in TIKTOKEN_SPECS.values()))


@dataclass(frozen=True)
class ExportResult:
    """What `export_bundle` wrote."""

    path: Path
    manifest: Manifest
    seconds: float
    graphs: tuple[GraphRecord, ...]
    policy: PolicyResult | None

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def expert_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.manifest.experts().values():
            counts[entry.precision or "?"] = counts.get(entry.precision or "?", 0) + 1
        return counts

    def summary(self) -> str:
        """One line: where, how big, which precisions, how long."""
        experts = ", ".join(f"{n} {p}" for p, n in sorted(self.expert_counts().items()))
        from edgemoe.offload.budget import format_bytes

        return (f"wrote {self.path}: {format_bytes(self.total_bytes)}, {len(self.graphs)} graphs, experts {experts}, "
                f"target {self.manifest.target}, in {self.seconds:.0f} s")


def export_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                  progress: ExportProgress | None = None) -> ExportResult:
    """Export `checkpoint` to a bundle at `out` (module docstring)."""
    t0 = time.monotonic()
    report = progress or (lambda phase, done, total, label: None)
    return_freed_memory()
    ckpt = Checkpoint.open(resolve_checkpoint(checkpoint))
    cfg, tower = ckpt.config, ckpt.tower
    plan = plan_precisions(options)
    tokenizer = load_tokenizer(ckpt.directory, cfg.family)
    cset = calibration_set(tokenizer, cfg.family, tower.processor, cfg.image_aspect_ratio,
                           images_dir=options.calibration_images, prompts_file=options.calibration_prompts,
                           candidates=cfg.candidate_resolutions)
    sample = next(s for s in cset.samples if s.pixels is not None)
    with tempfile.TemporaryDirectory(prefix="edgemoe-experts-") as scratch:
        graphs = ExpertGraphs(ckpt, Path(scratch), options.target)
        policy, auto_record = None, None
        if options.is_auto:
            policy, auto_record = choose_expert_precisions(
                ckpt, cset, graphs, plan, options, len(tokenizer),
                lambda done, total, label: report("measuring", done, total, label))
            experts = dict(policy.assignment)
        else:
            experts = uniform(expert_keys(ckpt), plan.experts.precision, options.target)
        total, done = graph_count(ckpt), 0

        def step(name: str) -> None:
            nonlocal done
            done += 1
            report("exporting", done, total, name)

        with BundleWriter(out, overwrite=options.overwrite) as writer:
            exporter = GraphExporter(ckpt, writer, plan, experts, graphs, sample, step)
            records = exporter.run()
            writer.add_array_file("routers.safetensors", exporter.routers, role="router", precision="fp32")
            if exporter.layout:  # tiled images: the rows laid between and after image tokens
                writer.add_array_file("layout.safetensors", exporter.layout, role="image_layout", precision="fp32")
            files = [n for n in TOKENIZER_FILES if (ckpt.directory / n).is_file()]
            writer.add_tokenizer(ckpt.directory, files)
            stats = {"seconds": round(time.monotonic() - t0, 2), "checkpoint": str(checkpoint),
                     "validation_sample": sample.name, "expert_graph_builds": graphs.builds}
            manifest = writer.finish(
                model=cfg.to_dict(), target=options.target,
                vision={"name": tower.name, **tower.vision.to_dict(), "select_layer": cfg.mm_vision_select_layer,
                        "select_feature": cfg.mm_vision_select_feature},
                processor={**tower.processor.to_dict(), "image_aspect_ratio": cfg.image_aspect_ratio},
                prompt=prompt_block(cfg.family), tokenizer=tokenizer_block(cfg.family, tokenizer, files),
                policy=policy_block(options, plan, policy, auto_record, cset, stats))
    seconds = time.monotonic() - t0
    result = ExportResult(writer.target, manifest, seconds, tuple(records), policy)
    log.info("%s", result.summary())
    return result


# -- manifest blocks ------------------------------------------------------------------------------

def prompt_block(family: str) -> dict[str, Any]:
    t = template_for(family)
    return {"family": family, "template": t.name, "style": t.style, "system": t.system, "roles": list(t.roles),
            "sep": t.sep, "sep2": t.sep2, "stop_str": t.sep2, "image_token": IMAGE_TOKEN,
            "image_token_index": IMAGE_TOKEN_INDEX}


def tokenizer_block(family: str, tokenizer: Tokenizer, files: list[str]) -> dict[str, Any]:
    return {"family": family, "files": [f"tokenizer/{f}" for f in files], "len_tokenizer": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id}


def policy_block(options: ExportOptions, plan: PrecisionPlan, policy: PolicyResult | None,
                 auto_record: dict | None, cset: CalibrationSet, stats: dict) -> dict[str, Any]:
    block: dict[str, Any] = {"mode": "auto" if policy is not None else "uniform", "precision": options.precision,
                             "target": options.target, "plan": plan.to_dict(), "export": stats}
    if policy is None:
        block["experts"] = plan.experts.to_dict()
    else:
        block["auto"] = {**policy.to_dict(), **(auto_record or {})}
    block["calibration"] = cset.describe()
    return block

