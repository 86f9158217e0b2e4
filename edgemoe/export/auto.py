"""`--precision auto`: per-expert precisions measured on calibration data (EdgeMoE's method, via quant.policy).

Contract: `choose_expert_precisions(ckpt, cset, graphs, plan, options, vocab_rows)` embeds the
calibration set, prepares an `ExpertEvaluator` (the fp32 baseline) and hands `quant.policy.auto` its
three callables: the evaluator, the real file size of each built expert graph (`ExpertGraphs.size`),
and the budgets. It returns the `PolicyResult`; the graphs it measured stay in `graphs` for the bundle.
`progress(done, total, label)` is told of each evaluation; `total` is the policy's worst case
(1 + E sensitivities + a binary search per level), so a run may finish early.

Sensitivities: with up to MODEL_SENSITIVITY_MAX experts each is measured on the whole model (EdgeMoE's
method: one calibration run per expert, 48 for MoE-LLaVA); with more, each is the local error the
evaluator measures in its baseline pass (`ExpertEvaluator.local`), because one run per expert took
about 2 h for DeepSeek-VL2-Tiny's 704. Either only orders the experts: every assignment the search
keeps is measured on the whole model against the accuracy budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from edgemoe.export.calibration import CalibrationSet, embed_samples
from edgemoe.export.evaluator import ExpertEvaluator
from edgemoe.export.expert_graphs import ExpertGraphs
from edgemoe.export.options import ExportOptions, PrecisionPlan
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.quant.metrics import OutputError
from edgemoe.quant.policy import PolicyResult, auto
from edgemoe.quant.schemes import Precision, QuantError

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

MODEL_SENSITIVITY_MAX = 64  # experts above which sensitivities are measured locally (module docstring)


def expert_keys(ckpt: Checkpoint) -> list[ExpertKey]:
    moe = ckpt.config.moe
    return [ExpertKey(n, e) for n in moe.layers for e in range(moe.experts_in(n))]


def max_evaluations(experts: int, levels: int, local: bool = False) -> int:
    """The policy's worst case: baseline + one sensitivity per expert (none when measured locally) + per
    level a full try and a search."""
    return 1 + (0 if local else experts) + (levels - 1) * (2 + math.ceil(math.log2(max(experts, 1))))


def choose_expert_precisions(ckpt: Checkpoint, cset: CalibrationSet, graphs: ExpertGraphs, plan: PrecisionPlan,
                             options: ExportOptions, vocab_rows: int | None,
                             progress: Progress | None = None) -> tuple[PolicyResult, dict]:
    """The auto policy's result and a record of the run (calibration tokens, evaluations, seconds)."""
    t0 = time.monotonic()
    samples = embed_samples(ckpt, cset, options.max_image_tokens)
    keys = expert_keys(ckpt)
    local = len(keys) > MODEL_SENSITIVITY_MAX
    total = max_evaluations(len(keys), len(plan.levels), local)
    local_levels = plan.levels[1:] if local else ()
    with ExpertEvaluator(ckpt, samples, graphs, vocab_rows=vocab_rows, local_levels=local_levels) as ev:
        baseline_s = time.monotonic() - t0

        seen: list[OutputError] = []

        def evaluate(assignment: Mapping[ExpertKey, Precision]) -> OutputError:
            err = ev(assignment)
            seen.append(err)
            if progress is not None:
                progress(ev.evaluations, total, str(err))
            return err

        try:
            result = auto(keys, plan.levels, evaluate, graphs.size, options.accuracy_budget, options.size_budget,
                          plan.target, sensitivity=ev.local if local else None)
        except QuantError as exc:
            if seen and not options.accuracy_budget.allows(seen[0]):  # the all-top assignment already misses
                raise QuantError(f"{exc}; {plan.levels[0].value} is the highest level auto uses on target "
                                 f"{plan.target}: export with --precision fp32, or relax --accuracy-budget") from None
            raise
        layers_run = ev.layers_run
    record = {"levels": [p.value for p in plan.levels], "calibration": cset.describe(),
              "calibration_tokens": sum(s.length for s in samples),
              "compared_positions": sum(len(s.compare) for s in samples),
              "max_image_tokens": options.max_image_tokens, "evaluations": result.evaluations,
              "sensitivity_measure": "local: each expert's error on its own tokens, relative to its layer's output"
                             if local else "model: budget usage with the expert alone lowered",
              "decoder_layers_run": layers_run, "baseline_seconds": round(baseline_s, 2),
              "seconds": round(time.monotonic() - t0, 2),
              "measured": "experts only: the trunk is the fp32 reference during evaluation; trunk graphs are "
                          "validated one by one against their declared tolerance"}
    log.info("auto: %s in %d evaluations, %.0f s", _counts(result), result.evaluations, record["seconds"])
    return result, record


def _counts(result: PolicyResult) -> str:
    return ", ".join(f"{n} x {p.value}" for p, n in sorted(result.counts().items(), key=lambda kv: -kv[0].bits))
