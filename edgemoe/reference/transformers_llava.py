"""MoE-LLaVA assembled from transformers' own classes: the torch baseline a user would actually run.

Contract: `TransformersLlava.from_checkpoint(ckpt, dtype)` builds
  - the language model with `AutoModelForCausalLM.from_config` from the family's
    `transformers_text_model(config)` (StableLM-2 -> StableLmForCausalLM, Phi-2 -> PhiForCausalLM),
    SDPA attention, every dense tensor loaded under its on-disk name (these families already store
    their language model under transformers' names);
  - each MoE layer's `mlp` replaced by `DeepSpeedMoE`: MoE-LLaVA's module layout and names
    (`mlp.deepspeed_moe.gate.wg`, `mlp.deepspeed_moe.experts.deepspeed_experts.E.*`), experts of
    transformers' own MLP class for the family, softmax over the router logits in fp32, the top k
    renormalised to sum to one, each expert run on its own tokens only (sparse dispatch);
  - transformers' CLIPVisionModel / SiglipVisionModel for the tower, features
    `hidden_states[mm_vision_select_layer]` (then `[:, 1:]` for "patch", as upstream), and LLaVA's
    mlp2x_gelu projector (Linear, exact GELU, Linear).
A family without a transformers class is a one-line `EdgeMoEError`. Weights are copied one tensor at
a time into a model allocated without initialisation, so peak memory is the model plus one tensor.

`generate(embeds, tokens, stop_id, logit_limit)` is greedy decoding on a transformers `StaticCache`
sized for the prompt plus `tokens`: one prefill call with `inputs_embeds`, then one token per call
with explicit `cache_position` and `logits_to_keep=1`. No torch.compile: on a CPU it needs a C++
toolchain and minutes of compilation per shape, and a data-dependent MoE breaks the graph anyway.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgemoe.errors import EdgeMoEError
from edgemoe.families import family_module
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.config import ModelConfig
from edgemoe.model.image import ImageInput
from edgemoe.model.towers import VisionTowerConfig
from edgemoe.reference.splice import SplicedPrompt, splice

ATTENTION = "sdpa"


class DeepSpeedMoE(nn.Module):
    """MoE-LLaVA's sparse MoE block, where transformers' dense MLP sat: [B, L, H] -> [B, L, H]."""

    def __init__(self, hidden: int, experts: list[nn.Module], top_k: int) -> None:
        super().__init__()
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.gate = nn.Module()
        self.deepspeed_moe.gate.wg = nn.Linear(hidden, len(experts), bias=False)
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(experts)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(F.linear(flat.float(), self.deepspeed_moe.gate.wg.weight.float()), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat, dtype=torch.float32)
        for e, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]).float() * weights[rows, slot, None])
        return out.to(x.dtype).reshape(x.shape)


def _vision_model(v: VisionTowerConfig, dtype: torch.dtype) -> nn.Module:
    import transformers

    common = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
                  hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, num_channels=v.num_channels,
                  attn_implementation=ATTENTION)
    if v.kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common)).to(dtype)
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common)).to(dtype)


def text_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The family's transformers config kwargs for its language model, or a one-line error."""
    text = family_module(cfg.family).transformers_text_model(cfg)
    if text is None:
        raise EdgeMoEError(f"transformers has no class for the {cfg.family} family's language model "
                           f"(the transformers peer takes StableLM-2 and Phi-2)")
    return text


