"""CLIP and SigLIP vision transformers, as far as MoE-LLaVA's and DeepSeek-VL2's image features need them.

select_feature "full_normed" (DeepSeek-VL2) is HF's `last_hidden_state`: every layer, then
`post_layernorm`, all tokens. The rest of this docstring is MoE-LLaVA's selection.

Contract: `VisionTower(tower, select_layer, select_feature)(pixels)` returns upstream's image
features: `hidden_states[select_layer]` of HF's CLIPVisionModel / SiglipVisionModel (index 0 is the
encoder input, so -2 is the output of the penultimate encoder layer), then `[:, 1:]` for
select_feature "patch". Upstream applies `[:, 1:]` to SigLIP too, which has no class token, so
one real patch is dropped (728 of 729 tokens at so400m-384): this port copies the quirk. Only the
encoder layers the selected hidden state depends on are built; the last layer, `post_layernorm`
and SigLIP's pooling head never affect the features and are not part of the module.

Attribute names mirror HF's `vision_model.*` names, which are the canonical `vision.*` suffixes.

Shape legend: B batch, C channels, P patch size, G = image_size / P, Hv tower hidden,
N = G*G patches (+1 class token for CLIP), NH heads, Dv head dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgemoe.model.towers import VisionTowerConfig
from edgemoe.reference.layers import ACTIVATIONS, Norm


class VisionEmbeddings(nn.Module):
    """Patch convolution (+ CLIP's class token) + learned absolute positions."""

    def __init__(self, v: VisionTowerConfig) -> None:
        super().__init__()
        self.clip = v.kind == "clip"
        # CLIP's patch convolution has no bias; SigLIP's has one.
        self.patch_embedding = nn.Conv2d(v.num_channels, v.hidden_size, v.patch_size, v.patch_size,
                                         bias=not self.clip)
        if self.clip:
            self.class_embedding = nn.Parameter(torch.zeros(v.hidden_size))
        self.position_embedding = nn.Embedding(v.num_positions, v.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, C, G*P, G*P] -> [B, N, Hv]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, Hv, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, Hv], row-major patches
        if self.clip:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat((cls, x), dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases on all four projections."""

    def __init__(self, v: VisionTowerConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(v.hidden_size, v.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, Hv] -> [B, N, Hv]
        b, n, h = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, Hv] -> [B, NH, N, Dv]
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)  # [B, NH, N, N]
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, h)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, v: VisionTowerConfig) -> None:
        super().__init__()
        if v.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown vision activation {v.hidden_act!r}")
        self.act = ACTIVATIONS[v.hidden_act]
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1 x), then + mlp(ln2 .)."""

    def __init__(self, v: VisionTowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = Norm("layernorm", v.hidden_size, v.layer_norm_eps)
        self.self_attn = VisionAttention(v)
        self.layer_norm2 = Norm("layernorm", v.hidden_size, v.layer_norm_eps)
        self.mlp = VisionMLP(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, v: VisionTowerConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def layers_needed(num_layers: int, select_layer: int) -> int:
    """Encoder layers to run for hidden_states[select_layer] (hidden_states has num_layers + 1 entries)."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"mm_vision_select_layer {select_layer} outside a {num_layers}-layer tower")
    return index


class VisionTower(nn.Module):
    """pixels [B, C, S, S] -> image features [B, N', Hv] (module docstring)."""

    def __init__(self, v: VisionTowerConfig, select_layer: int = -2, select_feature: str = "patch") -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch", "full_normed"):
            raise ValueError(f"mm_vision_select_feature {select_feature!r} is not supported "
                             "(patch, cls_patch, full_normed)")
        self.config, self.select_feature = v, select_feature
        self.embeddings = VisionEmbeddings(v)
        # CLIP's (misspelt, as in HF) pre-encoder LayerNorm; hidden_states[0] is taken after it.
        self.pre_layrnorm = Norm("layernorm", v.hidden_size, v.layer_norm_eps) if v.kind == "clip" else None
        self.encoder = VisionEncoder(v, layers_needed(v.num_layers, select_layer))
        # full_normed (DeepSeek-VL2): HF's last_hidden_state, every token after the final LayerNorm.
        self.post_layernorm = (Norm("layernorm", v.hidden_size, v.layer_norm_eps)
                               if select_feature == "full_normed" else None)

    @property
    def num_features(self) -> int:
        """Tokens per image after feature selection (576 for CLIP-L/14-336, 728 for SigLIP-so400m-384)."""
        return self.config.num_positions - (1 if self.select_feature == "patch" else 0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        x = self.encoder(x)
        if self.post_layernorm is not None:
            return self.post_layernorm(x)
        return x[:, 1:] if self.select_feature == "patch" else x
