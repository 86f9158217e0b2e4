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
from collections.abc import Callable, Iterable
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


TIKTOKEN_SPECS = {
    "stablelm": TiktokenSpec("arcade100k.tiktoken", "arcade100k", ARCADE100K_SPECIALS, 1),
    "qwen": TiktokenSpec("qwen.tiktoken", "qwen", QWEN_SPECIALS, 0),
}
FAMILIES = ("stablelm", "qwen", "phi", "deepseek_vl2")
# (eos, pad, bos) when the JSON files name none, as the real repos set them. Upstream pads Phi-2
# with unk, which CodeGen sets to <|endoftext|>; Qwen names a bos it never prepends.
DEFAULT_ROLES: dict[str, tuple[str, str | None, str | None]] = {
    "stablelm": (ENDOFTEXT, "<|reg0|>", None),
    "qwen": (ENDOFTEXT, "<|extra_0|>", "<|extra_1|>"),
    "phi": (ENDOFTEXT, ENDOFTEXT, None),
    "deepseek_vl2": ("<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>"),
}
PHI_FILES = ("vocab.json", "merges.txt")
GPT2_BPE_FAMILIES = ("phi",)  # vocab.json + merges.txt (+ added_tokens.json) when there is no tokenizer.json


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
        ids, size = [int(i) for i in ids], len(self)
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (0..{size - 1})")
        return ids


class TiktokenTokenizer(Tokenizer):
    """Arcade100k (StableLM-2) and QWen v1: a tiktoken BPE plus named special tokens."""

    def __init__(self, encoding: tiktoken.Encoding, specials: dict[str, int], eos: int,
                 pad: int | None, bos: int | None):
        super().__init__(specials, eos, pad, bos)
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
        self._len = tok.get_vocab_size(with_added_tokens=True)  # costly per call; never changes

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: a tokenizer.json post-processor must not add a BOS either.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self._len


def load_tokenizer(directory: Path, family: str) -> Tokenizer:
    """The tokenizer stored in a checkpoint `directory` of `family` (one of FAMILIES)."""
    if family not in FAMILIES:
        raise TokenizerError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    roles = Roles(special_token_names(directory), DEFAULT_ROLES[family])
    if (directory / "tokenizer.json").is_file():
        return _load_tokenizer_json(directory / "tokenizer.json", roles)
    if family in TIKTOKEN_SPECS:
        return _load_tiktoken(directory, TIKTOKEN_SPECS[family], roles)
    if family in GPT2_BPE_FAMILIES:
        return _load_phi(directory, roles)
    raise _missing(directory, "tokenizer.json")


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


def _load_tiktoken(directory: Path, spec: TiktokenSpec, roles: Roles) -> Tokenizer:
    path = directory / spec.filename
    if not path.is_file():
        raise _missing(directory, spec.filename)
    ranks = read_tiktoken_ranks(path)
    specials = tiktoken_specials(spec, len(ranks))
    enc = tiktoken.Encoding(spec.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    return TiktokenTokenizer(enc, specials, *roles.resolve(path, specials.get))


# ---- tokenizers-based: tokenizer.json and Phi-2 ------------------------------------------------


def _load_tokenizer_json(path: Path, roles: Roles) -> Tokenizer:
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unparsable files
        raise TokenizerError(f"{path}: cannot be read by tokenizers ({str(exc).splitlines()[0]})") from None
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return HFTokenizer(tok, *roles.resolve(path, tok.token_to_id), specials)


def _load_phi(directory: Path, roles: Roles) -> Tokenizer:
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
    _add_phi_tokens(tok, directory / "added_tokens.json", set(roles.names.values()))
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return HFTokenizer(tok, *roles.resolve(vocab, tok.token_to_id), specials)


def _add_phi_tokens(tok: tokenizers.Tokenizer, path: Path, named: set[str]) -> None:
    """added_tokens.json at the ids it gives, then the named specials (in vocab.json on Phi-2)."""
    added = _read_json(path) if path.is_file() else {}
    for content, want in sorted(added.items(), key=lambda kv: kv[1]):
        # CodeGen's whitespace runs are plain added tokens: split out of the text, BPE in between.
        special = content in named
        add = tok.add_special_tokens if special else tok.add_tokens
        add([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != want:
            raise TokenizerError(f"{path}: {content!r} should have id {want} but lands at "
                                 f"{tok.token_to_id(content)}; ids must follow vocab.json without gaps")
    for name in sorted(named):
        if tok.token_to_id(name) is not None and name not in added:
            tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])


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


@dataclass(frozen=True)
class Roles:
    """Which tokens are eos, pad and bos: the JSON files' names, else the family's defaults."""

    names: dict[str, str]  # from special_token_names()
    defaults: tuple[str, str | None, str | None]  # (eos, pad, bos)

    def resolve(self, source: Path, lookup: Callable[[str], int | None]) -> tuple[int, int | None, int | None]:
        eos, pad, bos = (self._find(source, lookup, role, default)
                         for role, default in zip(("eos_token", "pad_token", "bos_token"), self.defaults))
        if eos is None:
            raise TokenizerError(f"{source}: eos_token {self.defaults[0]!r} is not a token of this vocabulary")
        return eos, pad, bos

    def _find(self, source: Path, lookup, role: str, default: str | None) -> int | None:
        name = self.names.get(role, default)
        token_id = None if name is None else lookup(name)
        if token_id is None and role in self.names:  # a default may be absent; a named token may not
            raise TokenizerError(f"{source}: {role} {name!r} is not a token of this vocabulary")
        return token_id
