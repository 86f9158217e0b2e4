"""The peers' side of a benchmark: one peer per fresh process, printing one JSON object like `edgemoe ask`.

    python -m edgemoe.bench.peer_child torch --checkpoint CKPT --dtype bf16 --image IMG --question Q --tokens N
    python -m edgemoe.bench.peer_child transformers --checkpoint CKPT --dtype bf16 --image IMG --question Q --tokens N
    python -m edgemoe.bench.peer_child accelerate-prepare --checkpoint CKPT --dtype bf16 --offload-dir DIR
    python -m edgemoe.bench.peer_child accelerate --checkpoint CKPT --dtype bf16 --offload-dir DIR \
        --max-memory BYTES --image IMG --question Q --tokens N

Contract: the prompt is built exactly as the runtime builds it (the family's conversation template,
`Conversation.encode`, `prepare_image`), generation is greedy on a KV cache and stops at the stop
token or after N tokens, and the printed stats use `edgemoe ask`'s keys and definitions: time to first
token from the request (image preprocessing included) to the first id, model loading excluded
(`load_s`); decode tokens/s over the tokens after the first.

`torch`: the reference model fully resident at fp32 or bf16: what a user runs without DeepSpeed.
`transformers`: the same model assembled from transformers' own classes (`reference.transformers_llava`:
StableLmForCausalLM / PhiForCausalLM with SDPA, CLIP/SigLIP vision models) decoding greedily on a
transformers StaticCache: the torch baseline people actually use; the reference grows its cache.
`accelerate`: Hugging Face accelerate's big-model offload of the same model with only `max_memory`
bytes of weights in RAM: the model is built on the meta device, `infer_auto_device_map(max_memory=
{"cpu": ...})` places modules in order on "cpu" until the budget is spent and the rest on "disk",
and `dispatch_model(main_device="cpu", offload_dir=...)` hooks every module on disk so that each
forward reads its weights and drops them afterwards. The folder `accelerate-prepare` writes holds
accelerate's `index.json`: a tensor stored as is in one of the checkpoint's safetensors files is read
from that file in place (accelerate's own `{"safetensors_file", "weight_name", "dtype"}` entry, what
transformers writes for a safetensors checkpoint offloaded to disk), so a 32 GB checkpoint needs no
32 GB copy; any other tensor (a row slice of a fused tensor, a reshaped one) is written beside it as a
numpy memmap with accelerate's `offload_weight`. Offload is at module granularity: a
module's weights load when that module is *called*; an expert nobody routes to is not read. Two
modules use a child's weight without calling it, which accelerate cannot see: each MoE router
(`MoELayer.route` reads `router.weight`), pinned to "cpu" here (torch computes silently with a
meta tensor otherwise), and the vision embeddings, kept whole and preloaded. torch is imported
inside the functions only: importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROUTER_SUFFIX = ".moe.router"
# Kept whole in the device map (never split below them): the units accelerate may place on disk.
NO_SPLIT = ["Attention", "MLP", "Norm", "VisionEmbeddings", "LMHead"]
PRELOAD = ["VisionEmbeddings"]  # its forward reads position_embedding.weight without calling it
DTYPES = ("fp32", "bf16")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# -- the prompt, as the runtime builds it -------------------------------------------------------

def prompt_inputs(ckpt, question: str):
    """(ids with the image marker, tokenizer, stop id, stop string)."""
    from edgemoe.model.prompt import Conversation, stop_token_id
    from edgemoe.model.tokenizer import load_tokenizer

    cfg = ckpt.config
    tokenizer = load_tokenizer(ckpt.directory, cfg.family)
    conv = Conversation.for_family(cfg.family).add_user(question, image=True)
    ids = conv.encode(tokenizer)
    return ids, tokenizer, stop_token_id(tokenizer, conv), conv.stop_str


def image_of(ckpt, image: Path):
    """The image prepared as the runtime prepares it (`ImageInput`: views [T, 3, S, S], tiles for tiled layouts)."""
    from edgemoe.model.image import prepare_image

    cfg = ckpt.config
    return prepare_image(image, ckpt.tower.processor, cfg.image_aspect_ratio, cfg.candidate_resolutions)


def _generation(out: list[int], stop_id: int, prompt_tokens: int, t0: float, t_first: float,
                t_end: float) -> dict[str, Any]:
    """`edgemoe ask`'s timing keys for ids `out`, requested at t0, first id at t_first, done at t_end."""
    decode_s = t_end - t_first
    rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else None
    return {"token_ids": out, "stop_reason": "eos" if out[-1] == stop_id else "length",
            "prompt_tokens": prompt_tokens, "time_to_first_token_s": t_first - t0,
            "decode_s": decode_s, "decode_tokens_per_s": rate}


