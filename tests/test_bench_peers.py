"""Peers: accelerate's disk offload equals the resident model (routers pinned), and the peer processes run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from edgemoe.bench import peer_child
from edgemoe.bench.budgets import parse_budgets
from edgemoe.bench.limits import Bandwidths
from edgemoe.bench.peers import peer_steps, run_peers
from edgemoe.bench.prompt import synthetic_image
from edgemoe.bench.sweep import BenchOptions, SweepContext
from edgemoe.bundle import Bundle
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.create import create_checkpoint
from edgemoe.reference.model import ReferenceModel
from test_bench_limits import synthetic_manifest
from test_bench_sweep import FAKE_ASK, write_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_checkpoint(tmp_path_factory.mktemp("peers") / "tiny", "stablelm", "tiny").path


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen stores q, k and v fused in c_attn: row slices that cannot be read in place."""
    return create_checkpoint(tmp_path_factory.mktemp("peers") / "qwen", "qwen", "tiny").path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_image(tmp_path_factory.mktemp("img") / "img.png")


def test_pin_splits_the_covering_entry() -> None:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2),
                                                                              torch.nn.Linear(2, 2)))
    device_map = {"": "disk"}
    peer_child.pin(model, device_map, "1.0", "cpu")
    assert device_map == {"0": "disk", "1.0": "cpu", "1.1": "disk"}


@pytest.mark.parametrize("family", ["stablelm", "qwen"])
def test_accelerate_offload_equals_the_resident_model(family: str, tiny: Path, tiny_qwen: Path, image: Path,
                                                      tmp_path: Path) -> None:
    """With 1 byte of RAM every module but the routers is on disk, and the logits are unchanged: the
    routers must be pinned, since MoELayer reads router.weight without calling the router (torch
    computes on a meta tensor without complaint otherwise). Weights stored as they are in the checkpoint
    are read from its safetensors in place; only the rest (Qwen's fused q/k/v rows) is copied."""
    from accelerate import dispatch_model

    tiny = tiny if family == "stablelm" else tiny_qwen
    ckpt = Checkpoint.open(tiny)
    peer_child.prepare_offload(argparse.Namespace(checkpoint=tiny, dtype="fp32", offload_dir=tmp_path / "w"))
    index = json.loads((tmp_path / "w" / "index.json").read_text())
    in_place = {k for k, v in index.items() if "safetensors_file" in v}
    copied = {p.name.removesuffix(".dat") for p in (tmp_path / "w").glob("*.dat")}
    assert in_place | copied == set(index) and not in_place & copied
    assert all(Path(index[k]["safetensors_file"]).parent == tiny.resolve() for k in in_place)
    if family == "stablelm":
        assert not copied  # every tensor is stored as the model uses it
    else:
        assert copied and all(".attn." in k or "vision." in k for k in copied) and len(in_place) > len(copied)
    ids = peer_child.prompt_inputs(ckpt, "What is this?")[0]
    prepared = peer_child.image_of(ckpt, image)
    model = peer_child._meta_model(ckpt, torch.float32)
    device_map = peer_child.device_map_for(model, 1)
    routers = [k for k in device_map if k.endswith(peer_child.ROUTER_SUFFIX)]
    assert len(routers) == len(ckpt.config.moe.layers) and all(device_map[k] == "cpu" for k in routers)
    assert "disk" in device_map.values()
    peer_child._load_resident(model, device_map, tmp_path / "w")
    model = dispatch_model(model, device_map, main_device="cpu", offload_dir=str(tmp_path / "w"),
                           preload_module_classes=peer_child.PRELOAD)
    ref = ReferenceModel.from_checkpoint(ckpt, torch.float32)
    with torch.inference_mode():
        want = ref(ref.embed(ids, [ref.encode(prepared)]).embeds)
        got = model(model.embed(ids, [model.encode(prepared)]).embeds)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_peers_run_in_fresh_processes(tiny: Path, image: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_ASK.format(python=sys.executable).replace(
        'assert args[:3] == ["-m", "edgemoe.cli", "ask"], args',
        'import os\nif args[:2] != ["-m", "edgemoe.cli"]: os.execv(sys.executable, [sys.executable] + args)'))
    fake.chmod(0o755)
    bundle = Bundle.open(write_bundle(tmp_path / "bundle", synthetic_manifest()))
    options = BenchOptions(expert_budgets=parse_budgets("50%"), tokens=4, peers=True, checkpoint=tiny,
                           peer_dtypes=("fp32",), transformers_dtypes=("fp32",), accelerate_dtype="fp32", python=str(fake), image=image)
    ctx = SweepContext(bundle, options, image, Bandwidths(1e10, None, 1, 1, 1e9, 4e9, 1, 1), None)
    labels: list[str] = []
    peers = run_peers(ctx, [], tmp_path / "scratch", labels.append)
    assert [p.engine for p in peers] == ["edgemoe-resident", "torch-fp32", "transformers-fp32", "accelerate-fp32"]
    assert len(labels) == peer_steps(options) == 5
    assert all(p.ok for p in peers), [p.error for p in peers]
    resident, reference, hf, offloaded = peers
    assert hf.token_ids == reference.token_ids and hf.stats.get("kv_cache") == "static"
    assert hf.stats.prompt_tokens == reference.stats.prompt_tokens
    assert resident.expert_budget == "100%" and resident.stats.cache_hits == 100
    assert len(reference.token_ids) == 4 and reference.stats.decode_tokens_per_s > 0
    assert reference.peak_rss_bytes > 100 << 20 and reference.stats.prompt_tokens > 16
    assert offloaded.token_ids == reference.token_ids  # same weights, same greedy tokens
    manifest = bundle.manifest  # no edgemoe run at 50%: trunk bytes + half the experts
    assert offloaded.budget_bytes == manifest.total_bytes - manifest.expert_bytes_total // 2
    assert offloaded.stats.get("disk_entries") > 0 and offloaded.stats.get("resident_weight_bytes") > 0
