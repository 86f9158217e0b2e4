"""Export options and the precision plan (which graph gets which scheme), and the hub-id resolution, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe.errors import CheckpointError, EdgeMoEError
from edgemoe.export import hub
from edgemoe.export.options import ExportOptions, parse_size, plan_precisions
from edgemoe.quant.metrics import AccuracyBudget
from edgemoe.quant.schemes import Precision, QuantError


@pytest.mark.parametrize("text, size", [("123456", 123456), ("1.5GB", 1_500_000_000), ("800 MB", 800_000_000),
                                        ("2GiB", 2 * 2**30), ("0.5kb", 500), ("1e9", 10**9)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "1.5XB", "-3MB", "0", "2G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(EdgeMoEError, match="size"):
        parse_size(text)


def test_options_parse_and_reject() -> None:
    o = ExportOptions.parse("auto", "cpu", None, "top1=0.95", "1.5GB")
    assert o.accuracy_budget == AccuracyBudget(0.95, 0.02) and o.size_budget == 1_500_000_000
    for kw, msg in [(dict(precision="int3"), "unknown precision 'int3'"), (dict(target="tpu"), "unknown target"),
                    (dict(precision="int4", size_budget="1GB"), "auto only"),
                    (dict(vision_precision="auto"), "unknown vision precision")]:
        with pytest.raises(EdgeMoEError, match=msg):
            ExportOptions.parse(**kw)
    with pytest.raises(QuantError, match="bad accuracy budget"):
        ExportOptions.parse("auto", accuracy_budget="top5=1")


def _p(plan, what: str) -> Precision:
    return getattr(plan, what).precision


def test_uniform_plans() -> None:
    int4 = plan_precisions(ExportOptions(precision="int4"))
    assert (_p(int4, "experts"), _p(int4, "trunk"), _p(int4, "vision"), _p(int4, "embed")) == \
        (Precision.INT4, Precision.INT4, Precision.INT8, Precision.FP16)
    fp32 = plan_precisions(ExportOptions(precision="fp32"))
    assert {_p(fp32, w) for w in ("experts", "trunk", "vision", "embed")} == {Precision.FP32}
    int8 = plan_precisions(ExportOptions(precision="int8", vision_precision="int4"))
    assert _p(int8, "vision") is Precision.INT4 and _p(int8, "embed") is Precision.FP16
    assert int4.notes == () and int4.levels == ()


def test_kv_cache_precision_follows_the_trunk_unless_asked() -> None:
    assert plan_precisions(ExportOptions(precision="int4")).kv_cache == "fp16"
    assert plan_precisions(ExportOptions(precision="auto")).kv_cache == "fp16"
    fp32 = plan_precisions(ExportOptions(precision="fp32"))
    assert fp32.kv_cache == "fp32" and fp32.attention_check is Precision.FP32
    half = plan_precisions(ExportOptions(precision="fp32", kv_cache="fp16"))
    assert half.kv_cache == "fp16" and half.attention_check is Precision.FP16  # validated at fp16's tolerance
    assert plan_precisions(ExportOptions(precision="int4", kv_cache="fp32")).to_dict()["kv_cache"] == "fp32"
    with pytest.raises(EdgeMoEError, match="unknown KV cache precision 'int8'"):
        ExportOptions(kv_cache="int8")


def test_auto_plans_and_cuda() -> None:
    cpu = plan_precisions(ExportOptions(precision="auto"))
    assert cpu.experts is None and cpu.levels == (Precision.INT8, Precision.INT4)
    assert _p(cpu, "trunk") is Precision.INT8 and _p(cpu, "vision") is Precision.INT8
    cuda = plan_precisions(ExportOptions(precision="auto", target="cuda"))
    assert cuda.levels == (Precision.FP16, Precision.INT4)
    # The trunk builders compute in fp32 only: an fp16 trunk is built at fp32, and the plan says so.
    assert _p(cuda, "trunk") is Precision.FP32 and any("fp32" in n for n in cuda.notes)
    int4_cuda = plan_precisions(ExportOptions(precision="int4", target="cuda"))
    assert int4_cuda.experts.compute_dtype.name == "float16" and _p(int4_cuda, "trunk") is Precision.FP32
    fp16_cpu = plan_precisions(ExportOptions(precision="fp16"))
    assert any("x86" in n for n in fp16_cpu.notes)
    with pytest.raises(QuantError, match="no CUDA kernel"):
        plan_precisions(ExportOptions(precision="int8", target="cuda"))


def test_hub_id_offline_is_one_clear_line(monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kw):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.\nTo enable downloads, set HF_HUB_OFFLINE=0.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as info:
        hub.resolve_checkpoint("LanguageBind/MoE-LLaVA-StableLM-1.6B-4e")
    msg = str(info.value)
    assert "\n" not in msg and "could not be downloaded" in msg and "--local-dir" in msg


def test_hub_id_download_and_local_paths(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    seen = {}

    def fake(repo_id, allow_patterns):
        seen.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.resolve_checkpoint("LanguageBind/MoE-LLaVA-Qwen-1.8B-4e") == tmp_path
    assert seen["repo_id"] == "LanguageBind/MoE-LLaVA-Qwen-1.8B-4e" and "*.safetensors" in seen["patterns"]
    assert hub.resolve_checkpoint(tmp_path) == tmp_path  # an existing path is never looked up
    with pytest.raises(CheckpointError, match="not found"):
        hub.resolve_checkpoint(str(tmp_path / "missing" / "deeper"))
    assert not hub.is_hub_id("./a/b") and not hub.is_hub_id("a/../b") and hub.is_hub_id("a-b/c.d_e")
