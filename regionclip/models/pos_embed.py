"""Positional embeddings at another token grid than the one a tower was trained on."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolate_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a positional embedding with one leading class/global row to another token grid.

    ``pos_embed``: [1 + gh0 * gw0, C] (row-major grid after the leading row). Returns
    [1 + gh * gw, C]: the leading row unchanged, the grid resized with bicubic interpolation
    (align_corners=False, antialiased when shrinking, as open_clip's checkpoint ``resize_pos_embed``).
    The same grid returns ``pos_embed`` itself, so the model's native size stays bit-exact.
    """
    gh0, gw0 = src_grid
    gh, gw = dst_grid
    if pos_embed.shape[0] != 1 + gh0 * gw0:
        raise ValueError(f"positional embedding has {pos_embed.shape[0]} rows, expected 1 + {gh0}*{gw0}")
    if (gh, gw) == (gh0, gw0):
        return pos_embed
    grid = pos_embed[1:].reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)
    return torch.cat([pos_embed[:1], grid], dim=0)
