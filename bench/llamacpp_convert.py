"""Convert an edgemoe checkpoint's language model to GGUF with llama.cpp's own converter (the peer's input).

    python bench/llamacpp_convert.py CHECKPOINT OUT.gguf --llama-root ~/.cache/edgemoe/llama.cpp-0.3.36 \
        [--outtype q8_0] [--hf]

Contract: writes OUT.gguf (atomically: OUT.gguf.partial, then renamed) from the checkpoint's text model
as its family describes it (`families.<family>.llamacpp_text_model`): a Hugging Face config.json for the
architecture llama.cpp knows (DeepSeek-VL2-Small's language model is DeepSeek-V2: `deepseek2`), next
to symlinks of the checkpoint's own shards. Nothing is copied: llama.cpp's converter reads the shards
in place, with two adaptations applied to it at import time (not to its files):
  - tensor names lose the family's prefix (`language.model.layers...` -> `model.layers...`); the
    converter already drops vision and projector tensors itself;
  - the pre-tokenizer is named (`deepseek-llm`) instead of recognised by hashing the tokenizer's output,
    and the sentencepiece path is skipped: generated checkpoints carry a synthetic BPE tokenizer.json
    that no hash list knows, and a speed peer needs none.
`--hf`: CHECKPOINT is already a Hugging Face text model (bench/mixtral_peer_checkpoint.py writes one) and
is converted as it is, with only the pre-tokenizer named.
Then `llama-quantize` turns it into the bench's precision (bench/llamacpp_peer.py does that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edgemoe.families import family_module
from edgemoe.model.config import load_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def text_model_dir(checkpoint: Path, work: Path) -> tuple[Path, str]:
    """(a directory llama.cpp's converter reads as a text LM: config.json plus links to the shards, the
    prefix its tensor names carry)."""
    cfg, _ = load_config(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    hf_config, prefix = family_module(cfg.family).llamacpp_text_model(raw)
    out = work / "text-model"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    for f in checkpoint.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json") or f.name in TOKENIZER_FILES:
            os.symlink(f.resolve(), out / f.name)
    return out, prefix


def _patch_converter(llama_dir: Path, prefix: str) -> None:
    sys.path.insert(0, str(llama_dir))
    sys.path.insert(1, str(llama_dir / "gguf-py"))
    from conversion import base  # noqa: PLC0415 - llama.cpp's converter package, found above

    original = base.ModelBase.filter_tensors.__func__

    def filter_tensors(cls, item):
        name, gen = item
        return original(cls, (name[len(prefix):] if prefix and name.startswith(prefix) else name, gen))

    base.ModelBase.filter_tensors = classmethod(filter_tensors)

    def no_sentencepiece(self):  # generated checkpoints carry a BPE tokenizer.json, never a tokenizer.model:
        raise FileNotFoundError("no sentencepiece tokenizer.model")  # go on to the BPE paths

    base.TextModel._set_vocab_sentencepiece = no_sentencepiece
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-llm"


def convert(checkpoint: Path, out: Path, llama_root: Path, outtype: str, hf: bool = False) -> None:
    llama_dir = llama_root / "src" / "vendor" / "llama.cpp"
    with tempfile.TemporaryDirectory(prefix="edgemoe-gguf-", dir=out.parent) as tmp:
        model_dir, prefix = (checkpoint, "") if hf else text_model_dir(checkpoint, Path(tmp))
        _patch_converter(llama_dir, prefix)
        import convert_hf_to_gguf  # noqa: PLC0415

        partial = out.with_name(out.name + ".partial")
        sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(partial), "--outtype", outtype]
        convert_hf_to_gguf.main()
        shutil.move(partial, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--llama-root", type=Path, required=True)
    p.add_argument("--outtype", default="q8_0")
    p.add_argument("--hf", action="store_true", help="CHECKPOINT is a Hugging Face text model already.")
    a = p.parse_args()
    convert(a.checkpoint, a.out, a.llama_root, a.outtype, a.hf)


if __name__ == "__main__":
    main()
