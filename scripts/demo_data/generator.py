"""Synthetic demo data set: real pathology texts paired with synthetic, realistic slide feature bags.

No real slide-level feature bags are reachable offline, so the demo writes its own H5 slides while the texts
(captions, reports, multiple-choice questions) are real — a small attributed subset of SlideBench (SlideChat)
and WSI-Bench (WSI-LLaVA) kept in ``scripts/demo_data/texts/`` (see its ``NOTICE.md``).

What makes the synthetic slides worth training on:

* **geometry**: tiles lie on a 256-px level-0 grid (0.5 µm/px) inside one or two tissue-shaped blobs, with a
  sub-tile origin offset like real tilers; some files are written in CLAM-like column-major or shuffled
  order, so sorting at read time matters; the seed, CLAM and TRIDENT layouts and fp16/fp32 all occur;
* **scale**: every tile vector has a norm of ~33, like real Prov-GigaPath tile embeddings, whatever ``D``;
* **signal**: the class signal is planted in a *minority* of tiles — one contiguous "lesion" (10–25 % of the
  tiles) gets a class-specific direction added — while the rest is class-agnostic background tissue drawn
  from prototypes shared by every class (and partly resembling the classes). Mean pooling therefore sees a
  weak, confounded signal; attention / max pooling can find the lesion;
* **cases**: some cases have 2–3 slides sharing one caption (multi-positive pairs); splits are made by case.

Output layout (``output_dir``)::

    slides/<slide_id>.h5                  tile features + coords (seed / CLAM / TRIDENT layouts)
    annotations.csv                       one row per slide, all splits (``split`` column)
    train.csv, validation.csv, test.csv   the same rows, one file per split
    llava_caption_<split>.json            LLaVA conversations: caption / report generation (stage 2)
    llava_instruct_<split>.json           LLaVA conversations: multiple-choice VQA, single and multi-turn
    llava_diagnosis_<split>.json          LLaVA conversations: the slide-grounded closed "which tumour type" question
    class_prompts.json                    zero-shot class names → prompts, and templates
    lesion_tiles.json                     per slide: label and the (x, y) coords of the planted lesion tiles
    demo_info.json                        generator parameters and a per-slide summary

CSV columns: ``h5_path, caption, question, answer, slide_id, dataset, case_id, split, label``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from processing.coordinates import spatial_order
from processing.slide_io import SOURCE_LAYOUTS, write_slide

DEMO_TEXTS_DIR = Path(__file__).resolve().parent / "texts"
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CSV_COLUMNS: tuple[str, ...] = (
    "h5_path",
    "caption",
    "question",
    "answer",
    "slide_id",
    "dataset",
    "case_id",
    "split",
    "label",
)
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")
DISK_ORDERS: tuple[str, ...] = ("column_major", "shuffled", "row_major")  # column-major: CLAM-like

# Zero-shot prompts (TITAN / CONCH style: several names per class × templates, embeddings averaged).
CLASS_PROMPTS: dict[str, list[str]] = {
    "BRCA": [
        "invasive breast carcinoma",
        "breast invasive carcinoma",
        "invasive ductal carcinoma of the breast",
        "invasive lobular carcinoma of the breast",
        "breast cancer",
    ],
    "LUAD": [
        "lung adenocarcinoma",
        "adenocarcinoma of the lung",
        "non-small cell lung adenocarcinoma",
        "invasive pulmonary adenocarcinoma",
    ],
    "COAD": [
        "colon adenocarcinoma",
        "adenocarcinoma of the colon",
        "colorectal adenocarcinoma",
        "invasive adenocarcinoma of the large bowel",
    ],
    "LGG": [
        "lower grade glioma",
        "diffuse low-grade glioma",
        "oligodendroglioma",
        "diffuse astrocytoma",
        "brain lower grade glioma",
    ],
}
ZERO_SHOT_TEMPLATES: list[str] = [
    "{}.",
    "a whole slide image of {}.",
    "an H&E stained slide of {}.",
    "a histopathology slide showing {}.",
    "pathology report of {}.",
    "the diagnosis is {}.",
]
DEMO_CLASSES: tuple[str, ...] = tuple(CLASS_PROMPTS)

_SLIDE_NUMBER = re.compile(r"^(.*?)(\d+)$")


# ----------------------------------------------------------------------------------------------- real texts
@dataclass(frozen=True)
class MultipleChoiceQuestion:
    """One real multiple-choice question (stem, options A–D, answer letter)."""

    source: str
    question: str
    options: dict[str, str]
    answer: str

    def prompt(self) -> str:
        """The question with its options, one per line (the form used in the CSV and LLaVA files)."""
        return self.question + "".join(f"\n{letter}) {text}" for letter, text in self.options.items())


@dataclass(frozen=True)
class DemoText:
    """The real texts of one TCGA slide: a caption or report, its prompt, and the questions on that slide."""

    source: str  # "SlideBench-Caption-TCGA" or "WSI-Bench-Report"
    slide_id: str
    case_id: str
    label: str
    caption_question: str
    caption: str
    questions: tuple[MultipleChoiceQuestion, ...]

    @property
    def dataset(self) -> str:
        return "SlideBench" if self.source.startswith("SlideBench") else "WSI-Bench"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: demo text file missing. Restore it from the repository, or regenerate the "
            "folder with scripts/build_demo_texts.py."
        )
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_demo_texts(texts_dir: str | Path | None = None) -> dict[str, list[DemoText]]:
    """Real demo texts grouped by class label, each slide with its caption/report and questions.

    Only slides with at least one question are returned (every demo case carries both kinds of text).
    """
    root = Path(texts_dir) if texts_dir is not None else DEMO_TEXTS_DIR
    questions: dict[str, list[MultipleChoiceQuestion]] = {}
    for rec in _read_jsonl(root / "vqa.jsonl"):
        questions.setdefault(rec["slide_id"], []).append(
            MultipleChoiceQuestion(rec["source"], rec["question"], dict(rec["options"]), rec["answer"])
        )
    by_label: dict[str, list[DemoText]] = {}
    seen_cases: set[str] = set()
    for name, text_key in (("captions.jsonl", "caption"), ("reports.jsonl", "report")):
        for rec in _read_jsonl(root / name):
            if rec["case_id"] in seen_cases:
                raise ValueError(
                    f"{root}: case {rec['case_id']} occurs twice in the demo texts; one patient must "
                    "give one demo case. Regenerate with scripts/build_demo_texts.py."
                )
            seen_cases.add(rec["case_id"])
            if not questions.get(rec["slide_id"]):
                continue
            by_label.setdefault(rec["label"], []).append(
                DemoText(
                    source=rec["source"],
                    slide_id=rec["slide_id"],
                    case_id=rec["case_id"],
                    label=rec["label"],
                    caption_question=rec["question"],
                    caption=rec[text_key],
                    questions=tuple(questions[rec["slide_id"]]),
                )
            )
    return by_label


# --------------------------------------------------------------------------------------------- arguments
@dataclass
class DemoDataArguments:
    """Options of ``scripts/make_demo_data.py`` (same names as ``make_demo_dataset``)."""

    output_dir: str = field(default="demo_data", metadata={"help": "Folder to write the demo data set into."})
    num_cases: int = field(default=64, metadata={"help": "Number of cases (patients), spread evenly over classes."})
    classes: list[str] = field(
        default_factory=lambda: list(DEMO_CLASSES),
        metadata={"help": f"Class labels to use, among {list(DEMO_CLASSES)}."},
    )
    feature_dim: int = field(
        default=1536, metadata={"help": "Tile feature dimension D (Prov-GigaPath: 1536; 64–128 makes a fast demo)."}
    )
    min_tiles: int = field(default=60, metadata={"help": "Fewest tiles per slide."})
    max_tiles: int = field(default=400, metadata={"help": "Most tiles per slide."})
    max_slides_per_case: int = field(default=3, metadata={"help": "Most slides per case (1 = one slide each)."})
    multi_slide_fraction: float = field(default=0.35, metadata={"help": "Fraction of cases with 2+ slides."})
    lesion_fraction_min: float = field(default=0.10, metadata={"help": "Smallest fraction of lesion tiles."})
    lesion_fraction_max: float = field(default=0.25, metadata={"help": "Largest fraction of lesion tiles."})
    signal_strength: float = field(
        default=1.2,
        metadata={
            "help": "Norm of the class direction added to lesion tiles, relative to a background tile (before the "
            "per-tile rescaling to tile_norm)."
        },
    )
    background_confound: float = field(
        default=0.1,
        metadata={
            "help": "How much background tissue types and slide-level shifts lie along the class directions "
            "(a confounder: larger makes mean pooling weaker)."
        },
    )
    tile_norm: float = field(default=33.0, metadata={"help": "Mean L2 norm of a tile vector (GigaPath: ~33)."})
    patch_size: int = field(default=256, metadata={"help": "Tile stride in level-0 pixels."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Fraction of each class's cases in validation."})
    test_fraction: float = field(default=0.2, metadata={"help": "Fraction of each class's cases in test."})
    seed: int = field(default=0, metadata={"help": "Seed: the same seed and options give byte-identical files."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing demo data set in output_dir."})


# --------------------------------------------------------------------------------------------- geometry
def _blob(rng: np.random.Generator, num_tiles: int) -> np.ndarray:
    """``[num_tiles, 2]`` (col, row) grid cells of one tissue-shaped blob (wobbly ellipse, ragged border)."""
    aspect = rng.uniform(0.6, 1.7)
    radius = np.sqrt(num_tiles / np.pi)
    rx, ry = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    hx, hy = int(np.ceil(rx * 1.8)) + 2, int(np.ceil(ry * 1.8)) + 2
    xs, ys = np.meshgrid(np.arange(-hx, hx + 1), np.arange(-hy, hy + 1))  # [H, W] each
    theta = np.arctan2(ys / ry, xs / rx)
    wobble = np.ones_like(theta)
    for harmonic in (2, 3, 4):
        wobble += rng.uniform(0.0, 0.15) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(xs / rx, ys / ry) / wobble + 0.04 * rng.standard_normal(theta.shape)
    keep = np.argsort(rho.ravel(), kind="stable")[:num_tiles]
    cells = np.stack([xs.ravel()[keep], ys.ravel()[keep]], axis=1)  # [N, 2]
    return cells - cells.min(axis=0)


def _tissue_grid(rng: np.random.Generator, num_tiles: int) -> np.ndarray:
    """``[num_tiles, 2]`` (col, row) grid cells of a slide: one blob, or two fragments side by side."""
    if num_tiles >= 120 and rng.random() < 0.3:
        first = int(round(num_tiles * rng.uniform(0.55, 0.8)))
        sizes = [first, num_tiles - first]
    else:
        sizes = [num_tiles]
    parts, next_col = [], 0
    for size in sizes:
        cells = _blob(rng, size) + np.array([next_col, rng.integers(0, 6)])
        parts.append(cells)
        next_col = int(cells[:, 0].max()) + int(rng.integers(3, 9))  # a gap of glass between fragments
    return np.concatenate(parts)


def _lesion_mask(rng: np.random.Generator, cells: np.ndarray, fraction: float) -> np.ndarray:
    """``[N]`` bool: a contiguous, irregular region of ``round(fraction * N)`` tiles around a random tile."""
    num_lesion = max(1, int(round(fraction * len(cells))))
    offset = cells - cells[rng.integers(len(cells))]  # [N, 2]
    theta = np.arctan2(offset[:, 1], offset[:, 0])
    distance = np.hypot(offset[:, 0], offset[:, 1]) / (1 + 0.3 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi)))
    mask = np.zeros(len(cells), dtype=bool)
    mask[np.argsort(distance, kind="stable")[:num_lesion]] = True
    return mask


def _disk_order(rng: np.random.Generator, coords: np.ndarray, order: str) -> np.ndarray:
    """Permutation giving the on-disk row order of a slide's tiles."""
    if order == "row_major":
        return spatial_order(coords)
    if order == "column_major":
        return np.lexsort((coords[:, 1], coords[:, 0]))  # x primary, like CLAM's patching loop
    if order == "shuffled":
        return rng.permutation(len(coords))
    raise ValueError(f"disk order {order!r} is not one of {DISK_ORDERS}.")


