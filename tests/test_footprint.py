"""The memory budget bounds the footprint (RSS plus the page cache a run keeps), measured with mincore.

Equivalences: what `cached_bytes` reports == what was read / dropped; a kept probe's two ways of
counting agree; a watched file's pages count once, mapped or only cached; an evicted expert leaves neither
RSS nor page cache; hashing a bundle file leaves it uncached; a read error part-way through a page-in
leaves nothing resident, cached or counted, with or without MADV_POPULATE_READ (never a SIGBUS); and an
8-turn chat under --memory-budget keeps its footprint, sampled from outside, within the budget.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgemoe.bundle import Bundle
from edgemoe.keys import ExpertKey
from edgemoe.offload.footprint import FootprintSampler, measure_footprint, model_files
from edgemoe.offload.mapped import MappedExpertStore, mapped_store_supported
from edgemoe.offload.prepacked import PrepackedGraphs
from edgemoe.model.config import KVLayout
from edgemoe.page_cache import (PAGE, CacheProbe, cached_bytes, drop_cached, resident_array_bytes, sync_and_drop,
                                 will_need)
from edgemoe.runtime.kv_cache import KVCache
from offload_fakes import write_expert_bundle
from test_runtime_fixtures import tiny  # noqa: F401 (fixture)


def _page_cache_is_droppable(directory: Path) -> bool:
    """tmpfs keeps a file's pages as the file itself: nothing there can be dropped."""
    probe = directory / "probe"
    probe.write_bytes(b"x" * (4 * PAGE))
    sync_and_drop([probe])
    return cached_bytes(probe) == 0


