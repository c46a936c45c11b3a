"""Synthetic slide-classification tasks at chosen difficulty, for recipe sweeps and learning tests.

Unlike the demo set (real texts, 4 classes), these tasks are generated from scratch with every knob a recipe
should be robust to — the setting in which a new user first tries WSI-CLIP:

* ``num_classes`` diagnoses, ``num_cases`` cases with 1–3 slides each, splits by case;
* tile features of any ``feature_dim`` with the statistics of real foundation-model features: a large shared
  offset (every tile vector points roughly the same way, as with UNI / GigaPath embeddings), spatially smooth
  tissue types and per-tile noise;
* the class signal in one compact lesion covering ``signal_fraction`` of the tiles (a class direction added
  with per-tile ``signal_strength`` in units of the tile noise);
* one short report per case naming the diagnosis (several phrasings); zero-shot prompts from the class names.

The files are the package's usual contract (TRIDENT-layout H5 + ``annotations.csv`` + ``class_prompts.json``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from processing.slide_io import write_slide

from .generator import _lesion_mask, _tissue_grid

TASK_CLASSES: dict[str, str] = {
    "LUAD": "lung adenocarcinoma",
    "LUSC": "lung squamous cell carcinoma",
    "BRCA": "invasive breast carcinoma",
    "COAD": "colon adenocarcinoma",
    "KIRC": "clear cell renal cell carcinoma",
    "KIRP": "papillary renal cell carcinoma",
    "LIHC": "hepatocellular carcinoma",
    "GBM": "glioblastoma",
    "SKCM": "cutaneous melanoma",
    "PRAD": "prostate adenocarcinoma",
}
REPORT_TEMPLATES: tuple[str, ...] = (
    "Diagnosis: {name}, {grade} differentiated.",
    "Final diagnosis: {name}. The tumour is {grade} differentiated.",
    "Sections show {name}, {grade} differentiated.",
    "Consistent with {name} ({grade} differentiated).",
)
GRADES: tuple[str, ...] = ("well", "moderately", "poorly")
PROMPT_TEMPLATES: tuple[str, ...] = ("{}.", "diagnosis: {}.", "a whole slide image of {}.", "sections show {}.")


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs of one synthetic task (the defaults are the issue-14 setting)."""

    num_classes: int = 10
    num_cases: int = 150
    feature_dim: int = 768
    signal_fraction: tuple[float, float] = (0.05, 0.10)
    signal_strength: float = 1.0
    offset_scale: float = 3.0
    min_tiles: int = 300
    max_tiles: int = 900
    max_slides_per_case: int = 3
    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0


def _class_names(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= len(TASK_CLASSES):
        raise ValueError(f"num_classes={num_classes} must be between 2 and {len(TASK_CLASSES)}.")
    return list(TASK_CLASSES)[:num_classes]


def make_classification_task(output_dir: str | Path, spec: TaskSpec | None = None) -> dict[str, Any]:
    """Write one task (see the module docstring); returns its paths and a summary. Deterministic per ``spec``."""
    spec = spec or TaskSpec()
    labels = _class_names(spec.num_classes)
    rng = np.random.default_rng(spec.seed)
    dim = spec.feature_dim
    output_dir = Path(output_dir)
    slides_dir = output_dir / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)

    offset = spec.offset_scale * rng.standard_normal(dim)  # [D] shared by every tile
    tissue_types = rng.standard_normal((8, dim))  # [J, D] class-agnostic background tissue
    directions, _ = np.linalg.qr(rng.standard_normal((dim, spec.num_classes)))  # [D, K] orthonormal
    directions = directions.T * np.sqrt(dim)  # [K, D], norm sqrt(D): a unit step per dimension

    # cases round-robin over classes; splits by case, stratified
    case_class = np.arange(spec.num_cases) % spec.num_classes
    split = np.array(["train"] * spec.num_cases, dtype=object)
    for k in range(spec.num_classes):
        members = rng.permutation(np.flatnonzero(case_class == k))
        n_val = max(1, round(spec.validation_fraction * len(members)))
        n_test = max(1, round(spec.test_fraction * len(members)))
        split[members[:n_val]] = "validation"
        split[members[n_val : n_val + n_test]] = "test"

    rows: list[dict[str, str]] = []
    for case in range(spec.num_cases):
        label = labels[case_class[case]]
        template = REPORT_TEMPLATES[rng.integers(len(REPORT_TEMPLATES))]
        report = template.format(name=TASK_CLASSES[label], grade=GRADES[rng.integers(len(GRADES))])
        num_slides = int(rng.integers(1, spec.max_slides_per_case + 1))
        for s in range(num_slides):
            slide_id = f"case{case:04d}-s{s}"
            num_tiles = int(rng.integers(spec.min_tiles, spec.max_tiles + 1))
            cells = _tissue_grid(rng, num_tiles)  # [N, 2] (col, row)
            lesion = _lesion_mask(rng, cells, rng.uniform(*spec.signal_fraction))  # [N] bool
            features = _slide_features(
                rng, cells, lesion, offset, tissue_types, directions[case_class[case]], spec.signal_strength
            )
            coords = (cells + rng.integers(2, 20, size=2)) * 256  # [N, 2] level-0 (x, y)
            write_slide(slides_dir / f"{slide_id}.h5", features, coords, layout="trident", dtype="float16")
            rows.append(
                {
                    "h5_path": f"slides/{slide_id}.h5",
                    "caption": report,
                    "slide_id": slide_id,
                    "case_id": f"case{case:04d}",
                    "split": str(split[case]),
                    "label": label,
                }
            )
    annotations = output_dir / "annotations.csv"
    with annotations.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    prompts = output_dir / "class_prompts.json"
    prompts.write_text(
        json.dumps({"classnames": {k: [TASK_CLASSES[k]] for k in labels}, "templates": list(PROMPT_TEMPLATES)})
    )
    return {
        "annotations": str(annotations),
        "class_prompts": str(prompts),
        "num_slides": len(rows),
        "classes": labels,
        "slides_per_split": {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")},
    }


def _slide_features(
    rng: np.random.Generator,
    cells: np.ndarray,
    lesion: np.ndarray,
    offset: np.ndarray,
    tissue_types: np.ndarray,
    direction: np.ndarray,
    strength: float = 1.0,
) -> np.ndarray:
    """``[N, D]`` float32: offset + smooth tissue mix + unit noise + ``strength`` × class direction on the lesion."""
    num_tiles, dim = len(cells), len(offset)
    centres = cells[rng.choice(num_tiles, size=min(5, num_tiles), replace=False)]  # [S, 2]
    kind = rng.integers(len(tissue_types), size=len(centres))  # [S]
    distance = np.linalg.norm(cells[:, None, :] - centres[None, :, :], axis=-1)  # [N, S]
    weights = np.exp(-(distance - distance.min(axis=1, keepdims=True)) / 2.0)
    weights /= weights.sum(axis=1, keepdims=True)  # [N, S]
    features = offset + weights @ tissue_types[kind]  # [N, D]
    features = features + 0.3 * rng.standard_normal(dim)  # slide-level stain shift
    features = features + rng.standard_normal((num_tiles, dim))  # tile noise, unit per dimension
    features += strength * lesion[:, None] * direction
    return features.astype(np.float32)
