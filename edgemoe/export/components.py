"""Reference components (torch, fp32) built one at a time from a checkpoint, and their graph weights.

Contract: the exporter never holds the whole model. Each function here reads only the canonical
tensors one component needs (`Checkpoint.tensor`, pread, no mmap) and returns either a torch module
of `edgemoe.reference` (built on the meta device, weights adopted without a copy) or the stripped
tensor dict a graph builder takes. Callers drop what they get as soon as they are done with it, so
peak memory is one component, not the model. Imports torch.

    weights(ckpt, "layers.3.")          {"attn_norm.weight": ..., "attn.q.weight": ..., ...}
    decoder_layer(ckpt, 3, experts=())  DecoderLayer with attention, norms, router / dense MLP;
                                        only the listed experts get real weights (others stay meta)
    vision_tower / projector / head     VisionTower, Projector, LMHead
    embed_rows(ckpt, ids)               the embedding rows of `ids` (reads the table once, keeps rows)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from edgemoe.errors import CheckpointError
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.quant.graphs import MlpWeights
from edgemoe.reference.decoder import DecoderLayer
from edgemoe.reference.layers import MLP
from edgemoe.reference.model import LMHead, module_key
from edgemoe.reference.projector import Projector
from edgemoe.reference.vision import VisionTower

M = TypeVar("M", bound=nn.Module)


def weights(ckpt: Checkpoint, prefix: str, keep: Callable[[str], bool] = lambda _: True) -> dict[str, np.ndarray]:
    """Canonical tensors under `prefix`, with the prefix stripped (and filtered by `keep(stripped)`)."""
    return {name[len(prefix):]: ckpt.tensor(name) for name in ckpt.names
            if name.startswith(prefix) and keep(name[len(prefix):])}


class LazyTensors(Mapping[str, np.ndarray]):
    """`weights(...)` read on access instead of up front: a graph builder that consumes tensors one by one
    (transpose, copy into the graph, drop) then never holds more than one source tensor at a time, which
    for the 1.2 GB vision tower or the 0.8 GB lm_head is the difference between one copy and two."""

    def __init__(self, ckpt: Checkpoint, prefix: str, keep: Callable[[str], bool] = lambda _: True,
                 extra: Mapping[str, Callable[[], np.ndarray]] | None = None) -> None:
        self._ckpt, self._prefix = ckpt, prefix
        self._names = {n[len(prefix):]: n for n in ckpt.names if n.startswith(prefix) and keep(n[len(prefix):])}
        self._extra = dict(extra or {})

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._extra:
            return self._extra[key]()
        return self._ckpt.tensor(self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter([*self._names, *self._extra])

    def __len__(self) -> int:
        return len(self._names) + len(self._extra)

    def __contains__(self, key: object) -> bool:
        return key in self._names or key in self._extra


def _tensor(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy shares the buffer; a read-only array (never from Checkpoint.tensor) is copied.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def adopt(factory: Callable[[], M], state: dict[str, np.ndarray], partial: Iterable[str] = ()) -> M:
    """`factory()` built on the meta device, then given `state` (module keys -> arrays) by assignment.

    Every parameter must be in `state` except those under a prefix in `partial`, which stay on the
    meta device: calling them is an error, which is the point (an expert nobody loaded)."""
    with torch.device("meta"):
        module = factory()
    want = dict(module.state_dict())
    unexpected = sorted(set(state) - set(want))
    if unexpected:
        raise CheckpointError(f"{type(module).__name__} has no place for tensor {unexpected[0]!r}")
    prefixes = tuple(partial)
    missing = sorted(k for k in want if k not in state and not (prefixes and k.startswith(prefixes)))
    if missing:
        raise CheckpointError(f"{type(module).__name__} is missing tensor {missing[0]!r}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise CheckpointError(f"tensor {key} has shape {list(value.shape)}, expected {list(want[key].shape)}")
    module.load_state_dict({k: _tensor(v) for k, v in state.items()}, strict=False, assign=True)
    return module.requires_grad_(False).eval()


def decoder_layer(ckpt: Checkpoint, index: int, experts: Iterable[int] | None = None) -> DecoderLayer:
    """Decoder block `index` in fp32. `experts`: the experts to load on a MoE layer (None = all)."""
    cfg, prefix = ckpt.config, f"layers.{index}."
    wanted = None if experts is None else {f"experts.{e}." for e in experts}

    def keep(name: str) -> bool:
        return wanted is None or not name.startswith("experts.") or name.startswith(tuple(wanted))

    state = {module_key(prefix + k)[len(prefix):]: v for k, v in weights(ckpt, prefix, keep).items()}
    return adopt(lambda: DecoderLayer(cfg, index), state, partial=("moe.experts.",) if wanted is not None else ())


def expert_weights(ckpt: Checkpoint, key: ExpertKey) -> MlpWeights:
    return MlpWeights.from_tensors(weights(ckpt, key.canonical_prefix), "")


def expert_module(ckpt: Checkpoint, key: ExpertKey) -> MLP:
    cfg = ckpt.config
    return adopt(lambda: MLP.for_config(cfg), weights(ckpt, key.canonical_prefix))


def vision_tower(ckpt: Checkpoint) -> VisionTower:
    """The tower up to the selected layer (later layers' tensors are not read)."""
    cfg, tower = ckpt.config, ckpt.tower.vision

    def make() -> VisionTower:
        return VisionTower(tower, cfg.mm_vision_select_layer, cfg.mm_vision_select_feature)

    with torch.device("meta"):
        wanted = set(make().state_dict())
    return adopt(make, weights(ckpt, "vision.", lambda name: name in wanted))


def projector(ckpt: Checkpoint) -> Projector:
    cfg = ckpt.config
    return adopt(lambda: Projector.for_config(cfg), weights(ckpt, "projector."))


def head_weights(ckpt: Checkpoint) -> LazyTensors:
    """final_norm.* + lm_head.* (the embedding as lm_head.weight for tied models), as build_head takes
    them, read on access."""
    tied = {} if ckpt.has("lm_head.weight") else {"lm_head.weight": lambda: ckpt.tensor("embed.weight")}
    return LazyTensors(ckpt, "", lambda n: n.startswith(("final_norm.", "lm_head.")), tied)


def head(ckpt: Checkpoint, rows: int | None = None) -> LMHead:
    """Final norm + lm_head; `rows` keeps only the first rows of lm_head (the tokenizer's vocabulary),
    which equals masking the rest and costs a fraction of the memory when the tokenizer is small."""
    w = dict(head_weights(ckpt))
    if rows is not None:
        w["lm_head.weight"] = np.ascontiguousarray(w["lm_head.weight"][:rows])
        if "lm_head.bias" in w:
            w["lm_head.bias"] = np.ascontiguousarray(w["lm_head.bias"][:rows])
    cfg = ckpt.config
    vocab, hidden = w["lm_head.weight"].shape
    bias = "lm_head.bias" in w
    state = {("norm." + k[len("final_norm."):]) if k.startswith("final_norm.") else "lm_head." + k[len("lm_head."):]: v
             for k, v in w.items()}

    def make() -> LMHead:
        module = LMHead(cfg, bias)
        module.lm_head = nn.Linear(hidden, vocab, bias=bias)
        return module

    return adopt(make, state)


def embed_rows(ckpt: Checkpoint, ids: np.ndarray) -> np.ndarray:
    """embed.weight[ids] as fp32 [len(ids), H]; the table is read once and dropped."""
    table = ckpt.tensor("embed.weight")
    return np.ascontiguousarray(table[np.asarray(ids, dtype=np.int64)])
