"""Reading, validating, sampling and writing slide feature files (H5).

Three on-disk layouts are understood (see ``README.md`` → *Data contract*):

* ``"seed"``    — ``features [N, D]`` + ``coords_yx [N, 2]`` stored as (y, x);
* ``"clam"``    — ``features [N, D]`` + ``coords [N, 2]`` stored as (x, y); CLAM's coordinate attributes
  (``patch_size``, ``patch_level``, ``downsample``) are used when present;
* ``"trident"`` — ``features`` + ``coords`` (x, y) whose attributes include ``patch_size_level0``.

When a file has both ``coords`` and ``coords_yx``, ``coords`` wins (it is what every other tool writes).
Coordinates are returned in one canonical form: int64 ``(x, y)`` level-0 pixels. Tiles are returned in
**row-major order by (y, x)** (top row first, left to right), because LongNet's output depends on sequence
order and embeddings must be reproducible whatever order the extractor wrote.

This module is imported by the Hub-shipped processor, so it imports only stdlib, numpy, torch and
(lazily, inside a ``try``) h5py.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from .errors import SlideFormatError

try:  # optional at import time so the processor can be loaded as remote code without h5py
    import h5py
except ImportError:  # pragma: no cover - h5py is a declared dependency
    h5py = None

logger = logging.getLogger(__name__)

TileSampling = Literal["all", "uniform", "random"]
TILE_SAMPLING_STRATEGIES: tuple[str, ...] = ("all", "uniform", "random")
SOURCE_LAYOUTS: tuple[str, ...] = ("seed", "clam", "trident")

# A read touching at most this fraction of the rows uses a row selection; above it, reading everything and
# indexing in memory is faster than HDF5's per-row hyperslab selection.
_SELECTION_READ_MAX_FRACTION = 0.5
# Full reads of contiguous datasets go straight from the file into the float32 output, in pieces of about
# this many bytes (small enough to stay in the core's cache while they are converted and checked for NaN/Inf).
_READ_PIECE_BYTES = 2 << 20
# Below this many bytes a full read runs on the calling thread only (thread start-up would dominate).
_PARALLEL_READ_MIN_BYTES = 16 << 20
_MAX_READ_THREADS = 4


@dataclass
class SlideFeatures:
    """Tile features of one slide in the canonical form.

    Attributes:
        features: ``[N, D]`` float32 tile features.
        coords: ``[N, 2]`` int64 level-0 pixel coordinates, **(x, y)**, top-left corner of each tile.
        patch_size_level0: tile side in level-0 pixels when the file says so, else ``None``
            (see :func:`infer_tile_stride`).
        path: the file it came from (``None`` for in-memory slides).
        source_layout: ``"seed"``, ``"clam"``, ``"trident"`` or ``"memory"``.
    """

    features: torch.Tensor
    coords: torch.Tensor
    patch_size_level0: int | None = None
    path: str | None = None
    source_layout: str = "memory"

    @property
    def num_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def select(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> "SlideFeatures":
        """A new ``SlideFeatures`` holding only ``indices`` (in the given order)."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return SlideFeatures(self.features[index], self.coords[index], self.patch_size_level0, self.path,
                             self.source_layout)


# --------------------------------------------------------------------------------------------------- helpers
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


def sample_tile_indices(num_tiles: int, max_tiles: int | None, strategy: str = "uniform",
                        seed: int | None = None) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------------- reading
def _require_h5py() -> None:
    if h5py is None:
        raise ImportError("Reading slide files needs h5py: pip install h5py")


def _open(path: Path) -> "h5py.File":
    _require_h5py()
    if not path.exists():
        raise SlideFormatError(f"{path}: file not found. Check the h5_path column / h5_root (paths are resolved "
                               "against the annotation file's folder unless h5_root is given).")
    if path.is_dir():
        raise SlideFormatError(f"{path}: is a directory, expected an H5 feature file.")
    if not h5py.is_hdf5(path):
        raise SlideFormatError(f"{path}: not an HDF5 file (a .pt/.npy file renamed, or an incomplete download). "
                               "Re-export the tile features with h5py (datasets 'features' and 'coords').")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise SlideFormatError(f"{path}: HDF5 file cannot be opened ({err}); it is probably truncated or was "
                               "still being written. Re-run feature extraction for this slide.") from err