# --------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class _FeatureSpace:
    """Shared generative structure: background tissue prototypes and one direction per class."""

    prototypes: np.ndarray  # [J, D] class-agnostic tissue types
    class_directions: np.ndarray  # [K, D] orthogonal, norm sqrt(D)
    confound: float  # how much backgrounds and slide shifts lie along the class directions

    @classmethod
    def sample(
        cls, rng: np.random.Generator, num_classes: int, feature_dim: int, confound: float, num_tissue_types: int = 8
    ) -> _FeatureSpace:
        if feature_dim < num_classes:
            raise ValueError(f"feature_dim={feature_dim} must be at least the number of classes ({num_classes}).")
        basis, _ = np.linalg.qr(rng.standard_normal((feature_dim, num_classes)))  # [D, K] orthonormal columns
        directions = basis.T * np.sqrt(feature_dim)  # [K, D]
        prototypes = rng.standard_normal((num_tissue_types, feature_dim))  # [J, D]
        # background tissue partly resembles the classes, so a slide's tissue mix shifts its mean along them
        prototypes += confound * rng.standard_normal((num_tissue_types, num_classes)) @ directions
        return cls(prototypes, directions, confound)

    def slide(
        self,
        rng: np.random.Generator,
        cells: np.ndarray,
        lesion: np.ndarray,
        class_index: int,
        strength: float,
        tile_norm: float,
    ) -> np.ndarray:
        """``[N, D]`` float32 tile features of one slide (row i ↔ grid cell ``cells[i]``)."""
        num_tiles, dim = len(cells), self.prototypes.shape[1]
        num_regions = int(rng.integers(3, 7))
        centres = cells[rng.choice(num_tiles, size=min(num_regions, num_tiles), replace=False)]  # [S, 2]
        composition = rng.dirichlet(np.full(len(self.prototypes), 0.5))
        region_type = rng.choice(len(self.prototypes), size=len(centres), p=composition)  # [S]
        distance = np.linalg.norm(cells[:, None, :] - centres[None, :, :], axis=-1)  # [N, S]
        weights = np.exp(-(distance - distance.min(axis=1, keepdims=True)) / 1.5)
        weights /= weights.sum(axis=1, keepdims=True)  # [N, S] soft Voronoi regions of tissue
        features = weights @ self.prototypes[region_type]  # [N, D] background tissue
        # slide-level stain / scanner shift, partly along the class directions: a confounder that no linear
        # read-out of the mean-pooled features can remove, but that does not hide the lesion's local contrast
        features += (
            0.3 * rng.standard_normal(dim)
            + self.confound * rng.standard_normal(len(self.class_directions)) @ self.class_directions
        )
        features += 0.7 * rng.standard_normal((num_tiles, dim))  # tile-level variation
        intensity = lesion * rng.uniform(0.7, 1.0, num_tiles)  # [N], 0 outside the lesion
        features += strength * intensity[:, None] * self.class_directions[class_index]
        norms = tile_norm * (1.0 + 0.05 * rng.standard_normal(num_tiles))  # [N] around ~33
        features *= (norms / np.linalg.norm(features, axis=1))[:, None]
        return features.astype(np.float32)


