"""DeepSeek-VL2-Small's multi-head latent attention: the exported graph against the reference, the latent
KV cache it writes, and the Small bundle end to end (token-exact with the reference, offloaded == resident).

The graph computes in the absorbed form over a cache of [c | k_pe] (576 values a position at full size);
the reference (`edgemoe.reference.mla`, itself checked against transformers' DeepseekV2Attention in
test_reference_deepseek.py) computes in the expanded form. Run as the runtime runs it: through
`AttentionCall`, the cache's valid rows bound as past_latent and its next rows as new_latent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.bundle import Bundle
from edgemoe.export import components
from edgemoe.export.latent_attention_graph import build_latent_attention
from edgemoe.export.onnx_ops import io_signature, session
from edgemoe.export.options import ExportOptions
from edgemoe.export.pipeline import export_bundle
from edgemoe.families.deepseek_vl2_files import config_json
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.config import parse_config
from edgemoe.model.create import create_checkpoint
from edgemoe.quant.lowering import QUANTIZED_OPS
from edgemoe.quant.schemes import Precision, Scheme
from edgemoe.reference import ReferenceModel
from edgemoe.reference.generate import greedy_generate
from edgemoe.runtime import ask
from edgemoe.runtime.attention_call import AttentionCall
from edgemoe.runtime.kv_cache import KVCache
from test_runtime_fixtures import image_input, one_expert_bytes, prompt_ids, run_engine, tiny  # noqa: F401

SCHEMES = [Scheme.default(p) for p in (Precision.FP32, Precision.INT8, Precision.INT4)]
STEPS = (5, 1, 1, 3)  # prefill, decode, decode, a later chunk
MAX = 16
LAYER = 1
ROPE_OFFSET = 600
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny Small-shaped (MLA) checkpoint, its reference model, and fp32 + int4 bundles."""
    root = tmp_path_factory.mktemp("small")
    ckpt_dir = create_checkpoint(root / "ckpt", "deepseek-vl2-small", "tiny").path
    for precision in ("fp32", "int4"):
        export_bundle(ckpt_dir, root / precision, ExportOptions(precision=precision))
    ckpt = Checkpoint.open(ckpt_dir)
    return ckpt_dir, ckpt, ReferenceModel.from_checkpoint(ckpt), root


def _layer_tensors(ckpt: Checkpoint, n: int) -> dict[str, np.ndarray]:
    return components.weights(ckpt, f"layers.{n}.", lambda k: k.startswith(("attn_norm.", "attn.", "mlp_norm.")))