def _features_dataset(f: "h5py.File", path: Path) -> "h5py.Dataset":
    if "features" not in f or not isinstance(f["features"], h5py.Dataset):
        raise SlideFormatError(f"{path}: no 'features' dataset (found keys {sorted(f.keys())}). Store tile "
                               "features as a dataset named 'features' of shape [N, D].")
    ds = f["features"]
    if ds.ndim != 2:
        hint = " Drop the leading batch axis (features[0]) when writing." if ds.ndim == 3 and ds.shape[0] == 1 else ""
        raise SlideFormatError(f"{path}: 'features' has shape {ds.shape} (rank {ds.ndim}); expected rank 2 "
                               f"[N, D].{hint}")
    if ds.dtype.kind != "f":
        raise SlideFormatError(f"{path}: 'features' has dtype {ds.dtype}; expected float16/float32/float64.")
    if ds.shape[0] == 0:
        raise SlideFormatError(f"{path}: 'features' has no tiles (N = 0). The slide had no tissue tiles: remove "
                               "it from the annotation file or re-run tiling with a lower tissue threshold.")
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


def _read_coords(f: "h5py.File", path: Path, num_tiles: int) -> tuple[np.ndarray, str, int | None]:
    """Canonical (x, y) int64 coordinates, the layout name and the tile size in level-0 pixels."""
    if "coords" in f:
        ds, layout, yx = f["coords"], "clam", False
        if "patch_size_level0" in ds.attrs:
            layout = "trident"
    elif "coords_yx" in f:
        ds, layout, yx = f["coords_yx"], "seed", True
    else:
        raise SlideFormatError(f"{path}: no tile coordinates (expected a 'coords' (x, y) or 'coords_yx' (y, x) "
                               f"dataset; found keys {sorted(f.keys())}). Save the tile coordinates next to "
                               "the features.")
    name = ds.name.lstrip("/")
    if ds.ndim != 2 or ds.shape[1] != 2:
        raise SlideFormatError(f"{path}: '{name}' has shape {ds.shape}; expected [N, 2] level-0 pixel "
                               "coordinates.")
    if ds.shape[0] != num_tiles:
        raise SlideFormatError(f"{path}: 'features' has {num_tiles} rows but '{name}' has {ds.shape[0]}; "
                               "features and coordinates must describe the same tiles, row for row. Re-export "
                               "both from the same extraction run.")
    if ds.dtype == np.float16:
        raise SlideFormatError(f"{path}: '{name}' is stored as float16, which cannot represent level-0 pixel "
                               "coordinates above 2048 exactly (positions would alias). Store coordinates as "
                               "int32/int64.")
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
        raise SlideFormatError(f"{source}: {negative.size} tile(s) have negative coordinates (first: row {i}, "
                               f"(x, y) = {tuple(int(v) for v in coords[i])}). Coordinates must be level-0 pixel "
                               "offsets from the slide's top-left corner; shift them so the minimum is 0.")
    x, y = coords[:, 0], coords[:, 1]
    if bool(((y[1:] > y[:-1]) | ((y[1:] == y[:-1]) & (x[1:] > x[:-1]))).all()):
        return None  # strictly increasing in (y, x): sorted and without duplicates
    order = spatial_order(coords)
    sorted_xy = coords[order]
    same = np.flatnonzero((sorted_xy[1:] == sorted_xy[:-1]).all(axis=1))
    if same.size:
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise SlideFormatError(f"{source}: {same.size} duplicated tile coordinate(s) (e.g. rows {a} and {b} both "
                               f"at (x, y) = {tuple(int(v) for v in coords[a])}). Each tile must appear once: "
                               "deduplicate at extraction, or check that coordinates are level-0 pixels and "
                               "not grid indices at a coarser level.")
    return order


def _contiguous_offset(ds: "h5py.Dataset") -> int | None:
    """Byte offset of the dataset in its file when its bytes can be read directly (contiguous, uncompressed,
    plain POSIX file driver), else ``None``."""
    if ds.chunks is not None or ds.compression is not None or ds.file.driver not in ("sec2", None):
        return None
    return ds.id.get_offset()


def _memmap_rows(ds: "h5py.Dataset", rows: np.ndarray) -> np.ndarray | None:
    """Gather ``rows`` straight from the file when the dataset is stored contiguously and uncompressed.

    HDF5 builds one hyperslab per selected row (slow for thousands of rows); a read-only memory map of the
    dataset's bytes gathers them at memory speed. Returns ``None`` when the layout does not allow it.
    """
    offset = _contiguous_offset(ds)
    if offset is None:
        return None
    mapped = np.memmap(ds.file.filename, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
    try:
        block = mapped[rows]  # fancy indexing copies: nothing refers to the map afterwards
    finally:
        del mapped
    return block if block.dtype.isnative else block.astype(block.dtype.newbyteorder("="))


def _read_into(file, buffer: np.ndarray, offset: int) -> int:
    """Fill ``buffer`` with the file's bytes from ``offset``; returns how many bytes there were (short at EOF)."""
    view = memoryview(buffer).cast("B")
    file.seek(offset)
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])  # releases the GIL
        if not got:
            break
        done += got
    return done