# --------------------------------------------------------------------------------------------- planning
@dataclass
class _Case:
    case_index: int
    text: DemoText
    class_index: int
    split: str = ""
    slide_ids: list[str] = field(default_factory=list)


def _extra_slide_ids(slide_id: str, count: int) -> list[str]:
    """``slide_id`` followed by ``count - 1`` sibling ids (DX1 → DX2, DX3) for the case's other slides."""
    match = _SLIDE_NUMBER.match(slide_id)
    if match is None:
        return [slide_id] + [f"{slide_id}-{j + 1}" for j in range(1, count)]
    stem, number = match.group(1), int(match.group(2))
    return [slide_id] + [f"{stem}{number + j}" for j in range(1, count)]


def _assign_splits(
    rng: np.random.Generator, cases: list[_Case], validation_fraction: float, test_fraction: float
) -> None:
    """Split each class's cases (stratified, by case: a case's slides never straddle splits)."""
    for class_index in sorted({c.class_index for c in cases}):
        members = [c for c in cases if c.class_index == class_index]
        order = rng.permutation(len(members))
        n = len(members)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * validation_fraction))
        if n >= 3:  # every split sees every class when there are enough cases
            n_test, n_val = max(n_test, int(test_fraction > 0)), max(n_val, int(validation_fraction > 0))
        n_val = min(n_val, n - n_test - 1) if n > n_test else 0
        for rank, position in enumerate(order):
            members[position].split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"


