"""Generate a MoE-LLaVA checkpoint with random weights, in a family's exact published on-disk format.

Contract: `create_checkpoint(out_dir, family, size)` writes what a download of the published
checkpoint contains: config.json (the real key set, see `family_templates`), generation_config.json,
the family's tokenizer files (`tokenizer_files`), and the weights under the real on-disk names from
`names.family_tensors` (the same table the reader checks), in bf16 safetensors sharded at 5 GB with
HF's index when larger, vision tower included under the family's vision prefix as in the published
StableLM index. `weights_format="bin"` writes fp32 pickle shards plus `pytorch_model.bin.index.json`
instead (what Qwen's main branch ships). Tiny checkpoints (seconds, a few MB) carry their own tiny
tower as a directory (`mm_image_tower: "vision_tower"`); full-size ones name the published tower.

Weights are generated and written block by block, so memory stays flat however big the checkpoint
(see `weight_init` for the init scheme and its determinism). The directory appears atomically: it is
written into a temporary sibling renamed into place at the end, and removed on any failure or
interrupt. An existing non-empty `out_dir` is refused unless `overwrite=True`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import CheckpointError, ConfigError
from edgemoe.families import GENERATED_FAMILIES, GeneratedFamily, family_module
from edgemoe.model.config import ModelConfig, parse_config
from edgemoe.model.family_templates import (FAMILIES, FULL_DIMS, FULL_TOWER_NAMES, SIZES, TINY_DIMS, TINY_TOWERS,
                                            TOWERS, TokenIds, check_choice, dump_json, generation_config_json,
                                            model_config_json)
from edgemoe.model.names import TOWER_DIR_PREFIX, TensorSpec, family_tensors
from edgemoe.model.safetensors_io import ShardedWriter, ShardNameFn, bf16_to_f32, f32_to_bf16
from edgemoe.model.tokenizer_files import TokenizerInfo, write_tokenizer_files
from edgemoe.model.towers import BUILTIN_TOWERS, VisionTowerConfig, write_tower_directory
from edgemoe.model.weight_init import WeightInit

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]  # (bytes written, bytes in all, tensor being written)

TOWER_DIR = "vision_tower"  # tiny checkpoints: mm_image_tower, relative to the checkpoint
SAFETENSORS_SHARD_BYTES = 5 * 10**9  # HF's max_shard_size "5GB": StableLM's 4.99 + 1.41 GB
BIN_SHARD_BYTES = 10 * 10**9  # Qwen main's fp32 pickles: 9.96 + 3.5 GB
ST_METADATA = {"format": "pt"}  # what save_pretrained puts in every safetensors header


@dataclass(frozen=True)
class CreatedCheckpoint:
    """What `create_checkpoint` wrote."""

    path: Path
    family: str
    size: str
    total_bytes: int  # all files in the directory
    num_tensors: int  # tensors on disk (main checkpoint plus tower directory)
    files: tuple[str, ...]  # relative paths, sorted


@dataclass(frozen=True)
class DiskTensor:
    """One tensor as stored: its full on-disk name and the canonical tensors it holds (Qwen's
    c_attn holds q|k|v as row ranges; every other tensor holds exactly one)."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[str, ...]  # canonical names, in row order

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def create_checkpoint(out_dir: Path | str, family: str, size: str, *, seed: int = 0, tower: str | None = None,
                      weights_format: str = "safetensors", progress: ProgressFn | None = None,
                      overwrite: bool = False, tower_weights: str = "checkpoint",
                      shard_bytes: int | None = None) -> CreatedCheckpoint:
    """Write a random-weight `family` checkpoint of `size` ("tiny" | "full") into `out_dir`.

    tower: "clip" (default) or "siglip". tower_weights: "checkpoint" (under the vision prefix, as
    published) or "directory" (tiny only: `vision_model.*` in the tower directory's safetensors).
    shard_bytes: shard limit (default 5 GB safetensors, 10 GB bin). Same seed -> identical bytes.
    """
    tower = tower or "clip"
    generated = GENERATED_FAMILIES.get(family)
    if generated is None:
        _check_options(family, size, tower, weights_format, tower_weights)
    else:
        check_choice("size", size, SIZES)
        if weights_format != "safetensors" or tower_weights != "checkpoint":
            raise ConfigError(f"{family} checkpoints are bf16 safetensors with the tower inside")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()  # a sibling: the final rename stays on one filesystem
    try:
        if generated is None:
            num_tensors = _write_checkpoint(tmp, family, size, seed, tower, weights_format, tower_weights,
                                            shard_bytes, progress)
        else:
            num_tensors = _write_family_checkpoint(tmp, generated, size, seed, shard_bytes, progress)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = tuple(sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()))
    total = sum((out_dir / f).stat().st_size for f in files)
    log.info("wrote %s checkpoint %s (%d tensors, %d bytes)", family, out_dir, num_tensors, total)
    return CreatedCheckpoint(out_dir, family, size, total, num_tensors, files)


