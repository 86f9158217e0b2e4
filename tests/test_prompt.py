"""Prompt templates render upstream's strings; image splicing equals upstream's tokenizer_image_token."""

from __future__ import annotations

import pytest

from edgemoe.errors import TokenizerError
from edgemoe.model.prompt import (
    IMAGE_TOKEN_INDEX, Conversation, ConvTemplate, cut_at_stop, stop_index, stop_token_id, template_for,
    tokenize_with_image,
)
from edgemoe.model.tokenizer import load_tokenizer
from edgemoe.model.tokenizer_files import write_tokenizer_files

FAMILIES = ("stablelm", "qwen", "phi")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    out = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        write_tokenizer_files(family, directory)
        out[family] = load_tokenizer(directory, family)
    return out


def upstream_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """moellava/mm_utils.py, verbatim but for `tokenizer(chunk).input_ids` -> `encode`."""
    prompt_chunks = [tokenizer.encode(chunk) for chunk in prompt.split('<image>')]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep]*len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


# ---- rendering -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_one_turn(family):
    conv = Conversation.for_family(family).add_user("What is in the picture?", image=True)
    assert conv.render() == SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.mark.parametrize("family", FAMILIES)
def test_two_turns(family):
    conv = (Conversation.for_family(family).add_user("What is it?", image=True)
            .add_assistant("A grey cat.").add_user("What colour are its eyes?"))
    assert conv.render() == (SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A grey cat.<|endoftext|>"
                             "USER: What colour are its eyes? ASSISTANT:")
    closed = conv.add_assistant("Green.")
    assert closed.render() == conv.render() + " Green.<|endoftext|>"


def test_templates_per_family():
    assert template_for("stablelm").name == "stablelm"
    assert template_for("qwen") is template_for("phi")  # upstream's conv_mode "qwen" uses conv_phi
    assert Conversation.for_family("phi").stop_str == "<|endoftext|>"
    assert Conversation.for_family("qwen").add_user("hi").render() == SYSTEM + " USER: hi ASSISTANT:"
    with pytest.raises(TokenizerError, match="no prompt template for family 'llama'"):
        template_for("llama")


def test_conversation_is_immutable_and_ordered():
    empty = Conversation.for_family("stablelm")
    one = empty.add_user("q", image=True)
    assert empty.messages == () and one.messages == (("USER", "<image>\nq"),)
    assert one.has_image and not empty.has_image
    with pytest.raises(ValueError, match="two user turns in a row"):
        one.add_user("again")
    with pytest.raises(ValueError, match="must follow a user turn"):
        empty.add_assistant("a")
    with pytest.raises(ValueError, match="one image per conversation"):
        one.add_assistant("a").add_user("more", image=True)


# ---- image splicing --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_spliced_where_image_was(tokenizers, family):
    tok = tokenizers[family]
    prompt = Conversation.for_family(family).add_user("Describe the image.", image=True).render()
    head, tail = prompt.split("<image>")
    assert head.endswith("USER: ")
    ids = tokenize_with_image(tok, prompt)
    assert ids == tok.encode(head) + [IMAGE_TOKEN_INDEX] + tok.encode(tail)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.index(IMAGE_TOKEN_INDEX) == len(tok.encode(head))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_upstream_tokenizer_image_token(tokenizers, family):
    tok = tokenizers[family]
    bos_text = {"qwen": "<|extra_1|>", "phi": "<|endoftext|>"}.get(family, "")
    prompts = [
        Conversation.for_family(family).add_user("What is it?", image=True).add_assistant("A dog.")
        .add_user("Why?").render(),
        "no image at all",
        "<image>",
        "<image>\nstarts with the image",
        "two <image> images <image> here",
        "ends with <image>",
        "",
        bos_text + "USER: <image>\nbos first? ASSISTANT:",  # upstream then drops each later chunk's first id
    ]
    for prompt in prompts:
        assert tokenize_with_image(tok, prompt) == upstream_tokenizer_image_token(prompt, tok), prompt
    assert tokenize_with_image(tok, "two <image> images <image> here").count(IMAGE_TOKEN_INDEX) == 2


def test_bos_offset_logic(tokenizers):
    qwen = tokenizers["qwen"]
    ids = tokenize_with_image(qwen, "<|extra_1|>a <image>\nbc")
    tail = qwen.encode("\nbc")
    assert ids == [qwen.bos_token_id] + qwen.encode("a ") + [IMAGE_TOKEN_INDEX] + tail[1:]


# ---- stopping --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_token_is_eos(tokenizers, family):
    tok = tokenizers[family]
    conv = Conversation.for_family(family)
    assert stop_token_id(tok, conv) == tok.eos_token_id == tok.encode(conv.stop_str)[0]


def test_stop_token_must_be_eos(tokenizers):
    tok = tokenizers["qwen"]
    odd = Conversation(ConvTemplate("x", SYSTEM, ("USER", "ASSISTANT"), " ", "<|im_end|>"))
    with pytest.raises(TokenizerError, match=r"stop string '<\|im_end\|>' is id \d+, but eos is \d+"):
        stop_token_id(tok, odd)
    missing = Conversation(ConvTemplate("x", SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"))
    with pytest.raises(TokenizerError, match="'</s>' is not a special token"):
        stop_token_id(tok, missing)


def test_cut_at_stop():
    assert stop_index("A cat.<|endoftext|>junk", "<|endoftext|>") == 6
    assert stop_index("no stop", "<|endoftext|>") is None
    assert cut_at_stop(" A cat. <|endoftext|>junk", "<|endoftext|>") == "A cat."
    assert cut_at_stop(" unfinished ", "<|endoftext|>") == "unfinished"


def test_tokenizers_fixture_is_real(tokenizers):
    # Guard against a vacuous splice test: the chunks are multi-token in every family.
    assert all(len(t.encode(SYSTEM)) > 10 for t in tokenizers.values())
