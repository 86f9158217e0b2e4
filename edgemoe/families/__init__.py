"""Model families that live in one module each, found by name without importing them up front.

Contract: `family_module(family)` returns the module of a registered family, or None for the
MoE-LLaVA families (whose tables predate this package and live in edgemoe.model). A family module
provides `MODEL_TYPE`, `parse_config(raw) -> ModelConfig`, `tower_spec(raw) -> TowerSpec` and
`tensors(config, vision) -> {canonical: TensorSpec}`. Imports are lazy because family modules
import edgemoe.model.config, which consults this registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

# family name -> module; model_type -> family
MODULES = {"deepseek_vl2": "edgemoe.families.deepseek_vl2"}
MODEL_TYPES = {"deepseek_vl_v2": "deepseek_vl2"}


def family_module(family: str) -> ModuleType | None:
    """The module of a registered family, imported on first use; None for the MoE-LLaVA families."""
    name = MODULES.get(family)
    return None if name is None else importlib.import_module(name)


def _deepseek_shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i + 1:05d}-of-{n:06d}.safetensors"  # sic: 5-digit part, 6-digit total, as published


@dataclass(frozen=True)
class GeneratedFamily:
    """How `create-checkpoint --family NAME` writes a registry family's checkpoint."""

    family: str
    variant: str
    files_module: str  # provides write_checkpoint_files(directory, variant, size) -> (config dict, TokenizerInfo)
    shard_bytes: int
    shard_name: object = None  # (prefix, index, count) -> file name; None: HF's default naming


GENERATED_FAMILIES = {
    f"deepseek-vl2-{v}": GeneratedFamily("deepseek_vl2", v, "edgemoe.families.deepseek_vl2_files", 8 << 30,
                                         _deepseek_shard_name)
    for v in ("tiny", "small")
}
