"""Tile grids at a target magnification: level-0 coordinates of the tiles worth encoding.

A tile is ``patch_size`` pixels at ``target_magnification``, i.e. ``patch_size_level0 = patch_size ×
level0_magnification / target_magnification`` level-0 pixels (256 px at 20× = 512 px on a 40× scan), stepped by
``patch_size - overlap`` target pixels. Coordinates are level-0 (x, y) top-left corners, tiles wholly inside the
slide, in row-major order — the form :func:`processing.read_slide` returns and TRIDENT writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tissue_segmentation import TissueMask, tissue_fraction_of_tiles


@dataclass(frozen=True)
class TileGrid:
    """The kept tiles of one slide and the attributes TRIDENT writes with them."""

    coords: np.ndarray  # [T, 2] int64 level-0 (x, y)
    patch_size: int  # at the target magnification
    patch_size_level0: int
    target_magnification: float
    level0_magnification: float
    overlap: int  # target-magnification pixels shared by neighbouring tiles
    level0_width: int
    level0_height: int

    def attributes(self) -> dict[str, int | float]:
        """TRIDENT's ``coords`` attributes."""
        return {
            "patch_size": self.patch_size,
            "patch_size_level0": self.patch_size_level0,
            "target_magnification": self.target_magnification,
            "level0_magnification": self.level0_magnification,
            "overlap": self.overlap,
            "level0_width": self.level0_width,
            "level0_height": self.level0_height,
        }


def tile_grid(
    width: int,
    height: int,
    level0_magnification: float,
    target_magnification: float,
    patch_size: int = 256,
    overlap: int = 0,
    tissue: TissueMask | None = None,
    min_tissue_fraction: float = 0.25,
) -> TileGrid:
    """The tiles of a ``width × height`` level-0 slide, kept where ``tissue`` covers ``min_tissue_fraction``."""
    if patch_size <= 0 or not 0 <= overlap < patch_size:
        raise ValueError(f"patch_size={patch_size} must be positive and overlap={overlap} in [0, patch_size).")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction={min_tissue_fraction} must be in [0, 1].")
    if target_magnification <= 0 or target_magnification > level0_magnification * 1.001:
        raise ValueError(
            f"target_magnification={target_magnification} must be in (0, {level0_magnification}] (the scan's "
            "level-0 magnification): tiles cannot be read above the scanned resolution."
        )
    downsample = level0_magnification / target_magnification
    size_level0 = int(round(patch_size * downsample))
    step_level0 = int(round((patch_size - overlap) * downsample))
    xs = np.arange(0, width - size_level0 + 1, step_level0, dtype=np.int64)
    ys = np.arange(0, height - size_level0 + 1, step_level0, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)  # [T, 2] row-major (y, then x)
    if tissue is not None and len(coords):
        coords = coords[tissue_fraction_of_tiles(tissue, coords, size_level0) >= max(min_tissue_fraction, 1e-9)]
    return TileGrid(
        coords=coords,
        patch_size=int(patch_size),
        patch_size_level0=size_level0,
        target_magnification=float(target_magnification),
        level0_magnification=float(level0_magnification),
        overlap=int(overlap),
        level0_width=int(width),
        level0_height=int(height),
    )


__all__ = ["TileGrid", "tile_grid"]
