"""Zero-shot classification and slide↔text retrieval for WSI-CLIP (training-side: used by the trainer and
``wsi-evaluate-clip``).

* Zero-shot (TITAN / CONCH style): every class has several names × prompt templates; each prompt is embedded and
  L2-normalised, a class embedding is their mean, renormalised. A slide's scores are cosines to the class embeddings.
  Reported: balanced accuracy, weighted F1, macro one-vs-rest AUROC (``sklearn.metrics``).
* Retrieval with several positives: a slide's positives are the texts of its case (and identical texts); identical
  texts are one candidate (de-duplicated by text id), so a 3-slide case's report is not counted three times.
  Recall@K = share of queries with at least one positive in the top K; mAP = mean average precision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .losses import multi_positive_contrastive_loss, positive_mask

DEFAULT_RECALL_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}.",)


# --------------------------------------------------------------------------------------------- class prompts
@dataclass
class ClassPrompts:
    """Zero-shot prompts: ``classnames[label]`` = names of the class; ``templates`` with one ``{}`` each."""

    classnames: dict[str, list[str]]
    templates: list[str]

    @property
    def labels(self) -> list[str]:
        return list(self.classnames)

    def prompts(self, label: str) -> list[str]:
        """Every name × template of one class."""
        return [template.format(name) for name in self.classnames[label] for template in self.templates]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "class prompts") -> ClassPrompts:
        """``{"classnames": {label: [names]}, "templates": [...]}`` or a bare ``{label: [names]}`` mapping."""
        names = data.get("classnames", data) if isinstance(data, Mapping) else None
        templates = list(data.get("templates", DEFAULT_TEMPLATES)) if isinstance(data, Mapping) else []
        if not isinstance(names, Mapping) or not names:
            raise ValueError(
                f"{source}: expected {{'classnames': {{label: [names, ...]}}, 'templates': ['... {{}} ...']}}"
                " with at least one class."
            )
        classnames = {str(k): [v] if isinstance(v, str) else [str(n) for n in v] for k, v in names.items()}
        empty = [k for k, v in classnames.items() if not v]
        bad = [t for t in templates if t.count("{}") != 1]
        if empty or bad or not templates:
            raise ValueError(
                f"{source}: classes without names {empty}; templates must each contain one '{{}}' "
                f"(bad: {bad}; got {len(templates)} templates)."
            )
        return cls(classnames, templates)


def load_class_prompts(path: str | Path) -> ClassPrompts:
    """Read class prompts from JSON or YAML (the demo writes ``class_prompts.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: class prompts file not found (JSON or YAML with 'classnames' and "
            "'templates'; the demo data set writes class_prompts.json)."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return ClassPrompts.from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------------- embedding
def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", None) or processing_class


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    processing_class: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int | None = None,
) -> torch.Tensor:
    """``[len(texts), E]`` L2-normalised text embeddings through ``model.forward`` (works on DDP / FSDP wrappers)."""
    tokenizer = _tokenizer_of(processing_class)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        chunks.append(model(**enc, return_dict=True).text_embeds.float())
    return torch.cat(chunks)


@torch.no_grad()
def nearest_texts(
    model: torch.nn.Module,
    processor: Any,
    slides: Sequence[Any],
    texts: Sequence[str],
    batch_size: int = 8,
    max_tiles: int | None = None,
) -> list[int]:
    """Index into ``texts`` of the text nearest (cosine, joint space) to each slide: slide→text retrieval as a
    baseline for report generation (the best-matching training report of each test slide)."""
    device = next(model.parameters()).device
    text_embeds = embed_texts(model, processor, texts)  # [T, E] normalised
    best: list[int] = []
    for start in range(0, len(slides), batch_size):
        batch = processor(slides=list(slides[start : start + batch_size]), max_tiles=max_tiles)
        out = model.get_slide_features(
            batch["tile_features"].to(device), batch["tile_coords"].to(device), batch["tile_mask"].to(device)
        )
        slide_embeds = torch.nn.functional.normalize(out.pooler_output.float(), dim=-1)  # [B, E]
        best += (slide_embeds @ text_embeds.T).argmax(dim=1).tolist()
    return best


@torch.no_grad()
def build_zero_shot_classifier(
    model: torch.nn.Module,
    processing_class: Any,
    class_prompts: ClassPrompts,
    batch_size: int = 64,
    max_length: int | None = None,
) -> torch.Tensor:
    """``[C, E]`` normalised class embeddings: per class, the renormalised mean of its normalised prompt embeddings."""
    prompts = [class_prompts.prompts(label) for label in class_prompts.labels]
    flat = [p for group in prompts for p in group]
    embeds = embed_texts(model, processing_class, flat, batch_size, max_length)  # [P, E]
    out, start = [], 0
    for group in prompts:
        out.append(F.normalize(embeds[start : start + len(group)].mean(0), dim=-1))
        start += len(group)
    return torch.stack(out)


@torch.no_grad()
def encode_dataset(
    model: torch.nn.Module, dataset: Any, collator: Any, batch_size: int = 8, desc: str = "embedding slides and texts"
) -> dict[str, torch.Tensor]:
    """Run the model over a dataset: normalised ``slide_embeds`` / ``text_embeds`` ``[N, E]``, ``case_ids`` /
    ``text_ids`` / ``class_labels`` ``[N]`` and the ``logit_scale`` used by the model.

    Under ``torch.distributed`` each rank embeds the rows ``rank, rank + world, ...`` (no padding) and every rank gets
    all rows back in dataset order, so the metrics equal a single-process run: nothing duplicated, nothing dropped.
    """
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    indices = list(range(rank, len(dataset), world))
    shard = dataset.select(indices) if distributed else dataset
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collator)
    keys = ("tile_features", "tile_coords", "tile_mask", "input_ids", "attention_mask", "token_type_ids")
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("slide_embeds", "text_embeds", "case_ids", "text_ids", "class_labels")
    }
    scale = None
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=rank != 0):
            out = model(**{k: batch[k].to(device) for k in keys if k in batch}, return_dict=True)
            scale = out.logit_scale
            parts["slide_embeds"].append(out.slide_embeds.float().cpu())
            parts["text_embeds"].append(out.text_embeds.float().cpu())
            for key in ("case_ids", "text_ids", "class_labels"):
                default = torch.full((out.slide_embeds.shape[0],), -1, dtype=torch.long)
                parts[key].append(batch.get(key, default).cpu())
    if scale is None:  # this rank had no rows (fewer rows than processes)
        scale = model.scale() if hasattr(model, "scale") else torch.tensor(float("nan"))
    result = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    result["logit_scale"] = scale.detach().float().cpu()
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (indices, {k: v for k, v in result.items() if k != "logit_scale"}))
        order = torch.tensor([i for shard_indices, _ in gathered for i in shard_indices])
        inverse = torch.argsort(order)
        for key in parts:
            pieces = [p[key] for _, p in gathered if p[key].numel()]
            result[key] = torch.cat(pieces)[inverse]
    return result


