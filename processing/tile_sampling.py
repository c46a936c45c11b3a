"""Which tiles of a spatially ordered slide to keep: ``all``, ``uniform`` (evaluation) or ``random`` (training).

Hub-shipped with the processor: imports only numpy and torch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

TileSampling = Literal["all", "uniform", "random"]
TILE_SAMPLING_STRATEGIES: tuple[str, ...] = ("all", "uniform", "random")


def sample_tile_indices(
    num_tiles: int, max_tiles: int | None, strategy: str = "uniform", seed: int | None = None
) -> np.ndarray:
    """Positions (sorted, int64) of the tiles to keep among ``num_tiles`` spatially ordered tiles.

    * ``"all"``: every tile, no cap.
    * ``"uniform"``: deterministic, evenly strided (the centre of ``max_tiles`` equal bins) — for evaluation.
    * ``"random"``: uniformly random without replacement — for training. ``seed=None`` draws the seed from
      torch's global generator, so ``transformers.set_seed`` and DataLoader worker seeding make it
      reproducible and different per worker.
    """
    if strategy not in TILE_SAMPLING_STRATEGIES:
        raise ValueError(f"tile_sampling={strategy!r} is not one of {TILE_SAMPLING_STRATEGIES}.")
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles={max_tiles} must be a positive integer (or None for no cap).")
    if strategy == "all" or max_tiles is None or num_tiles <= max_tiles:
        return np.arange(num_tiles, dtype=np.int64)
    if strategy == "uniform":
        return ((np.arange(max_tiles, dtype=np.float64) + 0.5) * num_tiles / max_tiles).astype(np.int64)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_tiles, size=max_tiles, replace=False)).astype(np.int64)


__all__ = ["TileSampling", "TILE_SAMPLING_STRATEGIES", "sample_tile_indices"]
