"""A MoE-LLaVA checkpoint directory, read lazily under canonical tensor names.

Contract: `Checkpoint.open(dir)` parses config.json, resolves the vision tower, indexes the weight
files (single or sharded safetensors, or pickle `.bin` shards read only through torch's restricted
`weights_only=True` loader) and checks, from headers alone, that every tensor the model needs is
present with the right shape, naming the first that is not. `tensor(canonical)` then reads one
tensor as float32 numpy on demand; nothing loads the whole checkpoint. Vision tower weights come from
the main checkpoint when it holds them, else from the tower directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from edgemoe.errors import CheckpointError
from edgemoe.model.config import ModelConfig, load_config
from edgemoe.families import family_module
from edgemoe.model.names import TOWER_DIR_PREFIX, TensorSpec, family_tensors
from edgemoe.model.safetensors_io import SafetensorsFile
from edgemoe.model.towers import TowerSpec

log = logging.getLogger(__name__)


class WeightSource(Protocol):
    """A set of weight files answering by on-disk tensor name."""

    def shape(self, name: str) -> tuple[int, ...] | None: ...
    def read(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """One or more safetensors files, indexed by `*.safetensors.index.json` when sharded."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = {p: SafetensorsFile(p) for p in sorted(set(files.values()))}
        self._where = files

    def shape(self, name: str) -> tuple[int, ...] | None:
        path = self._where.get(name)
        if path is None:
            return None
        info = self._files[path].infos.get(name)
        if info is None:
            raise CheckpointError(f"index says {name} is in {path.name}, but that file lacks it")
        return info.shape

    def read(self, name: str) -> np.ndarray:
        return self._files[self._where[name]].tensor(name)

    def file_of(self, name: str) -> Path | None:
        """The file holding `name`."""
        return self._where.get(name)


