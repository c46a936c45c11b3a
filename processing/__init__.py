"""Data layer: slide H5 reading and validation, tile sampling, ``WSIProcessor``, annotations, collators.

Importing this package is cheap: heavy dependencies (transformers, datasets) load on first use of the names
that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import AnnotationError, PromptError, SlideFormatError, WSIDataError
from .slide_io import (SOURCE_LAYOUTS, TILE_SAMPLING_STRATEGIES, SlideFeatures, infer_tile_stride, read_slide,
                       sample_tile_indices, slide_num_tiles, spatial_order, write_slide)

__version__ = "0.1.0"

_LAZY = {
    "WSIProcessor": "processing_wsi",
    "load_annotations": "annotations",
    "ContrastiveCollator": "collators",
    "InstructionCollator": "collators",
    "stable_id": "collators",
    "make_demo_dataset": "demo_data",
    "preflight_check": "preflight",
    "inspect_slide": "preflight",
    "PreflightReport": "preflight",
    "preflight_dataset": "preflight",
    "slide_contract": "preflight",
    "common_feature_dim": "preflight",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'processing' has no attribute {name!r}")


__all__ = [
    "SlideFeatures", "read_slide", "write_slide", "slide_num_tiles", "sample_tile_indices", "spatial_order",
    "infer_tile_stride", "SOURCE_LAYOUTS", "TILE_SAMPLING_STRATEGIES", "WSIDataError", "SlideFormatError",
    "AnnotationError", "PromptError", *_LAZY,
]
