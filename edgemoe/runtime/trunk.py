"""The resident part of the model: one ORT session per trunk graph of a bundle, and how to call each.

Contract: `Trunk.open(bundle)` opens every non-expert graph the manifest lists (vision, projector,
embed, head, `layer{N}.attn` for every layer, `layer{N}.mlp` for the dense ones) and checks the
attention graphs' cache shape against the model config. The embedding table is read in place from
embed.onnx where it is a plain fp16/fp32 table (`runtime.embedding`). `release_vision()` closes the
vision tower's session, which runs once per image; `encode_image` reopens it when an image comes. The methods are the graph contracts of
`edgemoe.export.trunk_graphs`, in numpy:

    embed(ids [S])                    -> [S, H]
    encode_image(ImageInput)          -> image rows [N, H]   (vision then projector; tiles laid out)
    shared_mlp(n, m [S, H])           -> [S, H] on MoE layers with shared experts, else None
    attention(n, x [S, H], cache)     -> h, m [S, H]; keys/values written into the cache in place
    dense_mlp(n, m [S, H])            -> [S, H]
    head(h [S, H])                    -> fp32 logits [S, V]

`attention` binds the layer's preallocated cache buffer through IOBinding (as both past_key and
present_key, or for MLA's rows interface its valid rows as input and the next S rows as output), so ORT
writes the S new rows at positions length..length+S-1 and copies nothing (onnxruntime-notes.md: a
past -> present graph otherwise copies the whole cache per token); a decoded token reuses one binding per layer (`runtime.attention_call`).
Attention sessions allocate from one shared arena (`offload.sessions.shared_arena_options`: an fp16
cache's per-call scratch would otherwise fault in fresh memory every token), shrunk after each prefill.
It does not advance the cache: the engine does, once every layer has written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgemoe.attention_ports import PAST_KEY, PAST_ROWS
from edgemoe.bundle import Bundle
from edgemoe.model.config import ModelConfig
from edgemoe.model.image import ImageInput
from edgemoe.model.safetensors_io import SafetensorsFile
from edgemoe.page_cache import drop_cached
from edgemoe.runtime.attention_call import AttentionCall, uses_rows
from edgemoe.runtime.embedding import MappedEmbedding
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.sessions import (RuntimeGraphError, cache_dtype, one_line, session_options, shared_arena_options,
                                     trunk_session)


LAYOUT_FILE = "layout.safetensors"


def arrange_tiles(tiles: np.ndarray, rows: int, cols: int, newline: np.ndarray, separator: np.ndarray) -> np.ndarray:
    """Projected tiles [1 + rows*cols, g*g, H], global first -> one image's rows [N, H]
    (edgemoe.reference.projector.TiledProjector.arrange, in numpy)."""
    t, gg, h = tiles.shape
    g = int(round(gg ** 0.5))
    if t != 1 + rows * cols or g * g != gg:
        raise RuntimeGraphError(f"{t} tiles of {gg} tokens do not make a global view plus a {rows} x {cols} grid")
    nl = np.asarray(newline, np.float32)
    glob = np.concatenate([tiles[0].reshape(g, g, h), np.broadcast_to(nl, (g, 1, h))], axis=1).reshape(-1, h)
    local = tiles[1:].reshape(rows, cols, g, g, h).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, h)
    local = np.concatenate([local, np.broadcast_to(nl, (rows * g, 1, h))], axis=1).reshape(-1, h)
    return np.concatenate([glob, np.asarray(separator, np.float32)[None], local])


def _run(sess: ort.InferenceSession, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as exc:
        raise RuntimeGraphError(f"graph {name} failed: {one_line(exc)}") from None


@dataclass
class Trunk:
    """Sessions of the trunk graphs (see module docstring)."""

    config: ModelConfig
    vision: ort.InferenceSession | None  # None: released (`release_vision`), reopened by encode_image
    projector: ort.InferenceSession
    embed_session: ort.InferenceSession | None  # None: the table is read in place (`embedding`)
    head_session: ort.InferenceSession | None  # None: the language model is not loaded yet
    attn: list[ort.InferenceSession]
    mlp: dict[int, ort.InferenceSession]
    shared: dict[int, ort.InferenceSession] = field(default_factory=dict)  # always-on shared experts
    layout: dict[str, np.ndarray] = field(default_factory=dict)  # tiled images: image_newline, view_separator
    embedding: MappedEmbedding | None = None  # the embed graph's table, mapped from the bundle
    reopen_vision: Callable[[], ort.InferenceSession] | None = None
    _load: Callable[[], None] | None = field(default=None, repr=False)
    _attention_calls: dict[int, AttentionCall] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, bundle: Bundle, progress: Callable[[str], None] | None = None,
             language_model: bool = True) -> "Trunk":
        """The trunk's sessions; with `language_model=False` only the image side (vision, projector,
        the mapped embedding) until `load_language_model()`, so a first image can be encoded before the
        language model's weights are resident (a memory budget's start-up peak is then the larger of
        the two, not their sum)."""
        cfg = bundle.manifest.model_config()
        so, arena = session_options(), shared_arena_options()  # attention: the shared arena (its fp16 scratch)

        def load(name: str) -> ort.InferenceSession:
            if progress is not None:
                progress(name)
            session = trunk_session(bundle.graph_path(name), arena if name.endswith(".attn") else so)
            for entry in bundle.manifest.files_of(bundle.manifest.graph(name)):  # ORT holds its own copy now:
                drop_cached(bundle.path_of(entry))  # one file at a time in the page cache (footprint)
            return session

        layout = {}
        if any(e.path == LAYOUT_FILE for e in bundle.manifest.by_role("image_layout")):
            f = SafetensorsFile(bundle.path_of(LAYOUT_FILE))
            layout = {name: f.tensor(name) for name in f.infos}
        embedding = MappedEmbedding.open(bundle.graph_path("embed"))
        # The vision tower opens on the first image it encodes (a prompt cache hit never needs it).
        trunk = cls(cfg, None, load("projector"), None, None, [], {}, {}, layout, embedding)
        trunk.reopen_vision = lambda: load("vision")
        trunk._load = lambda: trunk._open_language_model(load)
        if language_model:
            trunk.load_language_model()
        for entry in bundle.manifest.files:  # and nothing else of the bundle stays cached (layout, ...)
            drop_cached(bundle.path_of(entry))
        return trunk

    def load_language_model(self) -> None:
        """Open the language model's graphs (embed, attention, dense MLPs, shared experts, head) if
        `open` deferred them."""
        if self.head_session is None:
            if self._load is None:
                raise RuntimeGraphError("this trunk was built without its language model graphs")
            self._load()
            self._check_cache_shape()

    def _open_language_model(self, load: Callable[[str], ort.InferenceSession]) -> None:
        cfg = self.config
        self.shared = {n: load(f"layer{n}.shared") for n in cfg.moe.layers} if cfg.moe.shared_intermediate else {}
        self.embed_session = None if self.embedding else load("embed")
        self.head_session = load("head")
        self.attn = [load(f"layer{n}.attn") for n in range(cfg.num_layers)]
        self.mlp = {n: load(f"layer{n}.mlp") for n in cfg.dense_layers}

    def _check_cache_shape(self) -> None:
        layout = self.config.kv_layout
        dtypes = {cache_dtype(sess) for sess in self.attn}
        if len(dtypes) > 1:
            raise RuntimeGraphError(f"the attention graphs disagree on the KV cache's type ({', '.join(sorted(dtypes))})")
        for n, sess in enumerate(self.attn):
            if uses_rows(sess):  # [1, T, W]: the valid rows of one shared buffer
                width = next(i.shape for i in sess.get_inputs() if i.name == PAST_ROWS)[2]
                if not layout.shared or width != layout.heads * layout.dim:
                    raise RuntimeGraphError(f"graph layer{n}.attn reads cache rows of {width} values, expected "
                                            f"one shared buffer of {layout.heads * layout.dim}")
                continue
            shape = next(i.shape for i in sess.get_inputs() if i.name == PAST_KEY)
            if shape[1] != layout.heads or shape[3] != layout.dim:
                raise RuntimeGraphError(f"graph layer{n}.attn has a cache of shape {shape}, expected "
                                       f"[1, {layout.heads}, MAX, {layout.dim}]")
            if isinstance(shape[2], int):
                raise RuntimeGraphError(f"graph layer{n}.attn fixes the cache length at {shape[2]}; "
                                       "this runtime sizes it per request (re-export the bundle)")

    def release_vision(self) -> None:
        """Close the vision tower's session until the next image (its weights leave the process)."""
        if self.reopen_vision is not None:
            self.vision = None

    @property
    def vision_resident(self) -> bool:
        return self.vision is not None

    def _vision(self) -> ort.InferenceSession:
        if self.vision is None:
            if self.reopen_vision is None:
                raise RuntimeGraphError("the vision tower was released and cannot be reopened")
            self.vision = self.reopen_vision()
        return self.vision

    def new_cache(self, capacity: int) -> KVCache:
        """A KV cache for `capacity` positions, in the attention graphs' cache dtype."""
        cfg = self.config
        return KVCache(cfg.num_layers, cfg.kv_layout, capacity, cache_dtype(self.attn[0]))

    # -- graphs -----------------------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        if self.embedding is not None:  # the rows read in place (runtime.embedding)
            return self.embedding.rows(ids)  # [S, H]
        return _run(self.embed_session, "embed", {"ids": np.asarray(ids, np.int64)})[0]  # [S, H]

    def encode_image(self, image: ImageInput) -> np.ndarray:
        """One image -> its prompt rows [N, H]: the tower's features, projected; tiles laid out in 2D
        (global grid, view separator, local grid, image_newline after each row) as upstream does."""
        feats = _run(self._vision(), "vision", {"pixel_values": np.ascontiguousarray(image.pixels, np.float32)})[0]
        embeds = _run(self.projector, "projector", {"features": feats})[0]
        if image.grid is None:
            return embeds
        if not self.layout:
            raise RuntimeGraphError("this bundle has no layout.safetensors for tiled images")
        return arrange_tiles(embeds, *image.grid, self.layout["image_newline"], self.layout["view_separator"])

    def attention(self, n: int, x: np.ndarray, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        """x [S, H] at positions cache.length.. -> (h, m) [S, H]; writes rows into layer n's cache."""
        call = self._attention_calls.get(n)
        if call is None or call.session is not self.attn[n]:
            call = self._attention_calls[n] = AttentionCall(self.attn[n], f"layer{n}.attn")
        return call(n, x, cache, first=n == 0)

    def dense_mlp(self, n: int, m: np.ndarray) -> np.ndarray:
        return _run(self.mlp[n], f"layer{n}.mlp", {"x": np.ascontiguousarray(m)})[0]

    def shared_mlp(self, n: int, m: np.ndarray) -> np.ndarray | None:
        """Layer n's always-on shared experts on m [S, H], or None where the model has none."""
        sess = self.shared.get(n)
        return None if sess is None else _run(sess, f"layer{n}.shared", {"x": np.ascontiguousarray(m)})[0]

    def head(self, h: np.ndarray) -> np.ndarray:
        return _run(self.head_session, "head", {"h": np.ascontiguousarray(h)})[0]  # [S, V]