def _read_all_rows_direct(ds: "h5py.Dataset", path: Path) -> tuple[torch.Tensor, np.ndarray] | None:
    """Every row of a contiguous float16/float32 dataset as a float32 ``[N, D]`` tensor, plus each row's sum.

    Why not ``ds[()]``: h5py copies the bytes on one core, and converting to float32 and checking for NaN/Inf
    are two more passes over memory. Here the file is read in cache-sized pieces that are converted and summed
    (the NaN/Inf check) while still in cache, by up to ``torch.get_num_threads()`` threads, each with its own
    file handle (reads and sums release the GIL; DataLoader workers run with one thread, so one here).
    Returns ``None`` when the dataset's layout does not allow a direct read.
    """
    offset = _contiguous_offset(ds)
    if offset is None or not ds.dtype.isnative or ds.dtype.type not in (np.float32, np.float16):
        return None
    num_rows, dim = (int(v) for v in ds.shape)
    row_bytes = dim * ds.dtype.itemsize
    out = np.empty((num_rows, dim), dtype=np.float32)  # NumPy allocation: huge pages (see _as_float32)
    row_sums = np.empty(num_rows, dtype=np.float32)
    piece_rows = max(1, _READ_PIECE_BYTES // (dim * 4))
    pieces = [(start, min(start + piece_rows, num_rows)) for start in range(0, num_rows, piece_rows)]
    threads = 1
    if num_rows * row_bytes >= _PARALLEL_READ_MIN_BYTES:
        threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, _MAX_READ_THREADS, len(pieces)))

    def read_pieces(first: int) -> None:
        staging = None if ds.dtype.type is np.float32 else np.empty((piece_rows, dim), dtype=ds.dtype)
        with open(ds.file.filename, "rb", buffering=0) as file:
            for start, stop in pieces[first::threads]:
                target = out[start:stop] if staging is None else staging[:stop - start]  # [rows, D]
                if _read_into(file, target, offset + start * row_bytes) != target.nbytes:
                    raise SlideFormatError(f"{path}: 'features' is truncated (rows {start}..{stop - 1} could not "
                                           "be read). The file was cut short; re-run feature extraction for it.")
                if staging is not None:
                    torch.from_numpy(out[start:stop]).copy_(torch.from_numpy(target))
                with np.errstate(over="ignore", invalid="ignore"):  # overflowing sums are re-checked exactly
                    np.add.reduce(out[start:stop], axis=1, out=row_sums[start:stop])

    if threads == 1:
        read_pieces(0)
    else:
        with ThreadPoolExecutor(threads - 1, thread_name_prefix="read_slide") as pool:
            helpers = [pool.submit(read_pieces, k) for k in range(1, threads)]
            read_pieces(0)
            for helper in helpers:
                helper.result()
    return torch.from_numpy(out), row_sums


def _read_feature_rows(ds: "h5py.Dataset", rows: np.ndarray | None,
                       path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
    """Float32 rows ``rows`` (any order, duplicates allowed) of ``ds``, or all rows, touching only what it
    needs; plus the rows' sums when the read computed them on the way (``None`` otherwise)."""
    if rows is None or rows.size > _SELECTION_READ_MAX_FRACTION * ds.shape[0]:
        direct = _read_all_rows_direct(ds, path)
        if direct is not None:
            features, row_sums = direct
            if rows is None:
                return features, row_sums
            return features[torch.from_numpy(rows)], row_sums[rows]
        if rows is None:
            return _as_float32(ds[()]), None
    unique, inverse = np.unique(rows, return_inverse=True)
    if unique.size > _SELECTION_READ_MAX_FRACTION * ds.shape[0]:
        block = ds[()][unique]
    else:
        block = _memmap_rows(ds, unique)
        if block is None:
            block = ds[unique]  # h5py needs increasing, unique indices
    if not (unique.size == rows.size and np.array_equal(unique, rows)):
        block = block[inverse]
    return _as_float32(block), None


def _as_float32(array: np.ndarray) -> torch.Tensor:
    """``[N, D]`` float32 tensor of ``array`` (no copy when it already is float32).

    The output buffer is allocated by NumPy, which asks the kernel for transparent huge pages on large
    arrays; ``Tensor.float()`` would fault it in 4 KiB pages, which costs more than the conversion itself.
    """
    if array.dtype == np.float32:
        return torch.from_numpy(array)
    out = torch.from_numpy(np.empty(array.shape, dtype=np.float32))
    out.copy_(torch.from_numpy(array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))))
    return out


