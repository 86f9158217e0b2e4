"""llama.cpp as a peer, side by side with `edgemoe bench` in one invocation.

    python bench/llamacpp_peer.py --gguf MODEL-Q4_0.gguf [--gguf MODEL-Q4_K_M.gguf] --prompt-tokens 1040 --tokens 64 \
        [--bundle BUNDLE --memory-budgets 4GB,3GB --image IMG] --out bench/results/NAME.json

Contract: runs llama.cpp's `llama-bench` (built once by bench/build_llamacpp.sh) twice on each GGUF:
prompt processing of `--prompt-tokens` tokens (`-p P -n 0`), then `--tokens` decoded tokens at that
context depth (`-p 0 -n N -d P`: what an image-sized prompt leaves behind), each with `--threads`
threads and `--repetitions` repetitions. llama.cpp maps the whole GGUF and has no memory budget, so its
footprint is whatever it keeps resident: sampled from outside every 100 ms as RSS plus the GGUF's
page cache it does not map (`offload.footprint`). The GGUF's pages are dropped from the page cache
before each llama-bench run, as `edgemoe bench` drops the bundle's (its first repetition reads the
disk; llama-bench reports the mean and spread over repetitions).

With `--bundle`, `edgemoe bench` runs first in the same invocation on the same machine (its own
cold runs; its arguments after `--memory-budgets` as given), and the report carries both, plus the
ratios against the first GGUF: edgemoe decode tok/s / llama.cpp decode tok/s per budget, and TTFT /
llama.cpp's prompt time (and against the best prompt time of all the GGUFs given).
llama.cpp reads text only (no DeepSeek-VL2 vision): its prompt is `--prompt-tokens` text tokens, set
to the edgemoe run's prompt length. Writes one JSON object to `--out` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemoe.bench.codec import encode
from edgemoe.bench.machine import machine_info
from edgemoe.bench.results import BenchReport
from edgemoe.offload.footprint import FootprintSampler
from edgemoe.page_cache import drop_cached

HERE = Path(__file__).resolve().parent


def llama_root() -> Path:
    out = subprocess.run(["bash", str(HERE / "build_llamacpp.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def llama_bench(tool: Path, gguf: Path, args: list[str]) -> dict:
    """One llama-bench run (JSON output), with its peak footprint sampled from outside."""
    drop_cached(gguf)
    cmd = [str(tool), "-m", str(gguf), "-o", "json", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with FootprintSampler(proc.pid, [gguf]) as sampler:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    rows = json.loads(out)
    peak = sampler.peak
    return {"command": cmd, "wall_s": time.monotonic() - t0, "rows": rows,
            "peak_footprint_bytes": None if peak is None else peak.total_bytes,
            "peak_rss_bytes": None if peak is None else peak.rss_bytes}


def run_llamacpp(gguf: Path, prompt: int, tokens: int, threads: int, reps: int, extra: list[str]) -> dict:
    tool = llama_root() / "build" / "bin" / "llama-bench"
    common = ["-t", str(threads), "-r", str(reps), *extra]
    pp = llama_bench(tool, gguf, ["-p", str(prompt), "-n", "0", *common])
    tg = llama_bench(tool, gguf, ["-p", "0", "-n", str(tokens), "-d", str(prompt), *common])
    prompt_tps = pp["rows"][0]["avg_ts"]
    return {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "threads": threads, "repetitions": reps,
            "prompt_tokens": prompt, "decode_tokens": tokens, "prompt_tok_s": prompt_tps,
            "prompt_tok_s_stddev": pp["rows"][0]["stddev_ts"], "prompt_s": prompt / prompt_tps,
            "decode_tok_s": tg["rows"][0]["avg_ts"], "decode_tok_s_stddev": tg["rows"][0]["stddev_ts"],
            "peak_footprint_bytes": max(r["peak_footprint_bytes"] or 0 for r in (pp, tg)),
            "build": {k: pp["rows"][0].get(k) for k in ("build_commit", "cpu_info", "type_k", "n_threads")},
            "runs": [pp, tg]}


def run_edgemoe(bundle: Path, bench_args: list[str], out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "edgemoe"), "bench", str(bundle), *bench_args, "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def ratios(edgemoe: dict, llama: dict) -> list[dict]:
    rows = []
    for run in BenchReport.from_dict(edgemoe).runs:
        if not run.ok:
            continue
        tps, ttft = run.stats.decode_tokens_per_s, run.stats.time_to_first_token_s
        rows.append({"run": run.label, "memory_budget": run.memory_budget, "decode_tok_s": tps, "ttft_s": ttft,
                     "peak_footprint_bytes": run.peak_footprint_bytes, "prompt_tokens": run.stats.prompt_tokens,
                     "decode_vs_llamacpp": None if not tps else tps / llama["decode_tok_s"],
                     "ttft_vs_llamacpp_prompt": None if not ttft else ttft / llama["prompt_s"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, action="append", required=True, help="Repeatable; ratios use the first.")
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repetitions", type=int, default=2)
    p.add_argument("--llama-args", default="", help="Extra llama-bench arguments, e.g. '--repack 0 -fa on'.")
    p.add_argument("--bundle", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a, bench_args = p.parse_known_args()
    report: dict = {"machine": encode(machine_info()), "python": platform.python_version(),
                    "command": sys.argv}
    if a.bundle is not None:
        with tempfile.TemporaryDirectory() as tmp:
            report["edgemoe"] = run_edgemoe(a.bundle, [*bench_args, "--tokens", str(a.tokens)], Path(tmp) / "e.json")
    runs = [run_llamacpp(g, a.prompt_tokens, a.tokens, a.threads, a.repetitions, a.llama_args.split()) for g in a.gguf]
    report["llamacpp"], report["llamacpp_all"] = runs[0], runs
    best_prompt_s = min(r["prompt_s"] for r in runs)
    if "edgemoe" in report:
        report["ratios"] = ratios(report["edgemoe"], report["llamacpp"])
        for row in report["ratios"]:
            row["ttft_vs_best_llamacpp_prompt"] = None if not row["ttft_s"] else row["ttft_s"] / best_prompt_s
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    for ll in runs:
        print(f"llama.cpp {Path(ll['gguf']).name}: prompt {ll['prompt_tokens']} tokens in {ll['prompt_s']:.2f} s "
              f"({ll['prompt_tok_s']:.1f} tok/s), decode {ll['decode_tok_s']:.2f} tok/s at depth "
              f"{ll['prompt_tokens']}, peak footprint {ll['peak_footprint_bytes'] / 1e9:.2f} GB")
    for row in report.get("ratios", []):
        print(f"edgemoe {row['run']}: decode {row['decode_tok_s']:.2f} tok/s = {row['decode_vs_llamacpp']:.2f}x "
              f"llama.cpp; TTFT {row['ttft_s']:.1f} s = {row['ttft_vs_llamacpp_prompt']:.2f}x its prompt time")


if __name__ == "__main__":
    main()
