"""Canonical tensor names and each family's map onto its on-disk names.

Contract: everything past the checkpoint reader speaks canonical names only:

    embed.weight                                   [V, H]
    lm_head.weight / lm_head.bias?                 [V, H] / [V]
    final_norm.weight / final_norm.bias?           [H]
    layers.N.attn_norm.{weight,bias?}              [H]
    layers.N.mlp_norm.{weight,bias?}               [H]     (absent in parallel blocks)
    layers.N.attn.{q,k,v}.{weight,bias?}           [heads*D, H] / [heads*D]
    layers.N.attn.o.{weight,bias?}                 [H, heads*D]
    layers.N.mlp.{gate?,up,down}.{weight,bias?}    dense layers; gate only for silu_glu
    layers.N.attn.{q,kv_a,kv_a_norm,kv_b,o}.weight  multi-head latent attention (DeepSeek-VL2-Small)
    layers.N.router.weight / router.bias?          [E, H] / [E] MoE layers (bias: noaux_tc's correction)
    layers.N.experts.K.{gate?,up,down}.{weight,bias?}
    layers.N.shared.{gate,up,down}.weight          always-on shared experts (DeepSeek)
    projector.{0,2}.{weight,bias}                  projector.image_newline / view_separator (DeepSeek)
    vision.<suffix>                                the HF vision_model.<suffix> names

`family_tensors(config, tower)` returns, for every canonical name, a `TensorSpec`: its source name in
the checkpoint, an optional row range (Qwen's `c_attn` and timm's `qkv` fuse q|k|v), the expected
shape (and the on-disk one where it differs), whether the model needs it and whether anything
computes with it. Each family's module (edgemoe.families) is the only place that knows its naming,
in its published state-dict order.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.families import family_module
from edgemoe.model.config import ModelConfig
from edgemoe.model.towers import VisionTowerConfig

TOWER_DIR_PREFIX = "vision_model."


@dataclass(frozen=True)
class TensorSpec:
    """Where a canonical tensor lives on disk and what shape it must have."""

    source: str  # name in the checkpoint (vision: suffix after the vision prefix)
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # slice of the source's first dim (fused tensors)
    required: bool = True
    vision: bool = False  # lives under the vision prefix (main checkpoint or tower directory)
    source_shape: tuple[int, ...] | None = None  # on-disk shape when it differs (timm's [1, N, D] pos_embed)
    used: bool = True  # False: on disk and counted, but nothing computes with it (SigLIP's unused pooling head)

    @property
    def disk_shape(self) -> tuple[int, ...]:
        return self.source_shape if self.source_shape is not None else self.shape


def family_tensors(cfg: ModelConfig, vision: VisionTowerConfig | None) -> dict[str, TensorSpec]:
    """Every canonical tensor of the model, with its on-disk source and expected shape (its family's map)."""
    return family_module(cfg.family).tensors(cfg, vision)


def expert_prefix(layer: int, expert: int) -> str:
    """Canonical prefix of one expert's tensors."""
    return f"layers.{layer}.experts.{expert}."


def is_llm_tensor(canonical: str) -> bool:
    """Tensors that count towards the LLM's parameters (published totals exclude tower and projector)."""
    return not (canonical.startswith("vision.") or canonical.startswith("projector."))
