"""Small tokenizers in the exact on-disk formats of the three MoE-LLaVA families (for tiny checkpoints).

Contract: `write_tokenizer_files(family, out_dir, vocab_size)` writes what the real checkpoint repos
ship (StableLM: arcade100k.tiktoken; Qwen: qwen.tiktoken; Phi-2: vocab.json + merges.txt +
added_tokens.json; each with tokenizer_config.json and special_tokens_map.json) and returns the ids
the checkpoint generator needs. The vocabulary is a byte-level BPE trained by `tokenizers` on the fixed
corpus below (about 1,200 tokens at most), so the output is identical on every run. Ranks 0..255 are the single bytes in GPT-2's
order (as in the real files); each later rank is one merge, in merge order, and only merges that
tiktoken's rank-driven BPE reproduces are kept, so the rank file and merges.txt encode alike.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from edgemoe.errors import TokenizerError
from edgemoe.model.tokenizer import DEFAULT_ROLES, ENDOFTEXT, FAMILIES, PAT_STR, TIKTOKEN_SPECS, load_tokenizer

CORPUS = """\
What is in the image? The picture shows a small grey cat sitting on a wooden table next to a bowl of
red apples. Describe the colour of the cat: it is grey with white paws and green eyes. Is there a dog
in the picture? No, there is no dog, but a brown dog is sleeping in the other image on the left.
Please describe this image in detail. The photo was taken outside on a sunny afternoon. A man in a
blue jacket is riding a bicycle along the river, and two children are playing with a red ball near
the trees. The sky is clear, the water is calm, and the light is warm and golden.
Question: How many people are there in the picture? Answer: There are three people. Question: What
colour is the bus? Answer: The bus is yellow. Question: Is the man wearing a hat? Answer: Yes, he is
wearing a black hat. What time of day is it? It looks like early morning, because the shadows are long.
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: what is the animal doing? ASSISTANT: The
animal is eating. USER: Where is the kitchen? ASSISTANT: The kitchen is behind the door on the right.
The weather in the mountains changes quickly; it can be cold, wet and windy at 3 o'clock and bright by 4.
We counted 12 birds, 7 boats and 1024 stones. She said: "I'll describe what I see, and you'll tell me
if I'm right." They're sure it isn't the same street we've seen before. Colour and color mean the same.
Une café au lait, s'il vous plaît. Über den Wolken ist die Freiheit grenzenlos. Naïve façade, déjà vu.
日本の猫はとてもかわいいです。 这是一只狗。 Ελληνικά γράμματα. Emoji: 🐱 🐶 📷 ✨ — done.
def describe(image):
    # return a caption for the picture
    if image is None:
        return "no image"
    return f"an image of size {image.width}x{image.height}"
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. Sphinx of black
quartz, judge my vow. A large elephant stands in the field while a flock of birds flies over the hills.
The kitten is playing with a ball of yarn on the sofa, and the puppy is chewing a shoe under the chair.
Look at the picture and describe what you see: people, animals, objects, colours, text and actions.
On the kitchen counter there are bottles, glasses, a cutting board with sliced vegetables, a knife and
a loaf of bread. Through the window we can see a garden with flowers, a fence, a swing and a tall tree.
The street is crowded: cars wait at the traffic light, pedestrians cross carefully, a cyclist rings a
bell, and a delivery van is parked beside a bakery whose sign reads "Fresh Bread Daily".
Scientists measured temperature, humidity and pressure every hour; the results were summarised in a
table, plotted on charts and discussed during a meeting with engineers, doctors, teachers and students.
Why would someone paint the wall purple? Perhaps because purple was their favourite colour, or maybe
they wanted the room to feel calmer. Which object is closest to the camera? The umbrella is closest.
An airplane is flying above snowy mountains; below it, a frozen lake reflects the pale winter sunlight.
"""


@dataclass(frozen=True)
class TokenizerInfo:
    """What a checkpoint's config.json needs from its tokenizer."""

    family: str
    len_tokenizer: int  # len(load_tokenizer(...)): embeddings must have at least this many rows
    eos_token_id: int
    pad_token_id: int | None
    bos_token_id: int | None
    base_vocab_size: int  # tiktoken ranks, or vocab.json entries for Phi-2

    @property
    def num_ranks(self) -> int:
        return self.base_vocab_size


# ---- byte-level BPE training ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE files)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    # Key order = GPT-2's: printable bytes first. Real vocabularies rank the 256 bytes in this order.
    return dict(sorted(chars.items(), key=lambda kv: ord(kv[1])))


def _to_bytes(token: str) -> bytes:
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(inverse[c] for c in token)


def _to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    if kind == "gpt2":  # Phi-2 / CodeGen: GPT-2's own regex
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@lru_cache(maxsize=8)
def train_merges(vocab_size: int = 1000, kind: str = "tiktoken") -> tuple[tuple[bytes, bytes], ...]:
    """Merges, in order, of a byte-level BPE trained on CORPUS; all reproducible by tiktoken.

    `kind` picks the pre-tokenizer used in training: "tiktoken" (PAT_STR) or "gpt2" (Phi-2).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(kind)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    raw = json.loads(tok.to_str())["model"]["merges"]
    merges = [(_to_bytes(a), _to_bytes(b)) for a, b in (m.split(" ") if isinstance(m, str) else m for m in raw)]
    return _consistent_merges(merges)


def _consistent_merges(merges: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """Keep the merges whose token tiktoken's rule splits exactly as trained.

    tiktoken joins the adjacent pair whose *join* has the lowest rank; merges.txt applies the
    earliest *pair*. Once every token's own bytes split into its trained pair under the lower ranks,
    each step tiktoken takes is a listed merge of the same rank, so both rules agree on any text.
    """
    ranks = byte_ranks()
    kept = []
    for a, b in merges:
        token = a + b
        if token in ranks or a not in ranks or b not in ranks:
            continue  # a second merge to an existing token, or one built on a dropped token
        if rank_bpe(token, ranks) == [a, b]:
            ranks[token] = len(ranks)
            kept.append((a, b))
    return tuple(kept)


def byte_ranks() -> dict[bytes, int]:
    """Ranks 0..255: the single bytes in GPT-2's order."""
    return {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}