def _check_arguments(a: DemoDataArguments) -> None:
    """Raise one ``ValueError`` listing every bad option."""
    problems = []
    if not a.classes:
        problems.append("classes is empty")
    unknown = [c for c in a.classes if c not in DEMO_CLASSES]
    if unknown:
        problems.append(f"classes {unknown} have no shipped texts (available: {list(DEMO_CLASSES)})")
    if len(set(a.classes)) != len(a.classes):
        problems.append(f"classes {list(a.classes)} has duplicates")
    if a.num_cases < max(1, len(a.classes)):
        problems.append(f"num_cases={a.num_cases} must be at least the number of classes ({len(a.classes)})")
    if a.feature_dim < max(1, len(a.classes)):
        problems.append(
            f"feature_dim={a.feature_dim} must be at least the number of classes ({len(a.classes)}), "
            "one orthogonal direction per class"
        )
    if not 1 <= a.min_tiles <= a.max_tiles:
        problems.append(f"need 1 <= min_tiles <= max_tiles (got {a.min_tiles}, {a.max_tiles})")
    if a.max_slides_per_case < 1:
        problems.append(f"max_slides_per_case={a.max_slides_per_case} must be >= 1")
    if not 0.0 <= a.multi_slide_fraction <= 1.0:
        problems.append(f"multi_slide_fraction={a.multi_slide_fraction} must be in [0, 1]")
    if not 0.0 < a.lesion_fraction_min <= a.lesion_fraction_max <= 1.0:
        problems.append(
            f"need 0 < lesion_fraction_min <= lesion_fraction_max <= 1 (got {a.lesion_fraction_min}, "
            f"{a.lesion_fraction_max})"
        )
    if a.validation_fraction < 0 or a.test_fraction < 0 or a.validation_fraction + a.test_fraction >= 1.0:
        problems.append(
            f"validation_fraction + test_fraction must be in [0, 1) (got {a.validation_fraction}, {a.test_fraction})"
        )
    if a.patch_size < 1 or a.tile_norm <= 0:
        problems.append(f"patch_size ({a.patch_size}) and tile_norm ({a.tile_norm}) must be positive")
    if problems:
        raise ValueError("make_demo_dataset: " + "; ".join(problems) + ".")


