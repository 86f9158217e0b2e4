"""Partition the model into graphs, validate each against the torch reference, write each to the bundle.

Contract: `GraphExporter(ckpt, writer, plan, experts, graphs, sample).run()` walks the model in data
order on one real calibration sample (an image prompt), one component at a time:

    vision -> projector -> embed -> splice -> for each layer: attention, dense MLP | experts -> head

For each graph it builds the graph from that component's checkpoint tensors, serializes it and drops
the proto, runs it in ORT on the component's real fp32 input (the image's pixels, the tower's
features, the prompt's ids, each layer's hidden states), runs the torch reference component on the
same input, checks the outputs at the graph's precision (`validation.check`, which raises on failure)
and only then adds the bytes to the bundle with their `Validation`. The reference output, never the
graph's, is what the next component gets, so every graph is judged on exactly the input the fp32
model gives it. Routers are collected as fp32 arrays for `routers.safetensors`. Everything a step
reads is dropped before the next, so peak memory is one component (the largest: lm_head).

Shape legend: S sample length, H hidden, Hv tower hidden, N image tokens, V vocabulary.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from edgemoe.bundle import BundleWriter
from edgemoe.bundle.writer import declared
from edgemoe.export import components, validation
from edgemoe.export.calibration import CalibrationSample
from edgemoe.export.expert_graphs import ExpertGraphs, cpu_session
from edgemoe.export.latent_attention_graph import build_latent_attention
from edgemoe.export.memory import trim
from edgemoe.export.options import PrecisionPlan
from edgemoe.export.trunk_graphs import build_attention, build_dense_mlp, build_embed, build_head, build_projector
from edgemoe.export.vision_graph import build_vision
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.prompt import IMAGE_TOKEN_INDEX
from edgemoe.quant.lowering import to_bytes
from edgemoe.quant.schemes import Precision, Scheme

log = logging.getLogger(__name__)

Step = Callable[[str], None]  # called with a graph's name once it is in the bundle
HEAD_ROWS = 64  # the head is validated on the last positions only: [S, V] logits are 400 KB a row at full size
_ATTN_PARTS = ("attn_norm.", "attn.", "mlp_norm.")


@dataclass(frozen=True)
class GraphRecord:
    """One graph written: its bundle name, role, precision, bytes and validation result."""

    name: str
    role: str
    bytes: int
    seconds: float
    check: validation.GraphCheck


def graph_count(ckpt: Checkpoint) -> int:
    """Graphs an export writes: vision, projector, embed, head, one attention per layer, MLPs, shared
    experts and experts."""
    cfg = ckpt.config
    shared = len(cfg.moe.layers) if cfg.moe.shared_intermediate else 0
    return 4 + cfg.num_layers + len(cfg.dense_layers) + shared + sum(cfg.moe.num_experts)


class GraphExporter:
    """One pass over the model that writes every graph (module docstring)."""

    def __init__(self, ckpt: Checkpoint, writer: BundleWriter, plan: PrecisionPlan, experts: Mapping[ExpertKey, Scheme],
                 graphs: ExpertGraphs, sample: CalibrationSample, step: Step | None = None) -> None:
        if sample.pixels is None or IMAGE_TOKEN_INDEX not in sample.ids:
            raise ValueError("graph validation needs an image prompt (the vision tower and projector run on it)")
        self.ckpt, self.cfg, self.writer, self.plan = ckpt, ckpt.config, writer, plan
        self.experts, self.graphs, self.sample = experts, graphs, sample
        self.step = step or (lambda name: None)
        self.records: list[GraphRecord] = []
        self.routers: dict[str, np.ndarray] = {}
        self.layout: dict[str, np.ndarray] = {}  # tiled layouts: the image_newline / view_separator rows

    def run(self) -> list[GraphRecord]:
        with torch.inference_mode():
            x = self._prompt()  # [S, H]
            for n in range(self.cfg.num_layers):
                x = self._layer(n, x)
                gc.collect()
                trim()
            self._head(x)
        return self.records

    # -- one graph ----------------------------------------------------------------------------

    def _add(self, name: str, role: str, scheme: Scheme, data: bytes, run: Callable, reference: Mapping,
             decls: tuple | None, t0: float, layer: int | None = None, expert: ExpertKey | None = None,
             check_as: Precision | None = None) -> None:
        """Run `data` in ORT via `run(session)`, check against `reference` (at the tolerance of
        `check_as`, else of the scheme's precision), then write it to the bundle."""
        sess = cpu_session(data)
        candidate = run(sess)
        del sess
        check = validation.check(name, check_as or scheme.precision, candidate, reference)
        inputs, outputs = decls if decls is not None else (None, None)
        if expert is not None:
            entry = self.writer.add_expert(expert, data, precision=scheme.precision.value,
                                           validation=check.validation(), inputs=inputs, outputs=outputs)
        else:
            entry = self.writer.add_graph(name, data, role=role, layer=layer, precision=scheme.precision.value,
                                          validation=check.validation(), inputs=inputs, outputs=outputs)
        trim()
        self.records.append(GraphRecord(entry.path, role, entry.size, time.monotonic() - t0, check))
        log.info("%s: %s, %.1f MB, rel rms %.2g, rel max %.2g, %.1f s, peak RSS so far %.2f GiB", entry.path,
                 scheme.label, entry.size / 1e6, check.rel_rms, check.rel_max, time.monotonic() - t0, _peak_rss_gb())
        self.step(name)

    def _trunk(self, name: str, role: str, scheme: Scheme, build: Callable[[], onnx.ModelProto], run: Callable,
               reference: Mapping, layer: int | None = None, check_as: Precision | None = None) -> None:
        t0 = time.monotonic()
        model = build()
        data, decls = _serialize(model)
        del model
        gc.collect()
        self._add(name, role, scheme, data, run, reference, decls, t0, layer=layer, check_as=check_as)

    # -- vision, projector, embedding ------------------------------------------------------------

    def _prompt(self) -> np.ndarray:
        """The sample's decoder input [S, H], having exported vision, projector and embed on the way."""
        feats = self._vision()
        image = self._projector(feats)
        text = self._embed()
        at = list(self.sample.ids).index(IMAGE_TOKEN_INDEX)
        return np.concatenate([text[:at], image, text[at:]])

    def _vision(self) -> np.ndarray:
        """The tower's features: [N, Hv] for one view, [T, N, Hv] for tiles."""
        cfg, tower, scheme = self.cfg, self.ckpt.tower.vision, self.plan.vision
        pixels = self.sample.views  # [T, 3, S, S]

        def build() -> onnx.ModelProto:
            return build_vision(tower, components.LazyTensors(self.ckpt, "vision."), scheme, cfg.mm_vision_select_layer,
                                cfg.mm_vision_select_feature)

        ref = components.vision_tower(self.ckpt)(torch.from_numpy(pixels)).numpy()  # [T, N, Hv]
        ref = ref if self.sample.grid is not None else ref[0]
        gc.collect()
        self._trunk("vision", "vision", scheme, build, lambda s: validation.run(s, {"pixel_values": pixels}),
                    {"features": ref})
        return ref

    def _projector(self, feats: np.ndarray) -> np.ndarray:
        """Projected image tokens [N, H]; tiles are projected [T, n, H], then laid out with the layout rows."""
        scheme, grid = self.plan.trunk, self.sample.grid
        proj = components.projector(self.ckpt)
        ref = proj(torch.from_numpy(feats)).numpy()  # [N, H] or [T, n, H]
        side = math.isqrt(feats.shape[1]) if grid is not None else None
        self._trunk("projector", "projector", scheme,
                    lambda: build_projector(self.cfg, components.LazyTensors(self.ckpt, "projector."), scheme, side),
                    lambda s: validation.run(s, {"features": feats}), {"embeds": ref})
        if grid is None:
            return ref
        self.layout = {"image_newline": proj.image_newline.numpy().copy(),
                       "view_separator": proj.view_separator.numpy().copy()}
        return proj.arrange(torch.from_numpy(ref), *grid).numpy()

    def _embed(self) -> np.ndarray:
        ids = np.asarray([i for i in self.sample.ids if i != IMAGE_TOKEN_INDEX], dtype=np.int64)
        t0, scheme = time.monotonic(), self.plan.embed
        table = self.ckpt.tensor("embed.weight")
        ref = np.ascontiguousarray(table[ids])  # [S_text, H]
        data, decls = _serialize(build_embed(self.cfg, table, scheme))
        del table
        gc.collect()
        self._add("embed", "embed", scheme, data, lambda s: validation.run(s, {"ids": ids}), {"embeds": ref},
                  decls, t0)
        return ref

    # -- decoder layers ---------------------------------------------------------------------------

    def _layer(self, n: int, x: np.ndarray) -> np.ndarray:
        """Export layer n's attention and MLP/experts on x [S, H]; return the reference layer's output."""
        layer = components.decoder_layer(self.ckpt, n)
        pos = torch.arange(x.shape[0])[None]
        h, m, _, _ = layer.attention_block(torch.from_numpy(x)[None], pos)  # [1, S, H] each
        scheme, cfg = self.plan.trunk, self.cfg
        build = build_attention if cfg.mla is None else build_latent_attention
        self._trunk(f"layer{n}.attn", "attention", scheme,
                    lambda: build(cfg, components.LazyTensors(self.ckpt, f"layers.{n}.",
                                                              lambda k: k.startswith(_ATTN_PARTS)), scheme,
                                  kv_cache=self.plan.kv_cache),
                    lambda s: validation.run_attention(s, x[None], cfg.kv_layout),
                    {"h": h.numpy(), "m": m.numpy()}, layer=n, check_as=self.plan.attention_check)
        m2 = m[0]
        if layer.is_moe:
            self.routers[f"layers.{n}.router.weight"] = layer.moe.router.weight.numpy().copy()
            if layer.moe.router.bias is not None:
                self.routers[f"layers.{n}.router.bias"] = layer.moe.router.bias.numpy().copy()
            for e, expert in enumerate(layer.moe.experts):
                self._expert(ExpertKey(n, e), m2, expert(m2).numpy())
            if layer.moe.shared is not None:  # always-on shared experts: a trunk graph of their own
                self._trunk(f"layer{n}.shared", "shared_mlp", scheme,
                            lambda: build_dense_mlp(cfg, components.LazyTensors(self.ckpt, f"layers.{n}.shared."),
                                                    scheme),
                            lambda s: validation.run(s, {"x": m2.numpy()}), {"y": layer.moe.shared(m2).numpy()},
                            layer=n)
        else:
            self._trunk(f"layer{n}.mlp", "dense_mlp", scheme,
                        lambda: build_dense_mlp(cfg, components.LazyTensors(self.ckpt, f"layers.{n}.mlp."), scheme),
                        lambda s: validation.run(s, {"x": m2.numpy()}), {"y": layer.mlp(m2).numpy()}, layer=n)
        return (h[0] + layer.ffn(m2)).numpy()

    def _expert(self, key: ExpertKey, m: torch.Tensor, ref: np.ndarray) -> None:
        t0, scheme = time.monotonic(), self.experts[key]
        data = self.graphs.data(key, scheme.precision)
        self._add(str(key), "expert", scheme, data, lambda s: validation.run(s, {"x": m.numpy()}), {"y": ref},
                  None, t0, expert=key)

    def _head(self, x: np.ndarray) -> None:
        rows = np.ascontiguousarray(x[-HEAD_ROWS:])  # [R, H]
        ref = components.head(self.ckpt)(torch.from_numpy(rows)).numpy()  # [R, V]
        gc.collect()
        scheme = self.plan.trunk
        self._trunk("head", "head", scheme, lambda: build_head(self.cfg, components.head_weights(self.ckpt), scheme),
                    lambda s: validation.run(s, {"h": rows}), {"logits": ref})


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _serialize(model: onnx.ModelProto) -> tuple[bytes, tuple]:
    """(bytes, (inputs, outputs) declarations): the writer then never re-parses the bytes."""
    inits = {t.name for t in model.graph.initializer}
    return to_bytes(model), (declared(model.graph.input, inits), declared(model.graph.output))