# --------------------------------------------------------------------------------------------- retrieval
def _dedup_texts(text_embeds: torch.Tensor, text_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique texts ``[U, E]`` and, for every row, the index of its unique text ``[N]``."""
    if text_ids is None:
        return text_embeds, torch.arange(text_embeds.shape[0])
    unique, inverse = torch.unique(text_ids, return_inverse=True)
    first = torch.full((unique.numel(),), text_ids.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(text_ids.numel()), reduce="amin")
    return text_embeds[first], inverse


def _rank_metrics(scores: torch.Tensor, positives: torch.Tensor, ks: Iterable[int], prefix: str) -> dict[str, float]:
    """Recall@K and mAP for queries (rows) over candidates (columns); rows without positives are skipped."""
    keep = positives.any(1)
    scores, positives = scores[keep], positives[keep]
    metrics: dict[str, float] = {}
    if scores.shape[0] == 0:
        return metrics
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [Q, C]
    hits = positives.gather(1, order).float()  # [Q, C] 1 where the ranked candidate is a positive
    for k in ks:
        metrics[f"{prefix}_recall_at_{k}"] = float((hits[:, :k].sum(1) > 0).float().mean())
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
    precision = hits.cumsum(1) / ranks  # [Q, C]
    ap = (precision * hits).sum(1) / hits.sum(1)
    metrics[f"{prefix}_map"] = float(ap.mean())
    return metrics


def retrieval_metrics(
    slide_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    case_ids: torch.Tensor,
    text_ids: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
) -> dict[str, float]:
    """Slide→text and text→slide Recall@K and mAP with multi-positive ground truth.

    Args:
        slide_embeds / text_embeds: ``[N, E]`` paired rows (row i: a slide and its text); normalised or not.
        case_ids: ``[N]`` int case ids (same case ⇒ positives). text_ids: ``[N]`` ids of the texts (identical texts
            are merged into one candidate and are positives of each other); ``None``: every row's text is distinct.
    """
    s = F.normalize(slide_embeds.float(), dim=-1)
    t = F.normalize(text_embeds.float(), dim=-1)
    case_ids, text_ids = case_ids.long().cpu(), None if text_ids is None else text_ids.long().cpu()
    unique_texts, inverse = _dedup_texts(t.cpu(), text_ids)  # [U, E], [N]
    row_pos = positive_mask(case_ids, case_ids, text_ids, text_ids)  # [N, N] slide i ↔ text of row r
    to_unique = F.one_hot(inverse, unique_texts.shape[0]).float()  # [N, U]
    pos = (row_pos.float() @ to_unique) > 0  # [N, U] slide ↔ unique text
    scores = s.cpu() @ unique_texts.t()  # [N, U]
    metrics = _rank_metrics(scores, pos, ks, "slide_to_text")
    metrics.update(_rank_metrics(scores.t(), pos.t(), ks, "text_to_slide"))
    metrics["retrieval_num_slides"] = float(s.shape[0])
    metrics["retrieval_num_texts"] = float(unique_texts.shape[0])
    return metrics


def contrastive_loss_full(
    slide_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    case_ids: torch.Tensor,
    text_ids: torch.Tensor | None = None,
) -> float:
    """The symmetric soft-target loss over a whole evaluation set (all slides × all texts), one process.

    Unlike a mean of per-batch losses it does not depend on batch composition, so it is comparable across runs.
    """
    scale = torch.as_tensor(float(logit_scale))
    out = multi_positive_contrastive_loss(
        slide_embeds.float(), text_embeds.float(), scale, case_ids, text_ids, gather=False
    )
    return float(out.loss) if out.num_rows else float("nan")


# --------------------------------------------------------------------------------------------- classification
def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``; predicted
    classes absent from ``y_true`` are not averaged over, and raise no warning)."""
    from sklearn.metrics import recall_score

    return float(recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 per class present in ``y_true``, averaged with class frequencies as weights (scikit-learn 'weighted');
    a class never predicted has precision 0."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="weighted", zero_division=0))


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of binary labels ``y`` (1 = positive); ties count one half. ``nan`` (instead of scikit-learn's
    error) when only one class is present or a score is not finite."""
    from sklearn.metrics import roc_auc_score

    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    pos = int(y.sum())
    if pos == 0 or pos == y.size or not np.isfinite(score).all():
        return float("nan")
    return float(roc_auc_score(y, score))


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean of one-vs-rest AUROCs over the classes present in ``y_true`` (needs ≥ 2 classes)."""
    aucs = [binary_auroc((y_true == c).astype(np.int64), scores[:, c]) for c in np.unique(y_true)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(
    y_true: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor, prefix: str = "zero_shot"
) -> dict[str, float]:
    """Accuracy, balanced accuracy, weighted F1 and macro AUROC of ``scores [N, C]`` against ``y_true [N]``.

    Rows with ``y_true < 0`` (no or unknown label) are ignored; ``{prefix}_num_samples`` counts the rest.
    """
    y_true = np.asarray(y_true.cpu() if isinstance(y_true, torch.Tensor) else y_true).astype(np.int64)
    scores = np.asarray(scores.float().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    keep = y_true >= 0
    y_true, scores = y_true[keep], scores[keep]
    if y_true.size == 0:
        return {}
    y_pred = scores.argmax(1)
    return {
        f"{prefix}_accuracy": float((y_pred == y_true).mean()),
        f"{prefix}_balanced_accuracy": balanced_accuracy(y_true, y_pred),
        f"{prefix}_weighted_f1": weighted_f1(y_true, y_pred),
        f"{prefix}_macro_auroc": macro_auroc(y_true, scores),
        f"{prefix}_num_samples": float(y_true.size),
    }


def zero_shot_scores(slide_embeds: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` cosine similarities of slides to the class embeddings (argmax = prediction)."""
    return F.normalize(slide_embeds.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).t()


def format_table(metrics: Mapping[str, float], title: str = "WSI-CLIP evaluation") -> str:
    """Plain-text two-column table of metrics (what ``wsi-evaluate-clip`` prints)."""
    width = max([len(k) for k in metrics] + [10])
    lines = [title, "-" * (width + 11)]
    for key, value in metrics.items():
        lines.append(f"{key:<{width}}  {value:>9.4f}" if isinstance(value, float) else f"{key:<{width}}  {value!s:>9}")
    return "\n".join(lines)


__all__ = [
    "ClassPrompts",
    "load_class_prompts",
    "embed_texts",
    "nearest_texts",
    "build_zero_shot_classifier",
    "encode_dataset",
    "retrieval_metrics",
    "contrastive_loss_full",
    "classification_metrics",
    "balanced_accuracy",
    "weighted_f1",
    "binary_auroc",
    "macro_auroc",
    "zero_shot_scores",
    "format_table",
    "DEFAULT_RECALL_KS",
]