_OWNED_FILES = (
    "annotations.csv",
    "class_prompts.json",
    "lesion_tiles.json",
    "demo_info.json",
    *(f"{s}.csv" for s in SPLITS),
    *(f"llava_{k}_{s}.json" for k in ("caption", "instruct") for s in SPLITS),
)


def _prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """Create ``output_dir``; refuse to mix with an earlier demo set unless ``overwrite`` (then clear it)."""
    slides_dir = output_dir / "slides"
    existing = [output_dir / n for n in _OWNED_FILES if (output_dir / n).exists()]
    old_slides = sorted(slides_dir.glob("*.h5")) if slides_dir.is_dir() else []
    if (existing or old_slides) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a demo data set ({len(old_slides)} slides). Pass "
            "overwrite=True (--overwrite) to replace it, or choose another output_dir."
        )
    for path in existing + old_slides:
        path.unlink()
    slides_dir.mkdir(parents=True, exist_ok=True)
    return slides_dir


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _conversation(question: str, answer: str, *, first: bool) -> list[dict[str, str]]:
    return [{"from": "human", "value": ("<image>\n" if first else "") + question}, {"from": "gpt", "value": answer}]


# --------------------------------------------------------------------------------------------- main entry
_DEFAULTS = DemoDataArguments()