pytestmark = pytest.mark.skipif(not mapped_store_supported(), reason="mincore and madvise: Linux")
KEYS = [ExpertKey(1, 0), ExpertKey(1, 1)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    root = tmp_path_factory.mktemp("footprint")
    if not _page_cache_is_droppable(root):
        pytest.skip("the test directory is on tmpfs, whose pages cannot be dropped")
    write_expert_bundle(root / "bundle", KEYS, {k: "int4" for k in KEYS}, 256, 1024)
    sync_and_drop(p for p in (root / "bundle").rglob("*") if p.is_file())  # on disk, as a bundle is
    return Bundle.open(root / "bundle")


def test_cached_bytes_follow_reads_and_drops(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(10 * PAGE + 123))
    sync_and_drop([path])
    assert cached_bytes(path) == 0
    with open(path, "rb") as f:
        f.seek(3 * PAGE)
        f.read(2 * PAGE)
    assert 2 * PAGE <= cached_bytes(path) < 11 * PAGE  # what was read (and the kernel's readahead)
    path.read_bytes()
    assert cached_bytes(path) == 11 * PAGE
    drop_cached(path, [(0, 4 * PAGE)])
    assert cached_bytes(path) == 7 * PAGE
    drop_cached(path)
    assert cached_bytes(path) == 0


def test_the_cache_probe_agrees_with_mincore_read_after_read(tmp_path: Path) -> None:
    """A probe kept open sees every later read and drop; cachestat (where the kernel has it) and mincore
    over a kept mapping count the same pages of the same files."""
    paths = [tmp_path / f"f{i}.bin" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(os.urandom((8 + i) * PAGE))
    paths.append(tmp_path / "empty.bin")
    paths[-1].write_bytes(b"")
    sync_and_drop(paths)
    fast = CacheProbe(paths)
    slow = CacheProbe(paths, cachestat=False)  # the fallback, forced
    with fast, slow:
        assert fast.cached() == slow.cached() == [0, 0, 0, 0]
        paths[1].read_bytes()
        drop_cached(paths[1], [(0, 2 * PAGE)])
        paths[2].read_bytes()
        assert fast.cached() == slow.cached() == [0, 7 * PAGE, 10 * PAGE, 0]
        drop_cached(paths[2])
        assert fast.cached() == slow.cached() == [0, 7 * PAGE, 0, 0]
    assert CacheProbe([tmp_path / "missing"]).cached() == [None]


_HOLD = """
import mmap, os, sys, time
path, how = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    if how == "map":
        view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        total = sum(view[i] for i in range(0, len(view), mmap.PAGESIZE))  # every page faulted in
    else:
        f.read()  # cached, not mapped
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["map", "read"])
def test_a_watched_page_counts_once_whether_mapped_or_only_cached(tmp_path: Path, how: str) -> None:
    """The footprint of a process holding a 32 MiB watched file: mapped, the pages are its RSS and count
    once (nothing beyond RSS); read, they are page cache beyond its RSS. Either way the watched part is
    the file, and the rest is what the process holds without it."""
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(32 << 20))
    sync_and_drop([path])
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), how], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        footprint = measure_footprint(child.pid, [path])
    finally:
        child.kill()
        child.wait()
    assert footprint is not None and footprint.model_cache_bytes == 32 << 20
    if how == "map":
        assert footprint.file_cache_bytes <= 64 * PAGE  # RSS already holds the file: counted once
        assert footprint.rss_bytes >= footprint.private_bytes + (32 << 20)
    else:
        assert footprint.file_cache_bytes >= (32 << 20) - 64 * PAGE
        assert footprint.rss_bytes < footprint.private_bytes + (8 << 20)


def test_a_kv_cache_counts_only_the_pages_written() -> None:
    """np.zeros is lazily backed: a fresh cache holds (almost) no RAM, and what the budget's baseline
    subtracts as the cache's own pages grows with the rows written, up to the whole buffer."""
    cache = KVCache(2, KVLayout(4, 64, False), 8192, "float16")  # 4 buffers of 4 MiB
    fresh = cache.resident_bytes()
    assert fresh <= len(cache.buffers()) * (2 << 20)  # at most a (huge) page each
    cache.keys[0][...] = 1.0
    # Not `fresh + nbytes`: with transparent huge pages, `fresh` may already hold a huge page of keys[0].
    assert resident_array_bytes(cache.keys[0]) >= cache.keys[0].nbytes
    assert max(fresh, cache.keys[0].nbytes) <= cache.resident_bytes() < cache.nbytes  # the rest still unwritten
    for buffer in cache.buffers():
        buffer[...] = 1.0
    assert resident_array_bytes(cache.keys[1]) >= cache.keys[1].nbytes
    assert cache.nbytes <= cache.resident_bytes() <= cache.nbytes + len(cache.buffers()) * PAGE


def test_an_evicted_expert_leaves_neither_rss_nor_page_cache(bundle: Bundle, tmp_path: Path) -> None:
    store = MappedExpertStore(bundle, PrepackedGraphs(tmp_path / "prepacked"))
    expert_file = bundle.path_of(bundle.manifest.expert(KEYS[0]))
    expert = store.load(KEYS[0])
    assert cached_bytes(expert_file) == 0  # hashed for its sha256, then dropped
    data = expert.residency.path
    assert expert.residency.resident() == expert.nbytes
    # The mapped pages and nothing else of the file (which also holds the original weights, about as
    # many bytes again); ranges sharing a page count it once here, once per range in nbytes.
    assert expert.nbytes - 4 * PAGE <= cached_bytes(data) <= expert.nbytes < data.stat().st_size
    expert.release()
    assert expert.residency.resident() == 0 and cached_bytes(data) == 0
    footprint = measure_footprint(os.getpid(), [data, expert_file])
    assert footprint is not None and footprint.file_cache_bytes == 0


def test_will_need_reads_a_range_larger_than_one_readahead_request(tmp_path: Path) -> None:
    """One POSIX_FADV_WILLNEED starts at most one readahead request's worth of a range (8 MB on the
    benchmark machine, far less on common defaults); `will_need` must bring in all of a larger one."""
    if not _page_cache_is_droppable(tmp_path):
        pytest.skip("the test directory is on tmpfs, whose pages cannot be dropped")
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(24 << 20))
    sync_and_drop([path])
    offset, length = 1 << 20, 20 << 20
    will_need(path, [(offset, length)])
    deadline = time.monotonic() + 10
    while cached_bytes(path) < length and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cached_bytes(path) >= length, f"{cached_bytes(path)} of {length} bytes read ahead"
    assert cached_bytes(path) <= length + 2 * PAGE  # exactly the range (page rounding aside)


# Runs in a child: a SIGBUS there fails the test instead of killing pytest.
_BROKEN_PAGE_IN = """
import sys
from pathlib import Path
from edgemoe.bundle import Bundle
from edgemoe.keys import ExpertKey
from edgemoe.offload import ExpertLoadError, OffloadingProvider
from edgemoe.offload import mapped
from edgemoe.offload.mapped import MappedExpertStore
from edgemoe.offload.prepacked import PrepackedGraphs
from edgemoe.page_cache import cached_bytes
mapped.POPULATE_READ = sys.argv[3] == "populate"
store = MappedExpertStore(Bundle.open(sys.argv[1]), PrepackedGraphs(Path(sys.argv[2])))
key = ExpertKey(1, 0)
expert = store.load(key)
expert.release()
data = expert.residency.path
with open(data, "r+b") as f:  # the disk loses the file's second half (an injected read error); page-aligned,
    f.truncate(data.stat().st_size // 2 // 4096 * 4096)  # so no partial page is left dirty in the cache
provider = OffloadingProvider.from_bundle(store.bundle, 10 * store.size_of(key), "lru", store=store)
try:
    list(provider.experts(1, [0]))
    print("loaded")
except ExpertLoadError as exc:
    print("error:", exc)
print("resident", expert.residency.resident(), "cached", cached_bytes(data), "counted", provider.cache.used_bytes,
      "held", key in provider.cache)
provider.close()
"""


@pytest.mark.parametrize("mode", ["populate", "read"])
def test_a_read_error_during_page_in_leaves_nothing_and_is_one_line(bundle: Bundle, tmp_path: Path,
                                                                   mode: str) -> None:
    run = subprocess.run([sys.executable, "-c", _BROKEN_PAGE_IN, str(bundle.root), str(tmp_path / "prepacked"), mode],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode} (SIGBUS is -7): {run.stderr[-2000:]}"
    lines = run.stdout.splitlines()
    assert lines[0].startswith("error: cannot load expert L1/E0") and "cannot page in" in lines[0], run.stdout
    assert lines[1] == "resident 0 cached 0 counted 0 held False", run.stdout


def test_paging_in_by_reading_computes_the_same(bundle: Bundle, tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from edgemoe.offload import mapped

    store = MappedExpertStore(bundle, PrepackedGraphs(tmp_path / "prepacked"))
    x = np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)
    want = store.load(KEYS[1]).run(x)
    store.load(KEYS[1]).release()
    monkeypatch.setattr(mapped, "POPULATE_READ", False)
    expert = store.load(KEYS[1])
    assert expert.nbytes - 4 * PAGE <= cached_bytes(expert.residency.path) <= expert.nbytes  # read, not touched
    assert np.array_equal(expert.run(x), want)


def test_an_eight_turn_chat_stays_within_its_memory_budget(tiny) -> None:
    bundle = tiny.bundle("stablelm", "int4")
    chat = [sys.executable, "-m", "edgemoe.cli", "-v", "chat", str(bundle), "--image", str(tiny.image),
            "--max-tokens", "40", "--json", "--expert-budget", "30%"]  # the expert cache pages all along
    refusal = subprocess.run(chat + ["--memory-budget", "1MB"], input="What?\n", capture_output=True, text=True,
                             timeout=120)
    minimum = int(re.search(r"minimum budget is (\d+) bytes", refusal.stderr).group(1))
    # Room for RSS noise (a few MB from run to run) and for the conversation's growth: eight turns
    # take the KV cache and a prefill's activations (estimated generously) about 10 MB past turn one.
    budget = minimum + (24 << 20)
    questions = "".join(f"Question {i}: what else is in the image?\n" for i in range(8))
    process = subprocess.Popen(chat + ["--memory-budget", str(budget)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    with FootprintSampler(process.pid, model_files(bundle), interval_s=0.01) as sampler:
        out, err = process.communicate(questions, timeout=300)
    assert process.returncode == 0, err[-3000:]
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 8 and all(t["stats"]["cache_misses"] > 0 for t in turns)
    assert turns[-1]["stats"]["prompt_tokens"] > turns[0]["stats"]["prompt_tokens"] + 4 * 40  # past the first KV
    assert sampler.samples > 10 and sampler.peak is not None
    assert sampler.peak.total_bytes <= budget, (sampler.peak, budget)


def test_a_chat_that_outgrows_its_budget_is_refused_naming_the_minimum(tiny) -> None:
    bundle = tiny.bundle("stablelm", "int4")
    chat = [sys.executable, "-m", "edgemoe.cli", "chat", str(bundle), "--image", str(tiny.image), "--max-tokens", "200",
            "--json"]
    refusal = subprocess.run(chat + ["--memory-budget", "1MB"], input="What?\n", capture_output=True, text=True,
                             timeout=120)
    minimum = int(re.search(r"minimum budget is (\d+) bytes", refusal.stderr).group(1))
    questions = "".join(f"Question {i}: what else is in the image?\n" for i in range(8))
    # Turn one fits; eight turns of 200 tokens take the KV cache and a prefill's activations (which
    # grow with the square of the prompt) tens of MB further.
    run = subprocess.run(chat + ["--memory-budget", str(minimum + (4 << 20))], input=questions, capture_output=True,
                         text=True, timeout=300)
    answered = run.stdout.splitlines()
    assert run.returncode == 2 and 1 <= len(answered) < 8, (minimum, [json.loads(a)["stats"]["prompt_tokens"] for a in answered], run.stderr[-2000:])
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: memory budget") and "the minimum budget is" in last
    assert "Traceback" not in run.stderr


def test_the_vision_tower_leaves_between_images_and_answers_do_not_change(tiny, tmp_path) -> None:
    from PIL import Image

    from edgemoe.runtime import ChatSession, GenerationOptions

    second = tmp_path / "second.png"
    Image.new("RGB", (50, 40), (200, 100, 0)).save(second)
    bundle = tiny.bundle("deepseek-vl2-tiny", "int4")
    answers = {}
    for budget in (None, "4GB"):
        with ChatSession(bundle, tiny.image, GenerationOptions(max_tokens=5, memory_budget=budget)) as chat:
            first = chat.ask("What is in the image?")
            assert chat.trunk.vision_resident is (budget is None)  # released under a memory budget
            chat.add_image(second)
            later = chat.ask("And in this one?")
            assert chat.trunk.vision_resident is (budget is None)
            answers[budget] = (first.token_ids, later.token_ids)
    assert answers[None] == answers["4GB"]
