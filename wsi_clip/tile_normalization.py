"""Per-dimension standardisation of tile features with statistics of the training set, stored in the checkpoint.

Why: tile embeddings of foundation models (UNI, Prov-GigaPath, …) share a large common offset — every tile vector
points roughly the same way — so a freshly initialised tower maps every slide to nearly the same vector (cosine
≈ 0.95 between slides) and contrastive training sits at ``log(batch)`` until the offset is unlearnt. Standardising
each feature dimension (``(x - mean) / std`` over training tiles) removes it before the first step. The statistics
are buffers: they travel with ``save_pretrained`` and every later use (zero-shot, embedding, WSI-LLaVA) applies the
same transform. Towers warm-started from pretrained weights keep raw features (their weights expect them).

Hub-shipped with the modeling files (imports only torch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TileFeatureStandardization(nn.Module):
    """``(x - mean) / std`` per feature dimension; identity until :meth:`set_statistics` is called."""

    def __init__(self, input_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(input_dim))  # [D]
        self.register_buffer("std", torch.ones(input_dim))  # [D]

    @torch.no_grad()
    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Set the ``[D]`` mean and standard deviation (of the training tiles)."""
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"tile feature statistics must be [{self.mean.numel()}] (the tower's input_dim), got mean "
                f"{tuple(mean.shape)} and std {tuple(std.shape)}."
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("tile feature statistics contain NaN or inf; check the training features.")
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std).clamp_min(self.eps))

    def forward(self, tile_features: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, N, D]`` features (any float dtype) → standardised ``[B, N, D]`` in ``dtype`` (computed in fp32)."""
        mean, std = self.mean.float(), self.std.float()
        return ((tile_features.float() - mean) / std).to(dtype)  # [B, N, D]

    def extra_repr(self) -> str:
        return f"input_dim={self.mean.numel()}"


__all__ = ["TileFeatureStandardization"]
