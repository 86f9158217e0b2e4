"""The physical limit: bytes a token touches from a synthetic manifest, the bound arithmetic, the probes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgemoe.bench.limits import (Bandwidths, budget_curve, decode_bound, evict_pages, kv_cache_bytes,
                                  measure_bandwidths, measure_disk_read, measure_memory_bandwidth, token_bytes,
                                  uniform_paged_bytes)
from edgemoe.bundle import FileEntry, Manifest
from edgemoe.keys import ExpertKey
from edgemoe.model.config import ModelConfig, MoEConfig

SHA = "0" * 64
# 4 layers, MoE on 0 and 2 (4 experts, top-2), 2 KV heads of 8 dims, 100-token vocabulary.
CONFIG = ModelConfig(
    family="stablelm", vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2,
    num_kv_heads=2, head_dim=8, rotary_dim=4, rope_theta=10000.0, norm="layernorm", norm_eps=1e-5,
    parallel_block=False, mlp_act="silu_glu", qkv_bias=False, o_bias=False, mlp_bias=False, lm_head_bias=False,
    tie_word_embeddings=False, max_position_embeddings=4096, moe=MoEConfig((0, 2), (4, 4), 2), mm_hidden_size=32,
    mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
    image_aspect_ratio="pad", mm_image_tower="vision_tower")
EXPERT_SIZES = {0: 300, 2: 500}  # bytes per expert graph, by layer
VISION = {"kind": "clip", "hidden_size": 32, "intermediate_size": 64, "num_layers": 3, "num_heads": 4,
          "patch_size": 4, "image_size": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
          "select_feature": "patch"}


def synthetic_files() -> list[FileEntry]:
    """Known sizes: attention 4 x 1000, dense MLP 2 x 500, head 2000 (1500 graph + 500 data), router 100,
    embed 10000 (100 per row), vision 99999 (never touched by a decoded token), experts 4 x 300 + 4 x 500."""
    files = [FileEntry(f"graphs/layer{i}.attn.onnx", "attention", 1000, SHA, layer=i) for i in range(4)]
    files += [FileEntry(f"graphs/layer{i}.mlp.onnx", "dense_mlp", 500, SHA, layer=i) for i in (1, 3)]
    files += [FileEntry("graphs/head.onnx", "head", 1500, SHA, external_data="graphs/head.onnx.data"),
              FileEntry("graphs/head.onnx.data", "external_data", 500, SHA),
              FileEntry("routers.safetensors", "router", 100, SHA),
              FileEntry("graphs/embed.onnx", "embed", 10000, SHA),
              FileEntry("graphs/vision.onnx", "vision", 99999, SHA)]
    files += [FileEntry(f"experts/L{layer}/E{e}.onnx", "expert", size, SHA, expert=ExpertKey(layer, e))
              for layer, size in EXPERT_SIZES.items() for e in range(4)]
    return files


def synthetic_manifest() -> Manifest:
    return Manifest(model=CONFIG.to_dict(), target="cpu", files=tuple(synthetic_files()), vision=VISION,
                    prompt={"family": "stablelm"})


def test_token_bytes_counts_what_a_decoded_token_touches() -> None:
    tb = token_bytes(synthetic_manifest(), context_tokens=10)
    assert tb.trunk_bytes == 4 * 1000 + 2 * 500 + 2000 + 100  # head counted with its external data
    assert tb.embed_row_bytes == 100
    assert tb.experts_bytes == 2 * 300 + 2 * 500  # top-2 of each MoE layer
    assert tb.kv_bytes == 2 * 4 * 2 * 8 * 10 * 4 == kv_cache_bytes(synthetic_manifest(), 10)
    assert tb.resident_bytes == 7100 + 100 + 1600 + 5120
    assert tb.expert_bytes_total == 4 * 300 + 4 * 500 and tb.top_k == 2 and tb.moe_layers == 2


def test_bound_arithmetic_gives_known_tokens_per_s() -> None:
    tb = token_bytes(synthetic_manifest(), context_tokens=10)  # 13920 resident bytes
    bw = Bandwidths(memory_1t=13920.0, memory_mt=6960.0, memory_threads=2, memory_probe_bytes=1,
                    disk_cold=400.0, disk_warm=1600.0, disk_probe_bytes=1, disk_probe_files=1)
    cold = decode_bound(tb, 800, bw, cold=True)  # 1 s streaming + 800 / 400 = 2 s paging
    assert cold.seconds_per_token == pytest.approx(3.0) and cold.tokens_per_s == pytest.approx(1 / 3)
    assert cold.link == "disk" and cold.memory_bandwidth == 13920.0  # the faster of 1 and 2 threads
    warm = decode_bound(tb, 800, bw, cold=False)  # 1 s + 0.5 s
    assert warm.tokens_per_s == pytest.approx(1 / 1.5) and warm.link == "page cache"
    assert decode_bound(tb, 0, bw, cold=True).tokens_per_s == pytest.approx(1.0)
    mapped = decode_bound(tb, 800 * 13920 / 1600, bw, cold=False, mapped=True)  # pages mapped, not copied
    assert mapped.link == "page cache (mapped)" and mapped.link_bandwidth == 13920.0
    assert mapped.tokens_per_s == pytest.approx(warm.tokens_per_s)  # 1 s + 6960 B at memory speed = 0.5 s


def test_uniform_paging_matches_the_anchor_loads_per_layer() -> None:
    """4 experts, top-2: 2.0 / 1.5 / 1.0 / 0.5 expected loads per MoE layer for 0-3 cached experts."""
    tb = token_bytes(synthetic_manifest(), 10)
    per_load = tb.experts_bytes / (2 * tb.moe_layers)  # bytes of one average expert load
    for cached, loads in ((0, 2.0), (1, 1.5), (2, 1.0), (3, 0.5), (4, 0.0)):
        assert uniform_paged_bytes(tb, cached / 4) == pytest.approx(loads * tb.moe_layers * per_load)
    bw = Bandwidths(13920.0, None, 1, 1, 400.0, 1600.0, 1, 1)
    curve = budget_curve(tb, bw, True, [0.0, 0.5, 1.0])
    assert [f for f, _ in curve] == [0.0, 0.5, 1.0]
    assert curve[0][1] < curve[1][1] < curve[2][1] == pytest.approx(1.0)


def test_memory_probe_returns_positive_finite_rates() -> None:
    single, multi = measure_memory_bandwidth(4 << 20, repeats=2, threads=2)
    assert single > 0 and math.isfinite(single)
    assert multi is not None and multi > 0 and math.isfinite(multi)
    assert measure_memory_bandwidth(1 << 20, repeats=1, threads=1)[1] is None


def test_disk_probe_reads_files_cold_then_warm(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate((3 << 20, 1 << 20)):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(bytes([i + 1]) * size)
    cold, warm, read, nfiles = measure_disk_read(files, max_bytes=2 << 20, chunk=1 << 20)
    assert cold > 0 and warm > 0 and math.isfinite(cold) and math.isfinite(warm)
    assert read == 2 << 20 and nfiles == 1  # largest first, stopped at the limit
    assert measure_disk_read([tmp_path / "missing"]) == (None, None, 0, 0)
    assert evict_pages(files) == 4 << 20


def test_measure_bandwidths_combines_both_probes(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * (1 << 20))
    bw = measure_bandwidths([tmp_path / "a.bin"], memory_bytes=2 << 20, disk_bytes=1 << 20, repeats=1, threads=2)
    assert bw.memory >= bw.memory_1t > 0 and bw.disk_cold and bw.disk_probe_files == 1
    assert bw.link(True) == bw.disk_cold and bw.link(False) == bw.disk_warm
