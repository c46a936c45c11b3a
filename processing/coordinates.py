"""Tile coordinates in canonical form (int64 ``(x, y)`` level-0 pixels): row-major order, validation, tile stride.

Tiles are kept in **row-major order by (y, x)** (top row first, left to right), because LongNet's output depends
on sequence order and embeddings must be reproducible whatever order the extractor wrote.

Hub-shipped with the processor: imports only numpy, torch and sibling modules.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import SlideFormatError


def spatial_order(coords: np.ndarray) -> np.ndarray:
    """Permutation sorting tiles row-major by (y, x): ``coords[perm]`` is top-to-bottom, left-to-right."""
    coords = np.asarray(coords)
    return np.lexsort((coords[:, 0], coords[:, 1]))  # last key (y) is primary


def infer_tile_stride(coords: np.ndarray | torch.Tensor) -> int | None:
    """The tile stride: the most frequent step between horizontal (else vertical) neighbours, or ``None``.

    Used when a file does not state ``patch_size_level0`` (CLAM feature files carry no attributes). The mode,
    not the minimum, because real tilings restart the grid per tissue contour (offsets of a few pixels).
    """
    xy = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords).astype(np.int64)
    for along, across in ((0, 1), (1, 0)):
        order = np.lexsort((xy[:, along], xy[:, across]))
        line, pos = xy[order, across], xy[order, along]
        steps = np.diff(pos)[(np.diff(line) == 0)]
        steps = steps[steps > 0]
        if steps.size:
            values, counts = np.unique(steps, return_counts=True)
            return int(values[np.argmax(counts)])
    return None


def validate_coords(coords: np.ndarray, source: str) -> np.ndarray | None:
    """Raise :class:`SlideFormatError` on negative or duplicated tile coordinates.

    Returns the row-major permutation (:func:`spatial_order`), or ``None`` when the rows already are in that
    order (the common case for files written by this package or by row-major tilers): checked in one O(N) pass
    so that reading such a file needs no sort.
    """
    coords = np.asarray(coords)
    if coords.size and int(coords.min()) < 0:
        negative = np.flatnonzero((coords < 0).any(axis=1))
        i = int(negative[0])
        raise SlideFormatError(
            f"{source}: {negative.size} tile(s) have negative coordinates (first: row {i}, "
            f"(x, y) = {tuple(int(v) for v in coords[i])}). Coordinates must be level-0 pixel "
            "offsets from the slide's top-left corner; shift them so the minimum is 0."
        )
    x, y = coords[:, 0], coords[:, 1]
    if bool(((y[1:] > y[:-1]) | ((y[1:] == y[:-1]) & (x[1:] > x[:-1]))).all()):
        return None  # strictly increasing in (y, x): sorted and without duplicates
    order = spatial_order(coords)
    sorted_xy = coords[order]
    same = np.flatnonzero((sorted_xy[1:] == sorted_xy[:-1]).all(axis=1))
    if same.size:
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise SlideFormatError(
            f"{source}: {same.size} duplicated tile coordinate(s) (e.g. rows {a} and {b} both "
            f"at (x, y) = {tuple(int(v) for v in coords[a])}). Each tile must appear once: "
            "deduplicate at extraction, or check that coordinates are level-0 pixels and "
            "not grid indices at a coarser level."
        )
    return order


__all__ = ["spatial_order", "infer_tile_stride", "validate_coords"]