class TorchBinSource:
    """Pickle `.bin` shards (Qwen-1.8B-4e ships only these), read with `weights_only=True`.

    The restricted unpickler refuses arbitrary objects, so a malicious pickle cannot run code; the
    full unpickler is never used. torch is imported only here, only when such a shard exists.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self._where = files
        self._loaded: dict[Path, dict] = {}

    def _load(self, path: Path) -> dict:
        if path not in self._loaded:
            import torch  # noqa: PLC0415 - only pickle checkpoints need torch

            try:
                self._loaded[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"refusing {path.name}: not a plain tensor pickle ({first})") from None
        return self._loaded[path]

    def shape(self, name: str) -> tuple[int, ...] | None:
        path = self._where.get(name)
        return None if path is None else tuple(self._load(path)[name].shape)

    def read(self, name: str) -> np.ndarray:
        import torch  # noqa: PLC0415

        return self._load(self._where[name])[name].to(torch.float32).numpy()


def _index(directory: Path, index_name: str) -> dict[str, Path]:
    path = directory / index_name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    files = {name: directory / fname for name, fname in weight_map.items()}
    missing = sorted({p.name for p in files.values() if not p.is_file()})
    if missing:
        raise CheckpointError(f"{path.name} names shard(s) that are missing: {', '.join(missing)}")
    return files


def open_weights(directory: Path, prefix: str = "model") -> WeightSource | None:
    """The weight files of a directory (HF's naming conventions), or None when it has none."""
    st_index, st_single = f"{prefix}.safetensors.index.json", directory / f"{prefix}.safetensors"
    if (directory / st_index).is_file():
        return SafetensorsSource(_index(directory, st_index))
    if st_single.is_file():
        return SafetensorsSource({n: st_single for n in SafetensorsFile(st_single).infos})
    if (directory / "pytorch_model.bin.index.json").is_file():
        return TorchBinSource(_index(directory, "pytorch_model.bin.index.json"))
    if (directory / "pytorch_model.bin").is_file():
        path = directory / "pytorch_model.bin"
        return TorchBinSource({n: path for n in TorchBinSource({})._load(path)})
    return None


@dataclass(frozen=True)
class _Located:
    spec: TensorSpec
    source: WeightSource
    name: str  # full on-disk name


class Checkpoint:
    """A checkpoint directory whose tensors are read by canonical name, lazily."""

    def __init__(self, directory: Path, config: ModelConfig, tower: TowerSpec,
                 located: dict[str, _Located]) -> None:
        self.directory, self.config, self.tower = directory, config, tower
        self._located = located

    @classmethod
    def open(cls, directory: Path | str) -> "Checkpoint":
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {directory}")
        config, tower = load_config(directory)
        main = open_weights(directory)
        if main is None:
            raise CheckpointError(
                f"{directory} has no weights (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])"
            )
        specs = family_tensors(config, tower.vision)
        has_tower_prefix = any(spec.vision for spec in specs.values())
        vision_source, vision_prefix = _vision_source(main, config, tower) if has_tower_prefix else (main, "")
        located = {}
        for canon, spec in specs.items():
            source, name = (vision_source, vision_prefix + spec.source) if spec.vision else (main, spec.source)
            if _check(canon, spec, source, name):
                located[canon] = _Located(spec, source, name)
        return cls(directory, config, tower, located)

    @property
    def names(self) -> list[str]:
        """Canonical names of the tensors present (required ones always are)."""
        return list(self._located)

    def spec(self, canonical: str) -> TensorSpec:
        return self._located[canonical].spec

    def has(self, canonical: str) -> bool:
        return canonical in self._located

    def stored(self, canonical: str) -> tuple[Path, str] | None:
        """(safetensors file, on-disk name) when the canonical tensor is exactly one stored tensor (no row
        slice, no reshape), so a reader may take it from the file in place; else None."""
        loc = self._located.get(canonical)
        file_of = getattr(loc.source, "file_of", None) if loc is not None else None
        if file_of is None or loc.spec.rows is not None or tuple(loc.spec.disk_shape) != tuple(loc.spec.shape):
            return None
        path = file_of(loc.name)
        return None if path is None else (Path(path), loc.name)

    def tensor(self, canonical: str) -> np.ndarray:
        """One tensor as float32 numpy (a row slice for fused sources)."""
        try:
            loc = self._located[canonical]
        except KeyError:
            raise CheckpointError(f"checkpoint has no tensor {canonical!r}") from None
        x = loc.source.read(loc.name)
        if loc.spec.rows is not None:
            x = x[loc.spec.rows[0]:loc.spec.rows[1]]
        return np.asarray(x, dtype=np.float32).reshape(loc.spec.shape)

    def tensors(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """(canonical name, tensor) for every present tensor under `prefix`, one at a time."""
        for canon in self._located:
            if canon.startswith(prefix):
                yield canon, self.tensor(canon)


def _check(canon: str, spec: TensorSpec, source: WeightSource, name: str) -> bool:
    """True when present with the right shape; False when absent but optional; else an error."""
    shape = source.shape(name)
    if shape is None:
        if spec.required:
            raise CheckpointError(f"checkpoint is missing tensor {name} (canonical {canon})")
        return False
    rows = spec.rows
    want = spec.disk_shape if rows is None else None
    if rows is not None:
        ok = len(shape) == len(spec.shape) and shape[0] >= rows[1] and tuple(shape[1:]) == spec.shape[1:]
    else:
        ok = tuple(shape) == want
    if not ok:
        raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {list(spec.disk_shape)}"
                              + (f" (rows {rows[0]}:{rows[1]})" if rows else ""))
    return True


def _vision_source(main: WeightSource, config: ModelConfig, tower: TowerSpec) -> tuple[WeightSource, str]:
    """The main checkpoint when it holds the tower's weights, else the tower directory. Families
    without a separate tower prefix (their tower names are full on-disk names) read the main one."""
    prefix = family_module(config.family).vision_prefix(config.family)
    if prefix is None:
        return main, ""
    probe = "embeddings.patch_embedding.weight"
    if main.shape(prefix + probe) is not None:
        return main, prefix
    if tower.directory is not None:
        source = open_weights(tower.directory)
        if source is not None:
            log.info("vision tower weights from %s", tower.directory)
            return source, TOWER_DIR_PREFIX
        raise CheckpointError(
            f"vision tower weights are neither in the checkpoint ({prefix}*) nor in {tower.directory}"
        )
    return _download_tower(tower), TOWER_DIR_PREFIX


def _download_tower(tower: TowerSpec) -> WeightSource:
    """A hub-named tower whose weights the checkpoint lacks: fetch it when online (never in tests)."""
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        path = Path(snapshot_download(tower.name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown repo, ...
        raise CheckpointError(
            f"vision tower {tower.name} weights are not in the checkpoint and could not be downloaded ({type(exc).__name__}); "
            "set mm_image_tower to a local tower directory"
        ) from None
    source = open_weights(path)
    if source is None:
        raise CheckpointError(f"downloaded vision tower {tower.name} has no safetensors weights")
    return source
