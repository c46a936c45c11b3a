"""Raw slides → tile-feature H5 files: segmentation, tiling, encoding, as a resumable batch job.

Per slide (:func:`extract_slide`): thumbnail → tissue mask (GeoJSON + QC PNG) → tile grid at the target
magnification → tiles read by DataLoader workers while the encoder runs → ``<out>/<slide>.h5`` in TRIDENT's layout
(``features [T, D]``, ``coords [T, 2]`` level-0 (x, y) with ``patch_size_level0``, both magnifications, ``overlap``,
level-0 width / height), which :func:`processing.read_slide` and every training command read as they are.

The job (:func:`extract_features`): completed slides are skipped (a file exists only once it is complete: written
under a temporary name, then renamed), so a killed run resumes where it stopped; bad slides (unreadable, no tissue,
no magnification) are reported by name and reason in ``<out>/extraction_report.csv`` and never stop the others
unless asked; under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) each process takes every ``WORLD_SIZE``-th slide.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import SlideFormatError
from .slide_io import write_slide
from .tile_encoders import TileEncoder, TilePreprocessor
from .tiling import TileGrid, tile_grid
from .tissue_segmentation import SegmentationOptions, save_qc_thumbnail, segment_tissue
from .whole_slide import SLIDE_SUFFIXES, open_slide

logger = logging.getLogger(__name__)

REPORT_NAME = "extraction_report.csv"
STATUS_DIR = "status"  # one JSON per slide (done / failed), merged into the report


@dataclass
class ExtractionOptions:
    """How slides are tiled and encoded (see :func:`extract_slide`)."""

    target_magnification: float = 20.0
    patch_size: int = 256
    overlap: int = 0
    min_tissue_fraction: float = 0.25
    level0_magnification: float | None = None  # override for slides that state no magnification
    mpp: float | None = None  # override of the slide's µm per pixel
    thumbnail_size: int = 2048
    batch_size: int = 64
    num_workers: int = 2
    feature_dtype: str = "float32"
    save_qc: bool = True
    segmentation: SegmentationOptions = field(default_factory=SegmentationOptions)


@dataclass
class SlideResult:
    """One slide's outcome, as the report lists it."""

    slide: str
    path: str
    status: str  # "done", "skipped" (already complete) or "failed"
    num_tiles: int = 0
    seconds: float = 0.0
    tiles_per_second: float = 0.0
    error: str = ""
    output: str = ""


class NoTissueError(SlideFormatError):
    """A slide without any tile that passes the tissue filter."""


class TileDataset(Dataset):
    """Tiles of one slide, read (and preprocessed) in DataLoader workers; each worker opens its own handle."""

    def __init__(self, path: str, coords: np.ndarray, grid: TileGrid, preprocess: TilePreprocessor, overrides: dict):
        self.path, self.coords, self.grid, self.preprocess, self.overrides = path, coords, grid, preprocess, overrides
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.path, **self.overrides)
        x, y = self.coords[index]
        tile = self._slide.read_tile(int(x), int(y), self.grid.patch_size_level0, self.grid.patch_size)
        return self.preprocess(tile)


