"""The non-weight files of a DeepSeek-VL2 checkpoint, as the published repos have them (for create-checkpoint).

Contract: `write_checkpoint_files(directory, variant, size)` writes config.json (the reconstructions of
../shared/reference/deepseek-vl2-format.md §1.2, serialised as transformers does: sorted keys,
indent 2), processor_config.json (the published text), and a tokenizer: `tokenizer.json` (a byte-level
BPE trained on a fixed corpus, padded with filler tokens to the real vocabulary size, with every
special token at its real id), tokenizer_config.json and special_tokens_map.json. It returns the
config dict and a `TokenizerInfo`. `variant` is "tiny" (Tiny's MHA language model) or "small" (MLA);
`size` "full" keeps the published dimensions, "tiny" shrinks them for tests while keeping every
key, the vocabulary and the special ids. Weight files are written by `edgemoe.model.create`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models

from edgemoe.families.deepseek_vl2 import CANDIDATE_TILES, IMAGE_TOKEN
from edgemoe.model.tokenizer import load_tokenizer
from edgemoe.model.tokenizer_files import TokenizerInfo, _pre_tokenizer, _to_unicode, ranks_from_merges, train_merges

VARIANTS = ("tiny", "small")
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
GROUNDING = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
ROLES = ("<|User|>", "<|Assistant|>")
# Special ids: Tiny uses DeepSeek-V3's vocabulary (bos/eos/pad 0/1/2, <image> 128815), Small DeepSeek-V2's
# (100000..). The ids after <|grounding|> follow the processor's add order (reference §1.4, derived).
SPECIAL_IDS = {
    "tiny": {BOS: 0, EOS: 1, PAD: 2, IMAGE_TOKEN: 128815,
             **{t: 128816 + i for i, t in enumerate(GROUNDING + ROLES)}},
    "small": {BOS: 100000, EOS: 100001, PAD: 100002, IMAGE_TOKEN: 100003,
              **{t: 100004 + i for i, t in enumerate(GROUNDING + ROLES)}},
}
ARCH = {"architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                     "AutoModel": "modeling_deepseek.DeepseekV2Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}}
FULL_LANGUAGE = {
    "tiny": {**ARCH, "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 1280,
             "intermediate_size": 6848, "kv_lora_rank": None, "lm_head": True, "max_position_embeddings": 4096,
             "model_type": "deepseek_v2", "moe_intermediate_size": 896, "n_group": 1, "n_routed_experts": 64,
             "n_shared_experts": 2, "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12,
             "num_key_value_heads": 10, "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0,
             "rm_head": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
             "use_mla": False, "v_head_dim": 0, "vocab_size": 129280},
    "small": {**ARCH, "first_k_dense_replace": 1, "hidden_size": 2048, "intermediate_size": 10944, "lm_head": True,
              "max_position_embeddings": 4096, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
              "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "num_attention_heads": 16,
              "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
              "rm_head": False, "topk_method": "greedy", "torch_dtype": "bfloat16"},
}
# Tiny sizes: three layers (dense, MoE, MoE), 8 experts top-3, head dims divisible by 8 (ORT kernels),
# hidden and expert widths of 128: one int4 block, so ORT's QMoE can run the experts (edgemoe.offload.fused).
TINY_LANGUAGE = {
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "n_routed_experts": 8,
             "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts_per_tok": 3, "num_hidden_layers": 3},
    "small": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "n_routed_experts": 8,
              "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts_per_tok": 3, "num_hidden_layers": 3,
              "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
}
FULL_VISION = {"layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
               "patch_size": 14, "width": 1152}
# 42-pixel tiles = a 3 x 3 patch grid: odd, so the projector's pad-to-even is exercised as at 27 x 27.
TINY_VISION = {"layers": 2, "mlp_ratio": 2.0, "model_name": "siglip_tiny_patch14_42", "model_type": "vision",
               "patch_size": 14, "width": 32, "heads": 4, "image_size": 42}


def config_json(variant: str, size: str) -> dict[str, Any]:
    """config.json of `variant` at `size` (module docstring)."""
    language = dict(FULL_LANGUAGE[variant])
    vision = dict(FULL_VISION)
    if size == "tiny":
        language.update(TINY_LANGUAGE[variant])
        vision = dict(TINY_VISION)
    tile = int(vision.get("image_size", 384))
    projector = {"model_type": "mlp_projector", "n_embed": language["hidden_size"]}
    if size == "tiny":
        projector["input_dim"] = vision["width"]
    return {"candidate_resolutions": [[w * tile, h * tile] for w, h in CANDIDATE_TILES], "global_view_pos": "head",
            "language_config": language, "model_type": "deepseek_vl_v2",
            "projector_config": projector,
            "tile_tag": "2D", "torch_dtype": "bfloat16", "transformers_version": "4.38.2", "vision_config": vision}


def processor_config_json(candidates: list[list[int]]) -> dict[str, Any]:
    return {"add_special_token": False, "candidate_resolutions": candidates, "downsample_ratio": 2,
            "ignore_id": -100, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_token": IMAGE_TOKEN, "mask_prompt": False, "normalize": True, "pad_token": PAD, "patch_size": 14,
            "processor_class": "DeepseekVLV2Processor", "sft_format": "deepseek"}


def dump(obj: dict[str, Any], ascii_only: bool = True) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=ascii_only) + "\n"


def write_checkpoint_files(directory: Path, variant: str, size: str) -> tuple[dict[str, Any], TokenizerInfo]:
    """config.json, processor_config.json and the tokenizer files (module docstring)."""
    raw = config_json(variant, size)
    (directory / "config.json").write_text(dump(raw))
    (directory / "processor_config.json").write_text(dump(processor_config_json(raw["candidate_resolutions"])))
    vocab_size = int(raw["language_config"]["vocab_size"]) if "vocab_size" in raw["language_config"] else 102400
    return raw, write_tokenizer(directory, variant, vocab_size)


# ---- tokenizer -----------------------------------------------------------------------------------


def _vocabulary(variant: str, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]], int]:
    """(token -> id for every id below vocab_size, merges, end of the ordinary ids)."""
    merges = train_merges(1000, "tiktoken")
    ordinary = [_to_unicode(t) for t, _ in sorted(ranks_from_merges(merges).items(), key=lambda kv: kv[1])]
    specials = SPECIAL_IDS[variant]
    taken = set(specials.values())
    free = (i for i in range(vocab_size) if i not in taken)
    vocab = dict(specials)
    end = 0
    for token in ordinary:
        end = next(free)
        vocab[token] = end
    for i in free:  # filler: never produced by a merge, decodes to its own text
        vocab[f"<filler_{i}>"] = i
    return vocab, [(_to_unicode(a), _to_unicode(b)) for a, b in merges], end + 1


def _tokenizer_json(variant: str, vocab_size: int) -> tuple[str, int]:
    vocab, merges, end = _vocabulary(variant, vocab_size)
    # Merges as "a b" strings: readable by old tokenizers (0.15) as well as new ones.
    model = models.BPE(vocab=vocab, merges=merges)
    tok = Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer("tiktoken")
    tok.decoder = decoders.ByteLevel()
    raw = json.loads(tok.to_str())
    raw["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    raw["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True}
                           for t, i in sorted(SPECIAL_IDS[variant].items(), key=lambda kv: kv[1])]
    return json.dumps(raw, ensure_ascii=False), end


def _added(content: str, normalized: bool = False) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_tokenizer(directory: Path, variant: str, vocab_size: int) -> TokenizerInfo:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json; the ids the generator needs."""
    text, end = _tokenizer_json(variant, vocab_size)
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    normalized = variant == "small"  # Small's bos/eos are `normalized: true` (its map is 2 B shorter)
    specials = {"additional_special_tokens": [_added(t) for t in ROLES], "bos_token": _added(BOS, normalized),
                "eos_token": _added(EOS, normalized), "pad_token": _added(PAD)}
    (directory / "special_tokens_map.json").write_text(dump(specials, ascii_only=False), encoding="utf-8")
    decoder = {str(i): {**_added(t, normalized and t in (BOS, EOS)), "special": True}
               for t, i in sorted(SPECIAL_IDS[variant].items(), key=lambda kv: kv[1])}
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": BOS,
              "clean_up_tokenization_spaces": False, "eos_token": EOS, "legacy": True, "model_max_length": 16384,
              "pad_token": PAD, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast", "unk_token": None,
              "use_default_system_prompt": False}
    (directory / "tokenizer_config.json").write_text(dump(config, ascii_only=False), encoding="utf-8")
    tok = load_tokenizer(directory, "deepseek_vl2")
    return TokenizerInfo("deepseek_vl2", len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, end)
