"""Raw whole-slide images through OpenSlide: size, pyramid, magnification, and tiles read at any magnification.

Why its own module: magnification is the one fact every later step needs (patch size at level 0, TRIDENT's
attributes, the slide encoder's positions) and scanners state it differently — Aperio as ``objective-power``, others
only as microns per pixel, some not at all. :func:`open_slide` resolves it once, with a clear error and an override
when a slide states neither.

Needs the ``slides`` extra (``openslide-python`` + ``openslide-bin``, both wheels on PyPI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideFormatError

SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)  # fmt: skip
MICRONS_PER_PIXEL_AT_10X = 1.0  # 10× ≈ 1.0 µm/px, 20× ≈ 0.5, 40× ≈ 0.25 (the convention TRIDENT and CLAM use)


def _openslide():
    try:
        import openslide
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading raw slides needs OpenSlide: pip install 'wsi-mm[slides]' (openslide-python + openslide-bin)."
        ) from err
    return openslide


def magnification_from_mpp(mpp: float) -> float:
    """Objective magnification of a scan with ``mpp`` µm per pixel, rounded to a common objective (… 10, 20, 40 …)."""
    raw = 10.0 * MICRONS_PER_PIXEL_AT_10X / mpp
    for common in (1.25, 2.5, 5, 10, 20, 40, 60, 80):
        if abs(raw - common) / common < 0.15:
            return float(common)
    return round(raw, 2)


@dataclass
class WholeSlide:
    """One open slide: level-0 size, pyramid, magnification and where it came from."""

    path: Path
    handle: object  # openslide.OpenSlide
    width: int
    height: int
    level0_magnification: float
    mpp: float | None
    magnification_source: str  # "objective-power", "mpp" or "given"

    @property
    def name(self) -> str:
        return self.path.stem

    def downsample_for(self, target_magnification: float) -> float:
        """Level-0 pixels per target-magnification pixel (2 for 20× tiles on a 40× scan)."""
        if target_magnification > self.level0_magnification * 1.001:
            raise ValueError(
                f"{self.path}: target magnification {target_magnification}× is above the scan's "
                f"{self.level0_magnification}× (level 0); choose {self.level0_magnification}× or less."
            )
        return self.level0_magnification / target_magnification

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """``[h, w, 3]`` uint8 RGB thumbnail and its downsample (level-0 pixels per thumbnail pixel)."""
        scale = max(self.width, self.height) / max_size
        scale = max(scale, 1.0)
        size = (max(1, round(self.width / scale)), max(1, round(self.height / scale)))
        image = self.handle.get_thumbnail(size).convert("RGB")
        return np.asarray(image), self.width / image.size[0]

    def read_tile(self, x: int, y: int, size_level0: int, size: int) -> np.ndarray:
        """``[size, size, 3]`` uint8 RGB of the level-0 square ``(x, y, size_level0)``, read from the pyramid level
        closest above the needed resolution and resized; transparent / out-of-slide pixels are white."""
        from PIL import Image

        downsample = size_level0 / size
        level = self.handle.get_best_level_for_downsample(downsample + 1e-6)
        level_downsample = self.handle.level_downsamples[level]
        read = max(1, round(size_level0 / level_downsample))
        region = self.handle.read_region((int(x), int(y)), level, (read, read))  # RGBA, premultiplied
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, region).convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb)

    def close(self) -> None:
        self.handle.close()


def open_slide(path: str | Path, level0_magnification: float | None = None, mpp: float | None = None) -> WholeSlide:
    """Open a slide; its level-0 magnification from ``level0_magnification`` (override), else the slide's
    ``objective-power``, else its µm per pixel (``mpp`` overrides the slide's). Raises :class:`SlideFormatError`
    naming the file for an unreadable file or a slide that states neither."""
    openslide = _openslide()
    path = Path(path)
    if not path.is_file():
        raise SlideFormatError(f"{path}: no such slide file.")
    try:
        handle = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as err:
        raise SlideFormatError(
            f"{path}: OpenSlide cannot read it ({type(err).__name__}: {err}); is it a whole-slide image "
            f"({', '.join(SLIDE_SUFFIXES)}) and complete?"
        ) from err
    props = handle.properties
    slide_mpp = mpp
    if slide_mpp is None:
        try:
            slide_mpp = float(props.get(openslide.PROPERTY_NAME_MPP_X, ""))
        except ValueError:
            slide_mpp = None
    source = "given"
    magnification = level0_magnification
    if magnification is None:
        try:
            magnification, source = float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER, "")), "objective-power"
        except ValueError:
            magnification = None
        if not (magnification and math.isfinite(magnification) and magnification > 0) and slide_mpp and slide_mpp > 0:
            magnification, source = magnification_from_mpp(slide_mpp), "mpp"
    if not (magnification and math.isfinite(magnification) and magnification > 0):
        handle.close()
        raise SlideFormatError(
            f"{path}: the slide states neither its objective power nor its microns per pixel; pass "
            "--level0_magnification (e.g. 40) or --mpp (e.g. 0.25) for it."
        )
    width, height = handle.dimensions
    return WholeSlide(path, handle, int(width), int(height), float(magnification), slide_mpp, source)


__all__ = ["SLIDE_SUFFIXES", "WholeSlide", "magnification_from_mpp", "open_slide"]