@contextlib.contextmanager
def encoder_threads(encoder: TileEncoder, num_workers: int):
    """On a CPU, leave one core per DataLoader worker: the encoder's intra-op threads otherwise spin on the cores
    the workers read tiles on (measured on 2 cores: reading-bound extraction 1.1× → see ``benchmark.py extract``)."""
    if encoder.device.type != "cpu" or num_workers <= 0:
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # torchrun ranks share the machine
    torch.set_num_threads(max(1, min(before, cores - num_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def output_path(output_dir: str | Path, slide_path: str | Path) -> Path:
    return Path(output_dir) / f"{Path(slide_path).stem}.h5"


def extract_slide(
    slide_path: str | Path, output_dir: str | Path, encoder: TileEncoder, options: ExtractionOptions | None = None
) -> SlideResult:
    """Segment, tile and encode one slide into ``<output_dir>/<slide>.h5`` (atomically); see the module docstring."""
    from tqdm.auto import tqdm

    options = options or ExtractionOptions()
    start = time.perf_counter()
    output_dir = Path(output_dir)
    overrides = {"level0_magnification": options.level0_magnification, "mpp": options.mpp}
    slide = open_slide(slide_path, **overrides)
    try:
        thumbnail, downsample = slide.thumbnail(options.thumbnail_size)
        mpp = slide.mpp or 10.0 / slide.level0_magnification
        tissue = segment_tissue(thumbnail, downsample, mpp, options.segmentation)
        grid = tile_grid(
            slide.width,
            slide.height,
            slide.level0_magnification,
            options.target_magnification,
            options.patch_size,
            options.overlap,
            tissue,
            options.min_tissue_fraction,
        )
    finally:
        slide.close()
    name = Path(slide_path).stem
    if options.save_qc:
        (output_dir / "segmentation").mkdir(parents=True, exist_ok=True)
        tissue.save_geojson(output_dir / "segmentation" / f"{name}.geojson")
        save_qc_thumbnail(output_dir / "segmentation" / f"{name}.png", thumbnail, tissue, grid.coords,
                          grid.patch_size_level0)  # fmt: skip
    if not len(grid.coords):
        raise NoTissueError(
            f"{slide_path}: no tile has ≥ {options.min_tissue_fraction:.0%} tissue (tissue covers "
            f"{tissue.tissue_fraction:.1%} of the thumbnail); see segmentation/{name}.png, or lower "
            "--min_tissue_fraction / --min_saturation."
        )
    loader = DataLoader(
        TileDataset(str(slide_path), grid.coords, grid, encoder.preprocess, overrides),
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        persistent_workers=False,
        pin_memory=encoder.device.type == "cuda",
    )
    features = []
    with (
        encoder_threads(encoder, options.num_workers),
        tqdm(total=len(grid.coords), desc=name, unit="tile", leave=False) as bar,
    ):
        for batch in loader:
            features.append(encoder(batch).cpu())  # [b, D]
            bar.update(len(batch))
    feats = torch.cat(features).numpy()  # [T, D]
    final = output_path(output_dir, slide_path)
    partial = final.with_name(f".{final.name}.partial")
    write_slide(
        partial,
        feats,
        grid.coords,
        layout="trident",
        patch_size_level0=grid.patch_size_level0,
        dtype=options.feature_dtype,
        level0_magnification=grid.level0_magnification,
        target_magnification=grid.target_magnification,
        extra_attributes={
            "overlap": grid.overlap,
            "level0_width": grid.level0_width,
            "level0_height": grid.level0_height,
            "name": name,
            "encoder": encoder.name,
        },
    )
    os.replace(partial, final)  # complete or absent: a killed run leaves no truncated file
    seconds = time.perf_counter() - start
    return SlideResult(name, str(slide_path), "done", len(feats), round(seconds, 2), round(len(feats) / seconds, 1),
                       output=str(final))  # fmt: skip


def list_slides(slides: str | Path | Sequence[str | Path]) -> list[Path]:
    """Slide files of a folder (by suffix, sorted), of a CSV with a ``slide_path`` (or ``path``) column, or a list."""
    if isinstance(slides, (str, Path)):
        source = Path(slides)
        if source.is_dir():
            return sorted(p for p in source.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        if source.suffix.lower() == ".csv":
            with source.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            column = next((c for c in ("slide_path", "path", "wsi") if rows and c in rows[0]), None)
            if column is None:
                raise ValueError(f"{source}: a slide list CSV needs a 'slide_path' column (one slide file per row).")
            return [p if p.is_absolute() else source.parent / p for p in (Path(r[column]) for r in rows)]
        return [source]
    return [Path(s) for s in slides]


def _write_status(output_dir: Path, result: SlideResult) -> None:
    status_dir = output_dir / STATUS_DIR
    status_dir.mkdir(parents=True, exist_ok=True)
    tmp = status_dir / f".{result.slide}.json.partial"
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, status_dir / f"{result.slide}.json")


def write_report(output_dir: str | Path) -> Path:
    """Merge the per-slide status files into ``<output_dir>/extraction_report.csv`` (every process may call it)."""
    output_dir = Path(output_dir)
    rows = [json.loads(p.read_text()) for p in sorted((output_dir / STATUS_DIR).glob("*.json"))]
    report = output_dir / REPORT_NAME
    tmp = output_dir / f".{REPORT_NAME}.{os.getpid()}.partial"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in SlideResult.__dataclass_fields__.values()])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, report)
    return report


def extract_features(
    slides: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    encoder: TileEncoder,
    options: ExtractionOptions | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    stop_on_error: bool = False,
) -> list[SlideResult]:
    """Extract every slide of ``slides`` that has no complete H5 yet; returns this process's results."""
    from tqdm.auto import tqdm

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    every = list_slides(slides)
    names = [p.stem for p in every]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"slides share a file name (their H5 files would collide): {duplicates[:5]}.")
    mine = every[rank::world_size]
    results: list[SlideResult] = []
    for path in tqdm(mine, desc=f"slides (rank {rank}/{world_size})" if world_size > 1 else "slides", unit="slide"):
        final = output_path(output_dir, path)
        for stale in output_dir.glob(f".{final.name}.partial"):
            stale.unlink()  # left by a killed run
        if final.is_file():
            result = SlideResult(path.stem, str(path), "skipped", output=str(final))
        else:
            try:
                result = extract_slide(path, output_dir, encoder, options)
            except Exception as err:  # a bad slide (OpenSlide / PIL / decoding errors too) never stops the others
                if stop_on_error:
                    raise
                logger.error("%s: %s", path.name, err)
                result = SlideResult(path.stem, str(path), "failed", error=f"{type(err).__name__}: {err}")
            else:
                logger.info("%s: %d tiles, %.1f tiles/s", path.name, result.num_tiles, result.tiles_per_second)
        if result.status != "skipped" or not (output_dir / STATUS_DIR / f"{path.stem}.json").is_file():
            _write_status(output_dir, result)  # a resumed run keeps the record of the run that did the work
        results.append(result)
    write_report(output_dir)
    return results


__all__ = [
    "ExtractionOptions",
    "NoTissueError",
    "SlideResult",
    "TileDataset",
    "extract_features",
    "extract_slide",
    "list_slides",
    "output_path",
    "write_report",
]