def _check_options(family: str, size: str, tower: str, weights_format: str, tower_weights: str) -> None:
    check_choice("family", family, FAMILIES + tuple(GENERATED_FAMILIES))
    check_choice("size", size, SIZES)
    check_choice("tower", tower, TOWERS)
    check_choice("weights_format", weights_format, ("safetensors", "bin"))
    check_choice("tower_weights", tower_weights, ("checkpoint", "directory"))
    if tower_weights == "directory" and size != "tiny":
        raise ConfigError("tower_weights='directory' needs size='tiny': full-size checkpoints name a hub tower")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; choose another path or pass overwrite=True")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to out_dir; an old out_dir is set aside first, then removed."""
    _check_target(out_dir, overwrite)  # again: something may have appeared while we wrote
    old = None
    if out_dir.is_dir():
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the checkpoint's contents --------------------------------------------------------------------


def _write_checkpoint(directory: Path, family: str, size: str, seed: int, tower: str, weights_format: str,
                      tower_weights: str, shard_bytes: int | None, progress: ProgressFn | None) -> int:
    """Phases: tokenizer -> tower -> configs -> weights. Returns the number of tensors written."""
    info = write_tokenizer_files(family, directory)
    vision, tower_name = _write_tower(directory, size, tower)
    config = _write_configs(directory, family, size, info, vision, tower_name)
    init = WeightInit(config, vision, seed, successor_ids(info), info.len_tokenizer)
    main, in_tower = plan_tensors(config, vision, tower_in_checkpoint=tower_weights == "checkpoint")
    total = sum(t.elements for t in main) * (2 if weights_format == "safetensors" else 4)
    total += sum(t.elements for t in in_tower) * 4
    meter = _Progress(progress, total)
    if weights_format == "safetensors":
        _write_safetensors(directory, main, init, "BF16", shard_bytes or SAFETENSORS_SHARD_BYTES, meter)
    else:
        _write_bin(directory, main, init, shard_bytes or BIN_SHARD_BYTES, meter)
    if in_tower:  # a tower directory as CLIPVisionModel.save_pretrained writes it: fp32, one file
        _write_safetensors(directory / TOWER_DIR, in_tower, init, "F32", 1 << 62, meter)
    return len(main) + len(in_tower)


def _write_family_checkpoint(directory: Path, generated: GeneratedFamily, size: str, seed: int,
                             shard_bytes: int | None, progress: ProgressFn | None) -> int:
    """A registry family: its own files module writes configs and tokenizer; weights as for any family."""
    module = family_module(generated.family)
    files = importlib.import_module(generated.files_module)
    raw, info = files.write_checkpoint_files(directory, generated.variant, size)
    config, tower = parse_config(raw), module.tower_spec(raw)
    init = WeightInit(config, tower.vision, seed, successor_ids(info), info.len_tokenizer)
    main, _ = plan_tensors(config, tower.vision)
    meter = _Progress(progress, sum(t.elements for t in main) * 2)
    _write_safetensors(directory, main, init, "BF16", shard_bytes or generated.shard_bytes, meter,
                       shard_name=generated.shard_name, always_index=True)
    return len(main)


def successor_ids(info: TokenizerInfo) -> list[int]:
    """Ordinary tokens (the base vocabulary less eos/pad/bos): the ids greedy output cycles through."""
    special = {info.eos_token_id, info.pad_token_id, info.bos_token_id}
    return [i for i in range(info.base_vocab_size) if i not in special]


def _write_tower(directory: Path, size: str, tower: str) -> tuple[VisionTowerConfig, str]:
    if size == "full":
        name = FULL_TOWER_NAMES[tower]
        return BUILTIN_TOWERS[name][0], name
    vision, processor = TINY_TOWERS[tower]
    write_tower_directory(directory / TOWER_DIR, vision, processor)
    return vision, TOWER_DIR


