"""Tokenizers of the three MoE-LLaVA families, read from a checkpoint directory without transformers.

Contract: `load_tokenizer(directory, family)` returns a `Tokenizer` whose ids equal upstream's for any
text (remote-code Arcade100k for StableLM, remote-code QWen for Qwen v1, slow CodeGen BPE for Phi-2):
- `encode` never prepends BOS (none of upstream's three does); special tokens written in the text are
  recognised, as upstream's `allowed_special="all"`; the tiktoken families NFC-normalise first.
- `decode` keeps every token unless `skip_special=True`; invalid UTF-8 becomes U+FFFD ("replace").
- `len(tokenizer)` is HF's len(): base vocabulary plus special/added tokens. Upstream resizes the
  embeddings to it, so the runtime masks logits at and beyond it.
A `tokenizer.json` wins when present; otherwise the family's own files are read. Every bad input
(unknown family, no tokenizer files, a malformed rank line, a bad id) is a one-line TokenizerError.
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from edgemoe.errors import TokenizerError

# Shared by Arcade100k and QWen (cl100k's pattern, but digits are split one by one).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"

_STARCODER = ("<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
              "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
              "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>")
ARCADE100K_SPECIALS: tuple[str, ...] = (
    (ENDOFTEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
    + _STARCODER
    + ("<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>")
    + tuple(f"<|reg{i}|>" for i in range(8))
    + ("<|extra0|>",)
)
QWEN_SPECIALS: tuple[str, ...] = (ENDOFTEXT, "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)


@dataclass(frozen=True)
class TiktokenSpec:
    """How one tiktoken family lays out its file and special tokens."""

    filename: str
    name: str
    specials: tuple[str, ...]
    gap: int  # ids left unused between the last rank and the first special (Arcade100k: 100256)
    eos: str  # defaults, used when the JSON files name no such token
    pad: str | None
    bos: str | None


TIKTOKEN_SPECS = {
    "stablelm": TiktokenSpec("arcade100k.tiktoken", "arcade100k", ARCADE100K_SPECIALS, 1,
                             ENDOFTEXT, "<|reg0|>", None),
    "qwen": TiktokenSpec("qwen.tiktoken", "qwen", QWEN_SPECIALS, 0,
                         ENDOFTEXT, "<|extra_0|>", "<|extra_1|>"),
}
FAMILIES = ("stablelm", "qwen", "phi")
PHI_FILES = ("vocab.json", "merges.txt")


class Tokenizer(ABC):
    """Text <-> ids for one checkpoint; ids and len() as upstream's HF tokenizer reports them."""

    def __init__(self, special_tokens: dict[str, int], eos: int, pad: int | None, bos: int | None):
        self.special_tokens = dict(special_tokens)
        self.eos_token_id = eos
        self.pad_token_id = pad
        self.bos_token_id = bos

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`: no BOS, special tokens in the text recognised."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens kept unless `skip_special`."""

    @abstractmethod
    def __len__(self) -> int:
        """HF's len(tokenizer): every id the model may be asked to embed or predict is below it."""

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (0..{len(self) - 1})")
        return ids


class TiktokenTokenizer(Tokenizer):
    """Arcade100k (StableLM-2) and QWen v1: a tiktoken BPE plus named special tokens."""

    def __init__(self, encoding: tiktoken.Encoding, eos: int, pad: int | None, bos: int | None):
        super().__init__(encoding._special_tokens, eos, pad, bos)
        self._enc = encoding

    def encode(self, text: str) -> list[int]:
        # Upstream normalises to NFC before tiktoken and allows every special token in the text.
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = self._check_ids(ids)
        if skip_special:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        try:
            return self._enc.decode(ids, errors="replace")
        except KeyError as exc:  # the unused id between ranks and specials (Arcade100k: 100256)
            raise TokenizerError(f"token id {exc.args[0]} has no text in {self._enc.name}") from None

    def __len__(self) -> int:
        return self._enc.n_vocab


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer: tokenizer.json, or Phi-2's GPT-2 style vocab.json + merges.txt."""

    def __init__(self, tok: tokenizers.Tokenizer, eos: int, pad: int | None, bos: int | None,
                 special_tokens: dict[str, int]):
        super().__init__(special_tokens, eos, pad, bos)
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: a tokenizer.json post-processor must not add a BOS either.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(directory: Path, family: str) -> Tokenizer:
    """The tokenizer stored in a checkpoint `directory` of `family` ("stablelm" | "qwen" | "phi")."""
    if family not in FAMILIES:
        raise TokenizerError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    names = special_token_names(directory)
    if (directory / "tokenizer.json").is_file():
        return _load_tokenizer_json(directory / "tokenizer.json", names)
    if family == "phi":
        return _load_phi(directory, names)
    return _load_tiktoken(directory, TIKTOKEN_SPECS[family], names)


def _missing(directory: Path, wanted: str) -> TokenizerError:
    return TokenizerError(f"no tokenizer in {directory}: looked for tokenizer.json, {wanted}")


# ---- tiktoken families -------------------------------------------------------------------------


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` per line -> {token bytes: rank}; ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue  # upstream's reader skips blank lines too
        token, rank = _parse_rank_line(path, lineno, line)
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    _check_ranks(path, ranks)
    return ranks


