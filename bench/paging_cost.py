"""Kernel cost of paging one mapped expert: MADV_DONTNEED then MADV_POPULATE_READ, and a run after.

Usage: python bench/paging_cost.py BUNDLE [--rounds 3]
Prints, per expert, the mean time to drop its pages, to map them back from the page cache, and to
run it for one token right after, next to running it resident. This is the per-load cost that
decides how close a budget sweep gets to resident speed (README, "Measured results").
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgemoe.bundle import Bundle
from edgemoe.offload.mapped import MappedExpertStore
from edgemoe.offload.sessions import configure_process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    configure_process()
    store = MappedExpertStore(Bundle.open(args.bundle))
    experts = [store.load(key) for key in store.keys()]
    x = np.random.default_rng(0).standard_normal((1, experts[0].session.get_inputs()[0].shape[-1]),
                                                  dtype=np.float32)
    for _ in range(args.rounds):
        resident = paged = populate = drop = 0.0
        for expert in experts:
            t = time.perf_counter(); expert.run(x); resident += time.perf_counter() - t
            t = time.perf_counter(); expert.release(); drop += time.perf_counter() - t
            t = time.perf_counter(); expert.page_in(); populate += time.perf_counter() - t
            t = time.perf_counter(); expert.run(x); paged += time.perf_counter() - t
        n = len(experts) / 1e3
        print(f"{len(experts)} experts of {experts[0].nbytes / 1e6:.1f} MB: run resident {resident / n:.3f} ms, "
              f"MADV_DONTNEED {drop / n:.3f} ms, MADV_POPULATE_READ {populate / n:.3f} ms, "
              f"run after paging {paged / n:.3f} ms")


if __name__ == "__main__":
    main()