def _write_configs(directory: Path, family: str, size: str, info: TokenizerInfo, vision: VisionTowerConfig,
                   tower_name: str) -> ModelConfig:
    dims = FULL_DIMS[family] if size == "full" else TINY_DIMS[family]
    # Tiny: room for every tokenizer id, padded to a multiple of 64 as resized embeddings often are.
    vocab = dims.vocab_size or -(-info.len_tokenizer // 64) * 64
    if vocab < info.len_tokenizer:
        raise ConfigError(f"vocab_size {vocab} < len(tokenizer) {info.len_tokenizer}")
    tokens = TokenIds(info.eos_token_id, info.pad_token_id, info.bos_token_id)
    raw = model_config_json(family, dims, vocab, tokens, vision.hidden_size, tower_name)
    (directory / "config.json").write_text(dump_json(raw))
    (directory / "generation_config.json").write_text(dump_json(generation_config_json(family, tokens)))
    return parse_config(raw)


def plan_tensors(config: ModelConfig, vision: VisionTowerConfig | None,
                 tower_in_checkpoint: bool = True) -> tuple[list[DiskTensor], list[DiskTensor]]:
    """On-disk tensors of the main checkpoint and of the tower directory, in write order.

    Order = the published models' state_dict order (embeddings, layers, final norm, vision tower,
    projector, lm_head), which decides shard boundaries: lm_head and the tower land in the last shard,
    as in the published StableLM index.
    """
    by_source: dict[tuple[bool, str], list[tuple[str, TensorSpec]]] = {}
    for canon, spec in family_tensors(config, vision).items():
        by_source.setdefault((spec.vision, spec.source), []).append((canon, spec))
    main, tower = [], []
    for parts in by_source.values():
        parts.sort(key=lambda p: (p[1].rows or (0, 0))[0])
        spec = parts[0][1]
        rows = sum(p[1].shape[0] for p in parts)
        shape = (rows, *spec.shape[1:]) if spec.rows else spec.disk_shape
        canon = tuple(c for c, _ in parts)
        if spec.vision:
            if tower_in_checkpoint:
                prefix = family_module(config.family).vision_prefix(config.family)
                main.append(DiskTensor(prefix + spec.source, shape, canon))
            else:
                tower.append(DiskTensor(TOWER_DIR_PREFIX + spec.source, shape, canon))
        else:
            main.append(DiskTensor(spec.source, shape, canon))
    return main, tower  # family_tensors lists tensors in the published state-dict order


# ---- weight files ----------------------------------------------------------------------------------


class _Progress:
    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.callback is not None:
            self.callback(self.done, self.total, name)


def _blocks(t: DiskTensor, init: WeightInit) -> Iterator[np.ndarray]:
    if len(t.parts) == 1 and init.shapes[t.parts[0]] == t.shape:
        yield from init.blocks(t.parts[0])
    else:  # fused (Qwen's c_attn, timm's qkv): the row slices, stacked q | k | v; or reshaped (pos_embed)
        yield np.concatenate([init.tensor(c) for c in t.parts], axis=0).reshape(t.shape)


def _write_safetensors(directory: Path, tensors: list[DiskTensor], init: WeightInit, dtype: str,
                       shard_bytes: int, meter: _Progress, shard_name: ShardNameFn | None = None,
                       always_index: bool = False) -> None:
    itemsize = 2 if dtype == "BF16" else 4
    writer = ShardedWriter(directory, [(t.name, t.shape, dtype) for t in tensors], shard_bytes,
                           metadata=ST_METADATA, shard_name=shard_name, always_index=always_index)
    try:
        for t in tensors:
            for block in _blocks(t, init):
                if dtype != "BF16":
                    block = bf16_round(block)  # the same model whatever the storage dtype
                writer.add_rows(t.name, block)
                meter.advance(block.size * itemsize, t.name)
        writer.close()
    finally:
        writer.abort()


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (what a bf16 checkpoint stores)."""
    return bf16_to_f32(f32_to_bf16(x))


def _shard_plan(tensors: list[DiskTensor], itemsize: int, shard_bytes: int) -> list[list[DiskTensor]]:
    """HF's rule: start a new shard when the next tensor would overflow the current one."""
    shards: list[list[DiskTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.elements * itemsize
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _write_bin(directory: Path, tensors: list[DiskTensor], init: WeightInit, shard_bytes: int,
               meter: _Progress) -> None:
    """fp32 pickle shards (torch.save of plain tensors) and pytorch_model.bin.index.json.

    A shard is built in memory before torch.save writes it: fine for tiny checkpoints, heavy for
    full ones. Always indexed, as Qwen's main branch is.
    """
    import torch  # noqa: PLC0415 - only the pickle format needs torch

    shards = _shard_plan(tensors, 4, shard_bytes)
    names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
    weight_map = {}
    for shard, fname in zip(shards, names):
        state = {}
        for t in shard:
            state[t.name] = torch.from_numpy(np.concatenate([bf16_round(b) for b in _blocks(t, init)], axis=0))
            weight_map[t.name] = fname
            meter.advance(t.elements * 4, t.name)
        torch.save(state, directory / fname)
    index = {"metadata": {"total_size": sum(t.elements for t in tensors) * 4},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