def _parse_rank_line(path: Path, lineno: int, line: bytes) -> tuple[bytes, int]:
    parts = line.split()
    try:
        if len(parts) != 2:
            raise ValueError
        return base64.b64decode(parts[0], validate=True), int(parts[1])
    except (ValueError, binascii.Error):
        shown = line[:60].decode("utf-8", "replace")
        raise TokenizerError(f"{path}:{lineno}: malformed tiktoken line {shown!r}; "
                             "expected 'base64-token rank'") from None


def _check_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    # Specials are placed after the last rank, so a gap or a repeat would collide with them.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single-byte tokens are missing (e.g. {missing[0]})")


def tiktoken_specials(spec: TiktokenSpec, num_ranks: int) -> dict[str, int]:
    """Special ids follow the ranks: Arcade100k leaves one id unused, QWen none.

    Upstream hard-codes the first id (100257, 151643); counting from the file gives the same ids on
    the real files and lets a small generated vocabulary keep the same layout.
    """
    start = num_ranks + spec.gap
    return {name: start + i for i, name in enumerate(spec.specials)}


def _load_tiktoken(directory: Path, spec: TiktokenSpec, names: dict[str, str]) -> Tokenizer:
    path = directory / spec.filename
    if not path.is_file():
        raise _missing(directory, spec.filename)
    ranks = read_tiktoken_ranks(path)
    specials = tiktoken_specials(spec, len(ranks))
    enc = tiktoken.Encoding(spec.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    lookup = specials.get
    eos, pad, bos = _resolve_roles(path, names, lookup, spec.eos, spec.pad, spec.bos)
    return TiktokenTokenizer(enc, eos, pad, bos)


# ---- tokenizers-based: tokenizer.json and Phi-2 ------------------------------------------------


def _load_tokenizer_json(path: Path, names: dict[str, str]) -> Tokenizer:
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unparsable files
        raise TokenizerError(f"{path}: cannot be read by tokenizers ({str(exc).splitlines()[0]})") from None
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    eos, pad, bos = _resolve_roles(path, names, tok.token_to_id, ENDOFTEXT, None, None)
    return HFTokenizer(tok, eos, pad, bos, specials)


def _load_phi(directory: Path, names: dict[str, str]) -> Tokenizer:
    """CodeGen's GPT-2 byte-level BPE (what upstream's slow tokenizer does) on `tokenizers`."""
    vocab, merges = (directory / f for f in PHI_FILES)
    if not (vocab.is_file() and merges.is_file()):
        raise _missing(directory, " + ".join(PHI_FILES))
    try:
        tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:
        raise TokenizerError(f"{directory}: bad vocab.json/merges.txt ({str(exc).splitlines()[0]})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _add_phi_tokens(tok, directory / "added_tokens.json", names)
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    eos, pad, bos = _resolve_roles(vocab, names, tok.token_to_id, ENDOFTEXT, None, None)
    # Upstream pads Phi with unk, which CodeGen sets to <|endoftext|>: pad = eos unless named.
    return HFTokenizer(tok, eos, eos if pad is None else pad, bos, specials)


def _add_phi_tokens(tok: tokenizers.Tokenizer, path: Path, names: dict[str, str]) -> None:
    """Named specials (in vocab.json already) and added_tokens.json, each at the id the file gives."""
    for name in dict.fromkeys(names.values()):
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    added = _read_json(path) if path.is_file() else {}
    for content, want in sorted(added.items(), key=lambda kv: kv[1]):
        if tok.token_to_id(content) is None:
            # Non-special, like CodeGen's whitespace runs: split out of the text, then BPE between.
            tok.add_tokens([AddedToken(content, normalized=False)])
        if tok.token_to_id(content) != want:
            raise TokenizerError(f"{path}: {content!r} should have id {want} but lands at "
                                 f"{tok.token_to_id(content)}; ids must follow vocab.json without gaps")


# ---- special token names from special_tokens_map.json / tokenizer_config.json ------------------

_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_token_names(directory: Path) -> dict[str, str]:
    """{"eos_token": "<|endoftext|>", ...} as the JSON files name them; the map wins over the config."""
    names: dict[str, str] = {}
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(directory) / filename
        if not path.is_file():
            continue
        raw = _read_json(path)
        for role in _ROLES:
            value = raw.get(role)
            if isinstance(value, dict):  # AddedToken serialised as {"content": ..., "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
    return names


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return raw


def _resolve_roles(source: Path, names: dict[str, str], lookup, eos: str, pad: str | None,
                   bos: str | None) -> tuple[int, int | None, int | None]:
    """Ids of eos, pad and bos: the JSON files' names, else the family defaults given."""

    def find(role: str, default: str | None) -> int | None:
        name = names.get(role, default)
        if name is None:
            return None
        token_id = lookup(name)
        if token_id is None:
            raise TokenizerError(f"{source}: {role} {name!r} is not a token of this vocabulary")
        return token_id

    return find("eos_token", eos), find("pad_token", pad), find("bos_token", bos)
