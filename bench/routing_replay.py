"""Replay one run's routing through caches of the same size: what a static cache would have read.

    edgemoe ask BUNDLE Q --image IMG --memory-budget 2.1GB --routing-trace run.trace --json > run.json
    python bench/routing_replay.py run.json run.trace [--out FILE.json]

Contract: reads the run's stats (`edgemoe ask --json`: its expert cache size, the fraction of all expert
bytes that is, and what it paged and read from disk after the first token) and its routing trace
(`runtime.routing_trace`). The cache holds C = floor(cache bytes / one expert's bytes) experts, one
expert's bytes being all expert bytes / all experts as the run's store counts them (equal-size int4
experts; a mixed-precision bundle would need per-expert sizes). Over the decode calls of the trace
(one token each) it counts the experts each cache would have had to load, per decoded token:
  static-oracle   the C experts used most often in this very decode (the best any static cache can do);
  static-prefill  the C experts that the prompt's prefill routed the most tokens to (what a run could pin
                  knowing only the prompt), a miss loaded into memory outside the C;
  static-same-memory  the same, within the same memory: the prompt's C - 1 most-routed experts pinned and
                  one slot into which each miss is loaded (a cache must hold the expert it runs);
  lru-demand      an LRU cache of C experts loaded on demand only, no prefetch, starting from the
                  static-prefill set;
  pinned-P        the prompt's P x C most-routed experts pinned, an on-demand LRU of the other
                  (1 - P) x C (for P in 0.5, 0.75, 0.9: how much of a cache to pin);
  uniform         (1 - C / experts) x top-k x MoE layers: a static cache under uniform routing;
  belady          the offline optimum of C experts loaded on demand, starting from the static-prefill
                  set: each miss evicts the expert whose next use is farthest (a floor no cache that
                  cannot see the future reaches).
It also prints how much a token's experts say about the next token's: the chance that an expert a
layer used is used again by the next token, against the chance that any expert is used at all (equal
when routing has no memory from token to token, so no history-based policy can beat a static set by
much).
Each is printed in MB per token (loads x one expert's bytes) next to the run's own paged bytes and disk
reads per decoded token. Routing is whatever the run used: label it (the generated checkpoints' routing
is easy to predict; `--routing uniform` is the worst case).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, OrderedDict
from pathlib import Path

from edgemoe.runtime.routing_trace import TraceRecord, read_trace

Key = tuple[int, int]  # (layer, expert)
PINNED_FRACTIONS = (0.5, 0.75, 0.9)


def _used(record: TraceRecord) -> list[Key]:
    return [(record.layer, e) for e in sorted(record.experts)]


def static_loads(decode: list[TraceRecord], pinned: set[Key]) -> int:
    return sum(1 for r in decode for key in _used(r) if key not in pinned)


def lru_loads(decode: list[TraceRecord], capacity: int, start: list[Key]) -> int:
    cache: OrderedDict[Key, None] = OrderedDict((k, None) for k in start[:capacity])
    loads = 0
    for r in decode:
        for key in _used(r):
            if key in cache:
                cache.move_to_end(key)
                continue
            loads += 1
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return loads


def pinned_lru_loads(decode: list[TraceRecord], capacity: int, order: list[Key], k: int) -> int:
    """Loads with the first `k` of `order` pinned and an LRU over the other `capacity - k` slots."""
    pinned = set(order[:k])
    rest = [r for r in (TraceRecord(r.layer, r.tokens, {e: c for e, c in r.experts.items() if (r.layer, e) not in pinned})
                        for r in decode)]
    return lru_loads(rest, capacity - k, order[k:]) if capacity > k else sum(len(r.experts) for r in rest)


def belady_loads(decode: list[TraceRecord], capacity: int, start: list[Key]) -> int:
    """Misses of an optimal offline cache: evict the resident key used farthest in the future."""
    uses = [(i, key) for i, r in enumerate(decode) for key in _used(r)]
    following: list[int] = [0] * len(uses)
    last: dict[Key, int] = {}
    for j in range(len(uses) - 1, -1, -1):
        following[j] = last.get(uses[j][1], len(uses))
        last[uses[j][1]] = j
    resident = {key: last.get(key, len(uses)) for key in start[:capacity]}  # key -> its next use
    loads = 0
    for j, (i, key) in enumerate(uses):
        if key not in resident:
            loads += 1
            if len(resident) >= capacity:
                running = set(_used(decode[i]))
                victim = max((k for k in resident if k not in running), key=resident.__getitem__)
                del resident[victim]
        resident[key] = following[j]
    return loads


def reuse(decode: list[TraceRecord], layers: list[int]) -> dict:
    """P(an expert is used by a token | the previous token used it) against P(it is used)."""
    per_layer: dict[int, list[set[int]]] = {n: [] for n in layers}
    for r in decode:
        per_layer[r.layer].append(set(r.experts))
    experts = max(e for r in decode for e in r.experts) + 1
    again = used_before = used = seen = 0
    for calls in per_layer.values():
        for prev, now in zip(calls, calls[1:]):
            again += len(prev & now)
            used_before += len(prev)
            used += len(now)
            seen += experts
    return {"p_used_again": again / used_before if used_before else None, "p_used": used / seen if seen else None}


def top(counter: Counter, n: int) -> list[Key]:
    return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def replay(stats: dict, records: list[TraceRecord]) -> dict:
    first_decode = next(i for i, r in enumerate(records) if r.tokens == 1)
    prefill, decode = records[:first_decode], records[first_decode:]
    layers = sorted({r.layer for r in records})
    tokens = len(decode) // len(layers)
    top_k = max(sum(r.experts.values()) // r.tokens for r in records)
    fraction = stats["expert_cache_fraction"] or 1.0
    all_bytes = stats["expert_budget_bytes"] / fraction
    # Every expert of every MoE layer (an image prefill routes tokens to all of them).
    experts_total = len(layers) * (max(e for r in records for e in r.experts) + 1)
    one = all_bytes / experts_total
    capacity = int(stats["expert_budget_bytes"] // one)
    decode_use, prefill_use = Counter(), Counter()
    for r in decode:
        decode_use.update(_used(r))
    for r in prefill:
        for e, c in r.experts.items():
            prefill_use[(r.layer, e)] += c
    prefill_set = top(prefill_use, capacity)
    loads = {"static-oracle": static_loads(decode, set(top(decode_use, capacity))),
             "static-prefill": static_loads(decode, set(prefill_set)),
             "lru-demand": lru_loads(decode, capacity, prefill_set)}
    order = top(prefill_use, len(prefill_use))
    if capacity > 1:
        loads["static-same-memory"] = pinned_lru_loads(decode, capacity, order, capacity - 1)
    for fraction in PINNED_FRACTIONS:
        loads[f"pinned-{fraction}"] = pinned_lru_loads(decode, capacity, order, int(capacity * fraction))
    loads["belady"] = belady_loads(decode, capacity, prefill_set)
    per_token = {k: v / tokens * one for k, v in loads.items()}
    per_token["uniform"] = (1 - capacity / experts_total) * top_k * len(layers) * one
    new = max(stats["new_tokens"] - 1, 1)
    return {"decoded_tokens": tokens, "moe_layers": len(layers), "top_k": top_k, "experts": experts_total,
            "cache_experts": capacity, "expert_bytes": one, "static_bytes_per_token": per_token,
            "edgemoe_paged_bytes_per_token": stats["decode_bytes_paged"] / new,
            "edgemoe_disk_bytes_per_token": (stats.get("decode_disk_read_bytes") or 0) / new,
            "routing": stats.get("routing", "model"), "reuse": reuse(decode, layers)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ask_json", type=Path)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = args.ask_json.read_text()
    stats = json.loads(text[text.index("{"):])["stats"]
    result = replay(stats, read_trace(args.trace))
    mb = 1e6
    print(f"routing {result['routing']}: {result['decoded_tokens']} decoded tokens, cache of {result['cache_experts']} "
          f"of {result['experts']} experts ({result['expert_bytes'] / mb:.1f} MB each)")
    print(f"edgemoe: paged {result['edgemoe_paged_bytes_per_token'] / mb:.1f} MB/token, read from disk "
          f"{result['edgemoe_disk_bytes_per_token'] / mb:.1f} MB/token")
    r = result["reuse"]
    if r["p_used_again"] is not None:
        print(f"an expert a token used is used by the next token with p = {r['p_used_again']:.3f}; any expert "
              f"with p = {r['p_used']:.3f}")
    for name, value in result["static_bytes_per_token"].items():
        print(f"{name:15s} {value / mb:8.1f} MB/token  (edgemoe paged {result['edgemoe_paged_bytes_per_token'] / value:.2f}x)"
              if value else f"{name:15s} {0:8.1f} MB/token")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
