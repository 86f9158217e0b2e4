"""Mapped experts (prepacked graphs whose weight pages are paged, not their sessions) on a tiny real bundle.

Equivalences: a prepacked graph's outputs == the bundle graph's (every precision, bit for bit); the
bytes a store counts == the bytes the process maps; page out -> nothing resident, page in -> all of it;
the cache's eviction really drops the pages; a prepared graph is written once and an interrupted
preparation leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.bundle import Bundle
from edgemoe.keys import ExpertKey
from edgemoe.offload import ExpertCache, ExpertLoadError, OffloadingProvider, OnnxExpertStore, ResidentProvider
from edgemoe.offload import prepacked as prepacked_module
from edgemoe.offload.mapped import MappedExpertStore, mapped_store_supported
from edgemoe.offload.prepacked import PrepackedGraphs, machine_signature
from edgemoe.offload.sessions import configure_process, session_factory
from offload_fakes import write_expert_bundle

pytestmark = pytest.mark.skipif(not mapped_store_supported(), reason="mapped experts need Linux")

H, F = 256, 640  # big enough that every precision's weights span many pages
PRECISION = {ExpertKey(1, 0): "int8", ExpertKey(1, 1): "int4", ExpertKey(3, 0): "int4"}  # the rest fp32
KEYS = [ExpertKey(layer, e) for layer in (1, 3) for e in range(2)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    configure_process()
    root = tmp_path_factory.mktemp("mapped") / "bundle"
    write_expert_bundle(root, KEYS, PRECISION, H, F)
    return Bundle.open(root)


@pytest.fixture
def graphs(tmp_path: Path) -> PrepackedGraphs:
    return PrepackedGraphs(tmp_path / "prepacked")


def x_in(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, H)).astype(np.float32)


def test_prepacked_experts_equal_the_bundle_graphs_bit_for_bit(bundle: Bundle, graphs: PrepackedGraphs) -> None:
    sessions, mapped = OnnxExpertStore(bundle, session_factory()), MappedExpertStore(bundle, graphs)
    for key in KEYS:
        for rows in (1, 5):
            assert np.array_equal(mapped.load(key).run(x_in(rows)), sessions.load(key).run(x_in(rows))), key


def test_counted_bytes_are_the_mapped_bytes_and_paging_moves_them(bundle: Bundle, graphs: PrepackedGraphs) -> None:
    store = MappedExpertStore(bundle, graphs)
    for key in KEYS:
        expert = store.load(key)
        assert expert.residency.nbytes == store.size_of(key) == expert.nbytes > 0, key
        assert expert.residency.resident() == expert.nbytes, f"{key} not fully paged in"
        want = expert.run(x_in())
        expert.release()
        assert expert.residency.resident() == 0, f"{key} still resident after release"
        assert np.array_equal(expert.run(x_in()), want), "a paged-out expert must still compute the same"
        store.load(key)
        assert expert.residency.resident() == expert.nbytes
    assert store.sessions == len(KEYS)  # loading again builds no new session
    assert store.stats().loads == 2 * len(KEYS)


def test_cache_eviction_drops_the_pages(bundle: Bundle, graphs: PrepackedGraphs) -> None:
    store = MappedExpertStore(bundle, graphs)
    a, b = ExpertKey(1, 0), ExpertKey(3, 1)
    cache = ExpertCache(max(store.size_of(a), store.size_of(b)), "lru")
    for key in (a, b):
        assert cache.reserve(key, store.size_of(key))
        cache.put(key, store.load(key))
    assert a not in cache and b in cache
    assert store.load(a).residency.resident() > 0  # loaded again outside the cache: resident
    store.load(a).release()
    assert store.load(b).residency.resident() == store.size_of(b)


def test_offloaded_mapped_equals_resident_sessions(bundle: Bundle, graphs: PrepackedGraphs) -> None:
    resident = ResidentProvider(OnnxExpertStore(bundle, session_factory()), KEYS)
    store = MappedExpertStore(bundle, graphs)
    offloading = OffloadingProvider.from_bundle(bundle, max(store.size_of(k) for k in KEYS), "lru", store=store)
    try:
        for layer in (1, 3, 1, 3):
            got_out = {k: r.run(x_in()) for k, r in offloading.experts(layer, [0, 1])}
            want_out = {k: r.run(x_in()) for k, r in resident.experts(layer, [0, 1])}
            assert got_out.keys() == want_out.keys()
            assert all(np.array_equal(got_out[k], want_out[k]) for k in got_out)
        assert offloading.stats().cache.evictions > 0
    finally:
        offloading.close()
        resident.close()


def test_prepared_once_and_reused(bundle: Bundle, graphs: PrepackedGraphs, monkeypatch: pytest.MonkeyPatch) -> None:
    MappedExpertStore(bundle, graphs)
    written = {p: p.stat().st_mtime_ns for p in graphs.root.rglob("*") if p.is_file()}
    assert len(written) == 2 * len(KEYS) + 1  # a graph and its data file per expert, and the ledger

    def must_not_write(*args, **kwargs):
        raise AssertionError("a prepared graph was written again")

    monkeypatch.setattr(prepacked_module, "write_prepacked", must_not_write)
    MappedExpertStore(bundle, PrepackedGraphs(graphs.root))  # as a new process would open it
    assert {p: p.stat().st_mtime_ns for p in graphs.root.rglob("*") if p.is_file()} == written


def test_interrupted_preparation_leaves_nothing(bundle: Bundle, graphs: PrepackedGraphs,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = prepacked_module.write_prepacked
    calls = []

    def interrupted(source: Path, directory: Path, stem: str, options):
        calls.append(stem)
        if len(calls) == 2:
            real(source, directory, stem, options)  # the files exist in the temporary directory...
            raise KeyboardInterrupt  # ...when the user presses ^C
        return real(source, directory, stem, options)

    monkeypatch.setattr(prepacked_module, "write_prepacked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MappedExpertStore(bundle, graphs)
    files = sorted(p.name for p in graphs.root.rglob("*"))
    assert len([f for f in files if f.endswith(".onnx")]) == 1 and len([f for f in files if f.endswith(".bin")]) == 1
    assert not [f for f in files if f.startswith(".prepack-")], files
    monkeypatch.setattr(prepacked_module, "write_prepacked", real)
    store = MappedExpertStore(bundle, graphs)  # the next run finishes the job
    assert np.array_equal(store.load(KEYS[1]).run(x_in()), OnnxExpertStore(bundle).load(KEYS[1]).run(x_in()))


def test_a_changed_or_unrecorded_twin_is_prepared_again(bundle: Bundle, graphs: PrepackedGraphs,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    MappedExpertStore(bundle, graphs)
    sha = bundle.manifest.expert(KEYS[1]).sha256
    assert all(graphs.exists(bundle.manifest.expert(k).sha256) for k in KEYS)
    data = graphs.path(sha).with_suffix(".bin")
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a disk error, or anything else that rewrote the packed weights
    data.write_bytes(bytes(blob))
    assert not graphs.exists(sha)
    assert graphs.exists(bundle.manifest.expert(KEYS[0]).sha256)
    assert not PrepackedGraphs(graphs.root.parent / "elsewhere").exists(sha)  # files without a record
    written = []
    real = prepacked_module.write_prepacked
    monkeypatch.setattr(prepacked_module, "write_prepacked",
                        lambda source, *a: written.append(Path(source).name) or real(source, *a))
    store = MappedExpertStore(bundle, PrepackedGraphs(graphs.root))  # the next run reads the ledger afresh
    assert written == [Path(bundle.manifest.expert(KEYS[1]).path).name]  # only the changed twin
    assert np.array_equal(store.load(KEYS[1]).run(x_in()), OnnxExpertStore(bundle).load(KEYS[1]).run(x_in()))


def test_a_tampered_expert_is_refused_even_when_its_graph_is_prepared(bundle: Bundle, graphs: PrepackedGraphs,
                                                                       tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    for src in bundle.root.rglob("*"):
        if src.is_file():
            dst = copy / src.relative_to(bundle.root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    MappedExpertStore(Bundle.open(copy), graphs)  # prepared from the genuine files
    target = copy / Bundle.open(copy).manifest.expert(KEYS[2]).path
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    store = MappedExpertStore(Bundle.open(copy), graphs)
    with pytest.raises(ExpertLoadError, match=f"cannot load expert {KEYS[2]}: .*sha256") as info:
        store.load(KEYS[2])
    assert "\n" not in str(info.value)


def test_the_packed_layout_is_per_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    here = machine_signature()
    monkeypatch.setattr(prepacked_module, "cpu_description", lambda: "x86_64 model:Other CPU avx2 fma")
    assert machine_signature() != here
    monkeypatch.setenv("EDGEMOE_CACHE_DIR", "/somewhere")
    assert PrepackedGraphs(signature="abc").root == Path("/somewhere/prepacked/abc")


def test_an_unwritable_cache_falls_back_to_sessions_under_auto(bundle: Bundle, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from edgemoe.offload import PrepareError
    from edgemoe.runtime.providers import open_expert_store, store_kind

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("EDGEMOE_CACHE_DIR", str(blocked))  # prepacked graphs cannot be written under it
    with pytest.raises(PrepareError, match="cannot prepare .* for this machine"):
        open_expert_store(bundle, "mapped")
    fallback = open_expert_store(bundle, "auto")
    assert store_kind(fallback) == "sessions"
    assert np.array_equal(fallback.load(KEYS[0]).run(x_in()), OnnxExpertStore(bundle).load(KEYS[0]).run(x_in()))


def test_session_overhead_is_measured_and_bounded(bundle: Bundle, graphs: PrepackedGraphs) -> None:
    """The memory budget sets aside what expert sessions really cost here: sampled sessions (opened,
    so they are the store's from then on), a margin, never more than the old fixed ceiling."""
    from edgemoe.offload.mapped import OVERHEAD_FLOOR, anonymous_rss
    from edgemoe.offload.prepacked import SESSION_OVERHEAD

    store = MappedExpertStore(bundle, graphs)
    assert anonymous_rss() is not None and store.sessions == 0
    per = store.per_session_overhead(sample=2)
    assert OVERHEAD_FLOOR <= per <= SESSION_OVERHEAD
    assert store.sessions == 2  # the sampled sessions were built, as a first load would
    total = store.session_overhead_bytes  # samples the remaining experts
    assert store.sessions == len(KEYS)
    assert OVERHEAD_FLOOR * len(KEYS) <= total <= SESSION_OVERHEAD * len(KEYS)
    y = store.load(KEYS[0]).run(x_in())  # sessions opened by the measurement still run
    assert y.shape == (3, H)
