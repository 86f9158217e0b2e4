"""Watch a running edgemoe process's footprint: RSS plus the bundle's and prepacked files' page cache
it keeps without mapping them (what `--memory-budget` bounds), sampled until the process exits.

    python bench/footprint_watch.py PID BUNDLE [--interval 0.1] [--also-under DIR]

The watched files are listed again every `--relist` seconds (1), so a first run's prepacked twins count
from the moment they exist; `--also-under DIR` (repeatable) watches every file under DIR as well, for
example the prepacked cache, whose temporary files a first run writes while it prepares. Prints one
line per new peak and a final JSON line with the peak footprint, its page-cache part, the process's
own peak RSS (VmHWM) and the number of samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

from edgemoe.offload.footprint import measure_footprint, model_files
from edgemoe.proc_stats import status_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--relist", type=float, default=1.0)
    parser.add_argument("--also-under", type=Path, action="append", default=[])
    args = parser.parse_args()
    files, listed, peak, samples, hwm = [], 0.0, None, 0, 0
    while psutil.pid_exists(args.pid):
        if time.monotonic() - listed >= args.relist:
            files = model_files(args.bundle) + [p for d in args.also_under for p in d.rglob("*") if p.is_file()]
            files, listed = list(dict.fromkeys(files)), time.monotonic()
        hwm = max(hwm, _vm_hwm(args.pid))
        now = measure_footprint(args.pid, files)
        if now is None:
            break
        samples += 1
        if peak is None or now.total_bytes > peak.total_bytes:
            peak = now
            print(f"peak footprint {now.total_bytes / 1e9:.3f} GB (RSS {now.rss_bytes / 1e9:.3f} GB, page cache "
                  f"{now.file_cache_bytes / 1e9:.3f} GB)", flush=True)
        time.sleep(args.interval)
    print(json.dumps({"peak_footprint_bytes": peak and peak.total_bytes,
                      "peak_file_cache_bytes": peak and peak.file_cache_bytes, "peak_rss_bytes": hwm,
                      "samples": samples}))


def _vm_hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), 0 once it is gone."""
    return status_bytes("VmHWM", pid) or 0


if __name__ == "__main__":
    main()
