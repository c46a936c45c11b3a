"""Per-dimension mean and standard deviation of tile features over a set of slides (for input standardisation).

A bounded, seeded sample (``max_tiles_per_slide`` tiles from each of at most ``max_slides`` slides) accumulated in
float64: the statistics of a cohort are stable long before every tile is read, and a 10,000-slide training set
must not need a full pass over its H5 files before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .slide_io import read_slide


def tile_feature_statistics(
    h5_paths: Sequence[str | Path],
    *,
    max_tiles_per_slide: int = 512,
    max_slides: int = 2000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(mean [D], std [D], tiles used)`` in float32 over a seeded sample of the slides' tiles.

    Slides beyond ``max_slides`` are chosen at random (seeded); each contributes up to ``max_tiles_per_slide``
    randomly sampled tiles. Raises ``ValueError`` for an empty list or slides of different feature dimensions.
    """
    paths = list(dict.fromkeys(str(p) for p in h5_paths))  # each file once, in order
    if not paths:
        raise ValueError("tile_feature_statistics needs at least one slide file.")
    rng = np.random.default_rng(seed)
    if len(paths) > max_slides:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), size=max_slides, replace=False))]
    total = total_sq = None
    count = 0
    for i, path in enumerate(paths):
        slide = read_slide(path, max_tiles=max_tiles_per_slide, tile_sampling="random", seed=seed + i)
        feats = slide.features.double()  # [n, D]
        if total is None:
            total, total_sq = (
                torch.zeros(feats.shape[1], dtype=torch.float64),
                torch.zeros(feats.shape[1], dtype=torch.float64),
            )
        elif feats.shape[1] != total.numel():
            raise ValueError(
                f"{path}: {feats.shape[1]}-d tile features, but {paths[0]} has {total.numel()}; one tower takes one "
                "feature dimension (use features of one tile encoder)."
            )
        total += feats.sum(dim=0)
        total_sq += (feats * feats).sum(dim=0)
        count += feats.shape[0]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0) * (count / max(count - 1, 1))
    return mean.float(), var.sqrt().float(), count


__all__ = ["tile_feature_statistics"]
