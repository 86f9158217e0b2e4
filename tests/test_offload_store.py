"""OnnxExpertStore on a tiny real bundle (BundleWriter + build_mlp): loads, checks, and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgemoe.bundle import Bundle, reader
from edgemoe.keys import ExpertKey
from edgemoe.offload import ExpertLoadError, OffloadingProvider, OnnxExpertStore, ResidentProvider, sessions
from edgemoe.quant.graphs import mlp_reference
from offload_fakes import expert_weights, write_expert_bundle

H, F = 128, 256
PRECISION = {ExpertKey(1, 0): "int8", ExpertKey(3, 1): "int4"}  # the rest fp32: unequal sizes
KEYS = [ExpertKey(layer, e) for layer in (1, 3) for e in range(2)]




@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offload") / "bundle"
    write_expert_bundle(root, KEYS, PRECISION, H, F)
    return root


@pytest.fixture
def bundle(bundle_dir: Path, tmp_path: Path) -> Bundle:
    """A private copy, so tests may corrupt it."""
    copy = tmp_path / "b"
    for src in bundle_dir.rglob("*"):
        if src.is_file():
            dst = copy / src.relative_to(bundle_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return Bundle.open(copy)


def x_in() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3, H)).astype(np.float32)


def test_load_runs_the_expert_and_counts(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    store = OnnxExpertStore(bundle)
    key = ExpertKey(1, 1)
    runner = store.load(key)
    entry = bundle.expert_entry(key)
    np.testing.assert_allclose(runner.run(x_in()), mlp_reference(expert_weights(key, H, F), "silu_glu", x_in()), atol=1e-4)
    assert runner.nbytes == store.size_of(key) == entry.size  # file size: known before loading
    store.load(key)
    assert hashed == ["E1.onnx"]  # verified once; the second load costs a stat
    s = store.stats()
    assert (s.loads, s.failures, s.bytes_read) == (2, 0, 2 * entry.size) and s.load_seconds > 0
    assert {store.size_of(k) for k in KEYS} == {bundle.expert_entry(k).size for k in KEYS}
    assert len({store.size_of(k) for k in KEYS}) == 3  # int8, int4 and fp32 experts differ


def flip_byte(path: Path, at: int = 100) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_corrupt_file_is_a_one_line_error_naming_the_expert(bundle: Bundle) -> None:
    store = OnnxExpertStore(bundle)
    store.load(ExpertKey(3, 0))  # verified and fine
    flip_byte(bundle.path_of(bundle.expert_entry(ExpertKey(3, 0))))
    with pytest.raises(ExpertLoadError, match=r"^cannot load expert L3/E0: experts/L3/E0.onnx failed its sha256 "
                                              r"check: the bundle is corrupt or was modified$"):
        store.load(ExpertKey(3, 0))
    assert store.stats().failures == 1


def test_unparseable_graph_is_a_one_line_error(bundle: Bundle) -> None:
    path = bundle.path_of(bundle.expert_entry(ExpertKey(1, 1)))
    path.write_bytes(b"\x08" + b"\xff" * (path.stat().st_size - 1))  # same size, not a model
    with pytest.raises(ExpertLoadError, match=r"^cannot load expert L1/E1: ONNX Runtime cannot open "
                                              r"experts/L1/E1.onnx: [^\n]+$") as info:
        OnnxExpertStore(bundle, verify=False).load(ExpertKey(1, 1))
    assert "\n" not in str(info.value)


def test_missing_truncated_and_unknown_experts(bundle: Bundle) -> None:
    store = OnnxExpertStore(bundle)
    bundle.path_of(bundle.expert_entry(ExpertKey(1, 0))).unlink()
    with pytest.raises(ExpertLoadError, match=r"^cannot load expert L1/E0: experts/L1/E0.onnx is listed .* missing"):
        store.load(ExpertKey(1, 0))
    path = bundle.path_of(bundle.expert_entry(ExpertKey(1, 1)))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ExpertLoadError, match=r"L1/E1: experts/L1/E1.onnx is 1000 bytes but the manifest says"):
        store.load(ExpertKey(1, 1))
    with pytest.raises(ExpertLoadError, match=r"^cannot load expert L9/E0: bundle has no expert L9/E0$"):
        store.load(ExpertKey(9, 0))


def test_offloaded_onnx_experts_equal_resident_at_one_expert_of_capacity(bundle: Bundle) -> None:
    resident = ResidentProvider(OnnxExpertStore(bundle), KEYS)
    largest = max(bundle.expert_entry(k).size for k in KEYS)
    provider = OffloadingProvider.from_bundle(bundle, largest, "edgemoe")
    x = x_in()
    try:
        for layer, needed in [(1, (0, 1)), (3, (1, 0)), (1, (1,)), (3, (0, 1)), (1, (0, 1))]:
            provider.hint(3 if layer == 1 else 1, [0, 1])
            want = {k: r.run(x) for k, r in resident.experts(layer, needed)}
            got = {k: r.run(x) for k, r in provider.experts(layer, needed)}
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        stats = provider.stats()
        assert stats.cache.peak_bytes <= largest and stats.store.loads >= 8
    finally:
        provider.close()
        resident.close()


def test_session_options_hygiene() -> None:
    so = sessions.session_options(2)
    assert so.enable_cpu_mem_arena is False and so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # glibc here: the mmap threshold is set (False would mean freed sessions stay in the heap)
    assert sessions.configure_process() is (sessions.glibc() is not None)
    calls: list[int] = []
    trimmer = sessions.HeapTrimmer(every=100, trim=lambda: calls.append(1) or True)
    for freed in (40, 40, 40, 90, 10):  # trims at 120 and at 100 bytes freed
        trimmer(freed)
    assert trimmer.trims == 2 and len(calls) == 2