def timed_generate(model, ckpt, image: Path, ids, tokens: int, stop_id: int, logit_limit: int) -> dict[str, Any]:
    """Greedy generation with the reference model's KV cache, timed like `edgemoe ask` (from the
    request, image preprocessing included, to the first id; then the tokens after it)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        features = model.encode(image_of(ckpt, image))  # [N, H]
        prompt = model.embed(ids, [features])
        cache = model.new_cache()
        logits = model(prompt.embeds, cache, logit_limit=logit_limit)
        out = [int(logits[0, -1].argmax())]
        t_first = time.perf_counter()
        while len(out) < tokens and out[-1] != stop_id:
            step = model.embed_tokens(torch.tensor([[out[-1]]]))
            logits = model(step, cache, logit_limit=logit_limit)
            out.append(int(logits[0, -1].argmax()))
        t_end = time.perf_counter()
    return _generation(out, stop_id, int(prompt.embeds.shape[1]), t0, t_first, t_end)


def _answer(tokenizer, token_ids: list[int], stop_str: str) -> str:
    from edgemoe.model.prompt import cut_at_stop

    return cut_at_stop(tokenizer.decode(token_ids), stop_str)


def _emit(tokenizer, stop_str: str, gen: dict[str, Any], **stats: Any) -> None:
    token_ids, stop_reason = gen.pop("token_ids"), gen.pop("stop_reason")
    result = {"answer": _answer(tokenizer, token_ids, stop_str), "token_ids": token_ids,
              "stop_reason": stop_reason, "stats": {**gen, **stats, "peak_rss_bytes": _max_rss()}}
    sys.stdout.write(json.dumps(result) + "\n")


# -- torch, fully resident ------------------------------------------------------------------------

def run_torch(args: argparse.Namespace) -> None:
    import torch

    from edgemoe.model.checkpoint import Checkpoint
    from edgemoe.reference.model import ReferenceModel

    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = Checkpoint.open(args.checkpoint)
    ids, tokenizer, stop_id, stop_str = prompt_inputs(ckpt, args.question)
    t0 = time.perf_counter()
    model = ReferenceModel.from_checkpoint(ckpt, _torch_dtype(args.dtype))
    load_s = time.perf_counter() - t0
    gen = timed_generate(model, ckpt, args.image, ids, args.tokens, stop_id, len(tokenizer))
    _emit(tokenizer, stop_str, gen, load_s=load_s, dtype=args.dtype)


# -- transformers' own classes, static cache -----------------------------------------------------

def run_transformers(args: argparse.Namespace) -> None:
    """`TransformersLlava` (transformers' causal LM, SDPA, MoE-LLaVA's MoE blocks) decoding on a StaticCache."""
    import torch

    from edgemoe.model.checkpoint import Checkpoint
    from edgemoe.reference.transformers_llava import ATTENTION, TransformersLlava

    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = Checkpoint.open(args.checkpoint)
    ids, tokenizer, stop_id, stop_str = prompt_inputs(ckpt, args.question)
    t0 = time.perf_counter()
    model = TransformersLlava.from_checkpoint(ckpt, _torch_dtype(args.dtype))
    load_s = time.perf_counter() - t0
    first: list[float] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        prompt = model.embed(ids, [model.encode(image_of(ckpt, args.image))])
        out = model.generate(prompt.embeds, args.tokens, stop_id, len(tokenizer),
                             on_first=lambda: first.append(time.perf_counter()))
        t_end = time.perf_counter()
    gen = _generation(out, stop_id, prompt.length, t0, first[0], t_end)
    _emit(tokenizer, stop_str, gen, load_s=load_s, dtype=args.dtype, attention=ATTENTION, kv_cache="static")


# -- accelerate ---------------------------------------------------------------------------------

def _meta_model(ckpt, dtype):
    import torch

    from edgemoe.reference.model import ReferenceModel

    bias = ckpt.config.lm_head_bias or ckpt.has("lm_head.bias")
    with torch.device("meta"):
        model = ReferenceModel(ckpt.config, ckpt.tower.vision, bias)
    return model.to(dtype).requires_grad_(False).eval()


def prepare_offload(args: argparse.Namespace) -> None:
    """Write accelerate's index for the model at `dtype` into `offload_dir` (once): in place where the
    checkpoint stores a tensor as is, else a converted copy."""
    import torch
    from accelerate.utils import offload_weight, save_offload_index

    from edgemoe.model.checkpoint import Checkpoint
    from edgemoe.reference.model import module_key

    folder, marker = Path(args.offload_dir), Path(args.offload_dir) / "edgemoe-source.json"
    source = {"checkpoint": str(Path(args.checkpoint).resolve()), "dtype": args.dtype, "in_place": True}
    if marker.is_file() and json.loads(marker.read_text()) == source and (folder / "index.json").is_file():
        sys.stdout.write(json.dumps({"prepared": str(folder), "reused": True}) + "\n")
        return
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(args.checkpoint)
    dtype = _torch_dtype(args.dtype)
    wanted = set(_meta_model(ckpt, dtype).state_dict())
    index: dict[str, Any] = {}
    copied = 0
    for name in ckpt.names:  # one tensor in memory at a time, and only those not readable in place
        key = module_key(name)
        if key not in wanted:
            continue
        stored = ckpt.stored(name)
        if stored is not None:
            index[key] = {"safetensors_file": str(stored[0].resolve()), "weight_name": stored[1],
                          "dtype": str(dtype).removeprefix("torch.")}
        else:
            index = offload_weight(torch.tensor(ckpt.tensor(name), dtype=dtype), key, str(folder), index)
            copied += 1
    if ckpt.config.tie_word_embeddings:
        index["head.lm_head.weight"] = index["embed_tokens.weight"]
        if (folder / "embed_tokens.weight.dat").is_file():
            os.link(folder / "embed_tokens.weight.dat", folder / "head.lm_head.weight.dat")
    save_offload_index(index, str(folder))
    marker.write_text(json.dumps(source))
    sys.stdout.write(json.dumps({"prepared": str(folder), "reused": False, "tensors": len(index),
                                 "copied": copied}) + "\n")


def _covering(device_map: dict[str, Any], name: str) -> str:
    return max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)


def pin(model, device_map: dict[str, Any], name: str, device: str) -> None:
    """Put module `name` on `device`, splitting the entry that covers it into its children first."""
    while name not in device_map:
        cover = _covering(device_map, name)
        module = model.get_submodule(cover)
        if any(True for _ in module.named_parameters(recurse=False)):
            raise RuntimeError(f"cannot split {cover or 'the model'}: it holds parameters of its own")
        where = device_map.pop(cover)
        for child, _ in module.named_children():
            device_map[f"{cover}.{child}" if cover else child] = where
    device_map[name] = device


def device_map_for(model, max_memory: int) -> dict[str, Any]:
    """accelerate's own placement under `max_memory` bytes of CPU RAM, with the routers pinned."""
    from accelerate import infer_auto_device_map

    device_map = dict(infer_auto_device_map(model, max_memory={"cpu": int(max_memory)},
                                            no_split_module_classes=NO_SPLIT))
    for name, _ in model.named_modules():
        if name.endswith(ROUTER_SUFFIX) and device_map[_covering(device_map, name)] != "cpu":
            pin(model, device_map, name, "cpu")
    return device_map


