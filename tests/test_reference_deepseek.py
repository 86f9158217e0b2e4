"""The DeepSeek-VL2 reference model against independent code, on generated tiny checkpoints (fp32).

- Small's language model (MLA) against transformers 4.57's DeepseekV2ForCausalLM, loading the same
  safetensors with `language.` stripped: full sequence and token by token with the latent cache.
- Tiny's language model (MHA) against a composite of transformers' LlamaAttention (head_dim from the
  Llama config, not DeepseekV2Config's) with DeepseekV2MoE / DeepseekV2MLP / DeepseekV2RMSNorm.
- The SigLIP tower against transformers' SiglipVisionModel through the timm -> HF key map.
- The projector's pad-and-unfold against an explicit per-element formula, the 2D layout against
  upstream's own prepare_inputs_embeds code (einops), tiling against upstream's processing code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from einops import rearrange, repeat
from PIL import Image, ImageOps
from transformers import LlamaConfig, SiglipVisionConfig, SiglipVisionModel
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (DeepseekV2ForCausalLM, DeepseekV2MLP, DeepseekV2MoE,
                                                                  DeepseekV2RMSNorm)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.safetensors_io import SafetensorsFile
from edgemoe.model.tiling import best_resolution, image_token_count, tile_image, tokens_per_side
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.projector import downsample_2x2

TOL = 1e-4


def _disk_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({n: torch.from_numpy(st.tensor(n)) for n in st.infos})
    return out


def _lm_state(path) -> dict[str, torch.Tensor]:
    return {n[len("language."):]: t for n, t in _disk_tensors(path).items() if n.startswith("language.")}


def _hf_config(ckpt: Checkpoint, **extra) -> DeepseekV2Config:
    c = ckpt.config
    lang = c.raw["language_config"]
    cfg = DeepseekV2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.expert_intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, n_routed_experts=c.moe.num_experts[0],
        n_shared_experts=lang.get("n_shared_experts"), num_experts_per_tok=c.moe.top_k, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        **extra)
    cfg._attn_implementation = "eager"
    return cfg


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(seed)) % vocab


def _ours_logits(model: ReferenceModel, ids: torch.Tensor) -> torch.Tensor:
    return model(model.embed(ids[0]).embeds)


def test_small_language_model_matches_transformers_deepseek_v2(deepseek_checkpoints):
    ckpt = Checkpoint.open(deepseek_checkpoints["small"])
    m = ckpt.config.mla
    hf = DeepseekV2ForCausalLM(_hf_config(ckpt, q_lora_rank=None, kv_lora_rank=m.kv_lora_rank,
                                          qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                                          v_head_dim=m.v_head_dim))
    hf.load_state_dict(_lm_state(ckpt.directory), strict=True)
    hf.eval()
    ours = ReferenceModel.from_checkpoint(ckpt)
    ids = _ids(24, ckpt.config.vocab_size, 0)
    with torch.no_grad():
        want = hf(ids).logits
        got = _ours_logits(ours, ids)
        err = (got - want).abs().max().item()
        assert err < TOL, err
        # token by token with the latent cache: 576-style (c, k_pe) entries, not expanded keys
        cache = ours.new_cache()
        step = [ours(ours.embed(ids[0, :16]).embeds, cache)]
        for i in range(16, 24):
            step.append(ours(ours.embed(ids[0, i:i + 1]).embeds, cache))
        inc = torch.cat(step, dim=1)
        assert (inc - want).abs().max().item() < TOL
        assert cache.keys[0].shape == (1, 1, 24, m.kv_lora_rank) and cache.values[0].shape == (1, 1, 24,
                                                                                                m.qk_rope_head_dim)
    # the routing is decisive enough that the comparison covered several experts per layer
    routing: dict = {}
    with torch.no_grad():
        ours(ours.embed(ids[0]).embeds, routing=routing)
    assert all(len(torch.unique(r.experts)) >= 4 for r in routing.values())


class _LlamaMoEComposite(torch.nn.Module):
    """DeepSeekMoE-3B with Llama attention, from transformers' own modules (the reference file's recipe)."""

    def __init__(self, ds: DeepseekV2Config, llama: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(ds.vocab_size, ds.hidden_size)
        self.rotary = LlamaRotaryEmbedding(llama)
        self.layers = torch.nn.ModuleList()
        for i in range(ds.num_hidden_layers):
            layer = torch.nn.Module()
            layer.self_attn = LlamaAttention(llama, i)
            layer.mlp = DeepseekV2MLP(ds) if i < ds.first_k_dense_replace else DeepseekV2MoE(ds)
            layer.input_layernorm = DeepseekV2RMSNorm(ds.hidden_size, ds.rms_norm_eps)
            layer.post_attention_layernorm = DeepseekV2RMSNorm(ds.hidden_size, ds.rms_norm_eps)
            self.layers.append(layer)
        self.norm = DeepseekV2RMSNorm(ds.hidden_size, ds.rms_norm_eps)
        self.lm_head = torch.nn.Linear(ds.hidden_size, ds.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        n = ids.shape[1]
        pos = torch.arange(n)[None]
        cos_sin = self.rotary(h, pos)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        for layer in self.layers:
            a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h))


def test_tiny_language_model_matches_llama_attention_with_deepseek_moe(deepseek_checkpoints):
    ckpt = Checkpoint.open(deepseek_checkpoints["tiny"])
    c = ckpt.config
    llama = LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                        head_dim=c.head_dim, rope_theta=c.rope_theta, attention_bias=False,
                        max_position_embeddings=c.max_position_embeddings)
    llama._attn_implementation = "eager"
    composite = _LlamaMoEComposite(_hf_config(ckpt), llama)
    state = {k.replace("model.", "", 1): v for k, v in _lm_state(ckpt.directory).items()}
    composite.load_state_dict(state, strict=False)
    missing = set(composite.state_dict()) - set(state)
    assert missing <= {"rotary.inv_freq"} | {k for k in missing if k.endswith("rotary_emb.inv_freq")}
    composite.eval()
    ours = ReferenceModel.from_checkpoint(ckpt)
    ids = _ids(20, c.vocab_size, 1)
    with torch.no_grad():
        err = (_ours_logits(ours, ids) - composite(ids)).abs().max().item()
    assert err < TOL, err


# timm -> transformers SiglipVisionModel names (reference file §4(b)), the attention pool left out.
def _siglip_state(disk: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    s = {"embeddings.position_embedding.weight": disk["vision.pos_embed"][0],
         "embeddings.patch_embedding.weight": disk["vision.patch_embed.proj.weight"],
         "embeddings.patch_embedding.bias": disk["vision.patch_embed.proj.bias"],
         "post_layernorm.weight": disk["vision.norm.weight"], "post_layernorm.bias": disk["vision.norm.bias"]}
    for n in range(layers):
        src, dst = f"vision.blocks.{n}", f"encoder.layers.{n}"
        for leaf in ("weight", "bias"):
            q, k, v = disk[f"{src}.attn.qkv.{leaf}"].chunk(3, dim=0)
            s |= {f"{dst}.self_attn.q_proj.{leaf}": q, f"{dst}.self_attn.k_proj.{leaf}": k,
                  f"{dst}.self_attn.v_proj.{leaf}": v, f"{dst}.self_attn.out_proj.{leaf}": disk[f"{src}.attn.proj.{leaf}"],
                  f"{dst}.layer_norm1.{leaf}": disk[f"{src}.norm1.{leaf}"],
                  f"{dst}.layer_norm2.{leaf}": disk[f"{src}.norm2.{leaf}"],
                  f"{dst}.mlp.fc1.{leaf}": disk[f"{src}.mlp.fc1.{leaf}"], f"{dst}.mlp.fc2.{leaf}": disk[f"{src}.mlp.fc2.{leaf}"]}
    return {f"vision_model.{k}": v for k, v in s.items()}


def test_vision_tower_matches_transformers_siglip(deepseek_checkpoints):
    ckpt = Checkpoint.open(deepseek_checkpoints["tiny"])
    v = ckpt.tower.vision
    hf = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False))
    hf.load_state_dict(_siglip_state(_disk_tensors(ckpt.directory), v.num_layers), strict=True)
    hf.eval()
    ours = ReferenceModel.from_checkpoint(ckpt)
    pixels = torch.from_numpy(tile_image(_photo(100, 60), v.image_size, ckpt.config.candidate_resolutions).pixels)
    with torch.no_grad():
        want = hf(pixel_values=pixels).last_hidden_state
        got = ours.vision(pixels)
        assert (got - want).abs().max().item() < TOL
        # tanh GELU, not erf: the choice is visible at the tower's output
        ours.vision.encoder.layers[0].mlp.act = torch.nn.functional.gelu
        assert (ours.vision(pixels) - want).abs().max().item() > 1e-6


def test_downsample_is_channel_major_pad_and_unfold():
    t, side, c = 2, 3, 5
    x = torch.randn(t, side * side, c, generator=torch.Generator().manual_seed(2))
    got = downsample_2x2(x).numpy()
    grid = x.view(t, side, side, c).numpy()
    g = math.ceil(side / 2)
    want = np.zeros((t, g * g, 4 * c), np.float32)
    for tile in range(t):
        for i in range(g):
            for j in range(g):
                for ch in range(c):
                    for di in range(2):
                        for dj in range(2):
                            r, col = 2 * i + di, 2 * j + dj
                            if r < side and col < side:
                                want[tile, i * g + j, ch * 4 + di * 2 + dj] = grid[tile, r, col, ch]
    np.testing.assert_array_equal(got, want)


def _upstream_layout(images_embeds, image_newline, view_seperator, num_width_tiles, num_height_tiles):
    """DeepSeek-VL2's prepare_inputs_embeds for one image, tile_tag 2D, global_view_pos head (verbatim)."""
    _, hw, n_dim = images_embeds.shape
    h = w = int(hw ** 0.5)
    tile_index = 0
    num_tiles_in_image = num_width_tiles * num_height_tiles
    global_features = images_embeds[tile_index]
    local_features = images_embeds[tile_index + 1: tile_index + 1 + num_tiles_in_image]
    global_features = global_features.view(h, w, n_dim)
    new_lines_in_global = repeat(image_newline, "d -> h 1 d", h=h)
    global_features = torch.cat([global_features, new_lines_in_global], dim=1)
    global_features = global_features.view(-1, n_dim)
    local_features = rearrange(local_features, "(th tw) (h w) d -> (th h) (tw w) d", th=num_height_tiles,
                               tw=num_width_tiles, h=h, w=w)
    new_lines_in_local = repeat(image_newline, "d -> (th h) 1 d", th=num_height_tiles, h=h)
    local_features = torch.cat([local_features, new_lines_in_local], dim=1)
    local_features = local_features.view(-1, n_dim)
    return torch.cat([global_features, view_seperator[None, :], local_features], dim=0)


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (1, 3), (3, 1), (2, 4)])
def test_layout_matches_upstream_prepare_inputs_embeds(deepseek_checkpoints, rows, cols):
    ours = ReferenceModel.from_checkpoint(Checkpoint.open(deepseek_checkpoints["small"]))
    tiles = torch.randn(1 + rows * cols, 4, 128, generator=torch.Generator().manual_seed(rows * 10 + cols))
    p = ours.projector
    with torch.no_grad():
        got = p.arrange(tiles, rows, cols)
        want = _upstream_layout(tiles, p.image_newline, p.view_separator, cols, rows)
    assert torch.equal(got, want)
    assert got.shape[0] == image_token_count(2, rows, cols)


