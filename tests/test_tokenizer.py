"""Tokenizers: generated files load back, ids match the real layouts, and independent implementations
(transformers' tiktoken converter, a merges-only BPE, slow CodeGen) give the same ids."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import time
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from edgemoe.errors import TokenizerError
from edgemoe.model.tokenizer import PAT_STR, load_tokenizer, read_tiktoken_ranks
from edgemoe.model.tokenizer_files import (
    CORPUS, _consistent_merges, _to_unicode, byte_ranks, bytes_to_unicode, merge_bpe, rank_bpe,
    ranks_from_merges, train_merges, write_tiktoken_file, write_tokenizer_files,
)

FAMILIES = ("stablelm", "qwen", "phi")
RANK_FILE = {"stablelm": "arcade100k.tiktoken", "qwen": "qwen.tiktoken"}
TEXTS = [
    "What is in the image?",
    "Describe the picture in detail.\nThe cat is grey; the dog isn't.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore tabs\n\n\nblank lines\r\nwindows",
    "numbers 1234567890 and 3.14159, 1,000,000",
    "café naïve façade déjà vu Über",
    "日本の猫はとてもかわいいです。这是一只狗。",
    "emoji 🐱🐶📷✨ and symbols ©®™ ∑∫√",
    "def f(x):\n    return x ** 2  # square\n",
    "I'LL say you're right, they'd've known, we'VE SEEN it",
    "",
    "x",
    "<|endoftext|>",
    "USER: <image>\nWhat colour is it? ASSISTANT: Red.<|endoftext|>USER: Why? ASSISTANT:",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in FAMILIES:
        out[family] = tmp_path_factory.mktemp(family)
        write_tokenizer_files(family, out[family])
    return out


def _fuzz_texts(n: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = sorted(set(CORPUS)) + [" ", " ", "\n", "'", "é", "🐱", "0"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


# ---- generated files ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_files_load_back(dirs, family):
    files = {p.name for p in dirs[family].iterdir()}
    extra = {"phi": {"vocab.json", "merges.txt", "added_tokens.json"}}.get(family, {RANK_FILE.get(family)})
    assert files == {"tokenizer_config.json", "special_tokens_map.json"} | extra
    info = write_tokenizer_files(family, dirs[family])
    tok = load_tokenizer(dirs[family], family)
    assert (info.len_tokenizer, info.eos_token_id, info.pad_token_id, info.bos_token_id) == (
        len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert info.num_ranks == info.base_vocab_size == 1000 + (family == "phi")
    specials = {"stablelm": 1 + 32, "qwen": 208, "phi": 38}[family]  # Arcade100k leaves one id unused
    assert len(tok) == info.base_vocab_size + specials


def test_generation_is_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    for family in FAMILIES:
        write_tokenizer_files(family, tmp_path / "a" / family, vocab_size=600)
    assert time.perf_counter() - start < 2.0
    for family in FAMILIES:
        write_tokenizer_files(family, tmp_path / "b" / family, vocab_size=600)
        for path in (tmp_path / "a" / family).iterdir():
            assert path.read_bytes() == (tmp_path / "b" / family / path.name).read_bytes(), path.name
    assert len(read_tiktoken_ranks(tmp_path / "a" / "qwen" / "qwen.tiktoken")) == 600


def test_rank_file_layout(dirs):
    ranks = read_tiktoken_ranks(dirs["stablelm"] / "arcade100k.tiktoken")
    by_rank = sorted(ranks, key=ranks.get)
    assert by_rank[:256] == list(byte_ranks())  # single bytes first, GPT-2 order
    assert by_rank[0] == b"!" and by_rank[255] == bytes([173])
    assert by_rank[256:] == [a + b for a, b in train_merges(1000, "tiktoken")]


def test_filter_drops_merges_tiktoken_cannot_rebuild():
    merges = [(b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c"), (b"abc", b"d")]
    # tiktoken joins "ab" (lower rank) before "bc", so "abc" cannot come from (a, bc); (ab, c) builds it.
    assert _consistent_merges(merges) == ((b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"abc", b"d"))


def _random_merges(rng: random.Random) -> list[tuple[bytes, bytes]]:
    tokens, merges = [b"a", b"b", b"c", b"d"], []
    for _ in range(rng.randint(3, 12)):
        a, b = rng.choice(tokens), rng.choice(tokens)
        if a + b not in tokens:
            merges.append((a, b))
            tokens.append(a + b)
    return merges


def test_rank_rule_equals_merge_rule_after_filtering():
    rng = random.Random(0)
    disagree_unfiltered = 0
    for _ in range(300):
        raw = _random_merges(rng)
        words = [bytes(rng.choice(b"abcd") for _ in range(rng.randint(1, 12))) for _ in range(20)]
        for merges in (raw, _consistent_merges(raw)):
            ranks, merge_rank = ranks_from_merges(tuple(merges)), {m: i for i, m in enumerate(merges)}
            same = all(rank_bpe(w, ranks) == merge_bpe(w, merge_rank) for w in words)
            if merges is raw:
                disagree_unfiltered += not same
            else:
                assert same, merges
    assert disagree_unfiltered > 0  # the filter is what makes them agree


def test_special_tokens_map_matches_real_sizes(dirs):
    # The real repos' files are 89 B (StableLM) and 125 B (Qwen): same names, same JSON layout.
    assert (dirs["stablelm"] / "special_tokens_map.json").stat().st_size == 89
    assert (dirs["qwen"] / "special_tokens_map.json").stat().st_size == 125


def test_phi_files_are_gpt2_style(dirs):
    vocab = json.loads((dirs["phi"] / "vocab.json").read_text(encoding="utf-8"))
    merges = (dirs["phi"] / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert list(vocab)[:256] == list(bytes_to_unicode().values())
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    smap = json.loads((dirs["phi"] / "special_tokens_map.json").read_text())
    assert smap["eos_token"]["content"] == "<|endoftext|>"  # AddedToken form, read by special_token_names
    assert all(vocab["".join(m.split(" "))] == 256 + i for i, m in enumerate(merges[1:]))


# ---- round trips and special ids -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(dirs, family):
    tok = load_tokenizer(dirs[family], family)
    for text in TEXTS + _fuzz_texts():
        ids = tok.encode(text)
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("family", FAMILIES)
def test_specials_in_text_and_skip(dirs, family):
    tok = load_tokenizer(dirs[family], family)
    eos = tok.eos_token_id
    assert tok.special_tokens["<|endoftext|>"] == eos
    ids = tok.encode("Red.<|endoftext|>")
    assert ids[-1] == eos and eos not in ids[:-1]
    assert tok.decode(ids, skip_special=True) == "Red."
    assert tok.decode(tok.encode("<|endoftext|>x<|endoftext|>"), skip_special=True) == "x"


def test_tiktoken_families_normalise_to_nfc(dirs):
    for family in ("stablelm", "qwen"):
        tok = load_tokenizer(dirs[family], family)
        assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_small_special_layouts(dirs):
    st = load_tokenizer(dirs["stablelm"], "stablelm")
    n = 1000
    assert (st.eos_token_id, st.pad_token_id, st.bos_token_id) == (n + 1, n + 24, None)
    assert st.encode("<|im_start|><|im_end|><|extra0|>") == [n + 21, n + 22, n + 32]
    qw = load_tokenizer(dirs["qwen"], "qwen")
    assert (qw.eos_token_id, qw.pad_token_id, qw.bos_token_id) == (n, n + 3, n + 4)
    assert qw.encode("<|extra_1|>") == [n + 4]  # named as bos, yet never prepended
    phi = load_tokenizer(dirs["phi"], "phi")
    assert (phi.eos_token_id, phi.pad_token_id) == (n, n)
    assert phi.encode("a    b") == phi.encode("a") + [n + 1 + 31 - 4] + phi.encode("b")  # 4-space token


def _real_sized_dir(tmp_path: Path, dirs, family: str, num_ranks: int) -> Path:
    """A rank file of the real size: the 256 bytes, then distinct 2- and 3-byte tokens."""
    ranks = byte_ranks()
    for combo in itertools.chain(itertools.product(range(256), repeat=2), itertools.product(range(256), repeat=3)):
        if len(ranks) == num_ranks:
            break
        ranks.setdefault(bytes(combo), len(ranks))
    write_tiktoken_file(tmp_path / RANK_FILE[family], ranks)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(dirs[family] / name, tmp_path / name)
    return tmp_path


def test_arcade100k_real_ids(tmp_path, dirs):
    tok = load_tokenizer(_real_sized_dir(tmp_path, dirs, "stablelm", 100256), "stablelm")
    expected = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_pad|>": 100261, "<gh_stars>": 100262,
                "<reponame>": 100275, "<|endofprompt|>": 100276, "<|im_start|>": 100277, "<|im_end|>": 100278,
                "<|pause|>": 100279, "<|reg0|>": 100280, "<|reg7|>": 100287, "<|extra0|>": 100288}
    assert {k: tok.special_tokens[k] for k in expected} == expected
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, len(tok)) == (100257, 100280, None, 100289)
    assert tok.encode("".join(expected)) == list(expected.values())
    with pytest.raises(TokenizerError, match="100256 has no text"):
        tok.decode([100256])


def test_qwen_real_ids(tmp_path, dirs):
    tok = load_tokenizer(_real_sized_dir(tmp_path, dirs, "qwen", 151643), "qwen")
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, len(tok)) == (151643, 151646, 151647, 151851)
    assert tok.encode("<|im_start|><|im_end|><|extra_204|>") == [151644, 151645, 151850]


# ---- equivalence with independent implementations -------------------------------------------------


def _sentences() -> list[str]:
    lines = [line for line in CORPUS.splitlines() if line]
    return [unicodedata.normalize("NFC", t) for t in TEXTS + lines + [CORPUS] + _fuzz_texts(300, seed=1)]


@pytest.mark.parametrize("family", ["stablelm", "qwen"])
def test_tiktoken_matches_transformers_converter(dirs, family):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = load_tokenizer(dirs[family], family)
    specials = sorted(tok.special_tokens, key=tok.special_tokens.get)
    conv = TikTokenConverter(str(dirs[family] / RANK_FILE[family]), pattern=PAT_STR,
                             additional_special_tokens=specials).converted()
    # The converter packs specials right after the ranks; Arcade100k leaves one id unused there.
    gap = 1 if family == "stablelm" else 0
    assert {s: conv.token_to_id(s) + gap for s in specials} == tok.special_tokens
    for text in _sentences():
        theirs = [i + gap if i >= 1000 else i for i in conv.encode(text, add_special_tokens=False).ids]
        assert theirs == tok.encode(text), text


def test_tiktoken_matches_merges_only_bpe(dirs):
    merges = train_merges(1000, "tiktoken")
    vocab = {_to_unicode(t): i for t, i in read_tiktoken_ranks(dirs["qwen"] / "qwen.tiktoken").items()}
    bpe = Tokenizer(models.BPE(vocab, [(_to_unicode(a), _to_unicode(b)) for a, b in merges]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    tok = load_tokenizer(dirs["qwen"], "qwen")
    for text in _sentences():
        text = text.replace("<|endoftext|>", "")
        assert bpe.encode(text).ids == tok.encode(text), text


@pytest.mark.parametrize("cls_name", ["AutoTokenizer", "GPT2Tokenizer"])
def test_phi_matches_slow_transformers(dirs, cls_name):
    import transformers

    kwargs = {"use_fast": False} if cls_name == "AutoTokenizer" else {}
    slow = getattr(transformers, cls_name).from_pretrained(str(dirs["phi"]), **kwargs)
    if cls_name == "AutoTokenizer":  # what upstream loads for Phi-2
        assert type(slow).__name__ == "CodeGenTokenizer"
    tok = load_tokenizer(dirs["phi"], "phi")
    assert len(slow) == len(tok)
    assert (slow.eos_token_id, slow.unk_token_id) == (tok.eos_token_id, tok.pad_token_id)
    for text in _sentences():
        ids = slow.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text
        assert slow.decode(ids, clean_up_tokenization_spaces=False,
                           spaces_between_special_tokens=False) == tok.decode(ids)


def test_tokenizer_json_wins(tmp_path, dirs):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    qwen = load_tokenizer(dirs["qwen"], "qwen")
    specials = sorted(qwen.special_tokens, key=qwen.special_tokens.get)
    TikTokenConverter(str(dirs["qwen"] / "qwen.tiktoken"), pattern=PAT_STR,
                      additional_special_tokens=specials).converted().save(str(tmp_path / "tokenizer.json"))
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(dirs["qwen"] / name, tmp_path / name)
    tok = load_tokenizer(tmp_path, "qwen")  # no qwen.tiktoken here: tokenizer.json alone suffices
    assert type(tok).__name__ == "HFTokenizer"
    assert (len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
        len(qwen), qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token_id)
    assert tok.special_tokens == qwen.special_tokens
    text = "USER: <image>\nWhat is it? ASSISTANT: a cat<|endoftext|>"
    assert tok.encode(text) == qwen.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_map_wins_over_config(tmp_path, dirs):
    shutil.copytree(dirs["qwen"], tmp_path / "q")
    config = json.loads((tmp_path / "q" / "tokenizer_config.json").read_text())
    (tmp_path / "q" / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|im_end|>"}))
    assert load_tokenizer(tmp_path / "q", "qwen").eos_token_id == 1000
    (tmp_path / "q" / "special_tokens_map.json").unlink()
    assert load_tokenizer(tmp_path / "q", "qwen").eos_token_id == 1002


def test_tokenizer_json_defaults_may_be_absent(tmp_path, dirs):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    TikTokenConverter(str(dirs["stablelm"] / "arcade100k.tiktoken"), pattern=PAT_STR,
                      additional_special_tokens=["<|endoftext|>"]).converted().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, "stablelm")  # no JSON maps: eos by default, no <|reg0|> to pad with
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, len(tok)) == (1000, None, None, 1001)
    assert tok.special_tokens == {"<|endoftext|>": 1000}


# ---- errors ----------------------------------------------------------------------------------------


def test_unknown_family(dirs):
    with pytest.raises(TokenizerError, match=r"unknown tokenizer family 'llama'.*stablelm, qwen, phi"):
        load_tokenizer(dirs["qwen"], "llama")
    with pytest.raises(TokenizerError, match="unknown tokenizer family"):
        write_tokenizer_files("llama", Path("/nonexistent"))


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope", "qwen")
    with pytest.raises(TokenizerError, match=r"looked for tokenizer.json, arcade100k.tiktoken$"):
        load_tokenizer(tmp_path, "stablelm")
    with pytest.raises(TokenizerError, match=r"looked for tokenizer.json, qwen.tiktoken$"):
        load_tokenizer(tmp_path, "qwen")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"looked for tokenizer.json, vocab.json \+ merges.txt$"):
        load_tokenizer(tmp_path, "phi")


@pytest.mark.parametrize("line, why", [
    ("IQ==", "malformed tiktoken line 'IQ=='"),
    ("IQ== 0 7", "malformed tiktoken line"),
    ("!!!! 0", "malformed tiktoken line"),
    ("IQ== zero", "malformed tiktoken line"),
    ("IQ== 0", "token b'!' appears twice"),
])
def test_malformed_rank_line(tmp_path, dirs, line, why):
    good = (dirs["qwen"] / "qwen.tiktoken").read_text().splitlines()
    (tmp_path / "qwen.tiktoken").write_text("\n".join(good[:4] + [line] + good[4:]) + "\n")
    with pytest.raises(TokenizerError, match=f"qwen.tiktoken:5: {why}"):
        load_tokenizer(tmp_path, "qwen")


def test_bad_rank_sets(tmp_path, dirs):
    lines = (dirs["stablelm"] / "arcade100k.tiktoken").read_text().splitlines()
    (tmp_path / "arcade100k.tiktoken").write_text("\n".join(lines[:-2] + [lines[-1].replace(" 999", " 5000")]))
    with pytest.raises(TokenizerError, match=r"ranks are not exactly 0\.\.998"):
        load_tokenizer(tmp_path, "stablelm")
    ranks = {t: r - 1 for t, r in read_tiktoken_ranks(dirs["stablelm"] / "arcade100k.tiktoken").items() if r}
    write_tiktoken_file(tmp_path / "arcade100k.tiktoken", ranks)
    with pytest.raises(TokenizerError, match="1 single-byte tokens are missing"):
        load_tokenizer(tmp_path, "stablelm")


def test_bad_ids_and_names(tmp_path, dirs):
    tok = load_tokenizer(dirs["phi"], "phi")
    with pytest.raises(TokenizerError, match=r"token id 5000 is outside the vocabulary \(0\.\.1038\)"):
        tok.decode([1, 5000])
    shutil.copytree(dirs["qwen"], tmp_path / "q")
    (tmp_path / "q" / "special_tokens_map.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(TokenizerError, match="eos_token '<\\|nope\\|>' is not a token"):
        load_tokenizer(tmp_path / "q", "qwen")
    (tmp_path / "q" / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="special_tokens_map.json: not valid JSON"):
        load_tokenizer(tmp_path / "q", "qwen")


def test_phi_added_token_ids_must_follow_vocab(tmp_path, dirs):
    shutil.copytree(dirs["phi"], tmp_path / "p")
    (tmp_path / "p" / "added_tokens.json").write_text('{"  ": 5000}')
    with pytest.raises(TokenizerError, match="should have id 5000 but lands at 1001"):
        load_tokenizer(tmp_path / "p", "phi")
