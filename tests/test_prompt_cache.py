"""The prompt cache: KV prefix write -> read round trips (split and shared layouts), refusals that leave the
cache alone, and a second question about an image in a fresh session that skips the vision tower and the
image prefill yet answers exactly as a cold run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.model.config import KVLayout
from edgemoe.model.image import ImageInput
from edgemoe.runtime import ChatSession, GenerationOptions
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.prompt_cache import PromptCache, pixels_digest
from edgemoe.runtime.stats import rss_high_water
from test_runtime_fixtures import tiny  # noqa: F401

POSITIONS = [1, 2, -200, -200, -200, 7]


def _filled(layout: KVLayout, length: int, seed: int = 0, dtype: str = "float32") -> KVCache:
    cache = KVCache(3, layout, 16, dtype)
    rng = np.random.default_rng(seed)
    for buffer in cache.buffers():
        buffer[...] = rng.standard_normal(buffer.shape)
    cache.advance(length)
    return cache


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", [KVLayout(2, 4, False), KVLayout(1, 6, True)], ids=["split", "shared"])
def test_a_saved_prefix_reads_back_into_a_fresh_cache(tmp_path: Path, layout: KVLayout, dtype: str) -> None:
    store = PromptCache(tmp_path)
    source = _filled(layout, len(POSITIONS), dtype=dtype)
    store.save(source, POSITIONS[:5], b"image")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    target = _filled(layout, 9, seed=1, dtype=dtype)
    assert store.restore(target, POSITIONS[:5], b"image")
    assert target.length == 5 and store.hits == 1
    for got, want in zip(target.buffers(), source.buffers()):
        np.testing.assert_array_equal(got[:, :, :5], want[:, :, :5])
    assert len(target.buffers()) == (3 if layout.shared else 6)  # 3 layers: keys (and values)


def test_other_positions_images_or_layouts_miss_and_leave_the_cache_alone(tmp_path: Path) -> None:
    store = PromptCache(tmp_path)
    layout = KVLayout(2, 4, False)
    store.save(_filled(layout, 6), POSITIONS[:5], b"image")
    target = _filled(layout, 4, seed=1)
    before = [b.copy() for b in target.buffers()]
    assert not store.restore(target, POSITIONS[:4], b"image")  # another prefix
    assert not store.restore(target, POSITIONS[:5], b"other image")
    assert not store.restore(KVCache(3, KVLayout(2, 8, False), 16), POSITIONS[:5], b"image")  # another model
    assert not store.restore(_filled(layout, 4, dtype="float16"), POSITIONS[:5], b"image")  # another cache dtype
    assert store.misses == 4 and store.hits == 0 and target.length == 4
    assert all(np.array_equal(a, b) for a, b in zip(target.buffers(), before))


def test_a_truncated_entry_empties_the_cache_instead_of_half_filling_it(tmp_path: Path) -> None:
    store = PromptCache(tmp_path)
    layout = KVLayout(2, 4, False)
    store.save(_filled(layout, 6), POSITIONS[:5], b"image")
    (entry,) = tmp_path.glob("prefix-*.kv")
    entry.write_bytes(entry.read_bytes()[:-10])
    target = _filled(layout, 4, seed=1)
    assert not store.restore(target, POSITIONS[:5], b"image")
    assert target.length == 0


def test_image_features_round_trip_keyed_by_pixels(tmp_path: Path) -> None:
    store = PromptCache(tmp_path)
    image = ImageInput(np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32))
    key = pixels_digest(image)
    assert store.features(key) is None
    rows = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    store.save_features(key, rows)
    np.testing.assert_array_equal(store.features(key), rows)
    tiled = ImageInput(image.pixels, (1, 1))
    assert pixels_digest(tiled) != key  # the same views as a tile grid are another input


@pytest.mark.parametrize("family, budgeted", [("stablelm", False), ("deepseek-vl2-tiny", True)])
def test_a_second_question_in_a_fresh_session_skips_the_image_and_answers_as_cold(
        tiny, tmp_path: Path, monkeypatch, family: str, budgeted: bool) -> None:
    monkeypatch.setenv("EDGEMOE_CACHE_DIR", str(tmp_path))
    bundle = tiny.bundle(family, "int4")
    # The plan counts this test process's high-water RSS (whatever ran before it) as start-up: leave room above it.
    budget = rss_high_water() + (512 << 20) if budgeted else None
    cached = GenerationOptions(max_tokens=8, prompt_cache=True, memory_budget=budget)
    with ChatSession(bundle, tiny.image, cached) as first:
        first.ask("What is in the image?")
    assert len(list(tmp_path.rglob("prefix-*.kv"))) == 1 and len(list(tmp_path.rglob("image-*.npy"))) == 1
    with ChatSession(bundle, tiny.image, cached) as second:
        warm = second.ask("What colour is it?")
        assert not second.trunk.vision_resident  # the tower was never opened
    with ChatSession(bundle, tiny.image, GenerationOptions(max_tokens=8, memory_budget=budget)) as cold:
        want = cold.ask("What colour is it?")
    assert warm.token_ids == want.token_ids
    assert warm.stats.prompt_tokens == want.stats.prompt_tokens
    image_end = want.stats.prompt_tokens - warm.stats.prefill_tokens
    assert warm.stats.prefill_tokens < want.stats.prefill_tokens and image_end >= want.stats.image_tokens
