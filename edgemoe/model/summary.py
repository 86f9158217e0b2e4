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
from edgemoe.model.towers import TowerSpec

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
    image_tokens: int
    projector_params: int

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


def image_token_count(config: ModelConfig, tower: TowerSpec) -> int:
    """Image tokens spliced into the prompt: patches (+CLS for CLIP) minus the dropped first one."""
    return tower.vision.num_positions - 1


def summarize_checkpoint(config: ModelConfig, tower: TowerSpec) -> ModelSummary:
    specs = family_tensors(config, tower.vision)
    total = active = expert_total = 0
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
    return ModelSummary(
        family=config.family, model_type=config.model_type, num_layers=config.num_layers,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_layers=config.moe.layers, experts_per_layer=config.moe.num_experts, top_k=config.moe.top_k,
        total_params=total, active_params=active, expert_params_total=expert_total,
        expert=expert_size(per_expert, [s for s in one if len(s) == 2] + [s for s in one if len(s) == 1]),
        vision_tower=tower.name, vision_kind=tower.vision.kind, vision_params=vision,
        image_tokens=image_token_count(config, tower), projector_params=projector,
    )
