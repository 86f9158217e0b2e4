"""Where a decoded token's time goes, measured in process: wall time per component of `Engine.decode`.

    python bench/decode_split.py BUNDLE IMAGE [--tokens 96] [--expert-store auto] [other ask options as KEY=VALUE]

Contract: one resident `edgemoe.runtime.ask` (no budget unless given) with timers wrapped around the
trunk's graph calls (attention, dense MLP, head, embedding), the MoE layer (its routing, hints, expert
runs and combine) and ONNX Runtime's `run_with_iobinding`; only calls made while decoding count. Prints
milliseconds per decoded token and microseconds per call for each, largest first. The timers add about
a microsecond a call. Complements `bench/decode_profile.py` (py-spy samples, including Python).
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any, Callable

import onnxruntime as ort

from edgemoe.runtime import api, engine as engine_module, moe as moe_module, routing as routing_module
from edgemoe.runtime import trunk as trunk_module


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.decoding = False

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.decoding:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("image")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--expert-store", default="auto")
    parser.add_argument("options", nargs="*", help="more `ask` keyword options, KEY=VALUE (e.g. memory_budget=1.5GB)")
    args = parser.parse_intermixed_args()
    timers = Timers()
    for owner, name, label in ((trunk_module.Trunk, "attention", "attention"), (trunk_module.Trunk, "dense_mlp", "dense MLP"),
                               (trunk_module.Trunk, "head", "head"), (trunk_module.Trunk, "embed", "embedding"),
                               (trunk_module.Trunk, "shared_mlp", "shared experts"),
                               (moe_module.MoELayer, "forward", "MoE layer, all"), (moe_module, "run_expert", "  experts"),
                               (moe_module.MoELayer, "_hint_next", "  hints"), (moe_module, "combine", "  combine"),
                               (routing_module.Routers, "route", "  routing"),
                               (ort.InferenceSession, "run_with_iobinding", "ORT run_with_iobinding")):
        timers.wrap(owner, name, label)
    decode = engine_module.Engine.decode

    def timed_decode(self: Any, token: int) -> Any:
        timers.decoding = True
        start = time.perf_counter()
        try:
            return decode(self, token)
        finally:
            timers.seconds["decoded token"] += time.perf_counter() - start
            timers.calls["decoded token"] += 1
            timers.decoding = False

    engine_module.Engine.decode = timed_decode
    extra = dict(option.split("=", 1) for option in args.options)
    api.ask(args.bundle, "Describe this image in detail.", image=args.image, max_tokens=args.tokens,
            expert_store=args.expert_store, **extra)
    tokens = timers.calls["decoded token"]
    for label in sorted(timers.seconds, key=lambda k: -timers.seconds[k]):
        print(f"{label:24s} {timers.seconds[label] / tokens * 1e3:8.2f} ms/token  "
              f"({timers.calls[label] / tokens:.0f} calls/token, {timers.seconds[label] / timers.calls[label] * 1e6:.0f} us/call)")


if __name__ == "__main__":
    main()
