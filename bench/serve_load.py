"""Load on `edgemoe serve`: N requests from C concurrent clients (the official openai client), each
answer checked against `edgemoe ask` for the same question and image, latency percentiles, and the
server's footprint (RSS plus the bundle's page cache it keeps) measured from outside before, during and
after (two rounds, to see any growth).

    python bench/serve_load.py BUNDLE [--requests 32] [--clients 8] [--tokens 16] [--image IMG]

Prints one JSON object. Each request is one of 8 questions about the image (as a data: URL), greedy,
so its answer must equal `edgemoe ask`'s token for token.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import subprocess
import sys
import threading
from dataclasses import asdict
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from edgemoe.bench.machine import machine_info
from edgemoe.bench.prompt import synthetic_image
from edgemoe.offload.footprint import FootprintSampler, measure_footprint, model_files
from edgemoe.runtime import ask

QUESTIONS = ["What is in the image?", "Describe the colours.", "Is there a person?", "Where was this taken?",
             "What stands out?", "Count the objects.", "Is it day or night?", "Describe it in one sentence."]


def start_server(bundle: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "edgemoe.cli", "serve", str(bundle), "--port", "0"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        found = re.search(r"serving \S+ at (http://[\d.]+:\d+)/v1", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, found.group(1)
    raise SystemExit(f"the server did not start (exit {process.wait()})")


def one_round(url: str, model: str, image_url: str, want: dict[str, str], requests: int, clients: int,
              tokens: int) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def request(i: int) -> tuple[float, bool]:
        question = QUESTIONS[i % len(QUESTIONS)]
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, max_tokens=tokens, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                   {"type": "text", "text": question}]}])
        return time.perf_counter() - t0, reply.choices[0].message.content == want[question]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(request, range(requests)))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    return {"requests": requests, "clients": clients, "correct": sum(r[1] for r in results), "wall_s": round(wall, 2),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "requests_per_s": round(requests / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--image", type=Path)
    args = parser.parse_args()
    image = args.image or synthetic_image(Path("/tmp/edgemoe-serve-load.png"), (480, 360))
    image_url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    want = {q: ask(args.bundle, q, image, max_tokens=args.tokens).text for q in QUESTIONS}
    process, url = start_server(args.bundle)
    files = model_files(args.bundle)
    try:
        loaded = measure_footprint(process.pid, files)
        report: dict = {"bundle": str(args.bundle), "machine": asdict(machine_info()),
                        "footprint_loaded_bytes": loaded and loaded.total_bytes}
        for name in ("round1", "round2"):
            with FootprintSampler(process.pid, files, interval_s=0.01) as watch:
                report[name] = one_round(url, args.bundle.resolve().name, image_url, want, args.requests,
                                         args.clients, args.tokens)
            after = measure_footprint(process.pid, files)
            report[name].update(peak_footprint_bytes=watch.peak and watch.peak.total_bytes,
                                footprint_after_bytes=after and after.total_bytes)
    finally:
        process.send_signal(2)
        report["server_exit"] = process.wait(60)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