def _load_resident(model, device_map: dict[str, Any], folder: Path) -> int:
    """Materialise the weights of every module placed on "cpu" (from the checkpoint in place or the
    folder, as the index says); bytes loaded."""
    from accelerate.utils import OffloadedWeightsLoader, set_module_tensor_to_device

    weights = OffloadedWeightsLoader(save_folder=str(folder))
    loaded = 0
    for key in model.state_dict():
        if device_map[_covering(device_map, key)] == "cpu":
            value = weights[key]
            set_module_tensor_to_device(model, key, "cpu", value=value)
            loaded += value.numel() * value.element_size()
    return loaded


def run_accelerate(args: argparse.Namespace) -> None:
    import torch
    from accelerate import dispatch_model

    from edgemoe.model.checkpoint import Checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = Checkpoint.open(args.checkpoint)
    ids, tokenizer, stop_id, stop_str = prompt_inputs(ckpt, args.question)
    t0 = time.perf_counter()
    model = _meta_model(ckpt, _torch_dtype(args.dtype))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = device_map_for(model, args.max_memory)
    resident = _load_resident(model, device_map, Path(args.offload_dir))
    model = dispatch_model(model, device_map, main_device="cpu", offload_dir=str(args.offload_dir),
                           preload_module_classes=PRELOAD)
    load_s = time.perf_counter() - t0
    gen = timed_generate(model, ckpt, args.image, ids, args.tokens, stop_id, len(tokenizer))
    on_disk = sorted(k for k, v in device_map.items() if v == "disk")
    _emit(tokenizer, stop_str, gen, load_s=load_s, dtype=args.dtype, max_memory_bytes=args.max_memory,
          resident_weight_bytes=resident, offloaded_weight_bytes=total - resident,
          device_map_entries=len(device_map), disk_entries=len(on_disk), first_disk_module=on_disk[0] if on_disk
          else None)


# -- entry point --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgemoe.bench.peer_child")
    sub = parser.add_subparsers(dest="peer", required=True)
    for name in ("torch", "transformers", "accelerate", "accelerate-prepare"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", type=Path, required=True)
        p.add_argument("--dtype", choices=DTYPES, default="bf16")
        if name != "accelerate-prepare":
            p.add_argument("--image", type=Path, required=True)
            p.add_argument("--question", required=True)
            p.add_argument("--tokens", type=int, required=True)
        if name.startswith("accelerate"):
            p.add_argument("--offload-dir", type=Path, required=True)
        if name == "accelerate":
            p.add_argument("--max-memory", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = {"torch": run_torch, "transformers": run_transformers, "accelerate": run_accelerate, "accelerate-prepare": prepare_offload}[args.peer]
    from edgemoe.errors import EdgeMoEError

    try:
        run(args)
    except EdgeMoEError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