@pytest.mark.parametrize("kv_cache", ["fp32", "fp16"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_latent_attention_matches_the_reference_through_the_runtimes_call(small, scheme: Scheme, kv_cache) -> None:
    """Prefill, two decoded tokens and a later chunk, each through `AttentionCall` (the valid rows bound
    as past_latent, the next rows as new_latent): h, m and the cache rows equal the reference's, and no
    row past the context is read or written (NaN there would poison the scores)."""
    _, ckpt, ref, _ = small
    cfg, m = ckpt.config, ckpt.config.mla
    model = build_latent_attention(cfg, _layer_tensors(ckpt, LAYER), scheme, kv_cache=kv_cache)
    if scheme.precision.is_integer:  # q|kv_a fused and o; W_uk / W_uv stay float (batched over heads)
        assert sum(n.op_type in QUANTIZED_OPS[scheme.precision] for n in model.graph.node) == 2
    call = AttentionCall(session(model), "attn")
    assert call.rows
    cache = KVCache(1, cfg.kv_layout, MAX, "float16" if kv_cache == "fp16" else "float32")
    cache.keys[0][...] = np.nan
    layer, rng = ref.layers[LAYER], np.random.default_rng(1)
    past_c = past_pe = None
    exact = scheme.precision is Precision.FP32 and kv_cache == "fp32"
    for n in STEPS:
        x = rng.standard_normal((n, cfg.hidden_size)).astype(np.float32)
        start = cache.length
        pos = torch.arange(start, start + n)[None]
        with torch.no_grad():
            h, mlp_in, c, pe = layer.attention_block(torch.from_numpy(x)[None], pos, past_c, past_pe)
        if kv_cache == "fp16":  # the reference attends over the rows as the cache holds them
            c, pe = c.half().float(), pe.half().float()
        past_c = c if past_c is None else torch.cat((past_c, c), dim=2)
        past_pe = pe if past_pe is None else torch.cat((past_pe, pe), dim=2)
        got_h, got_m = call(0, x, cache)
        cache.advance(n)
        want_cache = torch.cat((past_c, past_pe), dim=-1).numpy()[0, 0]  # [total, R + P]
        what = f"{scheme.label}, {kv_cache} cache, after {cache.length} tokens"
        for got, want, part in ((got_h - x, h.numpy()[0] - x, "h - x"), (got_m, mlp_in.numpy()[0], "m"),
                                (cache.keys[0][0, 0, :cache.length].astype(np.float32), want_cache, "latent cache")):
            if exact:
                assert float(np.abs(got - want).max()) < 1e-4, f"{what}: {part}"
            else:
                tol = scheme.tolerance if scheme.precision.is_integer else Scheme.default(Precision.FP16).tolerance
                tol.check(got, want, f"{what}: {part}")
        assert np.isnan(cache.keys[0][0, 0, cache.length:]).all()  # written in place, and only rows < total


def test_prefill_in_one_chunk_or_two_gives_the_same_rows_and_outputs(small) -> None:
    """The new rows attend to the past and causally to each other: a prompt in one call equals the
    same prompt in two (the chunked prefill the engine runs), to float rounding."""
    _, ckpt, _, _ = small
    cfg = ckpt.config
    call = AttentionCall(session(build_latent_attention(cfg, _layer_tensors(ckpt, LAYER), SCHEMES[0])), "attn")
    x = np.random.default_rng(2).standard_normal((9, cfg.hidden_size)).astype(np.float32)
    whole, parts = (KVCache(1, cfg.kv_layout, MAX) for _ in range(2))
    h_whole, _ = call(0, x, whole)
    h_first, _ = call(0, x[:4], parts)
    parts.advance(4)
    h_rest, _ = call(0, x[4:], parts)
    np.testing.assert_allclose(np.concatenate([h_first, h_rest]), h_whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(parts.keys[0][0, 0, :9], whole.keys[0][0, 0, :9], rtol=0, atol=1e-6)


def test_latent_attention_signature_reads_and_writes_latent_rows(small) -> None:
    _, ckpt, _, _ = small
    cfg = ckpt.config
    inputs, outputs = io_signature(build_latent_attention(cfg, _layer_tensors(ckpt, LAYER), SCHEMES[0]))
    width = str(cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim)
    assert [(i.name, i.shape) for i in inputs if i.name.startswith("past")] == [("past_latent", ("1", "T", width))]
    assert [(o.name, o.shape) for o in outputs if "latent" in o.name] == [("new_latent", ("1", "S", width))]


def test_the_runtime_cache_holds_576_values_a_position_at_full_small_size(tmp_path) -> None:
    cfg = parse_config(config_json("small", "full"))
    assert cfg.kv_layout.values_per_position == 576 and cfg.expanded_kv_values == 16 * (192 + 128)
    cache = KVCache(cfg.num_layers, cfg.kv_layout, capacity=10)
    assert cache.values[0] is cache.keys[0]
    assert cache.nbytes == cfg.num_layers * 576 * 4 * 10  # 62,208 B a position in fp32
    cache.length = 3
    cache.keys[5][0, 0, :3] = 7.0
    cache.reserve(20)  # growing keeps the rows and the sharing
    assert cache.values[5] is cache.keys[5] and (cache.keys[5][0, 0, :3] == 7.0).all()
    assert cache.nbytes == cfg.num_layers * 576 * 4 * 20


def test_inspect_reports_the_kv_bytes_the_runtime_allocates(small) -> None:
    """`inspect BUNDLE`'s KV line is what a position really costs in the runtime's cache: the latent in
    the attention graphs' own element type (fp32 for the fp32 bundle, fp16 for int4)."""
    from edgemoe.export.bundle_report import inspect_bundle
    from edgemoe.offload.sessions import cache_dtype

    _, _, _, root = small
    for precision, value_bytes in (("fp32", 4), ("int4", 2)):
        bundle = Bundle.open(root / precision)
        cfg = bundle.manifest.model_config()
        import onnxruntime as ort

        attn = ort.InferenceSession(str(bundle.path_of(next(e for e in bundle.manifest.files if e.role == "attention"))),
                                    providers=["CPUExecutionProvider"])
        cache = KVCache(cfg.num_layers, cfg.kv_layout, capacity=7, dtype=cache_dtype(attn))
        kv = inspect_bundle(root / precision)["kv_cache"]
        assert kv["value_bytes"] == value_bytes and kv["bytes_per_position"] * 7 == cache.nbytes, precision
        assert kv["expanded_values_per_position"] > kv["values_per_position"]  # MLA caches less than K and V


def _reference_tokens(small, image, tokens: int) -> list[int]:
    _, _, model, root = small
    bundle = root / "fp32"
    manifest = Bundle.open(bundle).manifest
    with torch.no_grad():
        features = model.encode(image_input(bundle, image))
    result = greedy_generate(model, model.embed(prompt_ids(bundle, QUESTION), [features]).embeds, tokens,
                             [manifest.tokenizer["eos_token_id"]], manifest.tokenizer["len_tokenizer"])
    return list(result.token_ids)


def test_small_fp32_bundle_is_token_exact_with_the_reference_resident_and_offloaded(small, tiny) -> None:
    _, _, _, root = small
    bundle = root / "fp32"
    want = _reference_tokens(small, tiny.image, 12)
    layers = len(Bundle.open(bundle).manifest.model_config().moe.layers)
    budget = int(1.5 * layers * one_expert_bytes(bundle))
    resident = ask(bundle, QUESTION, tiny.image, max_tokens=12)
    offloaded = ask(bundle, QUESTION, tiny.image, max_tokens=12, expert_budget=budget)
    assert list(resident.token_ids) == list(offloaded.token_ids) == want
    assert offloaded.stats.cache_misses > 0


def test_small_int4_offloaded_equals_resident(small, tiny) -> None:
    _, _, _, root = small
    bundle = root / "int4"
    want_tokens, want_logits, _ = run_engine(bundle, tiny.image, None, max_tokens=8, store="sessions")
    one = one_expert_bytes(bundle)
    for experts in (6, 1):
        tokens, logits, stats = run_engine(bundle, tiny.image, experts * one, max_tokens=8)
        assert tokens == want_tokens and all(np.array_equal(g, w) for g, w in zip(logits, want_logits))
        assert stats.cache.misses > 0
