"""The runtime's pieces on their own: routing, combine, sampling, streaming text, KV cache, chat reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.model.config import KVLayout
from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey
from edgemoe.reference.moe import top_k_gating
from edgemoe.runtime.detokenize import TextStream
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.moe import MoELayer
from edgemoe.runtime.routing import Routers, route
from edgemoe.runtime.sampling import Sampler, nucleus
from test_runtime_fixtures import run_engine, tiny  # noqa: F401 (fixture)

# -- routing ------------------------------------------------------------------------------------------


def test_routing_equals_the_reference_rule_ties_included() -> None:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((64, 16)).astype(np.float32)
    w = rng.standard_normal((4, 16)).astype(np.float32) * 4
    w[3] = w[1]  # experts 1 and 3 tie exactly for every token: the lower index must win
    got = route(m, w, 2)
    want = top_k_gating(torch.from_numpy(m @ w.T), 2)
    assert np.array_equal(got.experts, want.experts.numpy())
    np.testing.assert_allclose(got.weights, want.weights.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.weights.sum(-1), 1.0, rtol=1e-6)
    tied = np.any(got.experts == 3, axis=-1)
    assert tied.any() and np.all(got.experts[tied] == [1, 3])  # 3 only ever second, right after its twin 1


# -- MoE layer: dispatch and combine -------------------------------------------------------------------


class FakeProvider:
    """Experts y = (e + 1) * tanh(x), yielded in a chosen order; records what was asked."""

    def __init__(self, order: str = "asc", wrong: bool = False) -> None:
        self.order, self.wrong, self.calls, self.hints = order, wrong, [], []

    def experts(self, layer, needed):
        self.calls.append((layer, tuple(needed)))
        keys = sorted(needed, reverse=self.order == "desc")
        for e in keys:
            yield ExpertKey(layer + self.wrong, e), (lambda x, e=e: (e + 1) * np.tanh(x))

    def hint(self, layer, predicted):
        self.hints.append((layer, tuple(predicted)))

    def stats(self):
        return None

    def close(self):
        pass


def _moe(provider) -> tuple[MoELayer, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    routers = Routers({0: rng.standard_normal((4, 8)).astype(np.float32),
                       2: rng.standard_normal((4, 8)).astype(np.float32)})
    h, m = (rng.standard_normal((20, 8)).astype(np.float32) for _ in range(2))
    return MoELayer(routers, provider, (0, 2), 2), h, m


def test_each_expert_runs_once_and_yield_order_does_not_change_a_bit() -> None:
    asc, desc = FakeProvider("asc"), FakeProvider("desc")
    layer, h, m = _moe(asc)
    y_asc = layer.forward(0, h, m)
    layer.provider = desc
    y_desc = layer.forward(0, h, m)
    assert np.array_equal(y_asc, y_desc)
    assert asc.calls == [(0, (0, 1, 2, 3))]  # one call per layer, every expert once over all its tokens
    assert asc.hints and asc.hints[0][0] == 2  # the next MoE layer was hinted before the experts ran
    routing = route(m, layer.routers[0], 2)
    want = h + sum(routing.weights[:, k, None] * (routing.experts[:, k, None] + 1) * np.tanh(m) for k in range(2))
    np.testing.assert_allclose(y_asc, want, rtol=1e-5, atol=1e-6)


def test_a_provider_returning_the_wrong_expert_is_an_error() -> None:
    layer, h, m = _moe(FakeProvider(wrong=True))
    with pytest.raises(EdgeMoEError, match="expert provider returned L1"):
        layer.forward(0, h, m)


# -- sampling --------------------------------------------------------------------------------------------


def test_greedy_takes_the_first_maximum_and_sampling_is_seeded() -> None:
    logits = np.array([1.0, 3.0, 3.0, -np.inf], np.float32)
    assert Sampler()(logits) == 1
    draws = [Sampler(temperature=2.0, seed=5) for _ in range(2)]
    seq = [[s(logits) for _ in range(30)] for s in draws]
    assert seq[0] == seq[1] and 3 not in seq[0] and len(set(seq[0])) > 1
    with pytest.raises(EdgeMoEError):
        Sampler(top_p=0)


def test_nucleus_keeps_the_token_that_crosses_top_p() -> None:
    p = np.array([0.1, 0.5, 0.3, 0.1])
    np.testing.assert_allclose(nucleus(p, 0.6), [0, 0.5 / 0.8, 0.3 / 0.8, 0])
    np.testing.assert_allclose(nucleus(p, 0.5), [0, 1, 0, 0])


# -- streaming text --------------------------------------------------------------------------------------


class ByteTokenizer:
    """ids are indexes into a table of byte strings; decode is UTF-8 with replacement, as the real ones."""

    table = [b"Hel", b"lo ", b"\xc3", b"\xa9t\xc3\xa9", b"<|end", b"oftext|>", b" world"]

    def decode(self, ids, skip_special=False):
        return b"".join(self.table[i] for i in ids).decode("utf-8", "replace")


def test_text_stream_never_shows_half_a_character_or_half_the_stop_string() -> None:
    stream = TextStream(ByteTokenizer(), "<|endoftext|>")
    pieces = [stream.push(i) for i in (0, 1, 2, 3, 4, 5, 6)]
    pieces.append(stream.finish())
    assert pieces[2] == ""  # a lone lead byte of "é"
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == stream.text == "Hello été"
    assert pieces[4] == ""  # "<|end" could be the start of the stop string


# -- KV cache ----------------------------------------------------------------------------------------------


def test_kv_cache_grows_keeping_rows_and_truncates() -> None:
    cache = KVCache(2, KVLayout(2, 8), capacity=4)
    cache.keys[1][:, :, :3] = 7.0
    cache.advance(3)
    cache.reserve(16)
    assert cache.capacity == 16 and cache.length == 3 and np.all(cache.keys[1][:, :, :3] == 7.0)
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError):
        cache.advance(16)


# -- multi-turn reuse --------------------------------------------------------------------------------------


def test_second_turn_reuses_the_cache_and_matches_a_fresh_prefill(tiny) -> None:
    from edgemoe.model.prompt import tokenize_with_image
    from edgemoe.runtime.api import ChatSession

    bundle = tiny.bundle("stablelm")
    with ChatSession(bundle, tiny.image) as chat:
        first = chat.ask("What is it?", max_tokens=5)
        ids = tokenize_with_image(chat.tokenizer, chat.conversation.add_user("And the colour?").render())
        reused = chat.engine.prefill(ids, chat.image_features())
        info = chat.engine.last_prefill
        second = chat.ask("Anything else?", max_tokens=3)
    assert first.stats.prefill_tokens == first.stats.prompt_tokens
    # Turn two computes only what follows the cached prefix (the first answer's tokens onwards).
    assert 0 < info.computed <= info.prompt_tokens - first.stats.prompt_tokens
    assert second.stats.prefill_tokens < second.stats.prompt_tokens
    _, fresh, _ = run_engine(bundle, tiny.image, ids=ids, max_tokens=1)
    finite = np.isfinite(fresh[0])
    np.testing.assert_allclose(reused[finite], fresh[0][finite], atol=1e-4)


def test_top_k_min_p_and_repeat_penalty_follow_llama_cpp() -> None:
    from edgemoe.runtime.sampling import penalize_repeats, top_k_only

    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(penalize_repeats(logits, [0, 1, 1, -200], 2.0), [1.0, -2.0, 0.5, 3.0])
    assert list(np.isfinite(top_k_only(logits.astype(np.float64), 2))) == [True, False, False, True]
    # The penalty applies to greedy choice too: id 3 repeated at 1.5 falls to 2.0 and id 0 wins the tie.
    assert Sampler(repeat_penalty=1.5)(logits, recent=[3]) == 0
    assert Sampler(repeat_penalty=1.5, repeat_last_n=1)(logits, recent=[3, 2]) == 3  # id 3 is outside the window
    draws = [Sampler(temperature=5.0, top_k=2, seed=s)(logits) for s in range(40)]
    assert set(draws) == {0, 3}
    draws = [Sampler(temperature=1.0, min_p=0.3, seed=s)(logits) for s in range(40)]
    assert set(draws) == {0, 3}  # p(2)/p(3) = e^-2.5 < 0.3, p(0)/p(3) = e^-1 > 0.3
    for bad in ({"top_k": -1}, {"min_p": 1.0}, {"repeat_penalty": 0.0}):
        with pytest.raises(EdgeMoEError):
            Sampler(**bad)


def test_text_stream_stops_at_the_first_of_several_stop_strings_and_strips() -> None:
    stream = TextStream(ByteTokenizer(), ["<|endoftext|>", "lo"])
    pieces = [stream.push(i) for i in (0, 1, 6)]
    pieces.append(stream.finish())
    assert stream.stopped and "".join(pieces) == stream.text == "Hel"
    stream = TextStream(ByteTokenizer(), "<|endoftext|>")
    pieces = [stream.push(i) for i in (1, 6, 4)]  # "lo  world<|end": the trailing text waits
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text == "lo  world<|end"
