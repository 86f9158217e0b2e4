"""Quantization schemes: how one weight tensor is stored in an exported graph, and what that costs.

Contract: a `Scheme` is a frozen value naming a precision plus the knobs the ORT kernels care about
(int4 block size, symmetry, MatMulNBits accuracy_level, int8 per-channel / reduce-range) and the
target ("cpu" | "cuda"). It knows three things and nothing else:
  * `compute_dtype`: the dtype the graph computes in (graph I/O is always float32);
  * `tolerance`: the declared error an exported graph may show against a float64/torch reference;
  * `bytes_for(shape, scheme)`: the bytes the built graph's initializers occupy for one tensor given in
    torch layout ([out, in] for a Linear weight, [out] for a bias), so budgets can be planned before
    anything is built. Which expert gets which scheme is `policy.py`'s business, not this module's.
The defaults are portable choices, not one machine's best: see `Scheme.default`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from edgemoe.errors import EdgeMoEError

TARGETS = ("cpu", "cuda")


class QuantError(EdgeMoEError):
    """A scheme is invalid, a graph was not quantized as asked, or a policy budget cannot be met."""


class Precision(str, enum.Enum):
    """Storage precision of a weight, highest first in declaration order."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}[self.value]

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)

    @classmethod
    def parse(cls, value: "Precision | str") -> "Precision":
        """A Precision from its name ('int4'), as a one-line QuantError when unknown."""
        try:
            return cls(value)
        except ValueError:
            raise QuantError(f"unknown precision {value!r}: expected one of "
                             f"{', '.join(p.value for p in cls)}") from None


@dataclass(frozen=True)
class Tolerance:
    """Declared agreement of a graph's output with its reference, relative to the reference's scale.

    Relative metrics because expert outputs range from 1e-3 to 1e2 depending on the model and layer;
    rms bounds the typical error, max bounds outliers (int4 blocks with one large weight).
    """

    rel_rms: float
    rel_max: float

    def errors(self, candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
        """(relative rms error, relative max error) of candidate vs reference, in float64."""
        ref = np.asarray(reference, dtype=np.float64)
        diff = np.asarray(candidate, dtype=np.float64) - ref
        rms_ref = float(np.sqrt(np.mean(ref**2))) or 1.0
        max_ref = float(np.max(np.abs(ref))) if ref.size else 1.0
        return float(np.sqrt(np.mean(diff**2))) / rms_ref, float(np.max(np.abs(diff), initial=0.0)) / (max_ref or 1.0)

    def check(self, candidate: np.ndarray, reference: np.ndarray, what: str = "graph") -> None:
        """Raise QuantError when candidate differs from reference by more than declared."""
        rms, mx = self.errors(candidate, reference)
        if rms > self.rel_rms or mx > self.rel_max:
            raise QuantError(
                f"{what} differs from its reference: relative rms {rms:.3g} (allowed {self.rel_rms:g}), "
                f"relative max {mx:.3g} (allowed {self.rel_max:g})"
            )


# Validation catches broken graphs (wrong layout, missing bias, wrong activation: relative error ~1),
# not quantization noise, which the policy's accuracy budget judges on model outputs. Measured on
# random Gaussian experts (tests, bench/quant_formats.py), relative rms: fp32 5e-7, fp16 3.6e-4, int8
# per-channel 1.5-4.6e-2 (dominated by ORT quantizing the activations per tensor, which outliers in
# real hidden states make worse: hence the wide margin), int4 block-128 symmetric 0.15-0.18.
# A small bias dropped from an int4 graph hides in that noise; the quantizers only swap MatMuls, so
# the exporter should also validate each graph's fp32 build, whose tight tolerance vouches for the
# structure every scheme shares (tests/test_quant_graphs.py::test_tolerances_reject_wrong_graphs).
TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(rel_rms=1e-5, rel_max=1e-4),
    Precision.FP16: Tolerance(rel_rms=5e-3, rel_max=1e-2),
    Precision.INT8: Tolerance(rel_rms=0.15, rel_max=0.3),
    Precision.INT4: Tolerance(rel_rms=0.35, rel_max=0.5),
}


