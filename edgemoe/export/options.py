"""What an export is asked to do (`ExportOptions`) and which scheme each graph gets (`PrecisionPlan`).

Contract: `ExportOptions.parse(...)` turns CLI strings into a checked, frozen value, raising a
one-line `EdgeMoEError` for a bad precision, target, budget or size. `plan_precisions(options)` then
fixes every graph's scheme, the only place these rules live:

  uniform P   experts, attention, dense MLPs, head and projector at P; the vision tower at
              `--vision-precision`, by default P except int4 -> int8 on cpu (a 577-token prefill is
              compute bound, where int4's MatMulNBits is slower than int8's dynamic kernels on a CPU,
              onnxruntime-notes.md) and -> fp16 on cuda; the embedding table fp16 unless P is fp32;
              routers and norms always fp32 (routers ship as arrays, norms stay float in every graph);
              the KV cache fp16 unless P is fp32 (`--kv-cache`): half the memory a position costs, and
              ORT's CPU GroupQueryAttention decodes from fp16 no slower (about 10% faster at 700
              positions, 1.7x slower in prefill attention, which is a small part of prefill).
  auto        experts chosen per expert by `quant.policy.auto` over [int8, int4] on cpu, [fp16, int4]
              on cuda, inside the accuracy (and optional size) budget; trunk at int8 (cpu) / fp16 (cuda).
              Why not fp32 at the top on cpu: an fp32 expert is 4x the bytes of int8 and no faster on
              a CPU (int8 dynamic is the fastest CPU prefill format), while int8 moves an expert's
              output by 1-5% relative rms, far inside a top-1/KL budget; an offloading bundle pays for
              every byte it pages. If every expert at int8 already misses the budget, auto says so and
              `--precision fp32` is the answer.

Trunk graph builders compute in fp32 only (their KV cache and I/O are fp32): a trunk or vision scheme
computing in fp16 (fp16, or int4 for cuda) is built at fp32 instead, and the plan's `notes` say so
(the manifest records them). Experts have no such limit. fp16 on target cpu is allowed when asked
for explicitly, with a note: ORT on x86 casts it back to fp32, so it saves disk, not RAM or time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.offload.budget import parse_size as parse_budget_size
from edgemoe.quant.metrics import AccuracyBudget
from edgemoe.quant.schemes import TARGETS, Precision, Scheme

PRECISIONS = ("fp32", "fp16", "int8", "int4", "auto")
KV_CACHES = ("fp16", "fp32")
AUTO_LEVELS = {"cpu": (Precision.INT8, Precision.INT4), "cuda": (Precision.FP16, Precision.INT4)}
AUTO_TRUNK = {"cpu": Precision.INT8, "cuda": Precision.FP16}
def parse_size(text: str) -> int:
    """Bytes from '123456', '800MB', '1.5GB' (decimal) or '2GiB' (binary): the runtime's one parser."""
    return parse_budget_size(str(text))


