"""A random-weight text MoE of MoE-LLaVA-StableLM's language-model shape that stock llama.cpp runs.

    python bench/mixtral_peer_checkpoint.py STABLELM_CHECKPOINT OUT_DIR

Contract: writes OUT_DIR as a Hugging Face `MixtralForCausalLM` checkpoint (bf16 safetensors, config.json,
and STABLELM_CHECKPOINT's tokenizer files) with the StableLM-2-1.6B-4e language model's dimensions read
from its edgemoe config: hidden 2048, 24 layers, 32 heads, MLP width 5632, 4 experts top-2, vocabulary
100352. llama.cpp has no every-other-layer MoE that converts and runs unmodified (jamba's layout aborts
in stock llama.cpp, see shared/reference/llamacpp-peer.md), so every layer is MoE here: a decoded token
reads the 12 dense layers' MLPs twice over (two experts of the same width), 1.21x the bytes of the
MoE-LLaVA model. Say so next to any figure from it. Tensors are written one at a time (RSS stays small)
with N(0, 0.02) weights and unit norms; routing on such weights is whatever they produce. The tokenizer
is a synthetic byte-level BPE of the same vocabulary size (StableLM-2's own is a tiktoken file that
llama.cpp's converter cannot read); a speed peer needs ids, not words.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgemoe.families.deepseek_vl2_files import write_tokenizer
from edgemoe.model.config import load_config
from edgemoe.model.safetensors_io import ShardedWriter, f32_to_bf16


def plan(h: int, layers: int, f: int, experts: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out.append((p + "block_sparse_moe.gate.weight", (experts, h)))
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (f, h)), (q + "w2.weight", (h, f)), (q + "w3.weight", (f, h))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stablelm_checkpoint", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args()
    cfg, _ = load_config(a.stablelm_checkpoint)
    experts = cfg.moe.num_experts[0]
    tensors = plan(cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, experts, cfg.vocab_size)
    a.out.mkdir(parents=True, exist_ok=False)
    writer = ShardedWriter(a.out, [(n, s, "BF16") for n, s in tensors], metadata={"format": "pt"})
    rng = np.random.default_rng(0)
    try:
        for name, shape in tensors:
            x = np.ones(shape, np.float32) if len(shape) == 1 else \
                rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            writer.add(name, f32_to_bf16(x))
        writer.close()
    finally:
        writer.abort()
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
              "num_local_experts": experts, "num_experts_per_tok": cfg.moe.top_k, "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": 1e-5,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 100000, "eos_token_id": 100001}  # the synthetic tokenizer's (DeepSeek-V2's ids)
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(a.out, "small", cfg.vocab_size)
    print(f"wrote {a.out}: {sum(np.prod(s) for _, s in tensors) / 1e9:.2f}B parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
