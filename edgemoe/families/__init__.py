"""Model families that live in one module each, found by name without importing them up front.

Contract: `family_module(family)` returns the module that knows everything family-specific about a
model: `model_type(family)`, `parse_config(raw) -> ModelConfig`, `tower_spec(raw, config,
checkpoint_dir) -> TowerSpec`, `tensors(config, vision) -> {canonical: TensorSpec}` and
`vision_prefix(family)` (where a separate tower's weights sit, or None), and for the peers
`transformers_text_model(config)` (transformers' own config for the language model, or None).
Everything else (exporter, offload, runtime, bench) takes any family through one path. Imports are
lazy because family modules import edgemoe.model.config, which consults this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

# family name -> module; model_type -> family
MODULES = {"stablelm": "edgemoe.families.moe_llava", "qwen": "edgemoe.families.moe_llava",
           "phi": "edgemoe.families.moe_llava", "deepseek_vl2": "edgemoe.families.deepseek_vl2"}
MODEL_TYPES = {"moe_llava_stablelm": "stablelm", "moe_llava_qwen": "qwen", "moe_llava_phi": "phi",
               "deepseek_vl_v2": "deepseek_vl2"}


def family_module(family: str) -> ModuleType:
    """The module of a registered family, imported on first use."""
    try:
        return importlib.import_module(MODULES[family])
    except KeyError:
        from edgemoe.errors import ConfigError  # noqa: PLC0415 - keep this registry import-light

        raise ConfigError(f"unknown model family {family!r}; edgemoe knows {', '.join(sorted(MODULES))}") from None


def _deepseek_shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i + 1:05d}-of-{n:06d}.safetensors"  # sic: 5-digit part, 6-digit total, as published


@dataclass(frozen=True)
class GeneratedFamily:
    """How `create-checkpoint --family NAME` writes a registry family's checkpoint."""

    family: str
    variant: str
    files_module: str  # provides write_checkpoint_files(directory, variant, size) -> (config dict, TokenizerInfo)
    shard_bytes: int
    shard_name: Callable[[str, int, int], str] | None = None  # (prefix, index, count) -> file name


GENERATED_FAMILIES = {
    f"deepseek-vl2-{v}": GeneratedFamily("deepseek_vl2", v, "edgemoe.families.deepseek_vl2_files", 8 << 30,
                                         _deepseek_shard_name)
    for v in ("tiny", "small")
}
