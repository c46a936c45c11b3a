"""Data layer: slide H5 reading and validation, tile sampling, ``WSIProcessor``, annotations, collators.

Importing it registers ``WSIProcessor`` with ``AutoProcessor`` (so ``AutoProcessor.from_pretrained`` of any folder
holding a ``processor_config.json`` that names it returns one) and marks it for ``auto_map`` export; the other
heavy names (annotations, collators, preflight) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .coordinates import infer_tile_stride, resolve_patch_size, spatial_order
from .errors import AnnotationError, PromptError, SlideFormatError, WSIDataError
from .processing_wsi import WSIProcessor, model_frame_coords, pad_slides
from .slide_io import SOURCE_LAYOUTS, SlideFeatures, read_slide, slide_num_tiles, write_slide
from .tile_sampling import TILE_SAMPLING_STRATEGIES, sample_tile_indices

__version__ = "0.1.0"  # the one version of the distribution (setup.cfg reads it)

_LAZY = {
    "load_annotations": "annotations",
    "list_slide_files": "annotations",
    "ContrastiveCollator": "collators",
    "InstructionCollator": "collators",
    "stable_id": "collators",
    "preflight_check": "preflight",
    "inspect_slide": "preflight",
    "PreflightReport": "preflight",
    "preflight_dataset": "preflight",
    "slide_contract": "preflight",
    "common_feature_dim": "preflight",
    "tile_feature_statistics": "feature_statistics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'processing' has no attribute {name!r}")


__all__ = [
    "SlideFeatures",
    "read_slide",
    "write_slide",
    "slide_num_tiles",
    "sample_tile_indices",
    "spatial_order",
    "infer_tile_stride",
    "resolve_patch_size",
    "pad_slides",
    "model_frame_coords",
    "SOURCE_LAYOUTS",
    "TILE_SAMPLING_STRATEGIES",
    "WSIDataError",
    "SlideFormatError",
    "AnnotationError",
    "PromptError",
    "WSIProcessor",
    *_LAZY,
]


def _register_processor() -> None:
    """``AutoProcessor`` resolves ``processor_config.json``'s ``"processor_class": "WSIProcessor"`` by name among the
    registered processors; the key is not a config class because any model kind may use this processor (the model
    packages also map their configs to it)."""
    from transformers import AutoProcessor

    AutoProcessor.register("wsi_processor", WSIProcessor, exist_ok=True)
    WSIProcessor.register_for_auto_class("AutoProcessor")  # processor folders carry auto_map and their code


_register_processor()
