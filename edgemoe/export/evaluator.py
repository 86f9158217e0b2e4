"""The auto policy's `evaluate(assignment) -> OutputError`: the model with some experts lowered, vs fp32.

Contract: `ExpertEvaluator(ckpt, samples, sessions, vocab_rows)` measures, on embedded calibration
samples (`calibration.embed_samples`), how far the model's logits move when the experts of an
assignment run at their precisions. Everything except those experts is the fp32 torch reference:
the budget judges the experts' quantization (the trunk graphs are validated one by one at export).
Lowered experts run as real ORT sessions of the graphs the bundle will contain (`ExpertGraphs`), so
dynamic activation quantization (int8, and int4's accuracy_level 4) is measured, not modelled.

Memory stays bounded on a 2.9B model: the decoder is streamed layer by layer from the checkpoint
(`components.decoder_layer`, built, used on every sample, dropped; expert weights are read only for
experts kept at fp32), and what is kept between evaluations is small: the reference logits at the
compared positions (columns below the tokenizer's length: masking the padded vocabulary with -inf
would make KL undefined, slicing is the same distribution), the final norm + lm_head rows, and hidden
states at MoE-layer inputs. Those states are cached by the assignment of every MoE layer before
them, so an evaluation restarts at the first MoE layer whose experts differ from a run already made:
the fp32 baseline's states are pinned, later runs' states are kept while they fit `cache_bytes`.
The sensitivity pass (one expert lowered at a time from a common assignment) then recomputes only
the layers from that expert's onward.

`local_levels` (optional) also measures each expert's *local* sensitivity during the fp32 baseline,
at no extra layer passes: at every MoE layer, each expert's lowered session runs on the tokens routed
to it, and `local[key][level]` is the energy its error adds to the layer's output, relative to that
output: sum over its tokens of (w * |y_lowered - y_fp32|)^2 / sum over all tokens of |layer output|^2.
It stands in for the model-level sensitivity (the two orders agree only roughly: Spearman 0.55 on the
tiny StableLM) for the price of one run per expert of its own tokens, instead of one calibration run
of every later layer per expert (2 h for 704 experts).

Shape legend: L sample length, T tokens of all samples, H hidden, P compared positions, V' = vocab_rows.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from edgemoe.export import components
from edgemoe.export.calibration import EmbeddedSample
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.quant.metrics import OutputError, compare_logits, merge
from edgemoe.quant.schemes import Precision
from edgemoe.reference.decoder import DecoderLayer

log = logging.getLogger(__name__)

States = list[np.ndarray]  # one [L, H] array per sample
Signature = tuple[tuple[Precision, ...], ...]  # per MoE layer, the precision of each of its experts


class ExpertSessions(Protocol):
    """Where lowered experts come from: `ExpertGraphs`, or a bundle's files in tests."""

    def session(self, key: ExpertKey, precision: Precision): ...