def _upstream_select_best_resolution(image_size, candidate_resolutions):
    """processing_deepseek_vl_v2.select_best_resolution, verbatim."""
    original_width, original_height = image_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in candidate_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def _upstream_tiles(image, candidates, image_size, cropping=True):
    """The image half of upstream's tokenize_with_images, torchvision's ToTensor/Normalize written in torch."""
    def transform(pil):
        x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (x - 0.5) / 0.5

    if cropping:
        best_width, best_height = _upstream_select_best_resolution(image.size, candidates)
    else:
        best_width, best_height = image_size, image_size
    mean = (0.5, 0.5, 0.5)
    images_list = [transform(ImageOps.pad(image, (image_size, image_size), color=tuple(int(x * 255) for x in mean)))]
    local_view = ImageOps.pad(image, (best_width, best_height), color=tuple(int(x * 255) for x in mean))
    for i in range(0, best_height, image_size):
        for j in range(0, best_width, image_size):
            images_list.append(transform(local_view.crop((j, i, j + image_size, i + image_size))))
    return torch.stack(images_list), best_width // image_size, best_height // image_size


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


REAL_CANDIDATES = tuple((w * 384, h * 384) for w, h in
                        ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1),
                         (2, 3), (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3)))


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (300, 300), (200, 1800), (2000, 500), (97, 1000)])
def test_best_resolution_matches_upstream(size):
    assert best_resolution(size, REAL_CANDIDATES) == _upstream_select_best_resolution(size, REAL_CANDIDATES)


