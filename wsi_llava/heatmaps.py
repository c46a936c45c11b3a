"""Which tiles reach the language model: the WSI-LLaVA side of the tile heatmaps in :mod:`wsi_clip.heatmaps`."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def selected_tiles(
    model: nn.Module,
    tile_features: torch.Tensor,
    tile_coords: torch.Tensor,
    tile_mask: torch.Tensor | None = None,
    token_selection: str | None = None,
) -> torch.Tensor:
    """``[N]`` bool for one slide (``tile_features [1, N, D]``): the tiles a WSI-LLaVA token selector keeps (their
    tokens, or tokens merged into them, reach the LM). Draw it with ``wsi_clip.heatmaps.render_tile_heatmap``."""
    selected = model.get_slide_features(tile_features, tile_coords, tile_mask, token_selection=token_selection)
    kept = torch.zeros(tile_features.shape[1], dtype=torch.bool)
    index = selected.selection_indices[0]  # [K] source tile per visual token, -1 = padding / summary
    kept[index[index >= 0].cpu()] = True
    return kept


__all__ = ["selected_tiles"]