def _finite_rows(features: torch.Tensor, row_sums: np.ndarray | None = None) -> torch.Tensor:
    """``[N]`` bool: rows without NaN/Inf. A row sum is non-finite iff some entry is (or, for huge finite
    values, the sum overflowed — those rows are re-checked exactly), and it avoids an ``[N, D]`` bool temporary.
    ``row_sums`` are used when the read already computed them."""
    sums = features.sum(dim=1) if row_sums is None else torch.from_numpy(row_sums)  # [N]
    finite = torch.isfinite(sums)
    if not bool(finite.all()):
        suspects = torch.nonzero(~finite).flatten()
        finite[suspects] = torch.isfinite(features[suspects]).all(dim=1)
    return finite


def read_slide(path: str | Path, *, rows: Sequence[int] | np.ndarray | None = None, max_tiles: int | None = None,
               tile_sampling: str = "all", seed: int | None = None,
               nonfinite: Literal["raise", "drop"] = "raise") -> SlideFeatures:
    """Read one slide's tile features and coordinates, validated and in canonical form.

    Args:
        path: H5 file in the seed, CLAM or TRIDENT layout (fp16 or fp32 features).
        rows: read only these on-disk rows, returned **in the caller's order** (no spatial sort).
        max_tiles / tile_sampling / seed: cap the number of tiles (see :func:`sample_tile_indices`); only the
            chosen rows' features are read. Without ``rows``, tiles come back sorted row-major by (y, x).
        nonfinite: ``"raise"`` (default) on NaN/Inf features, or ``"drop"`` those tiles with a warning.

    Raises:
        SlideFormatError: on any violation of the data contract, naming the file, the problem and the fix.
    """
    path = Path(path)
    with _open(path) as f:
        ds = _features_dataset(f, path)
        num_tiles = int(ds.shape[0])
        coords, layout, patch = _read_coords(f, path, num_tiles)
        order = validate_coords(coords, str(path))  # None: already row-major on disk

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

        features, row_sums = _read_feature_rows(ds, disk_rows, path)
    coords_t = torch.from_numpy(coords if disk_rows is None else coords[disk_rows])

    finite = _finite_rows(features, row_sums)
    if not bool(finite.all()):
        bad_pos = torch.nonzero(~finite).flatten()
        bad_rows = (bad_pos if disk_rows is None else torch.from_numpy(disk_rows)[bad_pos]).tolist()
        if nonfinite != "drop":
            raise SlideFormatError(f"{path}: {len(bad_rows)} tile(s) have NaN/Inf features (on-disk rows "
                                   f"{bad_rows[:5]}{'...' if len(bad_rows) > 5 else ''}), often fp16 overflow at "
                                   "extraction. Re-extract in fp32/bf16, or pass nonfinite='drop' "
                                   "(--skip-bad-tiles) to drop those tiles.")
        logger.warning("%s: dropping %d tile(s) with NaN/Inf features", path, len(bad_rows))
        features, coords_t = features[finite], coords_t[finite]
        if features.shape[0] == 0:
            raise SlideFormatError(f"{path}: every selected tile has NaN/Inf features; nothing is left.")
    return SlideFeatures(features=features, coords=coords_t, patch_size_level0=patch, path=str(path),
                         source_layout=layout)


def slide_num_tiles(path: str | Path) -> int:
    """Number of tiles in a slide file, reading only its metadata."""
    path = Path(path)
    with _open(path) as f:
        return int(_features_dataset(f, path).shape[0])


# --------------------------------------------------------------------------------------------------- writing
def write_slide(path: str | Path, features: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor, *,
                layout: str = "seed", patch_size_level0: int | None = 256,
                dtype: str | np.dtype = "float16") -> Path:
    """Write tile ``features [N, D]`` and ``coords [N, 2]`` **(x, y)** in one of the three layouts.

    ``"seed"`` stores ``coords_yx`` (y, x); ``"clam"`` stores ``coords`` (x, y) without attributes;
    ``"trident"`` stores ``coords`` (x, y) with TRIDENT's attributes (``patch_size_level0`` …).
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
                ds.attrs.update({"patch_size": size, "patch_size_level0": size, "level0_magnification": 20,
                                 "target_magnification": 20, "overlap": 0, "name": path.stem})
    return path


__all__ = [
    "SlideFeatures", "read_slide", "write_slide", "slide_num_tiles", "sample_tile_indices", "spatial_order",
    "infer_tile_stride", "validate_coords", "TILE_SAMPLING_STRATEGIES", "SOURCE_LAYOUTS",
]
