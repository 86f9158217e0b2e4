"""Image splicing: prompt ids with IMAGE_TOKEN_INDEX markers -> one embedding sequence.

Contract: `splice(ids, image_features, embed_tokens)` is upstream's
`prepare_inputs_labels_for_multimodal` for one sequence: the text between markers is embedded,
each marker (-200) is replaced by the next image's projected features (all N of its tokens), in
order, and positions run 0..L'-1 over the spliced sequence. Upstream never truncates the spliced
sequence (its tokenizer_model_max_length is unset). Unlike upstream, a marker count that does not
match the number of images is an error rather than an IndexError or silently unused images.

Shape legend: L prompt ids, I images, N tokens per image, H hidden, L' = L - I + I*N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from edgemoe.errors import EdgeMoEError

IMAGE_TOKEN_INDEX = -200  # upstream's marker id (moellava/constants.py); no vocabulary has it


@dataclass(frozen=True)
class SplicedPrompt:
    """The LLM's input for one prompt and where the images landed in it."""

    embeds: torch.Tensor  # [1, L', H]
    image_spans: tuple[tuple[int, int], ...]  # (start, stop) in spliced positions, one per image

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def position_ids(self) -> torch.Tensor:  # [1, L']
        return torch.arange(self.length, device=self.embeds.device)[None]


def _as_ids(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise EdgeMoEError(f"image splicing takes one prompt at a time, got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1:
        raise EdgeMoEError(f"prompt ids must be [L] or [1, L], got shape {list(ids.shape)}")
    return ids


def splice(ids: torch.Tensor | Sequence[int], image_features: torch.Tensor | Sequence[torch.Tensor] | None,
           embed_tokens: Callable[[torch.Tensor], torch.Tensor]) -> SplicedPrompt:
    """ids [L] or [1, L] with -200 markers; image_features [I, N, H] (or I tensors [N, H])."""
    ids = _as_ids(ids)
    marks = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    images = [] if image_features is None else list(image_features)
    if len(marks) != len(images):
        raise EdgeMoEError(f"prompt has {len(marks)} image marker(s) ({IMAGE_TOKEN_INDEX}) "
                           f"but {len(images)} image(s) were given")
    text = embed_tokens(ids.masked_fill(ids == IMAGE_TOKEN_INDEX, 0))  # [L, H]; marker rows unused
    parts, spans, start, pos = [], [], 0, 0
    for mark, feats in zip(marks, images):
        parts.append(text[start:mark])
        pos += mark - start
        parts.append(feats.to(text.dtype))
        spans.append((pos, pos + feats.shape[0]))
        pos += feats.shape[0]
        start = mark + 1
    parts.append(text[start:])
    return SplicedPrompt(torch.cat(parts, dim=0)[None], tuple(spans))
