"""Model families that live in one module each, found by name without importing them up front.

Contract: `family_module(family)` returns the module of a registered family, or None for the
MoE-LLaVA families (whose tables predate this package and live in edgemoe.model). A family module
provides `MODEL_TYPE`, `parse_config(raw) -> ModelConfig`, `tower_spec(raw) -> TowerSpec` and
`tensors(config, vision) -> {canonical: TensorSpec}`. Imports are lazy because family modules
import edgemoe.model.config, which consults this registry.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# family name -> module; model_type -> family
MODULES = {"deepseek_vl2": "edgemoe.families.deepseek_vl2"}
MODEL_TYPES = {"deepseek_vl_v2": "deepseek_vl2"}


def family_module(family: str) -> ModuleType | None:
    """The module of a registered family, imported on first use; None for the MoE-LLaVA families."""
    name = MODULES.get(family)
    return None if name is None else importlib.import_module(name)