@dataclass(frozen=True)
class Scheme:
    """How one graph's weights are stored and computed (see module docstring)."""

    precision: Precision
    block_size: int = 128  # int4 only: weights per (column, block) sharing one scale
    symmetric: bool = True  # int4 only: no zero points (smaller, and the fastest MLAS path)
    accuracy_level: int = 4  # int4 only: 4 = int8 activations in MatMulNBits; lower is a slow CPU path
    per_channel: bool = True  # int8 only: one scale per output column instead of per tensor
    # int8 only: 7-bit weights. Per ORT's docs, x86 CPUs without VNNI run u8s8 via VPMADDUBSW, which can saturate;
    # 7 bits avoid that at a small accuracy cost. On by default because a bundle must be right on every CPU it
    # runs on: with 8 bits, a tiny StableLM expert missed the int8 tolerance on an AVX2-only AMD EPYC (relative
    # rms 0.25, 0.15 allowed) while passing on AVX-512 VNNI machines.
    reduce_range: bool = True
    target: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.target not in TARGETS:
            raise QuantError(f"unknown target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.precision is Precision.INT4 and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise QuantError(f"int4 block_size must be a power of two >= 16, got {self.block_size}")
        if self.precision is Precision.INT8 and self.target == "cuda":
            # DynamicQuantizeMatMul / MatMulInteger have no CUDA kernel: they would run on the CPU.
            raise QuantError("int8 dynamic quantization has no CUDA kernel: use fp16 or int4 for target cuda")

    @classmethod
    def default(cls, precision: Precision | str, target: str = "cpu") -> "Scheme":
        """The portable scheme for a precision: int4 block 128 symmetric accuracy_level 4, int8 per-channel."""
        return cls(Precision.parse(precision), target=target)

    @property
    def compute_dtype(self) -> np.dtype:
        """dtype the graph computes in. fp16 graphs are for GPUs: ORT on x86 casts them back to fp32."""
        half = self.precision is Precision.FP16 or (self.precision is Precision.INT4 and self.target == "cuda")
        return np.dtype(np.float16 if half else np.float32)

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.precision]

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. 'int4-b128-sym-acc4@cpu'."""
        if self.precision is Precision.INT4:
            sym = "sym" if self.symmetric else "asym"
            return f"int4-b{self.block_size}-{sym}-acc{self.accuracy_level}@{self.target}"
        if self.precision is Precision.INT8:
            gran = "pc" if self.per_channel else "pt"
            return f"int8-{gran}{'-rr' if self.reduce_range else ''}@{self.target}"
        return f"{self.precision.value}@{self.target}"

    def with_target(self, target: str) -> "Scheme":
        return replace(self, target=target)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precision"] = self.precision.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scheme":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def bytes_for(shape: tuple[int, ...], scheme: Scheme) -> int:
    """Initializer bytes one tensor occupies in a graph built with `scheme`.

    `shape` is torch layout: (out, in) for a Linear weight, (out,) for a bias. Only 2-D weights are
    quantized; biases (and any 1-D tensor) stay in the compute dtype, as the builders store them.
    """
    numel = math.prod(shape)
    float_bytes = scheme.compute_dtype.itemsize
    if len(shape) != 2 or not scheme.precision.is_integer:
        return numel * float_bytes
    out_f, in_f = shape
    if scheme.precision is Precision.INT8:
        # int8 weights + fp32 scale + int8 zero point, per output column or per tensor.
        groups = out_f if scheme.per_channel else 1
        return numel + groups * (4 + 1)
    return _int4_bytes(out_f, in_f, scheme, float_bytes)


def _int4_bytes(out_f: int, in_f: int, scheme: Scheme, scale_bytes: int) -> int:
    """MatMulNBits layout: [N, k_blocks, block/2] packed nibbles, [N, k_blocks] scales, packed zero points."""
    k_blocks = -(-in_f // scheme.block_size)
    packed = out_f * k_blocks * (scheme.block_size // 2)
    scales = out_f * k_blocks * scale_bytes
    zero_points = 0 if scheme.symmetric else out_f * -(-k_blocks // 2)
    return packed + scales + zero_points