def _precision(value: str, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise EdgeMoEError(f"unknown {what} {value!r}: expected one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class ExportOptions:
    """Everything `export_bundle` is asked, already validated (see `parse`)."""

    precision: str = "int4"  # fp32 | fp16 | int8 | int4 | auto
    target: str = "cpu"
    vision_precision: str | None = None  # None: the documented default (module docstring)
    accuracy_budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    size_budget: int | None = None  # bytes of all experts together (auto only)
    calibration_images: Path | None = None
    calibration_prompts: Path | None = None
    max_image_tokens: int | None = None  # cap image tokens per calibration image (auto only)
    kv_cache: str | None = None  # fp16 | fp32; None: the documented default (module docstring)
    overwrite: bool = False

    def __post_init__(self) -> None:
        _precision(self.precision, "precision", PRECISIONS)
        _precision(self.target, "target", TARGETS)
        if self.vision_precision is not None:
            _precision(self.vision_precision, "vision precision", PRECISIONS[:-1])
        if self.kv_cache is not None:
            _precision(self.kv_cache, "KV cache precision", KV_CACHES)
        if self.size_budget is not None and self.precision != "auto":
            raise EdgeMoEError("--size-budget applies to --precision auto only")

    @classmethod
    def parse(cls, precision: str = "int4", target: str = "cpu", vision_precision: str | None = None,
              accuracy_budget: str | None = None, size_budget: str | None = None, **kw: Any) -> "ExportOptions":
        """From CLI strings: budgets as 'top1=0.98,kl=0.02' and '1.5GB'."""
        budget = AccuracyBudget() if accuracy_budget is None else AccuracyBudget.parse(accuracy_budget)
        size = None if size_budget is None else parse_size(size_budget)
        return cls(precision=precision, target=target, vision_precision=vision_precision, accuracy_budget=budget,
                   size_budget=size, **kw)

    @property
    def is_auto(self) -> bool:
        return self.precision == "auto"


@dataclass(frozen=True)
class PrecisionPlan:
    """The scheme of every graph kind; experts get `experts` (uniform) or one of `levels` (auto)."""

    experts: Scheme | None  # None for auto
    levels: tuple[Precision, ...]  # auto's ladder, highest first; () for uniform
    trunk: Scheme  # attention, dense MLPs, head, projector
    vision: Scheme
    embed: Scheme
    target: str
    notes: tuple[str, ...] = ()
    kv_cache: str = "fp32"  # the attention graphs' KV cache element type

    @property
    def attention_check(self) -> Precision:
        """The tolerance an attention graph is validated at: its weights', or fp16's when an fp16 KV
        cache under fp32 weights is the looser of the two."""
        if self.kv_cache == "fp16" and self.trunk.precision is Precision.FP32:
            return Precision.FP16
        return self.trunk.precision

    def to_dict(self) -> dict[str, Any]:
        return {"experts": None if self.experts is None else self.experts.to_dict(),
                "levels": [p.value for p in self.levels], "trunk": self.trunk.to_dict(),
                "vision": self.vision.to_dict(), "embed": self.embed.to_dict(), "kv_cache": self.kv_cache,
                "notes": list(self.notes)}


def _trunk_scheme(precision: Precision, target: str, what: str, notes: list[str]) -> Scheme:
    scheme = Scheme.default(precision, target)
    if scheme.compute_dtype != np.float32:
        notes.append(f"{what}: {scheme.label} computes in fp16, which the trunk graph builders do not build "
                     f"yet: built at fp32")
        return Scheme.default(Precision.FP32, target)
    return scheme


def _default_vision(precision: Precision, target: str) -> Precision:
    if precision is Precision.INT4:
        return Precision.INT8 if target == "cpu" else Precision.FP16
    return precision


def plan_precisions(options: ExportOptions) -> PrecisionPlan:
    """Every graph's scheme for `options` (module docstring); QuantError for an impossible one."""
    target, notes = options.target, []
    if options.is_auto:
        levels = AUTO_LEVELS[target]
        trunk_p, experts = AUTO_TRUNK[target], None
    else:
        levels, trunk_p = (), Precision.parse(options.precision)
        experts = Scheme.default(trunk_p, target)
        if trunk_p is Precision.FP16 and target == "cpu":
            notes.append("fp16 on target cpu: ORT on x86 casts fp16 weights back to fp32 (half the disk, "
                         "not less RAM or time)")
    vision_p = (Precision.parse(options.vision_precision) if options.vision_precision
                else _default_vision(trunk_p, target))
    embed_p = Precision.FP32 if trunk_p is Precision.FP32 else Precision.FP16
    kv_cache = options.kv_cache or ("fp32" if trunk_p is Precision.FP32 else "fp16")
    return PrecisionPlan(experts=experts, levels=levels, trunk=_trunk_scheme(trunk_p, target, "trunk", notes),
                         vision=_trunk_scheme(vision_p, target, "vision tower", notes),
                         embed=Scheme.default(embed_p, target), target=target, notes=tuple(notes), kv_cache=kv_cache)
