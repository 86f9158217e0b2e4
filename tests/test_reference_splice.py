"""`ReferenceModel.embed` places image features exactly where upstream's
`prepare_inputs_labels_for_multimodal` does (batch 1, no attention mask, as the CLI and eval
scripts call it)."""

from __future__ import annotations

import pytest
import torch

from edgemoe.errors import EdgeMoEError
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.splice import IMAGE_TOKEN_INDEX
from edgemoe.reference.tiny import random_tensors, tiny_config, tiny_tower

IGNORE_INDEX = -100


def upstream_prepare_inputs(embed_tokens, input_ids, image_features):
    """moellava/model/llava_arch.py, the part that runs for image batches, with attention_mask and
    position_ids None, copied as literally as the test allows. Labels are the ids (as in training)
    rather than None, so the image positions show up as IGNORE_INDEX."""
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    labels = input_ids.clone()
    input_ids = [cur_input_ids[cur_attention_mask] for cur_input_ids, cur_attention_mask in zip(input_ids, attention_mask)]
    labels = [cur_labels[cur_attention_mask] for cur_labels, cur_attention_mask in zip(labels, attention_mask)]
    new_input_embeds = []
    new_labels = []
    cur_image_idx = 0
    for batch_idx, cur_input_ids in enumerate(input_ids):
        num_images = (cur_input_ids == IMAGE_TOKEN_INDEX).sum()
        if num_images == 0:
            cur_image_features = image_features[cur_image_idx]
            cur_input_embeds_1 = embed_tokens(cur_input_ids)
            cur_input_embeds = torch.cat([cur_input_embeds_1, cur_image_features[0:0]], dim=0)
            new_input_embeds.append(cur_input_embeds)
            new_labels.append(labels[batch_idx])
            cur_image_idx += 1
            continue
        image_token_indices = [-1] + torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0].tolist() + [cur_input_ids.shape[0]]
        cur_input_ids_noim = []
        cur_labels = labels[batch_idx]
        cur_labels_noim = []
        for i in range(len(image_token_indices) - 1):
            cur_input_ids_noim.append(cur_input_ids[image_token_indices[i] + 1:image_token_indices[i + 1]])
            cur_labels_noim.append(cur_labels[image_token_indices[i] + 1:image_token_indices[i + 1]])
        split_sizes = [x.shape[0] for x in cur_labels_noim]
        cur_input_embeds = embed_tokens(torch.cat(cur_input_ids_noim))
        cur_input_embeds_no_im = torch.split(cur_input_embeds, split_sizes, dim=0)
        cur_new_input_embeds = []
        cur_new_labels = []
        for i in range(num_images + 1):
            cur_new_input_embeds.append(cur_input_embeds_no_im[i])
            cur_new_labels.append(cur_labels_noim[i])
            if i < num_images:
                cur_image_features = image_features[cur_image_idx]
                cur_image_idx += 1
                cur_new_input_embeds.append(cur_image_features)
                cur_new_labels.append(torch.full((cur_image_features.shape[0],), IGNORE_INDEX,
                                                 device=cur_labels.device, dtype=cur_labels.dtype))
        new_input_embeds.append(torch.cat(cur_new_input_embeds))
        new_labels.append(torch.cat(cur_new_labels))
    max_len = max(x.shape[0] for x in new_input_embeds)
    position_ids = torch.zeros((len(new_input_embeds), max_len), dtype=position_ids.dtype)
    for i, cur_new_embed in enumerate(new_input_embeds):
        cur_len = cur_new_embed.shape[0]
        position_ids[i, :cur_len] = torch.arange(0, cur_len, dtype=position_ids.dtype)
    return torch.stack(new_input_embeds, dim=0), position_ids, torch.stack(new_labels)


@pytest.fixture(scope="module")
def model():
    cfg, tower = tiny_config("stablelm"), tiny_tower("clip")
    return ReferenceModel.from_tensors(cfg, tower, random_tensors(cfg, tower, 0))


@pytest.mark.parametrize("ids", [
    [1, 2, 3, IMAGE_TOKEN_INDEX, 4, 5],  # the chat prompt's shape: "... USER: <image>\n..."
    [IMAGE_TOKEN_INDEX, 4, 5],
    [1, 2, IMAGE_TOKEN_INDEX],
    [1, IMAGE_TOKEN_INDEX, 2, 3, IMAGE_TOKEN_INDEX, 6],  # two images, consumed in order
    [1, 2, 3],
])
def test_splice_matches_upstream(model, ids):
    n_images = ids.count(IMAGE_TOKEN_INDEX)
    pixels = torch.randn(max(n_images, 1), 3, 16, 16, generator=torch.Generator().manual_seed(len(ids)))
    with torch.no_grad():
        feats = model.encode_image(pixels)  # [I, 16, H]
        want, want_pos, labels = upstream_prepare_inputs(model.embed_tokens, torch.tensor([ids]), feats)
        got = model.embed(ids, feats[:n_images] if n_images else None)
    assert torch.equal(got.embeds, want)
    assert torch.equal(got.position_ids, want_pos)
    # The spans are exactly where upstream put IGNORE_INDEX labels (the image tokens).
    image_positions = set((labels[0] == IGNORE_INDEX).nonzero().flatten().tolist())
    assert image_positions == {p for start, stop in got.image_spans for p in range(start, stop)}
    assert len(got.image_spans) == n_images and all(b - a == 16 for a, b in got.image_spans)


def test_splice_rejects_marker_image_mismatch(model):
    feats = torch.zeros(1, 16, model.config.hidden_size)
    with pytest.raises(EdgeMoEError, match="marker"):
        model.embed([1, IMAGE_TOKEN_INDEX, 2, IMAGE_TOKEN_INDEX], feats)
    with pytest.raises(EdgeMoEError, match="marker"):
        model.embed([1, 2], feats)


def test_marker_id_agrees_with_prompt_module():
    from edgemoe.model import prompt

    assert prompt.IMAGE_TOKEN_INDEX == IMAGE_TOKEN_INDEX == -200
