"""Watch a running edgemoe process's footprint: RSS plus the bundle's and prepacked files' page cache
it keeps without mapping them (what `--memory-budget` bounds), sampled until the process exits.

    python bench/footprint_watch.py PID BUNDLE [--interval 0.1]

Prints one line per new peak and a final JSON line with the peak footprint, its page-cache part and
the number of samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

from edgemoe.offload.footprint import measure_footprint, model_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    files, peak, samples = model_files(args.bundle), None, 0
    while psutil.pid_exists(args.pid):
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
                      "peak_file_cache_bytes": peak and peak.file_cache_bytes, "samples": samples}))


if __name__ == "__main__":
    main()
