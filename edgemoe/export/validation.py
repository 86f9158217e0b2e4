"""Export-time validation: every graph run in ORT against its torch reference at a declared tolerance.

Contract: `check(graph, precision, candidate, reference)` compares each named output of a graph with
the reference's, using the precision's declared `quant.schemes.Tolerance` (relative rms and relative
max error, relative to the reference's own scale), and returns a `GraphCheck` for the worst output; a
graph out of tolerance raises `GraphValidationError`, one line naming the graph, the output, the
errors and the tolerance. `GraphCheck.validation()` is what the manifest records: the measured max
abs error against the absolute tolerance it implies (allowed rel_max x max|reference|), with both
relative errors and their allowances in the metric string (`bundle_report.parse_metric` reads them), so
`Validation.passed` means exactly what the check enforced on max error.

Runners feed graphs the way the runtime will: `run_attention` calls an attention graph through the
runtime's own `AttentionCall` on a preallocated cache, a prefill of all but the last token followed by
a one-token decode, so the in-place KV update is validated, not only the prefill.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgemoe.attention_ports import PAST_KEY
from edgemoe.bundle import Validation
from edgemoe.errors import EdgeMoEError
from edgemoe.model.config import KVLayout
from edgemoe.quant.schemes import Precision, Tolerance, TOLERANCES
from edgemoe.offload.sessions import cache_dtype
from edgemoe.runtime.attention_call import AttentionCall
from edgemoe.runtime.kv_cache import KVCache


class GraphValidationError(EdgeMoEError):
    """An exported graph disagrees with the torch reference by more than its precision allows."""


@dataclass(frozen=True)
class GraphCheck:
    """The worst output of one graph against its reference."""

    graph: str
    precision: Precision
    output: str
    rel_rms: float
    rel_max: float
    max_abs: float
    ref_max: float  # max |reference| of that output
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return self.rel_rms <= self.tolerance.rel_rms and self.rel_max <= self.tolerance.rel_max

    @property
    def usage(self) -> float:
        """Fraction of the tolerance used (the larger of rms and max): 1.0 is at the limit."""
        return max(self.rel_rms / self.tolerance.rel_rms, self.rel_max / self.tolerance.rel_max)

    def validation(self) -> Validation:
        metric = (f"max_abs;output={self.output};rel_rms={self.rel_rms:.4g};rel_max={self.rel_max:.4g};"
                  f"allowed_rel_rms={self.tolerance.rel_rms:g};allowed_rel_max={self.tolerance.rel_max:g}")
        return Validation(tolerance=float(self.tolerance.rel_max * (self.ref_max or 1.0)),
                          max_abs_error=float(self.max_abs), metric=metric)

    def describe(self) -> str:
        return (f"{self.graph} ({self.precision.value}) output {self.output!r}: relative rms {self.rel_rms:.3g} "
                f"(allowed {self.tolerance.rel_rms:g}), relative max {self.rel_max:.3g} (allowed "
                f"{self.tolerance.rel_max:g}), max abs error {self.max_abs:.3g} (tolerance "
                f"{self.tolerance.rel_max * (self.ref_max or 1.0):.3g})")


def _one(graph: str, precision: Precision, output: str, cand: np.ndarray, ref: np.ndarray) -> GraphCheck:
    cand, ref = np.asarray(cand), np.asarray(ref)
    if cand.shape != ref.shape:
        raise GraphValidationError(f"{graph}: output {output!r} has shape {list(cand.shape)}, "
                                   f"the reference {list(ref.shape)}")
    if not np.all(np.isfinite(cand)):
        raise GraphValidationError(f"{graph}: output {output!r} holds NaN or inf")
    tol = TOLERANCES[precision]
    rel_rms, rel_max = tol.errors(cand, ref)
    max_abs = float(np.max(np.abs(cand.astype(np.float64) - ref), initial=0.0))
    return GraphCheck(graph, precision, output, rel_rms, rel_max, max_abs, float(np.max(np.abs(ref), initial=0.0)),
                      tol)


def check(graph: str, precision: Precision, candidate: Mapping[str, np.ndarray],
          reference: Mapping[str, np.ndarray]) -> GraphCheck:
    """Compare every output in `reference`; raise GraphValidationError when one is out of tolerance."""
    precision = Precision.parse(precision)
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise GraphValidationError(f"{graph}: the graph has no output(s) {', '.join(missing)}")
    checks = [_one(graph, precision, k, candidate[k], v) for k, v in reference.items()]
    worst = max(checks, key=lambda c: c.usage)
    for c in checks:
        if not c.passed:
            raise GraphValidationError(f"{c.describe()}: the exported graph does not match the torch reference")
    return worst


# -- running graphs as the runtime does ---------------------------------------------------------

def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


def _cache_length(sess: ort.InferenceSession, needed: int) -> int:
    """The positions a cache buffer must hold: a graph that fixes its cache length gets exactly that."""
    dims = {i.name: i.shape for i in sess.get_inputs()}.get(PAST_KEY, [None] * 4)
    return dims[2] if isinstance(dims[2], int) else needed


def run_attention(sess: ort.InferenceSession, x: np.ndarray, layout: KVLayout) -> dict[str, np.ndarray]:
    """h and m [1, S, H] of an attention graph on x [1, S, H]: prefill S-1 tokens, then decode one,
    through the runtime's own call (`runtime.attention_call`) on a zeroed cache of the graph's type."""
    s = x.shape[1]
    max_len = _cache_length(sess, s)
    if max_len < s:
        raise GraphValidationError(f"attention cache holds {max_len} positions, the validation sequence {s}")
    cache, call = KVCache(1, layout, max_len, cache_dtype(sess)), AttentionCall(sess, "attention")
    steps = [(0, s - 1), (s - 1, s)] if s > 1 else [(0, s)]
    outs: dict[str, list[np.ndarray]] = {"h": [], "m": []}
    for start, stop in steps:
        h, m = call(0, x[0, start:stop], cache)
        cache.advance(stop - start)
        outs["h"].append(h[None])
        outs["m"].append(m[None])
    return {k: np.concatenate(v, axis=1) for k, v in outs.items()}
