"""DeepSeek-VL2-Tiny through the runtime: offloaded == resident, the fp32 bundle token-exact with the
reference under a 1.5-experts-per-layer budget, upstream's prompt ids, and the bad inputs of this family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgemoe.bundle import Bundle
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.prompt import IMAGE_TOKEN_INDEX, Conversation
from edgemoe.model.tokenizer import load_tokenizer
from edgemoe.offload import POLICIES
from edgemoe.reference import ReferenceModel
from edgemoe.reference.generate import greedy_generate
from edgemoe.runtime import ChatSession, GenerationOptions, ask
from test_runtime_fixtures import edgemoe_cli, image_input, one_expert_bytes, prompt_ids, run_engine, tiny  # noqa: F401

FAMILY = "deepseek-vl2-tiny"
TOKENS = 8


@pytest.fixture(scope="module")
def resident(tiny):
    return run_engine(tiny.bundle(FAMILY, "int4"), tiny.image, None, max_tokens=TOKENS, store="sessions")


@pytest.mark.parametrize("policy", POLICIES)
def test_offloaded_equals_resident_at_every_budget(tiny, resident, policy: str) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    one = one_expert_bytes(bundle)
    want_tokens, want_logits, _ = resident
    for experts in (16, 6, 3, 1):  # both layers' 8 experts ... one expert in all
        tokens, logits, stats = run_engine(bundle, tiny.image, experts * one, policy, max_tokens=TOKENS)
        assert tokens == want_tokens, f"{experts} experts, {policy}"
        assert all(np.array_equal(g, w) for g, w in zip(logits, want_logits)), f"{experts} experts, {policy}"
        assert stats.cache.peak_bytes <= experts * one
        if experts < 16:
            assert stats.cache.misses > 0 and stats.cache.evictions > 0


def _reference_tokens(tiny, question: str, tokens: int) -> list[int]:
    manifest = Bundle.open(tiny.bundle(FAMILY)).manifest
    model = ReferenceModel.from_checkpoint(Checkpoint.open(tiny.checkpoint(FAMILY)))
    ids = prompt_ids(tiny.bundle(FAMILY), question)
    with torch.no_grad():
        features = model.encode(image_input(tiny.bundle(FAMILY), tiny.image))
    result = greedy_generate(model, model.embed(ids, [features]).embeds, tokens, [manifest.tokenizer["eos_token_id"]],
                             manifest.tokenizer["len_tokenizer"])
    return list(result.token_ids)


def test_fp32_bundle_is_token_exact_with_the_reference_under_a_small_budget(tiny) -> None:
    bundle = tiny.bundle(FAMILY)
    want = _reference_tokens(tiny, "What is in the image?", 12)
    layers = len(Bundle.open(bundle).manifest.model_config().moe.layers)
    budget = int(1.5 * layers * one_expert_bytes(bundle))  # about 1.5 experts per MoE layer of top-3
    resident = ask(bundle, "What is in the image?", tiny.image, max_tokens=12)
    offloaded = ask(bundle, "What is in the image?", tiny.image, max_tokens=12, expert_budget=budget)
    assert list(resident.token_ids) == list(offloaded.token_ids) == want
    assert offloaded.stats.cache_misses > 0


def test_image_rows_follow_the_tile_grid(tiny) -> None:
    bundle = tiny.bundle(FAMILY)
    prepared = image_input(bundle, tiny.image)  # 72 x 48 image, 42-pixel tiles
    rows, cols = prepared.grid
    result = ask(bundle, "What is in the image?", tiny.image, max_tokens=2)
    assert result.stats.image_tokens == 2 * 3 + 1 + (2 * rows) * (2 * cols + 1)
    assert prepared.pixels.shape[0] == 1 + rows * cols


def _upstream_ids(tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    """format_messages_v2 (processing_deepseek_vl_v2.py) for the "deepseek" template, system "" :
    bos, each user turn as get_prompt() of (User: msg, Assistant: "") tokenized piecewise around
    <image>, each answer stripped + eos. The image's own ids are the runtime's single marker here."""
    ids = [tokenizer.bos_token_id]
    for role, content in turns:
        if role == "user":
            prompt = "<|User|>: " + content.strip() + "\n\n" + "<|Assistant|>:"
            pieces = prompt.split("<image>")
            for i, piece in enumerate(pieces):
                if i:
                    ids.append(IMAGE_TOKEN_INDEX)
                ids += tokenizer.encode(piece)
        else:
            ids += tokenizer.encode(content.strip()) + [tokenizer.eos_token_id]
    return ids


def test_prompt_ids_follow_upstream_format_messages_v2(tiny) -> None:
    tokenizer = load_tokenizer(tiny.bundle(FAMILY) / "tokenizer", "deepseek_vl2")
    conv = Conversation.for_family("deepseek_vl2").add_user("What is this?", image=True)
    assert conv.encode(tokenizer) == _upstream_ids(tokenizer, [("user", "<image>\nWhat is this?")])
    conv = conv.add_assistant(" A cat. ").add_user("And its colour?")
    want = _upstream_ids(tokenizer, [("user", "<image>\nWhat is this?"), ("assistant", "A cat."),
                                     ("user", "And its colour?")])
    assert conv.encode(tokenizer) == want
    assert want[0] == 0 and want.count(1) == 1  # Tiny's bos 0, one eos after the answer


def test_chat_reuses_the_image_prefix_and_answers_like_a_fresh_prompt(tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    with ChatSession(bundle, tiny.image, GenerationOptions(max_tokens=4)) as chat:
        first = chat.ask("What is in the image?")
        second = chat.ask("Describe it.")
        assert second.stats.prefill_tokens < second.stats.prompt_tokens  # the first turn stayed cached
    assert first.stats.image_tokens > 0 and len(second.token_ids) == 4


def test_an_image_too_large_to_tile_is_refused_in_one_line(tiny, tmp_path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (9000, 8000), (10, 20, 30)).save(big)  # 72 Mpx: past the decompression limit
    result = edgemoe_cli("ask", str(tiny.bundle(FAMILY)), "What is it?", "--image", str(big), "--max-tokens", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "pixels" in result.stderr


@pytest.mark.parametrize("count", [2, 3])
def test_several_images_match_the_reference(tiny, tmp_path, count: int) -> None:
    """Two images are tiled, three or more go in as one view each (upstream's cropping rule)."""
    from edgemoe.model.image import prepare_image

    bundle = tiny.bundle(FAMILY)
    paths = [tiny.image]
    for i in range(1, count):
        path = tmp_path / f"extra{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30 + 40 * i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    manifest = Bundle.open(bundle).manifest
    cfg = manifest.model_config()
    model = ReferenceModel.from_checkpoint(Checkpoint.open(tiny.checkpoint(FAMILY)))
    tokenizer = load_tokenizer(bundle / "tokenizer", "deepseek_vl2")
    ids = Conversation.for_family("deepseek_vl2").add_user("Compare them.", images=count).encode(tokenizer)
    assert ids.count(IMAGE_TOKEN_INDEX) == count
    prepared = [prepare_image(p, manifest.processor_config(), cfg.image_aspect_ratio, cfg.candidate_resolutions,
                              tiled=count <= 2) for p in paths]
    if count > 2:  # one global and one local view each
        assert all(p.grid == (1, 1) for p in prepared)
    else:  # tiled as a lone image would be
        assert prepared[0].grid == image_input(bundle, tiny.image).grid != (1, 1)
    with torch.no_grad():
        features = [model.encode(p) for p in prepared]
    want = greedy_generate(model, model.embed(ids, features).embeds, 6, [manifest.tokenizer["eos_token_id"]],
                           manifest.tokenizer["len_tokenizer"])
    got = ask(bundle, "Compare them.", paths, max_tokens=6)
    assert list(got.token_ids) == list(want.token_ids)
    assert got.stats.image_tokens == sum(f.shape[0] for f in features)


def test_moe_llava_refuses_a_second_image_in_one_line(tiny) -> None:
    result = edgemoe_cli("ask", str(tiny.bundle("stablelm", "int4")), "Compare.", "--image", str(tiny.image),
                         "--image", str(tiny.image), "--max-tokens", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: this model takes 1 image(s) per conversation, got 2"
