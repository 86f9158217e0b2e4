"""The reference vision towers and projector against transformers' CLIPVisionModel / SiglipVisionModel.

Upstream's image features are HF `hidden_states[mm_vision_select_layer][:, 1:]` (the slice applied
to SigLIP too); the reference must equal them within 1e-5 from the same canonical weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from edgemoe.model.towers import BUILTIN_TOWERS, CLIP_L14_336, SIGLIP_SO400M_384
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.projector import Projector
from edgemoe.reference.tiny import random_tensors, tiny_config, tiny_tower
from edgemoe.reference.vision import VisionTower

import transformers  # noqa: E402 (the dev extra installs it: the parity tests fail rather than skip)

TOL = 1e-5


def _hf_tower(kind: str, tensors: dict):
    v = tiny_tower(kind)
    common = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
                  hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, num_channels=3,
                  attn_implementation="eager")
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    state = {"vision_model." + k[len("vision."):]: torch.from_numpy(a.copy())
             for k, a in tensors.items() if k.startswith("vision.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    # Only SigLIP's pooling head (never part of the features) keeps HF's random init.
    assert all(".head." in k for k in missing), missing
    return model.eval()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_features_equal_hf_hidden_states(kind, select_layer):
    tower = tiny_tower(kind)
    cfg = tiny_config("stablelm", mm_vision_select_layer=select_layer)
    tensors = random_tensors(cfg, tower, seed=11)
    ref = ReferenceModel.from_tensors(cfg, tower, tensors)
    hf = _hf_tower(kind, tensors)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]
        got = ref.vision(pixels)
    err = (got - want).abs().max().item()
    print(f"{kind} layer {select_layer}: {err:.2e}")
    # CLIP: 16 patches (+ class token dropped); SigLIP: 16 patches, one real patch dropped (upstream quirk).
    assert got.shape == (2, 16 if kind == "clip" else 15, tower.hidden_size)
    assert err < TOL


def test_builtin_towers_give_upstream_token_counts():
    with torch.device("meta"):
        clip = VisionTower(BUILTIN_TOWERS[CLIP_L14_336][0])
        siglip = VisionTower(BUILTIN_TOWERS[SIGLIP_SO400M_384][0])
    assert clip.num_features == 576 and siglip.num_features == 728
    assert len(clip.encoder.layers) == 23 and len(siglip.encoder.layers) == 26  # penultimate layer's output


def test_projector_is_linear_exact_gelu_linear():
    proj = Projector(8, 6)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)) * 3
    w0, b0, w2, b2 = proj[0].weight, proj[0].bias, proj[2].weight, proj[2].bias
    h = x @ w0.T + b0
    erf_gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    tanh_gelu = torch.nn.functional.gelu(h, approximate="tanh")
    with torch.no_grad():
        got = proj(x)
    assert (got - (erf_gelu @ w2.T + b2)).abs().max() < 1e-6
    assert (got - (tanh_gelu @ w2.T + b2)).abs().max() > 1e-5  # and not the tanh approximation


def test_encode_image_projects_tower_features():
    tower = tiny_tower("clip")
    cfg = tiny_config("phi")
    tensors = random_tensors(cfg, tower, seed=2)
    ref = ReferenceModel.from_tensors(cfg, tower, tensors)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        feats = ref.encode_image(pixels)
        h = ref.vision(pixels) @ torch.from_numpy(tensors["projector.0.weight"]).T \
            + torch.from_numpy(tensors["projector.0.bias"])
        want = torch.nn.functional.gelu(h) @ torch.from_numpy(tensors["projector.2.weight"]).T \
            + torch.from_numpy(tensors["projector.2.bias"])
    assert feats.shape == (1, 16, cfg.hidden_size)
    assert (feats - want).abs().max() < 1e-5