class ExpertEvaluator:
    """evaluate(assignment) for `quant.policy.auto` (module docstring). Call `prepare()` first."""

    def __init__(self, ckpt: Checkpoint, samples: Sequence[EmbeddedSample], sessions: ExpertSessions,
                 vocab_rows: int | None = None, cache_bytes: int = 1 << 30,
                 local_levels: Sequence[Precision] = ()) -> None:
        self.ckpt, self.cfg, self.samples, self.sessions = ckpt, ckpt.config, list(samples), sessions
        self.vocab_rows = vocab_rows
        self.moe_layers = tuple(sorted(self.cfg.moe.layers))
        self.cache_bytes = cache_bytes
        self._pinned: dict[tuple[int, Signature], States] = {}
        self._lru: OrderedDict[tuple[int, Signature], States] = OrderedDict()
        self._reference: list[np.ndarray] = []
        self._head = None
        self.evaluations = 0
        self.layers_run = 0
        self.local_levels = tuple(Precision.parse(p) for p in local_levels)
        self.local: dict[ExpertKey, dict[Precision, float]] = {}  # filled by prepare() (module docstring)
        self._measuring = False  # the baseline pass is running: measure local sensitivities

    @property
    def keys(self) -> list[ExpertKey]:
        return [ExpertKey(n, e) for n in self.moe_layers for e in range(self.cfg.moe.experts_in(n))]

    # -- setup ----------------------------------------------------------------------------------

    def prepare(self) -> "ExpertEvaluator":
        """The fp32 baseline: hidden states at every MoE layer's input (pinned) and reference logits."""
        if self._head is not None:
            return self
        self._head = components.head(self.ckpt, rows=self.vocab_rows)
        xs = [s.embeds for s in self.samples]
        for n in range(self.moe_layers[0]):  # dense layers before the first MoE layer run once, ever
            xs = self._layer(n, xs, None)
        fp32 = self._signature({})
        self._pinned[(0, ())] = xs
        self._measuring = bool(self.local_levels)
        try:
            self._reference = self._logits(self._walk(0, xs, fp32, pin=True))
        finally:
            self._measuring = False
        return self

    def close(self) -> None:
        self._pinned.clear()
        self._lru.clear()
        self._reference, self._head = [], None

    def __enter__(self) -> "ExpertEvaluator":
        return self.prepare()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- evaluate -------------------------------------------------------------------------------

    def __call__(self, assignment: Mapping[ExpertKey, Precision]) -> OutputError:
        """Output error of the model with `assignment`'s experts lowered (unlisted experts: fp32)."""
        self.prepare()
        t0 = time.monotonic()
        sig = self._signature(assignment)
        start = max(i for i in range(len(sig)) if self._cached(i, sig[:i]) is not None)
        final = self._walk(start, self._cached(start, sig[:start]), sig, pin=False)
        err = merge(compare_logits(r, c) for r, c in zip(self._reference, self._logits(final)))
        self.evaluations += 1
        log.info("evaluation %d: %s from MoE layer %d in %.1f s", self.evaluations, err,
                 self.moe_layers[start], time.monotonic() - t0)
        return err

    def _signature(self, assignment: Mapping[ExpertKey, Precision]) -> Signature:
        return tuple(tuple(Precision.parse(assignment.get(ExpertKey(n, e), Precision.FP32))
                           for e in range(self.cfg.moe.experts_in(n))) for n in self.moe_layers)

    def _walk(self, start: int, xs: States, sig: Signature, pin: bool) -> States:
        """Run decoder layers from MoE layer `start` to the end, caching states at later MoE inputs."""
        first = self.moe_layers[start]
        for n in range(first, self.cfg.num_layers):
            if n in self.moe_layers and n != first:
                i = self.moe_layers.index(n)
                self._store(i, sig[:i], xs, pin)
            layer_sig = sig[self.moe_layers.index(n)] if n in self.moe_layers else None
            xs = self._layer(n, xs, layer_sig)
        return xs

    # -- the state cache ------------------------------------------------------------------------

    def _cached(self, i: int, prefix: Signature) -> States | None:
        key = (i, prefix)
        if key in self._pinned:
            return self._pinned[key]
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        return None

    def _store(self, i: int, prefix: Signature, xs: States, pin: bool) -> None:
        key = (i, prefix)
        if key in self._pinned or key in self._lru:
            return
        if pin:
            self._pinned[key] = xs
            return
        self._lru[key] = xs
        while self._lru and sum(a.nbytes for v in self._lru.values() for a in v) > self.cache_bytes:
            self._lru.popitem(last=False)

    # -- one layer, every sample -----------------------------------------------------------------

    def _layer(self, n: int, xs: States, sig: tuple[Precision, ...] | None) -> States:
        """x -> h + ffn(m) for each sample; the MoE experts of all samples run batched together."""
        fp32_experts = [] if sig is None else [e for e, p in enumerate(sig) if p is Precision.FP32]
        layer = components.decoder_layer(self.ckpt, n, experts=fp32_experts)
        self.layers_run += 1
        with torch.inference_mode():
            hs, ms = [], []
            for x in xs:
                pos = torch.arange(x.shape[0])[None]
                h, m, _, _ = layer.attention_block(torch.from_numpy(x)[None], pos)
                hs.append(h[0])
                ms.append(m[0])
            if sig is None:
                ys = [layer.mlp(m) for m in ms]
            else:
                lengths = [m.shape[0] for m in ms]
                errors: dict[ExpertKey, dict[Precision, float]] = {}
                ys = list(torch.split(self._moe(layer, n, torch.cat(ms), sig, errors), lengths))
            out = [(h + y).numpy() for h, y in zip(hs, ys)]
            if sig is not None and self._measuring:
                energy = max(sum(float(np.square(o, dtype=np.float64).sum()) for o in out), 1e-30)
                self.local.update({k: {p: e / energy for p, e in lv.items()} for k, lv in errors.items()})
            return out

    def _moe(self, layer: DecoderLayer, n: int, m: torch.Tensor, sig: tuple[Precision, ...],
             errors: dict[ExpertKey, dict[Precision, float]]) -> torch.Tensor:
        """MoELayer.forward_routed with lowered experts swapped for their ORT sessions. m [T, H]. While
        measuring, `errors[key][level]` gets each routed expert's weighted squared error at each level."""
        routing = layer.moe.route(m)
        out = torch.zeros_like(m, dtype=torch.float32)
        for e, precision in enumerate(sig):
            token, slot = routing.tokens_of(e)
            if token.numel() == 0:
                continue
            key, w = ExpertKey(n, e), routing.weights[token, slot, None]
            y = layer.moe.experts[e](m[token]) if precision is Precision.FP32 else self._run(key, precision, m[token])
            out.index_add_(0, token, y.float() * w)
            if self._measuring and precision is Precision.FP32:
                errors[key] = {p: float((w * (self._run(key, p, m[token]) - y)).double().square().sum())
                               for p in self.local_levels}
        return out

    def _run(self, key: ExpertKey, precision: Precision, x: torch.Tensor) -> torch.Tensor:
        """The expert's lowered graph (what the bundle will hold) on rows `x`."""
        sess = self.sessions.session(key, precision)
        return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).float()

    def _logits(self, xs: States) -> list[np.ndarray]:
        """Logits [P, V'] at each sample's compared positions."""
        with torch.inference_mode():
            return [self._head(torch.from_numpy(x[s.compare])).numpy() for x, s in zip(xs, self.samples)]
