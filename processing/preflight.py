"""Pre-flight check: validate every slide of a dataset *before* the first training step.

A bad H5 file found at step 40,000 costs hours; this pass opens every distinct slide once (metadata and
coordinates, and — with ``check_values`` — the feature values in bounded chunks), and reports every problem
at once with the annotation row, the file, what is wrong and the fix. With ``skip_bad_samples`` the bad rows
are dropped and counted instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .annotations import row_patch_size
from .coordinates import infer_tile_stride, resolve_patch_size, validate_coords
from .errors import SlideFormatError, WSIDataError
from .feature_reader import as_float32, finite_rows
from .slide_io import features_dataset, open_slide_file, read_coords

logger = logging.getLogger(__name__)

_VALUE_SCAN_ROWS = 8192  # rows per chunk when scanning features for NaN/Inf (bounded memory)
_MAX_LISTED = 50


def check_grid(coords: np.ndarray, patch_size_level0: int, slide_ngrids: int, source: str) -> None:
    """Raise when the tiles' grid cells ``floor(coords / patch_size_level0)`` leave the encoder's
    ``0..slide_ngrids-1`` position grid.

    Upstream GigaPath silently aliases such tiles onto other rows of its position table (or hits a device
    assert); the message names the tile and the fix.
    """
    cells = coords // patch_size_level0  # [N, 2]
    outside = np.flatnonzero((cells >= slide_ngrids).any(axis=1) | (cells < 0).any(axis=1))
    if not outside.size:
        return
    i = int(outside[0])
    stride = infer_tile_stride(coords)
    stride_note = (
        f" The tiles are {stride} px apart but the tile side used is {patch_size_level0} px: if {stride} is the "
        f"level-0 tile side, pass patch_size_level0={stride} (--patch_size_level0)."
        if stride and stride > patch_size_level0
        else ""
    )
    raise SlideFormatError(
        f"{source}: {outside.size} tile(s) fall outside the position grid 0..{slide_ngrids - 1} at "
        f"patch_size_level0 {patch_size_level0} (first: row {i}, (x, y) = {tuple(int(v) for v in coords[i])} → "
        f"grid cell {tuple(int(v) for v in cells[i])}).{stride_note} Otherwise the slide is larger than the "
        f"model's grid covers ({slide_ngrids} tiles per side): use a model with a larger slide_ngrids."
    )


def inspect_slide(
    path: str | Path,
    *,
    feature_dim: int | None = None,
    tile_size: int | None = None,
    slide_ngrids: int | None = None,
    check_values: bool = True,
    patch_size_level0: int | None = None,
) -> int:
    """Validate one slide file without loading it whole; returns its tile count.

    Raises :class:`SlideFormatError` for every contract violation :func:`processing.read_slide` would raise
    (collapsed grids included), plus a wrong feature dimension and grid cells outside the encoder's position grid
    (``tile_size``: the model's, used when the slide's own tile side is unknown; ``patch_size_level0``: an
    override of the file's).
    """
    path = Path(path)
    with open_slide_file(path) as f:
        ds = features_dataset(f, path)
        num_tiles, dim = (int(v) for v in ds.shape)
        coords, _, stated = read_coords(f, path, num_tiles)
        validate_coords(coords, str(path))
        patch, _ = resolve_patch_size(coords, stated, patch_size_level0, str(path), default=tile_size)
        if feature_dim is not None and dim != feature_dim:
            raise SlideFormatError(
                f"{path}: tile features have dimension {dim} but the model expects "
                f"{feature_dim}. Use features from the model's tile encoder, or configure the "
                f"model's input dimension as {dim}."
            )
        if patch is not None and slide_ngrids is not None:
            check_grid(coords, patch, slide_ngrids, str(path))
        if check_values:
            for start in range(0, num_tiles, _VALUE_SCAN_ROWS):
                finite = finite_rows(as_float32(ds[start : start + _VALUE_SCAN_ROWS]))  # [rows]
                if not bool(finite.all()):
                    rows = (torch.nonzero(~finite).flatten() + start).tolist()
                    raise SlideFormatError(
                        f"{path}: tile(s) with NaN/Inf features (on-disk rows {rows[:5]}), "
                        "often fp16 overflow at extraction. Re-extract in fp32/bf16, or drop "
                        "those tiles when reading (nonfinite='drop')."
                    )
    return num_tiles


@dataclass
class PreflightReport:
    """What the pre-flight pass found: rows checked, rows kept, and every problem with its row number."""

    num_rows: int
    kept_rows: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    num_slides: int = 0
    num_tiles: int = 0

    @property
    def num_skipped(self) -> int:
        return self.num_rows - len(self.kept_rows)

    def summary(self) -> str:
        return (
            f"pre-flight: {self.num_rows} rows, {self.num_slides} valid distinct slides ({self.num_tiles} tiles); "
            f"{self.num_skipped} row(s) skipped"
        )


def _process_rank_and_count() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def preflight_check(
    rows: Iterable[dict[str, Any]] | Any,
    *,
    feature_dim: int | None = None,
    tile_size: int | None = None,
    slide_ngrids: int | None = None,
    require_case_id: bool = False,
    check_values: bool = True,
    skip_bad_samples: bool = False,
    source: str = "dataset",
    progress: bool = True,
    row_check: Callable[[dict[str, Any]], Any] | None = None,
    patch_size_level0: int | None = None,
) -> PreflightReport:
    """Check every row's slide (each distinct file once) before training; raise or skip.

    Args:
        rows: a ``datasets.Dataset`` from :func:`processing.load_annotations` (or any iterable of row dicts with
            ``h5_path`` and optionally ``row`` / ``case_id``).
        feature_dim / tile_size / slide_ngrids: the model's input contract (``None`` skips that check).
        require_case_id: the loss groups by case: rows without a ``case_id`` are errors.
        check_values: also scan feature values for NaN/Inf (reads every file once, in bounded chunks). In a
            distributed run (``torch.distributed`` initialised) the processes split the distinct files between them
            and exchange their findings, so every file is read once in all and every process gets the same report.
        skip_bad_samples: drop bad rows (logged and counted) instead of raising.
        row_check: called on every row; a :class:`WSIDataError` it raises (e.g. a prompt that cannot be built)
            makes the row bad like a broken slide does.
        patch_size_level0: override of every file's tile side in level-0 pixels (a row's ``patch_size_level0``
            column wins), as the collators use it.

    Raises:
        WSIDataError: listing every bad row, unless ``skip_bad_samples``.
    """
    from tqdm.auto import tqdm

    rows = list(rows)
    report = PreflightReport(num_rows=len(rows))
    paths = list(dict.fromkeys(str(row.get("h5_path") or "") for row in rows))
    patch_sizes: dict[str, int | None] = {}
    for row in rows:
        try:
            patch_sizes.setdefault(str(row.get("h5_path") or ""), row_patch_size(row, patch_size_level0))
        except WSIDataError:
            patch_sizes.setdefault(str(row.get("h5_path") or ""), None)  # reported with the row below
    rank, world = _process_rank_and_count()
    mine = paths[rank::world]  # in a distributed run each process checks its share of the distinct files
    verdicts: dict[str, tuple[int, str | None]] = {}
    failure = None
    try:
        for path in tqdm(mine, desc=f"pre-flight {source}", unit="slide", disable=not progress or len(mine) < 50):
            try:
                verdicts[path] = (
                    inspect_slide(
                        path,
                        feature_dim=feature_dim,
                        tile_size=tile_size,
                        slide_ngrids=slide_ngrids,
                        check_values=check_values,
                        patch_size_level0=patch_sizes[path],
                    ),
                    None,
                )
            except WSIDataError as err:
                verdicts[path] = (0, str(err))
            except OSError as err:  # unreadable (permissions, I/O error): a problem of that file, not of the run
                verdicts[path] = (0, f"{path}: cannot be read ({err}). Check the file and its permissions.")
    except Exception as err:  # a bug, not a data problem: raised on every process after the exchange (no hang)
        if world == 1:
            raise
        failure = f"{type(err).__name__}: {err}"
    if world > 1:
        import torch.distributed as dist

        shares: list[tuple[dict, str | None] | None] = [None] * world
        dist.all_gather_object(shares, (verdicts, failure))
        failures = [f"process {r}: {share[1]}" for r, share in enumerate(shares) if share and share[1]]
        if failures:
            raise RuntimeError(f"pre-flight {source} failed: " + "; ".join(failures))
        verdicts = {path: verdict for share in shares if share for path, verdict in share[0].items()}
        logger.info(
            "pre-flight %s: process %d of %d checked %d of %d slide files", source, rank, world, len(mine), len(paths)
        )
    row_bar = tqdm(
        rows, desc=f"pre-flight {source} rows", unit="row", disable=not progress or row_check is None or len(rows) < 50
    )
    for index, row in enumerate(row_bar):
        label = f"row {row.get('row', index + 1)}"
        problems = []
        if require_case_id and not str(row.get("case_id") or "").strip():
            problems.append("case_id is missing but the loss groups slides by case (fill the case_id column)")
        path = str(row.get("h5_path") or "")
        tiles, error = verdicts[path]
        if error:
            problems.append(error)
        try:
            row_patch_size(row)
        except WSIDataError as err:
            problems.append(str(err))
        if row_check is not None:
            try:
                row_check(row)
            except WSIDataError as err:
                problems.append(str(err))
        if problems:
            report.problems.append(f"{label}: " + "; ".join(problems))
        else:
            report.kept_rows.append(index)
    report.num_slides = sum(1 for _, err in verdicts.values() if err is None)
    report.num_tiles = sum(t for t, err in verdicts.values() if err is None)
    if report.problems:
        listed = "\n  ".join(report.problems[:_MAX_LISTED])
        more = f"\n  ... and {len(report.problems) - _MAX_LISTED} more" if len(report.problems) > _MAX_LISTED else ""
        message = (
            f"{source}: {len(report.problems)} of {len(rows)} row(s) failed the pre-flight check:\n  "
            f"{listed}{more}\nFix them, or pass --skip_bad_samples to train on the rest."
        )
        if not skip_bad_samples:
            raise WSIDataError(message)
        logger.warning("%s", message)
        if not report.kept_rows:
            raise WSIDataError(f"{source}: every row failed the pre-flight check; nothing to train on.")
    logger.info("%s", report.summary())
    return report


def slide_contract(slide_config: Any) -> dict[str, int | None]:
    """The input contract of a slide tower config for :func:`preflight_check`: ``feature_dim`` (``input_dim``) and,
    for towers with a position grid (the LongNet slide encoder), ``tile_size`` and ``slide_ngrids``."""
    grid = getattr(slide_config, "tile_size", None), getattr(slide_config, "slide_ngrids", None)
    return {
        "feature_dim": getattr(slide_config, "input_dim", None),
        "tile_size": grid[0] if None not in grid else None,
        "slide_ngrids": grid[1] if None not in grid else None,
    }


def common_feature_dim(paths: Iterable[str | Path], limit: int = 32) -> int:
    """The most frequent tile-feature dimension among the first ``limit`` readable slide files (metadata only).

    Sizes a new slide tower from the data without trusting the first row alone (it may be the one broken file).
    """
    dims: dict[int, int] = {}
    first_error: WSIDataError | None = None
    for path in list(dict.fromkeys(str(p) for p in paths))[:limit]:
        try:
            with open_slide_file(Path(path)) as f:
                dim = int(features_dataset(f, Path(path)).shape[1])
        except WSIDataError as err:
            first_error = first_error or err
            continue
        dims[dim] = dims.get(dim, 0) + 1
    if not dims:
        raise first_error or WSIDataError("no slide files to infer the tile feature dimension from.")
    return max(dims, key=dims.get)


def preflight_dataset(dataset: Any, *, source: str, skip_bad_samples: bool = False, **checks: Any) -> Any:
    """:func:`preflight_check` over a ``datasets.Dataset``; returns it without the bad rows when skipping.

    The training scripts call this before building the Trainer, so every problem surfaces before step 1; with
    ``skip_bad_samples`` the skipped rows are logged (each with its reason) and counted.
    """
    report = preflight_check(dataset, source=source, skip_bad_samples=skip_bad_samples, **checks)
    if report.num_skipped:
        logger.warning(
            "%s: skipped %d of %d row(s) that failed the pre-flight check (--skip_bad_samples)",
            source,
            report.num_skipped,
            report.num_rows,
        )
        dataset = dataset.select(report.kept_rows)
    return dataset


__all__ = [
    "preflight_check",
    "preflight_dataset",
    "inspect_slide",
    "check_grid",
    "slide_contract",
    "common_feature_dim",
    "PreflightReport",
]
