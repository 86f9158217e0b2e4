"""One cold `edgemoe ask` and one line about its paging: what bench/loader_sweep.sh and bench/hint_gate.sh run
for each setting they compare.

    python bench/cold_ask.py LABEL BUNDLE IMAGE [edgemoe ask options...]

Contract: drops the page cache of the bundle's files and this machine's prepacked twins (so every miss reads
the disk), runs `python -m edgemoe.cli ask BUNDLE "Describe this image in detail." --image IMAGE --json` with the
options given, and prints LABEL, decode tok/s, disk bytes per decoded token, cache hits and misses, hints in time
and late, hints withheld, prediction precision, TTFT and peak RSS. A failed ask exits with its status and stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys

from edgemoe.offload.footprint import model_files
from edgemoe.page_cache import drop_cached

QUESTION = "Describe this image in detail."


def main(argv: list[str]) -> int:
    label, bundle, image, *options = argv
    for path in model_files(bundle):
        drop_cached(path)
    cmd = [sys.executable, "-m", "edgemoe.cli", "ask", bundle, QUESTION, "--image", image, "--json", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    s, n = out["stats"], max(len(out["token_ids"]) - 1, 1)
    print(f"{label}: {s['decode_tokens_per_s']:.2f} tok/s, disk {(s['decode_disk_read_bytes'] or 0) / n / 1e6:.1f} "
          f"MB/token, hits {s['cache_hits']} misses {s['cache_misses']}, in time {s['prefetched_in_time']}, late "
          f"{s['prefetched_late']}, withheld {s['hints_withheld']}, P {s['prediction_precision'] or 0:.2f}, "
          f"TTFT {s['time_to_first_token_s']:.1f} s, peak RSS {s['peak_rss_bytes'] / 1e9:.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
