"""Fixed memory an expert store keeps for its experts, whatever the cache holds: private bytes per expert.

    python bench/store_memory.py BUNDLE {mapped,fused} [--out FILE.json]

Contract: in a fresh process, measures the anonymous (private) RSS before and after the store has built
every session it will ever build, with no expert paged in: the mapped store's one session per expert
(each opened as a first load would, then released), or the fused store's one QMoE session per MoE layer
(built when the store opens). Prints experts, sessions, the private bytes in all and per expert, and the
time it took; the file-backed RSS left afterwards should be near zero (no expert resident).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict
from pathlib import Path

from edgemoe.bench.machine import machine_info
from edgemoe.bundle import Bundle
from edgemoe.bundle.ledger import HashLedger
from edgemoe.offload.mapped import MappedExpertStore, anonymous_rss
from edgemoe.offload.sessions import configure_process
from edgemoe.proc_stats import status_bytes


def measure(bundle_dir: str, kind: str) -> dict:
    configure_process()
    bundle = Bundle.open(bundle_dir, ledger=HashLedger.for_directory(bundle_dir))
    import onnxruntime  # noqa: F401  (its own start-up memory is not the store's)

    gc.collect()
    before, t0 = anonymous_rss(), time.perf_counter()
    if kind == "fused":
        from edgemoe.offload.fused import FusedExperts

        store = FusedExperts(bundle)
        sessions = len(store.layers)
    else:
        store = MappedExpertStore(bundle)
        for key in store.keys():
            store.load(key).release()
        sessions = store.sessions
    seconds = time.perf_counter() - t0
    gc.collect()
    grown = (anonymous_rss() or 0) - (before or 0)
    experts = len(store.keys())
    return {"store": kind, "experts": experts, "sessions": sessions, "private_bytes": grown,
            "private_bytes_per_expert": grown / experts, "seconds": seconds,
            "file_rss_after": status_bytes("RssFile")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("store", choices=("mapped", "fused"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.bundle, args.store)
    print(f"{result['store']}: {result['experts']} experts, {result['sessions']} sessions, "
          f"{result['private_bytes'] / 1e6:.1f} MB private = {result['private_bytes_per_expert'] / 1024:.1f} KiB "
          f"per expert, built in {result['seconds']:.1f} s; file-backed RSS after {(result['file_rss_after'] or 0) / 1e6:.1f} MB")
    if args.out:
        args.out.write_text(json.dumps({**result, "machine": asdict(machine_info())}, indent=1))


if __name__ == "__main__":
    main()
