"""Tile coordinates in canonical form (int64 ``(x, y)`` level-0 pixels): row-major order, validation, tile size.

Tiles are kept in **row-major order by (y, x)** (top row first, left to right), because LongNet's output depends
on sequence order and embeddings must be reproducible whatever order the extractor wrote.

A tile's grid position is ``floor(coords / patch_size_level0)``, with ``patch_size_level0`` the tile side in
level-0 pixels (TRIDENT's rule): 512 for 20× tiles of 256 px on a 40× scan, 256 on a 20× scan, so both give the
same positions. Which size applies is :func:`resolve_patch_size`'s job; :func:`check_tile_grid` refuses
coordinates that collapse onto few grid cells.

Hub-shipped with the processor: imports only numpy, torch and sibling modules.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import SlideFormatError

logger = logging.getLogger(__name__)

# More tiles than this fraction sharing a grid cell with another tile means the coordinates are not in the frame
# the tile size assumes (normalised, at a coarser level, or overlapping tiles); a few shared cells happen in real
# tilings whose grid restarts per tissue contour and only get a warning.
MAX_SHARED_CELL_FRACTION = 0.1
_DENSE_GRID_MAX_CELLS = 1 << 22  # grids up to this many cells are counted with a bincount (a few MB)


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


def tile_grid(coords: np.ndarray | torch.Tensor, patch_size_level0: int) -> np.ndarray:
    """``[N, 2]`` int64 grid cells ``floor(coords / patch_size_level0)`` of level-0 ``(x, y)`` coordinates."""
    xy = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords).astype(np.int64)
    return np.floor_divide(xy, int(patch_size_level0))


def shared_cell_count(cells: np.ndarray) -> int:
    """How many tiles land in a grid cell already taken by another tile (``N - distinct cells``)."""
    if cells.shape[0] < 2:
        return 0
    cells = cells - cells.min(axis=0)
    width, height = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    keys = cells[:, 1] * width + cells[:, 0]  # one int64 per cell
    if width * height <= _DENSE_GRID_MAX_CELLS:  # O(N + cells) count instead of an O(N log N) sort
        return int(cells.shape[0] - np.count_nonzero(np.bincount(keys, minlength=width * height)))
    return int(cells.shape[0] - np.unique(keys).size)


def check_tile_grid(coords: np.ndarray | torch.Tensor, patch_size_level0: int, source: str, origin: str = "") -> None:
    """Raise :class:`SlideFormatError` when many tiles share a grid cell at this tile size.

    A collapsed grid is silent poison for a position-aware slide encoder: coordinates normalised to [0, 1000] or
    given at a coarser level put hundreds of tiles on one position, and every slide embedding ends up alike.
    """
    cells = tile_grid(coords, patch_size_level0)
    shared = shared_cell_count(cells)
    if shared == 0:
        return
    num_tiles = cells.shape[0]
    stride = infer_tile_stride(coords)
    hint = (
        f" The tiles are {stride} apart: if that is their level-0 tile stride, pass patch_size_level0={stride} "
        "(--patch_size_level0)."
        if stride and stride < patch_size_level0
        else ""
    )
    message = (
        f"{source}: {shared} of {num_tiles} tiles share a grid cell with another tile at patch_size_level0="
        f"{patch_size_level0}{origin} (grid cell = floor(coords / {patch_size_level0})). Coordinates must be level-0 "
        f"pixel offsets of the tiles' top-left corners; these look normalised, given at a coarser level, or "
        f"from overlapping tiles.{hint} Fix: write level-0 pixel coordinates with their patch_size_level0 "
        "attribute (TRIDENT layout), or pass the right patch_size_level0."
    )
    if shared > MAX_SHARED_CELL_FRACTION * num_tiles:
        raise SlideFormatError(message)
    logger.warning("%s", message)


def resolve_patch_size(
    coords: np.ndarray, stated: int | None, given: int | None, source: str, default: int | None = None
) -> tuple[int | None, str | None]:
    """The tile side in level-0 pixels that places this slide's tiles, and where it came from, checked with
    :func:`check_tile_grid` on all of the slide's tiles.

    Order: ``given`` (the caller's override) → ``stated`` (the file's attributes: TRIDENT ``patch_size_level0``,
    CLAM ``patch_size`` × ``downsample``) → the coordinates' tile stride (:func:`infer_tile_stride`: files that
    state nothing, e.g. CLAM feature files) → ``default`` (a single tile, or no two tiles in one row or column).
    """
    for value, origin in ((given, "given"), (stated, "file")):
        if value is not None:
            if int(value) <= 0:
                raise SlideFormatError(f"{source}: patch_size_level0={value} ({origin}) must be a positive integer.")
            patch = int(value)
            break
    else:
        patch, origin = infer_tile_stride(coords), "inferred"
        if patch is None:
            return default, None if default is None else "default"
    described = {"given": " (given)", "file": " (stated by the file)", "inferred": " (inferred tile stride)"}
    check_tile_grid(coords, patch, source, described[origin])
    return patch, origin


__all__ = [
    "spatial_order",
    "infer_tile_stride",
    "validate_coords",
    "tile_grid",
    "shared_cell_count",
    "check_tile_grid",
    "resolve_patch_size",
    "MAX_SHARED_CELL_FRACTION",
]
