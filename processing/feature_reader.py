"""Float32 rows of an H5 ``features`` dataset, read touching only what is needed, and the NaN/Inf row check.

* full reads of contiguous, uncompressed float16/float32 datasets go straight from the file into the float32
  output, in cache-sized pieces, on up to ``torch.get_num_threads()`` threads (:func:`read_feature_rows`);
* sampled reads of such datasets gather the chosen rows through a read-only memory map; chunked or compressed
  datasets fall back to h5py's row selection;
* :func:`finite_rows` finds the rows holding NaN/Inf without an ``[N, D]`` temporary.

Hub-shipped with the processor: imports only stdlib, numpy, torch, sibling modules and (inside a ``try``) h5py;
the datasets come in as h5py objects opened by the caller.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import SlideFormatError

try:  # for the annotations only (the datasets come from the caller); optional, as in slide_io
    import h5py
except ImportError:  # pragma: no cover - h5py is a declared dependency
    h5py = None

# A read touching at most this fraction of the rows uses a row selection; above it, reading everything and
# indexing in memory is faster than HDF5's per-row hyperslab selection.
_SELECTION_READ_MAX_FRACTION = 0.5
# Full reads of contiguous datasets go straight from the file into the float32 output, in pieces of about
# this many bytes (small enough to stay in the core's cache while they are converted and checked for NaN/Inf).
_READ_PIECE_BYTES = 2 << 20
# Below this many bytes a full read runs on the calling thread only (thread start-up would dominate).
_PARALLEL_READ_MIN_BYTES = 16 << 20
_MAX_READ_THREADS = 4


def _contiguous_offset(ds: h5py.Dataset) -> int | None:
    """Byte offset of the dataset in its file when its bytes can be read directly (contiguous, uncompressed,
    plain POSIX file driver), else ``None``."""
    if ds.chunks is not None or ds.compression is not None or ds.file.driver not in ("sec2", None):
        return None
    return ds.id.get_offset()


def _memmap_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray | None:
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


def _read_all_rows_direct(ds: h5py.Dataset, path: Path) -> tuple[torch.Tensor, np.ndarray] | None:
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
    out = np.empty((num_rows, dim), dtype=np.float32)  # NumPy allocation: huge pages (see as_float32)
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
                target = out[start:stop] if staging is None else staging[: stop - start]  # [rows, D]
                if _read_into(file, target, offset + start * row_bytes) != target.nbytes:
                    raise SlideFormatError(
                        f"{path}: 'features' is truncated (rows {start}..{stop - 1} could not "
                        "be read). The file was cut short; re-run feature extraction for it."
                    )
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


def read_feature_rows(ds: h5py.Dataset, rows: np.ndarray | None, path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
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
            return as_float32(ds[()]), None
    unique, inverse = np.unique(rows, return_inverse=True)
    if unique.size > _SELECTION_READ_MAX_FRACTION * ds.shape[0]:
        block = ds[()][unique]
    else:
        block = _memmap_rows(ds, unique)
        if block is None:
            block = ds[unique]  # h5py needs increasing, unique indices
    if not (unique.size == rows.size and np.array_equal(unique, rows)):
        block = block[inverse]
    return as_float32(block), None


def as_float32(array: np.ndarray) -> torch.Tensor:
    """``[N, D]`` float32 tensor of ``array`` (no copy when it already is float32).

    The output buffer is allocated by NumPy, which asks the kernel for transparent huge pages on large
    arrays; ``Tensor.float()`` would fault it in 4 KiB pages, which costs more than the conversion itself.
    """
    if array.dtype == np.float32:
        return torch.from_numpy(array)
    out = torch.from_numpy(np.empty(array.shape, dtype=np.float32))
    out.copy_(torch.from_numpy(array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))))
    return out


def finite_rows(features: torch.Tensor, row_sums: np.ndarray | None = None) -> torch.Tensor:
    """``[N]`` bool: rows without NaN/Inf. A row sum is non-finite iff some entry is (or, for huge finite
    values, the sum overflowed — those rows are re-checked exactly), and it avoids an ``[N, D]`` bool temporary.
    ``row_sums`` are used when the read already computed them."""
    sums = features.sum(dim=1) if row_sums is None else torch.from_numpy(row_sums)  # [N]
    finite = torch.isfinite(sums)
    if not bool(finite.all()):
        suspects = torch.nonzero(~finite).flatten()
        finite[suspects] = torch.isfinite(features[suspects]).all(dim=1)
    return finite


__all__ = ["read_feature_rows", "as_float32", "finite_rows"]
