"""The runtime against the torch reference: same tokens, same logits (fp32 bundles, every family)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.bundle import Bundle
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.reference import ReferenceModel
from edgemoe.reference.generate import greedy_generate
from test_runtime_fixtures import FAMILIES, image_input, prompt_ids, run_engine, tiny  # noqa: F401 (fixture)

TOKENS = 10
LOGIT_TOL = 1e-4


def reference_run(tiny, family: str, ids: list[int], tokens: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """The reference's greedy ids (`generate`) and its logits at every step of `tokens` (teacher-forced)."""
    manifest = Bundle.open(tiny.bundle(family)).manifest
    model = ReferenceModel.from_checkpoint(Checkpoint.open(tiny.checkpoint(family)))
    limit, eos = manifest.tokenizer["len_tokenizer"], manifest.tokenizer["eos_token_id"]
    image = image_input(tiny.bundle(family), tiny.image)
    pixels = torch.from_numpy(image.pixels)
    with torch.no_grad():
        features = (model.encode_tiles(pixels, *image.grid) if image.tiled else model.encode_image(pixels)[0])
    greedy = greedy_generate(model, model.embed(ids, [features]).embeds, TOKENS, [eos], limit)
    with torch.no_grad():
        cache = model.new_cache()
        logits = [model(model.embed(ids, [features]).embeds, cache, logit_limit=limit)[0, -1]]
        for t in tokens[:-1]:
            logits.append(model(model.embed_tokens(torch.tensor([[t]])), cache, logit_limit=limit)[0, -1])
    return list(greedy.token_ids), [x.numpy() for x in logits]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_bundle_matches_the_torch_reference(tiny, family: str) -> None:
    ids = prompt_ids(tiny.bundle(family))
    tokens, logits, _ = run_engine(tiny.bundle(family), tiny.image, max_tokens=TOKENS, ids=ids)
    ref_tokens, ref_logits = reference_run(tiny, family, ids, tokens)
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) == len(tokens)
    limit = Bundle.open(tiny.bundle(family)).manifest.tokenizer["len_tokenizer"]
    for step, (got, want) in enumerate(zip(logits, ref_logits)):
        masked = ~np.isfinite(want)
        assert np.array_equal(~np.isfinite(got), masked), f"step {step}: masked logits differ"
        # MoE-LLaVA pads its vocabulary past len(tokenizer); DeepSeek-VL2's tokenizer fills it
        assert masked.any() == (limit < len(want)), "exactly the ids past len(tokenizer) are masked"
        err = np.abs(got[~masked] - want[~masked]).max()
        assert err < LOGIT_TOL, f"step {step} ({'prefill' if step == 0 else 'decode'}): max |diff| {err:.2e}"


def test_int4_bundle_answers_close_to_fp32(tiny) -> None:
    fp32_tokens, fp32_logits, _ = run_engine(tiny.bundle("stablelm"), tiny.image, max_tokens=6)
    tokens, logits, _ = run_engine(tiny.bundle("stablelm", "int4"), tiny.image, max_tokens=6)
    again, _, _ = run_engine(tiny.bundle("stablelm", "int4"), tiny.image, max_tokens=6)
    assert tokens == again  # deterministic
    assert tokens[0] == fp32_tokens[0]  # the tiny models' successor logit wins by a wide margin
    finite = np.isfinite(fp32_logits[0])
    assert np.corrcoef(logits[0][finite], fp32_logits[0][finite])[0, 1] > 0.95


@pytest.mark.parametrize("family", ["stablelm", "deepseek-vl2-small"])  # split K/V, and MLA's shared latent
def test_fp16_kv_cache_answers_as_fp32(tiny, family: str, tmp_path) -> None:
    """The same fp32 weights with the KV cache stored in fp16 (what int4/int8 bundles get by default):
    the buffers take half the bytes, the greedy tokens are the same and every logit stays within fp16
    rounding of the fp32-cache bundle's."""
    from edgemoe.export.options import ExportOptions
    from edgemoe.export.pipeline import export_bundle
    from edgemoe.model.create import create_checkpoint
    from edgemoe.runtime.trunk import Trunk

    ckpt = tiny.checkpoint(family)
    if not ckpt.exists():
        ckpt = create_checkpoint(tmp_path / "ckpt", family, "tiny").path
    bundles = {kv: tmp_path / kv for kv in ("fp32", "fp16")}
    for kv, path in bundles.items():
        export_bundle(ckpt, path, ExportOptions(precision="fp32", kv_cache=kv))
    caches = {kv: Trunk.open(Bundle.open(path)).new_cache(64) for kv, path in bundles.items()}
    assert caches["fp16"].dtype == np.float16 and caches["fp32"].dtype == np.float32
    assert caches["fp16"].nbytes * 2 == caches["fp32"].nbytes
    assert Bundle.open(bundles["fp16"]).manifest.kv_value_bytes == 2
    want_tokens, want_logits, _ = run_engine(bundles["fp32"], tiny.image, max_tokens=TOKENS)
    tokens, logits, _ = run_engine(bundles["fp16"], tiny.image, max_tokens=TOKENS)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        finite = np.isfinite(want)
        scale = np.abs(want[finite]).max()
        assert np.abs(got[finite] - want[finite]).max() <= 2e-3 * scale


@pytest.mark.parametrize("family,precision", [("stablelm", "int4"), ("stablelm", "fp32"), ("deepseek-vl2-tiny", "fp32")])
def test_a_chunked_prefill_computes_the_same_logits(tiny, family: str, precision: str, monkeypatch) -> None:
    """Prefill in chunks (engine.PREFILL_CHUNK) and in one pass give the same tokens, and logits equal
    up to rounding: GEMM kernels block by the number of rows (fp32 everywhere; the int4 kernels too on
    AVX-512 VNNI, measured: a 4e-6 difference in 3.3, where AVX2 gave identical bits), so a row's
    sums may be added in another order."""
    import edgemoe.runtime.engine as engine

    bundle = tiny.bundle(family, precision)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 1 << 20)  # one pass
    whole = run_engine(bundle, tiny.image, max_tokens=TOKENS)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 7)  # a prompt of dozens of positions: many chunks, a ragged tail
    chunked = run_engine(bundle, tiny.image, max_tokens=TOKENS)
    assert chunked[0] == whole[0]
    for got, want in zip(chunked[1], whole[1]):
        finite = np.isfinite(want)
        assert np.array_equal(finite, np.isfinite(got))
        assert np.abs(got[finite] - want[finite]).max() <= 1e-5 * np.abs(want[finite]).max()
