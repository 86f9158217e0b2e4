"""Repeated questions about one image: time to first token cold against with `--prompt-cache`, in one run.

    python bench/repeat_image.py BUNDLE IMAGE [--memory-budget 2.1GB] [--expert-store fused] [--tokens 32] [--out FILE.json]

Contract: three fresh `edgemoe ask` processes, each measured by `edgemoe.bench.child.run_child` (peak RSS,
and the footprint: RSS plus the page cache of the bundle's, prepacked and prompt-cache files) after the
page cache of all those files is dropped, so every run reads the disk:
  1. `--prompt-cache` with question A, in an empty prompt-cache folder: computes and saves the image prefix;
  2. question B without the cache: the cold time to first token;
  3. question B with `--prompt-cache`: reads the image's features and prefix back and computes only B.
Prints and stores each run's TTFT, its parts, decode tok/s and footprint, the ratio TTFT(3) / TTFT(2), and
whether runs 2 and 3 gave the same tokens (they must). The prompt cache lives in a temporary
`EDGEMOE_CACHE_DIR` whose `prepacked` folder links to the user's, so nothing is prepacked again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from edgemoe.bench.child import parse_json_output, run_child
from edgemoe.bench.limits import evict_pages
from edgemoe.bench.machine import machine_info
from edgemoe.offload.footprint import model_files
from edgemoe.cache_dir import cache_root

QUESTION_A = "Describe this image in detail."
QUESTION_B = "What colours are in this image?"


def _ask(args: argparse.Namespace, question: str, cached: bool, env: dict[str, str], prompts: Path) -> dict:
    files = model_files(args.bundle) + [p for p in prompts.rglob("*") if p.is_file()]
    evict_pages(files)
    cmd = [sys.executable, "-m", "edgemoe.cli", "ask", str(args.bundle), question, "--image", str(args.image),
           "--max-tokens", str(args.tokens), "--json"] + (["--prompt-cache"] if cached else [])
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    if args.expert_store:
        cmd += ["--expert-store", args.expert_store]
    child = run_child(cmd, env=env, watch_files=files, timeout_s=3600)
    if not child.ok:
        raise SystemExit(f"{' '.join(cmd)} failed: {child.failure()}")
    out = parse_json_output(child.stdout, "edgemoe ask")
    s = out["stats"]
    return {"question": question, "prompt_cache": cached, "token_ids": out["token_ids"],
            "ttft_s": s["time_to_first_token_s"], "image_encode_s": s["image_encode_s"],
            "prefill_s": s["prefill_s"], "prefill_tokens": s["prefill_tokens"], "prompt_tokens": s["prompt_tokens"],
            "prefill_expert_load_s": s["prefill_expert_load_s"], "decode_tokens_per_s": s["decode_tokens_per_s"],
            "load_s": s["load_s"], "peak_rss_bytes": child.peak_rss_bytes,
            "peak_footprint_bytes": child.peak_footprint_bytes, "command": cmd}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--memory-budget")
    parser.add_argument("--expert-store", help="as `edgemoe ask --expert-store` (default: its own)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgemoe-prompts-") as tmp:
        root = Path(tmp)
        (root / "prepacked").symlink_to(cache_root() / "prepacked", target_is_directory=True)
        env = {**os.environ, "EDGEMOE_CACHE_DIR": str(root)}
        prompts = root / "prompts"
        runs = [_ask(args, QUESTION_A, True, env, prompts), _ask(args, QUESTION_B, False, env, prompts),
                _ask(args, QUESTION_B, True, env, prompts)]
        saved = sum(p.stat().st_size for p in prompts.rglob("*") if p.is_file())
    cold, warm = runs[1], runs[2]
    report = {"machine": asdict(machine_info()), "bundle": str(args.bundle), "image": str(args.image),
              "memory_budget": args.memory_budget, "expert_store": args.expert_store, "tokens": args.tokens,
              "prompt_cache_bytes": saved,
              "runs": runs, "ttft_ratio": warm["ttft_s"] / cold["ttft_s"],
              "same_tokens": warm["token_ids"] == cold["token_ids"]}
    for run in runs:
        print(f"{'cached' if run['prompt_cache'] else 'cold  '} {run['question']!r}: TTFT {run['ttft_s']:.2f} s "
              f"(image {run['image_encode_s']:.2f}, prefill {run['prefill_s']:.2f} over {run['prefill_tokens']} of "
              f"{run['prompt_tokens']} positions, experts loading {run['prefill_expert_load_s']:.2f}), decode "
              f"{run['decode_tokens_per_s'] or 0:.2f} tok/s, footprint {(run['peak_footprint_bytes'] or 0) / 1e9:.3f} GB, "
              f"loading before the question {run['load_s']:.2f} s")
    print(f"prompt cache {saved / 1e6:.0f} MB on disk; repeated-image TTFT {report['ttft_ratio']:.3f}x cold; "
          f"same tokens: {report['same_tokens']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
