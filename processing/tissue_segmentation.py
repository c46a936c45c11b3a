"""Tissue segmentation on a slide thumbnail: a mask, its contours as GeoJSON, and a QC picture.

Why these rules: stained tissue is *coloured* while glass, background and most scanner artefacts are grey or white,
so the saturation channel separates them (Otsu's threshold adapts to the stain; a floor keeps a blank slide blank).
Simple colour rules then drop what is coloured but not tissue: blue and green pen (blue/green far above red) and
black marker or dust (very dark). Red pen looks like eosin and is kept — draw an exclusion by hand for it. Small
holes are filled (nuclei-free gaps inside tissue), large ones (lumens, tears) kept; specks below a minimum area are
dropped. Areas are physical (mm²), so one setting works at any magnification.

Needs ``opencv-python-headless`` (the ``slides`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("tissue segmentation needs OpenCV: pip install 'wsi-mm[slides]'.") from err
    return cv2


@dataclass
class SegmentationOptions:
    """Knobs of :func:`segment_tissue` (defaults suit H&E at any magnification)."""

    min_saturation: int = 20  # floor of the saturation threshold (0–255): below it nothing is tissue
    min_region_area_mm2: float = 0.01  # tissue pieces smaller than this are dropped (≈ a 100 µm square)
    max_hole_area_mm2: float = 0.01  # holes smaller than this are filled
    reject_pen: bool = True  # drop blue / green pen and black marker by colour


@dataclass
class TissueMask:
    """A tissue mask on a thumbnail and its contours in level-0 pixels.

    Attributes:
        mask: ``[h, w]`` bool on the thumbnail (True = tissue).
        downsample: level-0 pixels per thumbnail pixel.
        contours: one ``(outer [P, 2], [holes [Q, 2], ...])`` per tissue region, level-0 (x, y) float coordinates.
    """

    mask: np.ndarray
    downsample: float
    contours: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def to_geojson(self) -> dict:
        """A GeoJSON FeatureCollection of tissue polygons (level-0 pixels; holes as interior rings; QuPath reads it)."""

        def ring(points: np.ndarray) -> list[list[float]]:
            pts = [[round(float(x), 1), round(float(y), 1)] for x, y in points]
            return pts + pts[:1]  # closed

        features = [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring(outer), *(ring(h) for h in holes)]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}, "region": i},
            }
            for i, (outer, holes) in enumerate(self.contours)
        ]
        return {"type": "FeatureCollection", "features": features}

    def save_geojson(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_geojson()))
        return path


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values`` (the split maximising the between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * np.arange(256))
    total_weight, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - mean * total_weight) ** 2 / (weight * (total_weight - weight))
    if not total_weight or np.isnan(between[:-1]).all():
        return float(values.max()) if values.size else 0.0  # one grey level: nothing above it
    return float(np.nanargmax(between[:-1]))


def segment_tissue(
    thumbnail: np.ndarray, downsample: float, mpp: float, options: SegmentationOptions | None = None
) -> TissueMask:
    """Tissue of an ``[h, w, 3]`` uint8 RGB ``thumbnail`` whose pixels are ``downsample`` level-0 pixels of ``mpp``
    µm each (see the module docstring for the rules)."""
    cv2 = _cv2()
    options = options or SegmentationOptions()
    rgb = np.ascontiguousarray(thumbnail[..., :3])
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[..., 1], 5)
    threshold = max(_otsu(saturation), float(options.min_saturation))
    mask = saturation > threshold
    if options.reject_pen:
        r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
        blue_pen = (b > r + 40) & (b > g + 10)
        green_pen = (g > r + 20) & (g > b + 10)
        black = hsv[..., 2] < 40
        mask &= ~(blue_pen | green_pen | black)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)

    mm2_per_pixel = (downsample * mpp / 1000.0) ** 2  # area of one thumbnail pixel
    min_region = options.min_region_area_mm2 / mm2_per_pixel
    max_hole = options.max_hole_area_mm2 / mm2_per_pixel
    found, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    final = np.zeros_like(mask)
    contours: list[tuple[np.ndarray, list[np.ndarray]]] = []
    if hierarchy is not None:
        hierarchy = hierarchy[0]  # [C, 4]: next, previous, first child, parent
        for index, contour in enumerate(found):
            if hierarchy[index][3] != -1 or cv2.contourArea(contour) < min_region:
                continue  # a hole, or a speck
            holes, child = [], hierarchy[index][2]
            while child != -1:
                if cv2.contourArea(found[child]) >= max_hole:
                    holes.append(found[child])
                child = hierarchy[child][0]
            region = np.zeros_like(mask)
            cv2.drawContours(region, [contour], -1, 1, thickness=cv2.FILLED)
            cv2.drawContours(region, holes, -1, 0, thickness=cv2.FILLED)
            final |= region  # per region: tissue inside another region's hole survives
            scale = lambda c: (c[:, 0, :].astype(np.float64) + 0.5) * downsample  # noqa: E731  thumbnail → level 0
            contours.append((scale(contour), [scale(h) for h in holes]))
    return TissueMask(final.astype(bool), downsample, contours)


def tissue_fraction_of_tiles(tissue: TissueMask, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """``[T]`` fraction of each level-0 square ``(x, y, size_level0)`` covered by tissue (integral image of the mask;
    tiles smaller than a thumbnail pixel use the pixel under their centre)."""
    integral = np.pad(tissue.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # [h+1, w+1]
    h, w = tissue.mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / tissue.downsample).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] / tissue.downsample).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / tissue.downsample).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / tissue.downsample).astype(np.int64), y0 + 1, h)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return covered / ((x1 - x0) * (y1 - y0))


def save_qc_thumbnail(
    path: str | Path, thumbnail: np.ndarray, tissue: TissueMask, coords: np.ndarray, size_level0: int
) -> Path:
    """The thumbnail with the tissue contours (green, holes orange) and the kept tiles (outlined) drawn on it."""
    cv2 = _cv2()
    canvas = np.ascontiguousarray(thumbnail[..., :3]).copy()
    ds = tissue.downsample
    for x, y in np.asarray(coords):
        top_left = (int(x / ds), int(y / ds))
        bottom_right = (int((x + size_level0) / ds) - 1, int((y + size_level0) / ds) - 1)
        cv2.rectangle(canvas, top_left, bottom_right, (60, 60, 220), 1)
    line = max(1, round(max(canvas.shape[:2]) / 500))
    for outer, holes in tissue.contours:
        cv2.polylines(canvas, [np.round(outer / ds).astype(np.int32)], True, (0, 170, 0), line + 1)
        for hole in holes:
            cv2.polylines(canvas, [np.round(hole / ds).astype(np.int32)], True, (255, 140, 0), line)
    path = Path(path)
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return path


__all__ = ["SegmentationOptions", "TissueMask", "save_qc_thumbnail", "segment_tissue", "tissue_fraction_of_tiles"]
