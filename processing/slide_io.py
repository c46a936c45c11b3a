"""Slide feature files (H5): the three on-disk layouts, reading a slide validated into canonical form, writing one.

Three on-disk layouts are understood:

* ``"seed"``    — ``features [N, D]`` + ``coords_yx [N, 2]`` stored as (y, x);
* ``"clam"``    — ``features [N, D]`` + ``coords [N, 2]`` stored as (x, y); CLAM's coordinate attributes
  (``patch_size``, ``patch_level``, ``downsample``) are used when present;
* ``"trident"`` — ``features`` + ``coords`` (x, y) whose attributes include ``patch_size_level0``.

When a file has both ``coords`` and ``coords_yx``, ``coords`` wins (it is what every other tool writes).
Coordinates are returned in one canonical form: int64 ``(x, y)`` level-0 pixels, tiles in row-major order by
(y, x) (:mod:`.coordinates`). Which tiles a capped read keeps is :mod:`.tile_sampling`'s job; how the chosen
feature rows come off the disk is :mod:`.feature_reader`'s.

This module is imported by the Hub-shipped processor, so it imports only stdlib, numpy, torch, sibling modules
and (lazily, inside a ``try``) h5py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .coordinates import resolve_patch_size, validate_coords
from .errors import SlideFormatError
from .feature_reader import finite_rows, read_feature_rows
from .tile_sampling import sample_tile_indices

try:  # optional at import time so the processor can be loaded as remote code without h5py
    import h5py
except ImportError:  # pragma: no cover - h5py is a declared dependency
    h5py = None

logger = logging.getLogger(__name__)

SOURCE_LAYOUTS: tuple[str, ...] = ("seed", "clam", "trident")


@dataclass
class SlideFeatures:
    """Tile features of one slide in the canonical form.

    Attributes:
        features: ``[N, D]`` float32 tile features.
        coords: ``[N, 2]`` int64 level-0 pixel coordinates, **(x, y)**, top-left corner of each tile.
        patch_size_level0: tile side in level-0 pixels: the tile's grid position is ``floor(coords /
            patch_size_level0)`` (:func:`.coordinates.tile_grid`). ``None`` when unknown.
        path: the file it came from (``None`` for in-memory slides).
        source_layout: ``"seed"``, ``"clam"``, ``"trident"`` or ``"memory"``.
        patch_size_source: where ``patch_size_level0`` came from: ``"file"`` (stated by the file's attributes),
            ``"inferred"`` (the tile stride of its coordinates), ``"given"`` (passed by the caller) or ``None``.
    """

    features: torch.Tensor
    coords: torch.Tensor
    patch_size_level0: int | None = None
    path: str | None = None
    source_layout: str = "memory"
    patch_size_source: str | None = None

    @property
    def num_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def select(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> SlideFeatures:
        """A new ``SlideFeatures`` holding only ``indices`` (in the given order)."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return dataclasses.replace(self, features=self.features[index], coords=self.coords[index])


# --------------------------------------------------------------------------------------------------- reading
def _require_h5py() -> None:
    if h5py is None:
        raise ImportError("Reading slide files needs h5py: pip install h5py")


def open_slide_file(path: Path) -> h5py.File:
    """The slide file opened read-only, or :class:`SlideFormatError` saying why it cannot be (missing, a folder,
    not HDF5, truncated)."""
    _require_h5py()
    if not path.exists():
        raise SlideFormatError(
            f"{path}: file not found. Check the h5_path column / h5_root (paths are resolved "
            "against the annotation file's folder unless h5_root is given)."
        )
    if path.is_dir():
        raise SlideFormatError(f"{path}: is a directory, expected an H5 feature file.")
    if not h5py.is_hdf5(path):
        raise SlideFormatError(
            f"{path}: not an HDF5 file (a .pt/.npy file renamed, or an incomplete download). "
            "Re-export the tile features with h5py (datasets 'features' and 'coords')."
        )
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise SlideFormatError(
            f"{path}: HDF5 file cannot be opened ({err}); it is probably truncated or was "
            "still being written. Re-run feature extraction for this slide."
        ) from err


def features_dataset(f: h5py.File, path: Path) -> h5py.Dataset:
    """The file's ``features`` dataset, checked to be a non-empty float ``[N, D]`` array (its values are not read)."""
    if "features" not in f or not isinstance(f["features"], h5py.Dataset):
        raise SlideFormatError(
            f"{path}: no 'features' dataset (found keys {sorted(f.keys())}). Store tile "
            "features as a dataset named 'features' of shape [N, D]."
        )
    ds = f["features"]
    if ds.ndim != 2:
        hint = " Drop the leading batch axis (features[0]) when writing." if ds.ndim == 3 and ds.shape[0] == 1 else ""
        raise SlideFormatError(
            f"{path}: 'features' has shape {ds.shape} (rank {ds.ndim}); expected rank 2 [N, D].{hint}"
        )
    if ds.dtype.kind != "f":
        raise SlideFormatError(f"{path}: 'features' has dtype {ds.dtype}; expected float16/float32/float64.")
    if ds.shape[0] == 0:
        raise SlideFormatError(
            f"{path}: 'features' has no tiles (N = 0). The slide had no tissue tiles: remove "
            "it from the annotation file or re-run tiling with a lower tissue threshold."
        )
    if ds.shape[1] == 0:
        raise SlideFormatError(f"{path}: 'features' has feature dimension 0.")
    return ds


def _clam_patch_size_level0(attrs) -> int | None:
    if "patch_size" not in attrs:
        return None
    size = float(np.asarray(attrs["patch_size"]).reshape(-1)[0])
    if "downsample" in attrs:
        return int(round(size * float(np.asarray(attrs["downsample"]).reshape(-1)[0])))
    if int(np.asarray(attrs.get("patch_level", 0)).reshape(-1)[0]) == 0:
        return int(round(size))
    return None


def read_coords(f: h5py.File, path: Path, num_tiles: int) -> tuple[np.ndarray, str, int | None]:
    """Canonical (x, y) int64 coordinates, the layout name and the tile size in level-0 pixels (``None`` when the
    file does not say), checked against the ``num_tiles`` feature rows (validity of the values themselves:
    :func:`.coordinates.validate_coords`)."""
    if "coords" in f:
        ds, layout, yx = f["coords"], "clam", False
        if "patch_size_level0" in ds.attrs:
            layout = "trident"
    elif "coords_yx" in f:
        ds, layout, yx = f["coords_yx"], "seed", True
    else:
        raise SlideFormatError(
            f"{path}: no tile coordinates (expected a 'coords' (x, y) or 'coords_yx' (y, x) "
            f"dataset; found keys {sorted(f.keys())}). Save the tile coordinates next to "
            "the features."
        )
    name = ds.name.lstrip("/")
    if ds.ndim != 2 or ds.shape[1] != 2:
        raise SlideFormatError(f"{path}: '{name}' has shape {ds.shape}; expected [N, 2] level-0 pixel coordinates.")
    if ds.shape[0] != num_tiles:
        raise SlideFormatError(
            f"{path}: 'features' has {num_tiles} rows but '{name}' has {ds.shape[0]}; "
            "features and coordinates must describe the same tiles, row for row. Re-export "
            "both from the same extraction run."
        )
    if ds.dtype == np.float16:
        raise SlideFormatError(
            f"{path}: '{name}' is stored as float16, which cannot represent level-0 pixel "
            "coordinates above 2048 exactly (positions would alias). Store coordinates as "
            "int32/int64."
        )
    raw = ds[()]
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise SlideFormatError(f"{path}: '{name}' contains NaN/Inf values. Re-export the coordinates.")
        raw = np.floor(raw)  # floor(floor(c) / s) == floor(c / s) for c >= 0: positions are unchanged
    elif raw.dtype.kind not in "iu":
        raise SlideFormatError(f"{path}: '{name}' has dtype {raw.dtype}; expected integers.")
    coords = raw.astype(np.int64, copy=False)
    if yx:
        coords = coords[:, ::-1]
    coords = np.ascontiguousarray(coords)

    patch = None
    if "patch_size_level0" in ds.attrs:
        patch = int(np.asarray(ds.attrs["patch_size_level0"]).reshape(-1)[0])
    elif "patch_size_level0" in f.attrs:
        patch = int(np.asarray(f.attrs["patch_size_level0"]).reshape(-1)[0])
    elif layout == "clam":
        patch = _clam_patch_size_level0(ds.attrs)
    return coords, layout, patch


def read_slide(
    path: str | Path,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
    max_tiles: int | None = None,
    tile_sampling: str = "all",
    seed: int | None = None,
    nonfinite: Literal["raise", "drop"] = "raise",
    patch_size_level0: int | None = None,
) -> SlideFeatures:
    """Read one slide's tile features and coordinates, validated and in canonical form.

    Args:
        path: H5 file in the seed, CLAM or TRIDENT layout (fp16 or fp32 features).
        rows: read only these on-disk rows, returned **in the caller's order** (no spatial sort).
        max_tiles / tile_sampling / seed: cap the number of tiles (see
            :func:`.tile_sampling.sample_tile_indices`); only the chosen rows' features are read. Without
            ``rows``, tiles come back sorted row-major by (y, x).
        nonfinite: ``"raise"`` (default) on NaN/Inf features, or ``"drop"`` those tiles with a warning.
        patch_size_level0: the tile side in level-0 pixels, overriding what the file states (for files that state
            nothing, or state it wrongly). Without it: the file's attribute, else the coordinates' tile stride
            (:func:`.coordinates.resolve_patch_size`).

    Raises:
        SlideFormatError: on any violation of the data contract, naming the file, the problem and the fix; this
            includes a collapsed grid (many tiles in one grid cell: :func:`.coordinates.check_tile_grid`).
    """
    path = Path(path)
    with open_slide_file(path) as f:
        ds = features_dataset(f, path)
        num_tiles = int(ds.shape[0])
        coords, layout, stated = read_coords(f, path, num_tiles)
        order = validate_coords(coords, str(path))  # None: already row-major on disk
        patch, patch_source = resolve_patch_size(coords, stated, patch_size_level0, str(path))

        if rows is not None:
            disk_rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            bad = disk_rows[(disk_rows < 0) | (disk_rows >= num_tiles)]
            if bad.size:
                raise SlideFormatError(f"{path}: requested rows {bad[:5].tolist()} are outside 0..{num_tiles - 1}.")
            if disk_rows.size == 0:
                raise SlideFormatError(f"{path}: rows=[] selects no tile.")
        else:
            keep = sample_tile_indices(num_tiles, max_tiles, tile_sampling, seed)
            if order is None:
                disk_rows = None if keep.size == num_tiles else keep  # None: one contiguous read
            else:
                disk_rows = order[keep]

        features, row_sums = read_feature_rows(ds, disk_rows, path)
    coords_t = torch.from_numpy(coords if disk_rows is None else coords[disk_rows])

    finite = finite_rows(features, row_sums)
    if not bool(finite.all()):
        bad_pos = torch.nonzero(~finite).flatten()
        bad_rows = (bad_pos if disk_rows is None else torch.from_numpy(disk_rows)[bad_pos]).tolist()
        if nonfinite != "drop":
            raise SlideFormatError(
                f"{path}: {len(bad_rows)} tile(s) have NaN/Inf features (on-disk rows "
                f"{bad_rows[:5]}{'...' if len(bad_rows) > 5 else ''}), often fp16 overflow at "
                "extraction. Re-extract in fp32/bf16, or pass nonfinite='drop' "
                "(--skip-bad-tiles) to drop those tiles."
            )
        logger.warning("%s: dropping %d tile(s) with NaN/Inf features", path, len(bad_rows))
        features, coords_t = features[finite], coords_t[finite]
        if features.shape[0] == 0:
            raise SlideFormatError(f"{path}: every selected tile has NaN/Inf features; nothing is left.")
    return SlideFeatures(
        features=features,
        coords=coords_t,
        patch_size_level0=patch,
        path=str(path),
        source_layout=layout,
        patch_size_source=patch_source,
    )


def slide_num_tiles(path: str | Path) -> int:
    """Number of tiles in a slide file, reading only its metadata."""
    path = Path(path)
    with open_slide_file(path) as f:
        return int(features_dataset(f, path).shape[0])


# --------------------------------------------------------------------------------------------------- writing
def write_slide(
    path: str | Path,
    features: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor,
    *,
    layout: str = "seed",
    patch_size_level0: int | None = 256,
    dtype: str | np.dtype = "float16",
    level0_magnification: float = 20,
    target_magnification: float | None = None,
    extra_attributes: dict | None = None,
) -> Path:
    """Write tile ``features [N, D]`` and ``coords [N, 2]`` **(x, y)** in one of the three layouts.

    ``"seed"`` stores ``coords_yx`` (y, x); ``"clam"`` stores ``coords`` (x, y) without attributes;
    ``"trident"`` stores ``coords`` (x, y) with TRIDENT's attributes (``patch_size_level0``, ``patch_size`` at the
    target magnification, both magnifications …). A 40× scan tiled at 20× with 256-px tiles is
    ``patch_size_level0=512, level0_magnification=40, target_magnification=20``. ``extra_attributes`` are added to
    the ``coords`` attributes of the ``"trident"`` layout (``overlap``, ``level0_width`` / ``level0_height`` …).
    """
    _require_h5py()
    if layout not in SOURCE_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {SOURCE_LAYOUTS}.")
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    xy = coords.detach().cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    xy = xy.astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(dtype))
        if layout == "seed":
            f.create_dataset("coords_yx", data=xy[:, ::-1])
            if patch_size_level0 is not None:
                f.attrs["patch_size_level0"] = int(patch_size_level0)
        else:
            ds = f.create_dataset("coords", data=xy)
            if layout == "trident":
                size = int(patch_size_level0 or 256)
                target = level0_magnification if target_magnification is None else target_magnification
                ds.attrs.update(
                    {
                        "patch_size": int(round(size * target / level0_magnification)),
                        "patch_size_level0": size,
                        "level0_magnification": level0_magnification,
                        "target_magnification": target,
                        "overlap": 0,
                        "name": path.stem,
                        **(extra_attributes or {}),
                    }
                )
    return path


__all__ = [
    "SlideFeatures",
    "read_slide",
    "write_slide",
    "slide_num_tiles",
    "SOURCE_LAYOUTS",
    "open_slide_file",
    "features_dataset",
    "read_coords",
]