@pytest.mark.parametrize("size,tiled", [((100, 60), True), ((60, 130), True), ((42, 42), True), ((300, 90), True),
                                        ((90, 70), False)])
def test_tiles_match_upstream_processing_pixel_for_pixel(deepseek_checkpoints, size, tiled):
    ckpt = Checkpoint.open(deepseek_checkpoints["tiny"])
    img = _photo(*size)
    got = tile_image(img, 42, ckpt.config.candidate_resolutions, tiled=tiled)
    want, cols, rows = _upstream_tiles(img, ckpt.config.candidate_resolutions, 42, cropping=tiled)
    assert (got.rows, got.cols) == (rows, cols)
    np.testing.assert_array_equal(got.pixels, want.numpy())


def test_image_token_counts_follow_the_published_formula():
    side = tokens_per_side(384, 14)
    assert side == 14
    assert image_token_count(side, 1, 1) == 421 and image_token_count(side, 2, 2) == 1023
    assert image_token_count(side, 9, 1) == 2101
    # 640 x 480 -> 768 x 768 (2 x 2 tiles): 1,023 tokens, the figure the benchmark uses
    w, h = best_resolution((640, 480), REAL_CANDIDATES)
    assert (w, h) == (768, 768)


def test_a_real_image_fills_the_published_token_layout(deepseek_checkpoints):
    """pixels -> tower -> projector -> layout: as many rows as the published formula, with the newline
    and separator embeddings at the positions upstream's tokenize_with_images gives them."""
    ckpt = Checkpoint.open(deepseek_checkpoints["small"])
    model = ReferenceModel.from_checkpoint(ckpt)
    tiled = tile_image(_photo(100, 60), 42, ckpt.config.candidate_resolutions)
    with torch.no_grad():
        feats = model.encode_tiles(torch.from_numpy(tiled.pixels), tiled.rows, tiled.cols)
    g = tokens_per_side(42, 14)
    assert feats.shape == (image_token_count(g, tiled.rows, tiled.cols), ckpt.config.hidden_size)
    newline, separator = model.projector.image_newline, model.projector.view_separator
    glob = g * (g + 1)
    assert all(torch.equal(feats[i * (g + 1) + g], newline) for i in range(g))  # after each global row
    assert torch.equal(feats[glob], separator)
    width = g * tiled.cols + 1
    assert all(torch.equal(feats[glob + 1 + r * width + width - 1], newline) for r in range(g * tiled.rows))
    assert not torch.equal(feats[0], newline)  # image rows are features, not layout rows