def _language_model(cfg: ModelConfig, text: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    import transformers
    from transformers.modeling_utils import no_init_weights

    config = transformers.AutoConfig.for_model(**text)
    config._attn_implementation = ATTENTION
    with no_init_weights():
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        for n in cfg.moe.layers:
            layer = lm.model.layers[n]
            mlp_class = type(layer.mlp)  # the family's own MLP, as transformers writes it
            experts = [mlp_class(config) for _ in range(cfg.moe.experts_in(n))]
            layer.mlp = DeepSpeedMoE(cfg.hidden_size, experts, cfg.moe.top_k).to(dtype)
    return lm


class TransformersLlava(nn.Module):
    """Tower + projector + transformers' causal LM with MoE-LLaVA's MoE blocks (module docstring)."""

    def __init__(self, cfg: ModelConfig, tower: VisionTowerConfig | None, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers.modeling_utils import no_init_weights

        self.config = cfg
        text = text_model_config(cfg)
        with no_init_weights():
            self.vision = None if tower is None else _vision_model(tower, dtype)
            self.projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, cfg.hidden_size), nn.GELU(),
                                           nn.Linear(cfg.hidden_size, cfg.hidden_size)).to(dtype)
        self.lm = _language_model(cfg, text, dtype)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16) -> "TransformersLlava":
        model = cls(ckpt.config, ckpt.tower.vision, dtype)
        model.load(ckpt)
        return model.requires_grad_(False).eval()

    def _key(self, ckpt: Checkpoint, canonical: str) -> str:
        """The parameter of this model that a canonical tensor fills."""
        spec = ckpt.spec(canonical)
        if canonical.startswith("vision."):
            return "vision.vision_model." + spec.source
        if canonical.startswith("projector."):
            return canonical
        if spec.rows is not None:
            raise EdgeMoEError(f"{canonical} is a slice of a fused tensor, which the transformers peer does not split")
        return "lm." + spec.source

    def load(self, ckpt: Checkpoint) -> None:
        """Copy every checkpoint tensor into place, one at a time; anything left unfilled must be a
        bias transformers has and the checkpoint does not (Phi-2's lm_head), which is zero."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for canonical in ckpt.names:
            key = self._key(ckpt, canonical)
            if key not in params:
                if canonical.startswith("vision."):
                    continue  # SigLIP's pooling head: never part of the features
                raise EdgeMoEError(f"the transformers model has no place for {canonical} ({key})")
            value = torch.from_numpy(np.ascontiguousarray(ckpt.tensor(canonical)))
            if tuple(value.shape) != tuple(params[key].shape):
                raise EdgeMoEError(f"{canonical} has shape {list(value.shape)}, transformers expects "
                                   f"{list(params[key].shape)}")
            params[key].data.copy_(value)
            filled.add(key)
        if self.config.tie_word_embeddings:
            self.lm.tie_weights()
            filled.add("lm.lm_head.weight")
        unused = ("vision.vision_model.head.", "vision.vision_model.post_layernorm.")  # never in the features
        for key in sorted(set(params) - filled):
            if not (key.startswith(unused) or (key.startswith("lm.") and key.endswith(".bias"))):
                raise EdgeMoEError(f"the checkpoint has no tensor for the transformers model's {key}")
            params[key].data.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def encode(self, image: ImageInput) -> torch.Tensor:
        """One prepared image -> its prompt rows [N, H] (untiled layouts: MoE-LLaVA's)."""
        if self.vision is None:
            raise EdgeMoEError("this model was built without a vision tower")
        if image.tiled:
            raise EdgeMoEError("the transformers peer takes untiled images only (MoE-LLaVA's layouts)")
        pixels = torch.from_numpy(image.pixels).to(self.dtype)
        states = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = states[self.config.mm_vision_select_layer]
        if self.config.mm_vision_select_feature == "patch":
            feats = feats[:, 1:]
        return self.projector(feats)[0]

    def embed(self, ids: Sequence[int], features: Sequence[torch.Tensor]) -> SplicedPrompt:
        return splice(ids, features, self.lm.get_input_embeddings())

    def generate(self, embeds: torch.Tensor, tokens: int, stop_id: int | None, logit_limit: int,
                 on_first: Any = None) -> list[int]:
        """Greedy ids after the prompt `embeds` [1, L, H] on a StaticCache (module docstring);
        `on_first()` is called once the first id is known."""
        from transformers import StaticCache

        length = embeds.shape[1]
        cache = StaticCache(config=self.lm.config, max_cache_len=length + tokens)
        out = self.lm(inputs_embeds=embeds.to(self.dtype), past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(length), logits_to_keep=1)
        ids = [int(out.logits[0, -1, :logit_limit].argmax())]
        if on_first is not None:
            on_first()
        while len(ids) < tokens and ids[-1] != stop_id:
            pos = length + len(ids) - 1
            out = self.lm(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True,
                          cache_position=torch.tensor([pos]), logits_to_keep=1)
            ids.append(int(out.logits[0, -1, :logit_limit].argmax()))
        return ids
