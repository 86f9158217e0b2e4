"""Prompt templates and image-token splicing, as upstream MoE-LLaVA builds its model input.

Contract: `Conversation.render()` returns byte-for-byte upstream's `conv.get_prompt()` for the
family's template (conv_stablelm for StableLM; conv_phi for Phi-2 and Qwen; both "TWO" style), and
`tokenize_with_image` returns upstream's `tokenizer_image_token` ids: each `<image>`-separated chunk
encoded alone, joined by IMAGE_TOKEN_INDEX (-200), which the runtime replaces with the projected
image features. Generation stops at the template's stop string, which is the tokenizer's eos token;
`stop_token_id` checks that and `cut_at_stop` trims decoded text the way upstream's scripts do.
The module knows nothing about models; it only needs a `Tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgemoe.errors import TokenizerError
from edgemoe.model.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # a negative id no vocabulary has: marks where image features go


@dataclass(frozen=True)
class ConvTemplate:
    """Upstream's `Conversation` settings for one family (moellava/conversation.py)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str  # after the system prompt and after each user turn
    sep2: str  # after each assistant turn; also the stop string
    style: str = "two"  # "two": LLaVA's rendered string; "deepseek": DeepSeek-VL2's per-turn token assembly
    max_images: int | None = 1  # images one conversation may hold (None: any number)


SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CONV_STABLELM = ConvTemplate("stablelm", SYSTEM, ("USER", "ASSISTANT"), " ", "<|endoftext|>")
CONV_PHI = ConvTemplate("phi", SYSTEM, ("USER", "ASSISTANT"), " ", "<|endoftext|>")
# DeepSeek-VL2's "deepseek" sft_format (conversation.py): empty system, "\n\n" after a user turn, eos after
# an answer.
CONV_DEEPSEEK = ConvTemplate("deepseek", "", ("<|User|>", "<|Assistant|>"), "\n\n", "<｜end▁of▁sentence｜>",
                             style="deepseek", max_images=None)
# Upstream's conv_mode: "stablelm" -> conv_stablelm, "phi" and "qwen" -> conv_phi.
TEMPLATES = {"stablelm": CONV_STABLELM, "phi": CONV_PHI, "qwen": CONV_PHI, "deepseek_vl2": CONV_DEEPSEEK}


def template_for(family: str) -> ConvTemplate:
    if family not in TEMPLATES:
        raise TokenizerError(f"no prompt template for family {family!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[family]


@dataclass(frozen=True)
class Conversation:
    """Alternating user/assistant turns; each `add_*` returns a new Conversation."""

    template: ConvTemplate
    messages: tuple[tuple[str, str], ...] = ()

    @classmethod
    def for_family(cls, family: str) -> Conversation:
        return cls(template_for(family))

    def with_system(self, system: str | None) -> Conversation:
        """This conversation with its template's system prompt replaced (None: unchanged)."""
        return self if system is None else replace(self, template=replace(self.template, system=system))

    @property
    def stop_str(self) -> str:
        return self.template.sep2

    @property
    def has_image(self) -> bool:
        return self.image_count > 0

    @property
    def image_count(self) -> int:
        return sum(text.count(IMAGE_TOKEN) for _, text in self.messages)

    def add_user(self, text: str, image: bool = False, images: int | None = None) -> Conversation:
        """Append a user turn; `image=True` (or `images=n`) puts `<image>\\n` first (n times), as
        upstream does on turn one."""
        if self.messages and self.messages[-1][0] == self.template.roles[0]:
            raise ValueError("two user turns in a row: add the assistant's answer first")
        n = int(image) if images is None else images
        most = self.template.max_images
        if most is not None and self.image_count + n > most:
            raise ValueError(f"upstream takes {'one image' if most == 1 else f'{most} images'} per conversation"
                             + ("; it is already in an earlier turn" if self.has_image else ""))
        text = f"{IMAGE_TOKEN}\n" * n + text
        return replace(self, messages=self.messages + ((self.template.roles[0], text),))

    def add_assistant(self, text: str) -> Conversation:
        """Append the assistant's answer (without the stop string; see `cut_at_stop`)."""
        if not self.messages or self.messages[-1][0] != self.template.roles[0]:
            raise ValueError("an assistant turn must follow a user turn")
        return replace(self, messages=self.messages + ((self.template.roles[1], text),))

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        """Prompt ids, -200 where the image goes: upstream's ids for this template's style."""
        if self.template.style == "deepseek":
            return _encode_deepseek(tokenizer, self)
        return tokenize_with_image(tokenizer, self.render())

    def render(self) -> str:
        """upstream get_prompt() (TWO style); after a user turn it ends with the open `ASSISTANT:`."""
        t = self.template
        seps = (t.sep, t.sep2)
        out = t.system + t.sep
        for i, (role, text) in enumerate(self.messages):
            out += f"{role}: {text}{seps[i % 2]}"
        if self.messages and self.messages[-1][0] == t.roles[0]:
            out += f"{t.roles[1]}:"  # upstream appends (ASSISTANT, None), rendered as "ASSISTANT:"
        return out


def tokenize_with_image(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """upstream tokenizer_image_token: encode each `<image>`-separated chunk, join with -200.

    Upstream keeps a leading BOS once and then drops the first id of *every* chunk, assuming each
    chunk got a BOS of its own. None of the three tokenizers prepends one, so this matters only when
    the prompt literally starts with the BOS token's text; it is kept for exact parity.
    """
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    bos = tokenizer.bos_token_id
    if chunks[0] and bos is not None and chunks[0][0] == bos:
        offset = 1
        ids.append(bos)
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def _encode_deepseek(tokenizer: Tokenizer, conv: Conversation) -> list[int]:
    """DeepSeek-VL2's `format_messages_v2`: bos, then each user turn tokenized as
    `<|User|>: {text}\n\n<|Assistant|>:` (the system prompt and sep before the first), each answer as
    its stripped text then eos. Turns are encoded apart, so no BPE merge crosses a turn boundary."""
    t = conv.template
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise TokenizerError("the deepseek template needs a tokenizer with bos and eos tokens")
    ids = [tokenizer.bos_token_id]
    for i, (role, text) in enumerate(conv.messages):
        if role == t.roles[0]:
            system = t.system + t.sep if i == 0 and t.system else ""
            ids += tokenize_with_image(tokenizer, f"{system}{role}: {text.strip()}{t.sep}{t.roles[1]}:")
        else:
            ids += tokenizer.encode(text.strip()) + [tokenizer.eos_token_id]
    return ids


def stop_token_id(tokenizer: Tokenizer, conv: Conversation) -> int:
    """The id generation stops on: the stop string's token, which must be the eos the runtime uses."""
    token_id = tokenizer.special_tokens.get(conv.stop_str)
    if token_id is None:
        raise TokenizerError(f"stop string {conv.stop_str!r} is not a special token of this tokenizer")
    if token_id != tokenizer.eos_token_id:
        raise TokenizerError(f"stop string {conv.stop_str!r} is id {token_id}, but eos is {tokenizer.eos_token_id}")
    return token_id


def stop_index(text: str, stop_str: str) -> int | None:
    """Where `stop_str` starts in decoded text, or None: the answer is text[:index]."""
    index = text.find(stop_str)
    return None if index < 0 else index


def cut_at_stop(text: str, stop_str: str) -> str:
    """The answer in decoded text: up to the stop string, stripped (upstream: outputs.strip())."""
    index = stop_index(text, stop_str)
    return (text if index is None else text[:index]).strip()
