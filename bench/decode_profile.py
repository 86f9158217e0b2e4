"""Where a decoded token's time goes, from a py-spy recording of one `edgemoe ask`.

    py-spy record -o prof.raw --format raw --rate 50 -- \
        python -m edgemoe.cli ask BUNDLE "Describe this image in detail." --image IMG --max-tokens 256
    python bench/decode_profile.py prof.raw

(`--native --threads` adds the native frames and thread names, but unwinding native stacks at 100 Hz
slowed that decode from 11.8 to 1.5 tok/s, so its shares describe a different run.)

Contract: reads py-spy's raw (collapsed) stacks, keeps the main thread's samples taken inside
`Engine.decode` (prefill and start-up are left out), and prints the share of those samples under each
innermost edgemoe frame (which graph call or host step the time is in), then the share whose innermost
native frame is the thread pool's wake-up (`pthread_cond_signal`: ORT waking its workers, once per
session call). Loader threads are not counted: their time overlaps the main thread's.
"""

from __future__ import annotations

import sys
from collections import Counter


def summarise(lines: list[str]) -> tuple[int, Counter, int]:
    """(decode samples, samples per innermost edgemoe frame, samples waking the thread pool)."""
    frames_of: Counter = Counter()
    total = wake = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        if ("MainThread" not in frames[0] and frames[0].startswith("thread (")) or "Engine.decode" not in stack:
            continue
        n = int(count)
        total += n
        ours = [f for f in frames if "edgemoe/" in f]
        name, _, where = (ours[-1] if ours else frames[-1]).partition(" (")
        frames_of[f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})"] += n
        wake += n if frames[-1].startswith("pthread_cond_signal") else 0
    return total, frames_of, wake


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        total, frames_of, wake = summarise(f.readlines())
    if not total:
        print("no samples inside Engine.decode")
        return 1
    print(f"{total} main-thread samples while decoding")
    for name, n in frames_of.most_common(12):
        print(f"{n / total:6.1%}  {name}")
    print(f"{wake / total:6.1%}  of them waking ORT's worker threads (pthread_cond_signal)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
