"""What a checkpoint holds, counted from its config alone: the numbers `edgemoe inspect` reports.

Contract: `summarize_checkpoint(config, tower)` returns a frozen `ModelSummary` (family, layers, MoE
layers, experts, total vs active LLM parameters, bytes of one expert at fp16/int8/int4, vision
tower). Counts come from the canonical shapes in `names.family_tensors`, the same table the loader
checks the checkpoint against, so they describe exactly what would be loaded. "Active" counts what
one token touches: every non-expert tensor plus top_k experts per MoE layer. Totals cover the LLM
only (embeddings, decoder, lm_head), as the published 2.89B / 2.06B figures do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edgemoe.model.config import ModelConfig
from edgemoe.model.names import family_tensors, is_llm_tensor
from edgemoe.model.tiling import image_token_count as tiled_token_count
from edgemoe.model.tiling import TILED, tokens_per_side
from edgemoe.model.towers import TowerSpec, VisionTowerConfig

# 4-bit experts are stored as MatMulNBits blocks: 128 weights share one fp32 scale (symmetric).
INT4_BLOCK = 128


@dataclass(frozen=True)
class ExpertSize:
    """Parameters of one expert and its size at each precision the exporter offers."""

    params: int
    fp32_bytes: int
    fp16_bytes: int
    int8_bytes: int  # int8 weights + one fp32 scale per output row
    int4_bytes: int  # packed nibbles + one fp32 scale per block of INT4_BLOCK


@dataclass(frozen=True)
class ModelSummary:
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    moe_layers: tuple[int, ...]
    experts_per_layer: tuple[int, ...]
    top_k: int
    total_params: int  # LLM
    active_params: int  # LLM, per token
    expert_params_total: int
    expert: ExpertSize
    vision_tower: str
    vision_kind: str
    vision_params: int
    image_tokens: int  # one image (tiled layouts: the smallest, one local tile)
    projector_params: int
    all_params: int = 0  # every tensor on disk: LLM, tower (unused parts too), projector
    token_params: int = 0  # LLM parameters one decoded token reads: active, with one embedding row
    shared_expert_params: int = 0  # per MoE layer, always on
    dense_layers: tuple[int, ...] = ()
    attention: str = "mha"  # "mha" (q/k/v/o, grouped when kv heads < heads) | "mla" (latent KV)
    routing: str = ""
    max_image_tokens: int = 0  # tiled layouts: the largest candidate grid
    kv_values_per_position: int = 0  # what the runtime caches per position, all layers (MLA: the latent)
    expanded_kv_values_per_position: int = 0  # what plain multi-head attention would cache instead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def expert_size(params: int, matrices: list[tuple[int, ...]]) -> ExpertSize:
    """Size of an expert with `params` parameters whose weight matrices have the given shapes."""
    rows = sum(s[0] for s in matrices if len(s) == 2)
    blocks = sum(s[0] * math.ceil(s[1] / INT4_BLOCK) for s in matrices if len(s) == 2)
    vectors = params - sum(_numel(s) for s in matrices if len(s) == 2)  # biases stay fp32
    return ExpertSize(
        params=params,
        fp32_bytes=4 * params,
        fp16_bytes=2 * params,
        int8_bytes=(params - vectors) + 4 * rows + 4 * vectors,
        int4_bytes=math.ceil((params - vectors) / 2) + 4 * blocks + 4 * vectors,
    )


def image_token_count(config: ModelConfig, vision: VisionTowerConfig, grid: tuple[int, int] = (1, 1)) -> int:
    """Image tokens spliced into the prompt. MoE-LLaVA: every position (+CLS for CLIP), less the first
    for "patch" features (SigLIP's first patch too, as upstream). Tiled layouts: global view +
    separator + `grid` (rows, cols) of local tiles."""
    if config.image_aspect_ratio != TILED:
        return vision.num_positions - (config.mm_vision_select_feature == "patch")
    side = tokens_per_side(vision.image_size, vision.patch_size)
    return tiled_token_count(side, *grid)


def _routing_text(config: ModelConfig) -> str:
    r = config.moe.routing
    text = f"{r.scoring}, {r.method}, top-{r.top_k}"
    if r.renorm != "none":
        text += ", renormalised"
    if r.routed_scaling_factor != 1.0:
        text += f", x{r.routed_scaling_factor:g}"
    return text


def summarize_checkpoint(config: ModelConfig, tower: TowerSpec) -> ModelSummary:
    specs = family_tensors(config, tower.vision)
    total = active = expert_total = 0
    all_params = sum(_numel(s.shape) for s in specs.values() if s.required)
    for name, spec in specs.items():
        if not is_llm_tensor(name) or not spec.required:
            continue
        n = _numel(spec.shape)
        total += n
        if ".experts." in name:
            expert_total += n
        else:
            active += n
    first = config.moe.layers[0]
    prefix = f"layers.{first}.experts.0."
    one = [s.shape for k, s in specs.items() if k.startswith(prefix)]
    per_expert = sum(_numel(s) for s in one)
    active += sum(config.moe.top_k * per_expert for _ in config.moe.layers)
    vision = sum(_numel(s.shape) for k, s in specs.items() if k.startswith("vision.") and s.required)
    projector = sum(_numel(s.shape) for k, s in specs.items() if k.startswith("projector."))
    shared = sum(_numel(s.shape) for k, s in specs.items() if k.startswith(f"layers.{first}.shared."))
    grids = [(h // tower.vision.image_size, w // tower.vision.image_size) for w, h in config.candidate_resolutions]
    return ModelSummary(
        all_params=all_params, token_params=active - (config.vocab_size - 1) * config.hidden_size,
        shared_expert_params=shared, dense_layers=config.dense_layers,
        attention="mla" if config.mla is not None else "mha", routing=_routing_text(config),
        kv_values_per_position=config.kv_values_per_position,
        expanded_kv_values_per_position=config.num_layers * config.expanded_kv_values,
        max_image_tokens=max((image_token_count(config, tower.vision, g) for g in grids), default=0),
        family=config.family, model_type=config.model_type, num_layers=config.num_layers,
        hidden_size=config.hidden_size, intermediate_size=config.expert_intermediate_size,
        moe_layers=config.moe.layers, experts_per_layer=config.moe.num_experts, top_k=config.moe.top_k,
        total_params=total, active_params=active, expert_params_total=expert_total,
        expert=expert_size(per_expert, [s for s in one if len(s) == 2] + [s for s in one if len(s) == 1]),
        vision_tower=tower.name, vision_kind=tower.vision.kind, vision_params=vision,
        image_tokens=image_token_count(config, tower.vision), projector_params=projector,
    )