def make_demo_dataset(
    output_dir: str | Path,
    *,
    num_cases: int = _DEFAULTS.num_cases,
    classes: Sequence[str] = DEMO_CLASSES,
    feature_dim: int = _DEFAULTS.feature_dim,
    min_tiles: int = _DEFAULTS.min_tiles,
    max_tiles: int = _DEFAULTS.max_tiles,
    max_slides_per_case: int = _DEFAULTS.max_slides_per_case,
    multi_slide_fraction: float = _DEFAULTS.multi_slide_fraction,
    lesion_fraction_min: float = _DEFAULTS.lesion_fraction_min,
    lesion_fraction_max: float = _DEFAULTS.lesion_fraction_max,
    signal_strength: float = _DEFAULTS.signal_strength,
    background_confound: float = _DEFAULTS.background_confound,
    tile_norm: float = _DEFAULTS.tile_norm,
    patch_size: int = _DEFAULTS.patch_size,
    validation_fraction: float = _DEFAULTS.validation_fraction,
    test_fraction: float = _DEFAULTS.test_fraction,
    seed: int = _DEFAULTS.seed,
    overwrite: bool = _DEFAULTS.overwrite,
    texts_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the synthetic demo data set (see the module docstring) and return its paths and a summary.

    Deterministic: the same arguments give byte-identical files. Raises ``ValueError`` on bad options (all
    listed at once) or when more cases are asked for than there are real texts of a class.
    """
    classes = list(classes)
    options = DemoDataArguments(
        output_dir=str(output_dir),
        num_cases=num_cases,
        classes=classes,
        feature_dim=feature_dim,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        max_slides_per_case=max_slides_per_case,
        multi_slide_fraction=multi_slide_fraction,
        lesion_fraction_min=lesion_fraction_min,
        lesion_fraction_max=lesion_fraction_max,
        signal_strength=signal_strength,
        background_confound=background_confound,
        tile_norm=tile_norm,
        patch_size=patch_size,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        seed=seed,
        overwrite=overwrite,
    )
    _check_arguments(options)
    texts = load_demo_texts(texts_dir)
    space_seq, plan_seq, slide_seq = np.random.SeedSequence(seed).spawn(3)
    plan_rng = np.random.default_rng(plan_seq)

    # cases: classes round-robin, each taking real texts of its class in a seeded order
    per_class = [num_cases // len(classes) + (k < num_cases % len(classes)) for k in range(len(classes))]
    pools: list[list[DemoText]] = []
    for label, wanted in zip(classes, per_class):
        pool = sorted(texts.get(label, []), key=lambda t: (t.source, t.slide_id))
        if wanted > len(pool):
            most = len(classes) * min(len(texts.get(c, [])) for c in classes)
            raise ValueError(
                f"num_cases={num_cases} needs {wanted} {label} cases but only {len(pool)} real {label} "
                f"texts are shipped; use num_cases <= {most} for classes {classes}."
            )
        pools.append([pool[i] for i in plan_rng.permutation(len(pool))[:wanted]])
    cases = [_Case(i, pools[i % len(classes)][i // len(classes)], i % len(classes)) for i in range(num_cases)]
    _assign_splits(plan_rng, cases, validation_fraction, test_fraction)
    for case in cases:
        many = max_slides_per_case > 1 and plan_rng.random() < multi_slide_fraction
        count = int(plan_rng.integers(2, max_slides_per_case + 1)) if many else 1
        case.slide_ids = _extra_slide_ids(case.text.slide_id, count)

    # slides
    output_dir = Path(output_dir)
    slides_dir = _prepare_output(output_dir, overwrite)
    space = _FeatureSpace.sample(np.random.default_rng(space_seq), len(classes), feature_dim, background_confound)
    slide_plan = [(case, sid) for case in cases for sid in case.slide_ids]
    rows, lesions, slide_info = [], {}, []
    for index, ((case, slide_id), slide_rng_seq) in enumerate(zip(slide_plan, slide_seq.spawn(len(slide_plan)))):
        rng = np.random.default_rng(slide_rng_seq)
        layout = SOURCE_LAYOUTS[index % len(SOURCE_LAYOUTS)]
        dtype = FEATURE_DTYPES[(index // len(SOURCE_LAYOUTS)) % len(FEATURE_DTYPES)]
        order = DISK_ORDERS[(index // (len(SOURCE_LAYOUTS) * len(FEATURE_DTYPES))) % len(DISK_ORDERS)]
        num_tiles = int(rng.integers(min_tiles, max_tiles + 1))
        cells = _tissue_grid(rng, num_tiles)  # [N, 2] (col, row)
        origin = rng.integers(2, 30, size=2) * patch_size + rng.integers(0, patch_size, size=2)
        coords = origin + cells * patch_size  # [N, 2] level-0 (x, y)
        lesion = _lesion_mask(rng, cells, rng.uniform(lesion_fraction_min, lesion_fraction_max))
        features = space.slide(rng, cells, lesion, case.class_index, signal_strength, tile_norm)  # [N, D]
        perm = _disk_order(rng, coords, order)
        h5_name = f"{slide_id}.h5"
        write_slide(
            slides_dir / h5_name, features[perm], coords[perm], layout=layout, patch_size_level0=patch_size, dtype=dtype
        )
        lesions[slide_id] = {
            "label": case.text.label,
            "lesion_fraction": round(float(lesion.mean()), 4),
            "lesion_coords": coords[lesion].tolist(),
        }
        slide_info.append(
            {
                "slide_id": slide_id,
                "case_id": case.text.case_id,
                "label": case.text.label,
                "split": case.split,
                "layout": layout,
                "dtype": dtype,
                "disk_order": order,
                "num_tiles": num_tiles,
                "num_lesion_tiles": int(lesion.sum()),
            }
        )
        first = case.text.questions[0]
        rows.append(
            {
                "h5_path": f"slides/{h5_name}",
                "caption": case.text.caption,
                "question": first.prompt(),
                "answer": first.answer,
                "slide_id": slide_id,
                "dataset": case.text.dataset,
                "case_id": case.text.case_id,
                "split": case.split,
                "label": case.text.label,
            }
        )

    # annotations
    paths: dict[str, Any] = {"output_dir": str(output_dir), "slides_dir": str(slides_dir)}
    paths["annotations"] = str(_write_csv(output_dir / "annotations.csv", rows))
    paths["splits"] = {
        s: str(_write_csv(output_dir / f"{s}.csv", [r for r in rows if r["split"] == s])) for s in SPLITS
    }
    llava = _llava_records(cases)
    paths["llava"] = {kind: {} for kind in llava}
    for kind, records in llava.items():
        for split in SPLITS:
            path = output_dir / f"llava_{kind}_{split}.json"
            _write_json(path, [r for r in records if r["split"] == split])
            paths["llava"][kind][split] = str(path)
    paths["class_prompts"] = str(output_dir / "class_prompts.json")
    _write_json(
        output_dir / "class_prompts.json",
        {"classnames": {c: CLASS_PROMPTS[c] for c in classes}, "templates": ZERO_SHOT_TEMPLATES},
    )
    paths["lesion_tiles"] = str(output_dir / "lesion_tiles.json")
    _write_json(output_dir / "lesion_tiles.json", lesions)

    summary = {
        "num_cases": len(cases),
        "num_slides": len(rows),
        "num_tiles": sum(s["num_tiles"] for s in slide_info),
        "classes": classes,
        "feature_dim": feature_dim,
        "cases_per_split": {s: sum(c.split == s for c in cases) for s in SPLITS},
        "slides_per_split": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "layouts": dict(Counter(s["layout"] for s in slide_info)),
        "dtypes": dict(Counter(s["dtype"] for s in slide_info)),
        "disk_orders": dict(Counter(s["disk_order"] for s in slide_info)),
    }
    parameters = {k: v for k, v in asdict(options).items() if k not in ("output_dir", "overwrite")}
    paths["demo_info"] = str(output_dir / "demo_info.json")
    _write_json(
        output_dir / "demo_info.json",
        {
            "description": "Synthetic slide features paired with real SlideBench / WSI-Bench texts; see "
            "scripts/demo_data/texts/NOTICE.md for the texts' origin, licence and citations.",
            "parameters": parameters,
            "summary": summary,
            "slides": slide_info,
        },
    )
    return {**paths, **summary}


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def diagnosis_question(classes: Sequence[str]) -> str:
    """The slide-grounded closed question of the demo: which class, options in a fixed order (A = first class).

    The real VQA texts ask about grades, stages or markers that synthetic features cannot show; this question's
    answer is exactly the planted class signal, so accuracy above the blind baselines proves the model reads the
    slide.
    """
    options = "\n".join(f"{chr(ord('A') + i)}) {CLASS_PROMPTS[c][0]}" for i, c in enumerate(classes))
    return f"Which tumour type does this whole slide image show?\n{options}"


def _llava_records(cases: list[_Case]) -> dict[str, list[dict[str, Any]]]:
    """LLaVA-style records per slide: caption/report generation, VQA (multi-turn for every other case), and the
    slide-grounded diagnosis question (:func:`diagnosis_question`)."""
    classes = sorted(
        {case.text.label for case in cases},
        key=lambda c: list(CLASS_PROMPTS).index(c) if c in CLASS_PROMPTS else len(CLASS_PROMPTS),
    )
    question = diagnosis_question(classes)
    caption, instruct, diagnosis = [], [], []
    for case in cases:
        text = case.text
        for slide_id in case.slide_ids:
            meta = {
                "image": f"slides/{slide_id}.h5",
                "slide_id": slide_id,
                "case_id": text.case_id,
                "label": text.label,
                "dataset": text.dataset,
                "split": case.split,
            }
            caption.append(
                {
                    "id": f"{slide_id}-caption",
                    **meta,
                    "conversations": _conversation(text.caption_question, text.caption, first=True),
                }
            )
            letter = chr(ord("A") + classes.index(text.label))
            diagnosis.append(
                {"id": f"{slide_id}-diagnosis", **meta, "conversations": _conversation(question, letter, first=True)}
            )
            if len(text.questions) > 1 and case.case_index % 2 == 0:
                turns = [
                    t for k, q in enumerate(text.questions) for t in _conversation(q.prompt(), q.answer, first=k == 0)
                ]
                instruct.append({"id": f"{slide_id}-vqa-multi", **meta, "conversations": turns})
            else:
                instruct.extend(
                    {
                        "id": f"{slide_id}-vqa-{k}",
                        **meta,
                        "conversations": _conversation(q.prompt(), q.answer, first=True),
                    }
                    for k, q in enumerate(text.questions)
                )
    return {"caption": caption, "instruct": instruct, "diagnosis": diagnosis}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``scripts/make_demo_data.py``): parse :class:`DemoDataArguments` and write the
    data set."""
    from transformers import HfArgumentParser  # heavy import, only for the CLI

    (args,) = HfArgumentParser(DemoDataArguments).parse_args_into_dataclasses(
        args=list(argv) if argv is not None else sys.argv[1:]
    )
    options = asdict(args)
    summary = make_demo_dataset(options.pop("output_dir"), **options)
    print(
        f"Demo data set written to {summary['output_dir']}: {summary['num_cases']} cases, "
        f"{summary['num_slides']} slides, {summary['num_tiles']} tiles (D = {summary['feature_dim']}), "
        f"cases per split {summary['cases_per_split']}, layouts {summary['layouts']}, dtypes {summary['dtypes']}."
    )
    print(f"Annotations: {summary['annotations']}; zero-shot prompts: {summary['class_prompts']}.")


__all__ = [
    "make_demo_dataset",
    "main",
    "load_demo_texts",
    "DemoDataArguments",
    "DemoText",
    "MultipleChoiceQuestion",
    "CLASS_PROMPTS",
    "ZERO_SHOT_TEMPLATES",
    "DEMO_CLASSES",
    "CSV_COLUMNS",
    "SPLITS",
]
