"""Fused expert layers (one QMoE session per MoE layer) against the per-expert sessions they are built from."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemoe.bundle import Bundle
from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey
from edgemoe.model.routing_rule import select
from edgemoe.offload import OnnxExpertStore
from edgemoe.offload.fused import FusedExperts
from edgemoe.offload.fused_graph import fused_layers_prepared, layer_keys
from edgemoe.offload.footprint import measure_footprint, model_files
from edgemoe.offload.mapped import mapped_store_supported
from edgemoe.offload.prepacked import PAGE, PrepackedGraphs, machine_signature
from edgemoe.offload.sessions import session_factory
from edgemoe.page_cache import cached_bytes, sync_and_drop
from edgemoe.runtime import ask
from test_runtime_fixtures import edgemoe_cli, tiny  # noqa: F401 (fixture)

FAMILY = "deepseek-vl2-tiny"


def test_a_fused_layer_equals_the_sum_of_its_expert_sessions(tiny, tmp_path) -> None:
    bundle = Bundle.open(tiny.bundle(FAMILY, "int4"))
    cfg = bundle.manifest.model_config()
    fused = FusedExperts(bundle, PrepackedGraphs(tmp_path / "packed"))
    store = OnnxExpertStore(bundle, session_factory())
    rng = np.random.default_rng(0)
    for layer in cfg.moe.layers:
        m = rng.standard_normal((5, cfg.hidden_size), dtype=np.float32)
        logits = rng.standard_normal((5, cfg.moe.experts_in(layer)), dtype=np.float32) * 3
        routing = select(logits, cfg.moe.routing)
        want = np.zeros_like(m)
        for t in range(5):
            for e, w in zip(routing.experts[t], routing.weights[t]):
                want[t] += w * store.load(ExpertKey(layer, int(e))).run(m[t:t + 1])[0]
        # One token at a time (decode): the same int4 kernels, another summation order.
        one = np.concatenate([fused.run_layer(layer, m[t:t + 1], select(logits[t:t + 1], cfg.moe.routing))
                              for t in range(5)])
        assert np.abs(one - want).max() <= 1e-5 * np.abs(want).max()
        # Several tokens at once (prefill) differ at int8-activation precision (1.1e-3 of the largest
        # output measured): QMoE's activation quantization does not match the sessions' row by row.
        batch = fused.run_layer(layer, m, routing)
        assert np.abs(batch - want).max() <= 3e-3 * np.abs(want).max()


def test_fused_answers_equal_the_mapped_store_and_run_from_a_prepared_file(tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    mapped = ask(bundle, "What is in the image?", tiny.image, max_tokens=8, expert_store="mapped")
    fused = ask(bundle, "What is in the image?", tiny.image, max_tokens=8, expert_store="fused")
    again = ask(bundle, "What is in the image?", tiny.image, max_tokens=8, expert_store="fused")
    assert list(fused.token_ids) == list(mapped.token_ids) == list(again.token_ids)
    assert fused.stats.expert_store == "fused" and fused.stats.cache_misses == 0
    packed = PrepackedGraphs()
    for layer in Bundle.open(bundle).manifest.model_config().moe.layers:
        assert packed.exists(layer_keys(Bundle.open(bundle))[layer])  # prepared once, reused by `again`


def test_what_fused_cannot_run_is_refused_in_one_line(tiny) -> None:
    with pytest.raises(EdgeMoEError, match="needs int4 experts; this bundle's are fp32"):
        FusedExperts(Bundle.open(tiny.bundle(FAMILY)))
    with pytest.raises(EdgeMoEError, match="divisible by the int4 block"):  # MoE-LLaVA tiny: hidden 64
        FusedExperts(Bundle.open(tiny.bundle("stablelm", "int4")))


def test_paged_fused_answers_equal_resident_at_every_expert_budget(tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    store = FusedExperts(Bundle.open(bundle))
    sizes = sorted((store.size_of(k) for k in store.keys()), reverse=True)
    together = sum(sizes[:store.experts_together])  # a layer's experts may all be resident at once
    store.close()
    resident = ask(bundle, "What is in the image?", tiny.image, max_tokens=8, expert_store="fused")
    for budget in (str(together), str(together + together // 2)):
        paged = ask(bundle, "What is in the image?", tiny.image, max_tokens=8, expert_store="fused",
                    expert_budget=budget)
        assert list(paged.token_ids) == list(resident.token_ids), budget
        assert paged.stats.cache_misses > 0 and paged.stats.expert_store == "fused"
    result = edgemoe_cli("ask", bundle, "What?", "--expert-store", "fused", "--expert-budget", str(together - 1),
                         "--max-tokens", "2")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"a layer's {store.experts_together} largest experts at once: the minimum is {together} bytes" in result.stderr
    assert "--expert-store mapped pages one expert at a time" in result.stderr  # the way below that minimum


def _page_cache_is_droppable(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x" * (4 * PAGE))
    sync_and_drop([probe])
    return cached_bytes(probe) == 0


def test_a_fused_layer_reads_only_the_pages_of_the_experts_it_runs(tiny, tmp_path) -> None:
    """Every expert's pages are its own span of the layer's packed blobs: with nothing resident, a call
    routed to some experts faults in those experts' spans and nothing of the others' but the pages they
    share with them, so evicting an expert really gives its bytes back and a miss really reads them."""
    if not (mapped_store_supported() and _page_cache_is_droppable(tmp_path)):
        pytest.skip("needs mincore, madvise and a page cache that can be dropped (not tmpfs)")
    bundle = Bundle.open(tiny.bundle(FAMILY, "int4"))
    cfg = bundle.manifest.model_config()
    store = FusedExperts(bundle, PrepackedGraphs(tmp_path / "packed"))
    layer, experts = cfg.moe.layers[0], cfg.moe.experts_in(cfg.moe.layers[0])
    keys = [ExpertKey(layer, e) for e in range(experts)]
    assert all(store._pages[k].resident() == 0 for k in keys)  # opening the store loads nothing
    chosen = [0, experts - 1] + list(range(2, 2 * cfg.moe.top_k - 2, 2))[:cfg.moe.top_k - 2]
    runners = [store.load(ExpertKey(layer, e)) for e in chosen]
    m = np.random.default_rng(0).standard_normal((1, cfg.hidden_size), dtype=np.float32)
    logits = np.full((1, experts), -10.0, np.float32)
    logits[0, chosen] = 10.0
    y = runners[0].run_layer(layer, m, select(logits, cfg.moe.routing))
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    others = [k for k in keys if k.expert not in chosen]
    shared_pages = 2 * len(chosen) * len(store._pages[keys[0]].ranges)  # at most a page each side per blob
    assert sum(store._pages[k].resident() for k in others) <= shared_pages * PAGE
    assert all(store._pages[ExpertKey(layer, e)].resident() == store.size_of(ExpertKey(layer, e)) for e in chosen)
    for runner in runners:
        runner.release()
    assert all(store._pages[k].resident() == 0 for k in keys)


def test_under_a_budget_a_layer_runs_with_its_chosen_experts_leased_and_nothing_else_resident(
        tiny, tmp_path, monkeypatch) -> None:
    """The runtime holds a fused layer's chosen experts leased through its one call (were the leases to end
    first, a loader thread could evict one mid-call and the kernel would fault it back in, outside the
    budget). After a paged generation nothing of an expert outside the cache is resident but the pages it
    shares with a cached neighbour."""
    if not (mapped_store_supported() and _page_cache_is_droppable(tmp_path)):
        pytest.skip("needs mincore, madvise and a page cache that can be dropped (not tmpfs)")
    from edgemoe.runtime.api import ChatSession
    from edgemoe.runtime.options import GenerationOptions

    bundle = tiny.bundle(FAMILY, "int4")
    store = FusedExperts(Bundle.open(bundle))
    sizes = sorted((store.size_of(k) for k in store.keys()), reverse=True)
    budget = sum(sizes[:store.experts_together]) + sizes[0]  # a layer and one more expert: the rest pages
    store.close()
    calls, unleased, sessions = [], [], []
    run_layer = FusedExperts.run_layer

    def checked(self, layer, m, routing):
        pinned = set(sessions[0].provider.cache.pinned())
        calls.append(layer)
        unleased.extend(k for k in (ExpertKey(layer, int(e)) for e in routing.needed()) if k not in pinned)
        return run_layer(self, layer, m, routing)

    monkeypatch.setattr(FusedExperts, "run_layer", checked)
    options = GenerationOptions(expert_budget=str(budget), expert_store="fused", max_tokens=6)
    with ChatSession(bundle, tiny.image, options) as session:
        sessions.append(session)
        result = session.ask("What is in the image?")
        assert calls and not unleased, unleased[:5]
        provider = session.provider
        cached = set(provider.cache.resident())
        pages = provider.store._pages
        assert result.stats.cache_misses > 0 and len(cached) < len(pages)
        outside = sum(pages[k].resident() for k in pages if k not in cached)
        assert outside <= 2 * 2 * len(cached) * PAGE  # shared boundary pages only
        assert all(pages[k].resident() >= pages[k].nbytes - 4 * PAGE for k in cached)


def _ask_cli(bundle: str, image: Path, cache: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgemoe.cli", "ask", bundle, "What?", "--image", str(image),
                             "--max-tokens", "2", "--json", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "EDGEMOE_CACHE_DIR": str(cache)})


def test_a_first_budgeted_run_prepares_the_fused_store_within_its_budget(tiny, tmp_path, monkeypatch) -> None:
    """A first run on a machine packs the fused layers before the model loads, so under --memory-budget
    that step fits beside what the process holds then: the footprint, sampled from outside and with the
    layers' files watched as soon as they exist, stays within a budget just above the run's own minimum,
    and the answer is the one an unbudgeted run gives. A budget too small even for that step is refused
    in one line, before anything is written."""
    bundle = str(tiny.bundle(FAMILY, "int4"))
    refused = _ask_cli(bundle, tiny.image, tmp_path / "a", "--memory-budget", "1MB")
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "cannot prepare the fused experts for this machine" in err and "needs about" in err
    assert not (tmp_path / "a" / "prepacked").exists()
    warm = _ask_cli(bundle, tiny.image, tmp_path / "b")
    out, err = warm.communicate(timeout=300)
    assert warm.returncode == 0, err
    unbudgeted = json.loads(out)
    assert unbudgeted["stats"]["expert_store"] == "fused"  # auto picks fused for int4 SwiGLU experts
    floor = _ask_cli(bundle, tiny.image, tmp_path / "b", "--memory-budget", "1MB")
    _, err = floor.communicate(timeout=300)
    minimum = int(re.search(r"minimum budget is (\d+) bytes", err).group(1))
    budget = minimum + (24 << 20)  # RSS noise from run to run, as in test_footprint
    monkeypatch.setenv("EDGEMOE_CACHE_DIR", str(tmp_path / "c"))  # model_files lists this cache's twins
    first = _ask_cli(bundle, tiny.image, tmp_path / "c", "--memory-budget", str(budget))
    peak, samples = 0, 0
    while first.poll() is None:
        now = measure_footprint(first.pid, model_files(bundle))  # re-listed: twins appear as they are written
        if now is not None:
            peak, samples = max(peak, now.total_bytes), samples + 1
        time.sleep(0.01)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads(out)["token_ids"] == unbudgeted["token_ids"]
    assert fused_layers_prepared(Bundle.open(bundle), PrepackedGraphs(tmp_path / "c" / "prepacked" / machine_signature()))
    assert samples > 10 and 0 < peak <= budget, (peak, budget)


def test_auto_picks_fused_exactly_where_the_experts_can_be_fused(tiny, tmp_path, monkeypatch) -> None:
    """The default store depends on the bundle (and the machine), never on a budget: fused for int4
    SwiGLU experts whose widths fit the int4 block in layers that route a token to several experts,
    mapped otherwise, with the reason the wire-format
    check gives matching the one building the layer gives. The check leaves none of the graphs it read
    in the page cache (on full Small they were 120 MB of a 4 GB run's footprint)."""
    from edgemoe.offload.fused_graph import fused_refusal
    from edgemoe.runtime import providers
    from edgemoe.runtime.providers import resolve_store

    if not mapped_store_supported():
        pytest.skip("needs madvise and mincore (Linux)")
    deepseek, stablelm, fp32 = (Bundle.open(tiny.bundle(FAMILY, "int4")), Bundle.open(tiny.bundle("stablelm", "int4")),
                                Bundle.open(tiny.bundle(FAMILY)))
    assert [resolve_store(b) for b in (deepseek, stablelm, fp32)] == ["fused", "mapped", "mapped"]
    assert [resolve_store(deepseek, kind) for kind in ("mapped", "sessions", "fused")] == ["mapped", "sessions", "fused"]
    with monkeypatch.context() as coarse:  # top-2 layers (MoE-LLaVA) page one expert at a time even where fusable
        coarse.setattr(providers, "FUSED_FROM_TOP_K", deepseek.manifest.model_config().moe.top_k + 1)
        assert resolve_store(deepseek) == "mapped"
    assert fused_refusal(deepseek) is None
    if _page_cache_is_droppable(tmp_path):
        with monkeypatch.context() as unprepared:  # an empty cache: the graphs are read
            unprepared.setenv("EDGEMOE_CACHE_DIR", str(tmp_path / "cache"))
            read = [deepseek.path_of(deepseek.manifest.expert(ExpertKey(n, 0)))
                    for n in deepseek.manifest.model_config().moe.layers]
            for path in read:
                path.read_bytes()
            assert fused_refusal(deepseek) is None and all(cached_bytes(path) == 0 for path in read)
    assert "divisible by the int4 block (64, " in fused_refusal(stablelm)
    assert "needs int4 experts; this bundle's are fp32" in fused_refusal(fp32)
    with pytest.raises(EdgeMoEError, match="divisible by the int4 block \\(64, "):
        FusedExperts(stablelm)
    assert ask(tiny.bundle(FAMILY, "int4"), "What?", tiny.image, max_tokens=2).stats.expert_store == "fused"


def test_an_unwritable_cache_falls_back_from_fused_under_auto(tiny, tmp_path, monkeypatch) -> None:
    """Where the prepacked cache cannot be written, a named fused store fails in one line and auto falls
    back (fused, then mapped, both need the cache) to a session per expert, which still answers."""
    from edgemoe.offload import PrepareError
    from edgemoe.runtime.providers import open_expert_store, store_kind

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("EDGEMOE_CACHE_DIR", str(blocked))
    bundle = tiny.bundle(FAMILY, "int4")
    with pytest.raises(PrepareError, match="cannot prepare the fused experts of layer .* for this machine"):
        open_expert_store(Bundle.open(bundle), "fused")
    assert store_kind(open_expert_store(Bundle.open(bundle), "auto")) == "sessions"
    result = ask(bundle, "What?", tiny.image, max_tokens=2)
    assert result.stats.expert_store == "sessions" and len(result.token_ids) == 2


def test_edgemoe_prepare_packs_the_default_store_that_ask_then_uses_as_it_is(tiny, tmp_path) -> None:
    """`edgemoe prepare` takes a first run's preparation step on its own: after it the fused layers are
    prepared, and an ask runs on them without writing them again; a bad store name is one line."""
    bundle = str(tiny.bundle(FAMILY, "int4"))
    env = {**os.environ, "EDGEMOE_CACHE_DIR": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "edgemoe.cli"]
    prepared = subprocess.run(cli + ["prepare", bundle], capture_output=True, text=True, timeout=300, env=env)
    assert prepared.returncode == 0, prepared.stderr
    assert "fused experts ready on this machine" in prepared.stdout
    graphs = PrepackedGraphs(tmp_path / "cache" / "prepacked" / machine_signature())
    b = Bundle.open(bundle)
    assert fused_layers_prepared(b, graphs)
    files = [graphs.path(key) for key in layer_keys(b).values()]
    before = [f.stat().st_mtime_ns for f in files]
    asked = subprocess.run(cli + ["ask", bundle, "What?", "--image", str(tiny.image), "--max-tokens", "2", "--json"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert asked.returncode == 0 and json.loads(asked.stdout)["stats"]["expert_store"] == "fused", asked.stderr
    assert [f.stat().st_mtime_ns for f in files] == before
    bad = subprocess.run(cli + ["prepare", bundle, "--expert-store", "nope"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "unknown expert store" in bad.stderr


def test_prepacked_graphs_are_read_without_the_onnx_package(tiny) -> None:
    """The runtime reads where prepacked blobs lie with its own wire-format reader (the `onnx` package
    costs about 11 MB of private memory a process): the reader's entries equal onnx's own, and a run on
    prepared fused and mapped stores never imports onnx."""
    import onnx

    from edgemoe.bundle.onnx_wire import external_data, nodes

    bundle = tiny.bundle(FAMILY, "int4")
    ask(bundle, "What?", tiny.image, max_tokens=2, expert_store="fused")  # prepares both on first use
    ask(bundle, "What?", tiny.image, max_tokens=2, expert_store="mapped")
    b = Bundle.open(bundle)
    graph = PrepackedGraphs().path(layer_keys(b)[b.manifest.model_config().moe.layers[0]])
    for path in (graph, b.graph_path("layer0.attn")):
        model = onnx.load(str(path), load_external_data=False)
        want = [(t.name, {e.key: e.value for e in t.external_data}) for t in model.graph.initializer]
        assert external_data(path) == want and any(entries for _, entries in want) == (path == graph)
    expert = b.path_of(b.manifest.expert(ExpertKey(b.manifest.model_config().moe.layers[0], 0)))
    model = onnx.load(str(expert), load_external_data=False)
    want = [(len(n.input), {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT})
            for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nodes(expert, "MatMulNBits") == want and len(want) == 3 and all("block_size" in a for _, a in want)
    script = ("import sys; from edgemoe.runtime import ask\n"
              f"for store in ('fused', 'mapped'): ask({str(bundle)!r}, 'What?', {str(tiny.image)!r}, max_tokens=2, "
              "expert_store=store, memory_budget='4GB')\n"
              "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
