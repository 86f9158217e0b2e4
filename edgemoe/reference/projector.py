"""The multimodal projectors: image features (tower width) -> LLM embeddings.

Contract: `mlp2x_gelu` (MoE-LLaVA) is upstream's `Linear(mm_hidden, hidden) -> GELU -> Linear(hidden,
hidden)`, with torch's default, exact (erf) GELU, not a tanh approximation. As an `nn.Sequential` its
parameters are `0.*` and `2.*`, the canonical `projector.{0,2}.*` names.

`downsample_mlp_gelu` (DeepSeek-VL2) first folds each tile's G x G grid of features into 2 x 2 blocks:
zero-pad the grid to even size (27 -> 28), `F.unfold(k=2, s=2)`, so a token's features are
channel-major (`c * 4 + di * 2 + dj`, not pixel-unshuffle order), then the same Linear -> GELU ->
Linear. `arrange(tiles, rows, cols)` lays one image's projected tiles out as upstream's
`prepare_inputs_embeds` with `tile_tag "2D"` and `global_view_pos "head"`: the global tile's g x g
grid with `image_newline` after each row, `view_separator`, then the local tiles stitched into a
(g*rows) x (g*cols) grid, again with `image_newline` after each row.

Shape legend: T tiles, P tower tokens per tile (G*G), Hv tower hidden, H LLM hidden, g = ceil(G/2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgemoe.model.config import ModelConfig


class Projector(nn.Sequential):
    """[B, N, Hv] -> [B, N, H]."""

    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__(nn.Linear(mm_hidden, hidden), nn.GELU(approximate="none"), nn.Linear(hidden, hidden))

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "Projector":
        if cfg.mm_projector_type == "downsample_mlp_gelu":
            return TiledProjector(cfg.mm_hidden_size, cfg.hidden_size)
        if cfg.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"projector {cfg.mm_projector_type!r} is not supported (mlp2x_gelu, downsample_mlp_gelu)")
        return cls(cfg.mm_hidden_size, cfg.hidden_size)


def downsample_2x2(x: torch.Tensor) -> torch.Tensor:
    """[T, G*G, Hv] -> [T, g*g, 4*Hv]: pad the grid to even, unfold 2 x 2 blocks (channel-major)."""
    t, p, hv = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"{p} tower tokens per tile are not a square grid")
    grid = x.reshape(t, side, side, hv)
    pad = side % 2
    if pad:
        grid = F.pad(grid, (0, 0, 0, pad, 0, pad))  # zero row at the bottom, zero column at the right
    blocks = F.unfold(grid.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # [T, Hv*4, g*g]
    return blocks.permute(0, 2, 1)


class TiledProjector(Projector):
    """DeepSeek-VL2's projector with its two layout embeddings (module docstring)."""

    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__(4 * mm_hidden, hidden)
        self.image_newline = nn.Parameter(torch.zeros(hidden))
        self.view_separator = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, G*G, Hv] -> [T, g*g, H]
        return super().forward(downsample_2x2(x))

    def arrange(self, tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Projected tiles [1 + rows*cols, g*g, H] (global first) -> one image's tokens [N, H]."""
        t, gg, h = tiles.shape
        g = math.isqrt(gg)
        if t != 1 + rows * cols:
            raise ValueError(f"{t} tiles do not make a global view plus a {rows} x {cols} grid")
        newline = self.image_newline.to(tiles.dtype)
        glob = torch.cat((tiles[0].view(g, g, h), newline.expand(g, 1, h)), dim=1).reshape(-1, h)
        local = tiles[1:].view(rows, cols, g, g, h).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, h)
        local = torch.cat((local, newline.expand(rows * g, 1, h)), dim=1).reshape(-1, h)
        return torch.cat((glob, self.view_separator.to(tiles.dtype)[None], local), dim=0)