def rank_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's rule: repeatedly join the adjacent pair whose join has the lowest rank."""
    return _bpe(piece, lambda x, y: ranks.get(x + y))


def merge_bpe(piece: bytes, merge_rank: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """merges.txt's rule: repeatedly apply the earliest listed merge among adjacent pairs."""
    return _bpe(piece, lambda x, y: merge_rank.get((x, y)))


def _bpe(piece: bytes, rank_of) -> list[bytes]:
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        scored = [(rank_of(x, y), i) for i, (x, y) in enumerate(zip(parts, parts[1:]))]
        scored = [(r, i) for r, i in scored if r is not None]
        if not scored:
            break
        _, i = min(scored)  # lowest rank, leftmost on ties
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def ranks_from_merges(merges: tuple[tuple[bytes, bytes], ...]) -> dict[bytes, int]:
    ranks = byte_ranks()
    for a, b in merges:
        ranks[a + b] = len(ranks)
    return ranks


# ---- writers ---------------------------------------------------------------------------------------


def write_tokenizer_files(family: str, out_dir: Path, vocab_size: int = 1000) -> TokenizerInfo:
    """Write a small `family` tokenizer into `out_dir`; `vocab_size` ~ the trained base vocabulary."""
    if family not in FAMILIES:
        raise TokenizerError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    if vocab_size < 257:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: 256 byte tokens come first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _write_phi if family == "phi" else _write_tiktoken_family
    base = writer(family, out_dir, vocab_size)
    tok = load_tokenizer(out_dir, family)
    return TokenizerInfo(family, len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, base)


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_text("".join(lines), encoding="ascii")


def _write_json(path: Path, obj: dict) -> None:
    # HF's save_pretrained layout: sorted keys, indent 2, UTF-8, trailing newline.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tiktoken_family(family: str, out_dir: Path, vocab_size: int) -> int:
    spec = TIKTOKEN_SPECS[family]
    ranks = ranks_from_merges(train_merges(vocab_size, "tiktoken"))
    write_tiktoken_file(out_dir / spec.filename, ranks)
    eos, pad, bos = DEFAULT_ROLES[family]
    roles = {"eos_token": eos, "pad_token": pad, "unk_token": pad} | ({"bos_token": bos} if bos else {})
    _write_json(out_dir / "special_tokens_map.json", roles)
    _write_json(out_dir / "tokenizer_config.json", _tiktoken_config(family, roles))
    return len(ranks)


def _tiktoken_config(family: str, roles: dict[str, str]) -> dict:
    """tokenizer_config.json in the shape of the real repos (the class upstream loads it with)."""
    cls = {"stablelm": "tokenization_arcade100k.Arcade100kTokenizer",
           "qwen": "tokenization_qwen.QWenTokenizer"}[family]
    config = {"added_tokens_decoder": {}, "auto_map": {"AutoTokenizer": [cls, None]},
              "clean_up_tokenization_spaces": True, "model_max_length": 2048,
              "padding_side": "right", "tokenizer_class": cls.rsplit(".", 1)[1], **roles}
    if family == "stablelm":
        config["errors"] = "replace"
    return config


# CodeGen's added tokens (Phi-2 keeps them): whitespace runs, longest first, right after vocab.json.
PHI_ADDED = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))


def _write_phi(family: str, out_dir: Path, vocab_size: int) -> int:
    merges = train_merges(vocab_size, "gpt2")
    vocab = {_to_unicode(t): r for t, r in ranks_from_merges(merges).items()}
    vocab[ENDOFTEXT] = len(vocab)  # as in GPT-2: the last entry of vocab.json (50256 on Phi-2)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{_to_unicode(a)} {_to_unicode(b)}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    added = {text: len(vocab) + i for i, text in enumerate(PHI_ADDED)}
    _write_json(out_dir / "added_tokens.json", added)
    roles = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    # Phi-2's map stores AddedToken objects, the pad that training set as a plain string.
    token = _added_token(ENDOFTEXT, special=None)
    _write_json(out_dir / "special_tokens_map.json", {k: token for k in roles} | {"pad_token": ENDOFTEXT})
    _write_json(out_dir / "tokenizer_config.json", _phi_config(vocab[ENDOFTEXT], added, roles))
    return len(vocab)


def _added_token(content: str, special: bool | None) -> dict:
    """An AddedToken as HF serialises it (`special` only inside added_tokens_decoder)."""
    entry = {"content": content, "lstrip": False, "normalized": not special, "rstrip": False, "single_word": False}
    return entry if special is None else entry | {"special": special}


def _phi_config(eos_id: int, added: dict[str, int], roles: dict[str, str]) -> dict:
    decoder = {str(eos_id): _added_token(ENDOFTEXT, True)} | {str(i): _added_token(t, False) for t, i in added.items()}
    return {"add_prefix_space": False, "added_tokens_decoder": decoder, "clean_up_tokenization_spaces": True,
            "model_max_length": 2048, "return_token_type_ids": False, "tokenizer_class": "CodeGenTokenizer",
            **roles}
