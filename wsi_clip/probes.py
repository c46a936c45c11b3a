"""The evaluations users run on slide embeddings: linear probe, k-NN and few-shot, with folds split by case.

What Patho-Bench and TITAN report beside zero-shot and retrieval. Every method runs on the same stratified folds in
which all slides of one case fall on the same side (a case's slides share their label and look alike: splitting
them would leak), and reports the mean over folds with a 95 % confidence interval (Student's t over the folds; for
few-shot over folds × episodes). The reference every slide model must beat is the same probe on the **mean of the
tile features** (:func:`mean_tile_features`): a model that does not beat it has learned nothing a bag average has
not.

* linear probe: scikit-learn ``LogisticRegression`` (L2, ``C``, balanced class weights) on standardised embeddings;
* k-NN: cosine distance, ``k`` neighbours (at most the training slides), distance-weighted votes;
* few-shot: ``k`` training *cases* per class drawn from each fold's training part (``episodes`` draws per fold), the
  linear probe fit on their slides; classes with fewer than ``k`` training cases use all they have.

Metrics: balanced accuracy and macro one-vs-rest AUROC (:mod:`wsi_clip.evaluation`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .evaluation import balanced_accuracy, macro_auroc

DEFAULT_SHOTS = (1, 4, 16)


@dataclass
class ProbeSettings:
    folds: int = 5
    seed: int = 0
    C: float = 1.0
    knn_k: int = 20
    shots: Sequence[int] = DEFAULT_SHOTS
    episodes: int = 5
    max_iter: int = 2000


@dataclass
class ProbeScores:
    """Per-fold (or per-episode) scores of one method."""

    balanced_accuracy: list[float] = field(default_factory=list)
    macro_auroc: list[float] = field(default_factory=list)

    def add(self, y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> None:
        """Score class probabilities ``proba [n, len(classes)]`` (columns in ``classes`` order) on ``y_true``."""
        full = np.zeros((len(y_true), int(max(classes.max(), y_true.max())) + 1))
        full[:, classes] = proba
        self.balanced_accuracy.append(balanced_accuracy(y_true, classes[proba.argmax(1)]))
        self.macro_auroc.append(macro_auroc(y_true, full))

    def summary(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, values in (("balanced_accuracy", self.balanced_accuracy), ("macro_auroc", self.macro_auroc)):
            mean, low, high = mean_and_ci(values)
            out.update({f"{prefix}_{name}": mean, f"{prefix}_{name}_ci_low": low, f"{prefix}_{name}_ci_high": high})
        return out


def mean_and_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of ``values`` (NaNs dropped; a single value: no interval)."""
    from scipy import stats

    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def case_folds(
    labels: np.ndarray, cases: Sequence[str], folds: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds with every case on one side (``StratifiedGroupKFold``); fewer folds when a class has fewer
    cases than ``folds`` (at least 2)."""
    from sklearn.model_selection import StratifiedGroupKFold

    cases = np.asarray([str(c) for c in cases])
    cases_per_class = [len(set(cases[labels == c])) for c in np.unique(labels)]
    n_folds = min(folds, min(cases_per_class))
    if n_folds < 2:
        raise ValueError(
            f"a class has {min(cases_per_class)} case(s): probes need at least 2 cases per class (one to train on, "
            "one to test)."
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    yield from splitter.split(np.zeros(len(labels)), labels, cases)


def _logistic(x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=settings.C, class_weight="balanced", max_iter=settings.max_iter),
    )
    return model.fit(x_train, y_train)


def _fit_predict(kind: str, x_train, y_train, x_test, settings: ProbeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities on ``x_test`` and their class order."""
    classes = np.unique(y_train)
    if classes.size == 1:  # a one-class training set: that class, with certainty
        return np.ones((len(x_test), 1)), classes
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        k = min(settings.knn_k, len(y_train))
        model = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance").fit(x_train, y_train)
    else:
        model = _logistic(x_train, y_train, settings)
    return model.predict_proba(x_test), model.classes_


def run_probes(
    embeddings: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray,
    cases: Sequence[str],
    settings: ProbeSettings | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Linear probe, k-NN and few-shot of ``embeddings [S, D]`` against integer ``labels [S]`` (negative: no label,
    skipped), folds split by ``cases``. Keys: ``{prefix}linear_probe_balanced_accuracy`` (+ ``_ci_low`` /
    ``_ci_high``), ``…_macro_auroc``, ``{prefix}knn_…``, ``{prefix}few_shot_{k}_…``."""
    settings = settings or ProbeSettings()
    x = np.asarray(embeddings.float().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, np.float64)
    y = np.asarray(labels, dtype=np.int64)
    cases = np.asarray([str(c) for c in cases])
    keep = y >= 0
    x, y, cases = x[keep], y[keep], cases[keep]
    if np.unique(y).size < 2:
        raise ValueError("probes need at least two classes among the labelled slides.")
    rng = np.random.default_rng(settings.seed)
    scores = {name: ProbeScores() for name in ("linear_probe", "knn", *(f"few_shot_{k}" for k in settings.shots))}
    for train, test in case_folds(y, cases, settings.folds, settings.seed):
        for kind in ("linear_probe", "knn"):
            proba, classes = _fit_predict(kind, x[train], y[train], x[test], settings)
            scores[kind].add(y[test], proba, classes)
        for k in settings.shots:
            for _ in range(settings.episodes):
                chosen = _few_shot_rows(y[train], cases[train], k, rng)
                proba, classes = _fit_predict("linear", x[train][chosen], y[train][chosen], x[test], settings)
                scores[f"few_shot_{k}"].add(y[test], proba, classes)
    metrics: dict[str, float] = {f"{prefix}num_slides": float(len(y)), f"{prefix}num_cases": float(len(set(cases)))}
    for name, result in scores.items():
        metrics.update(result.summary(prefix + name))
    return metrics


def _few_shot_rows(labels: np.ndarray, cases: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``shots`` randomly drawn cases per class (all of a class's cases when it has fewer)."""
    rows = []
    for c in np.unique(labels):
        class_cases = np.unique(cases[labels == c])
        picked = rng.choice(class_cases, size=min(shots, class_cases.size), replace=False)
        rows.append(np.flatnonzero((labels == c) & np.isin(cases, picked)))
    return np.concatenate(rows)


def mean_tile_features(paths: Sequence[str], max_tiles: int | None = None) -> torch.Tensor:
    """``[S, D]`` mean of each slide's tile features: the reference embedding every slide model must beat."""
    from processing import read_slide

    return torch.stack([read_slide(p, max_tiles=max_tiles, tile_sampling="uniform").features.mean(0) for p in paths])


def format_probe_table(results: Mapping[str, Mapping[str, float]], shots: Sequence[int] = DEFAULT_SHOTS) -> str:
    """One row per embedding (e.g. the model and the mean-pooled reference), balanced accuracy [95 % CI] per method."""
    methods = ["linear_probe", "knn", *(f"few_shot_{k}" for k in shots)]
    width = max(len(n) for n in results) + 2
    header = f"{'embedding':<{width}}" + "".join(f"{m:>22}" for m in methods)
    lines = ["balanced accuracy, mean over folds [95% CI]", header, "-" * len(header)]
    for name, metrics in results.items():
        cells = []
        for m in methods:
            key = f"{m}_balanced_accuracy"
            mean, low, high = (metrics.get(k, float("nan")) for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]".rjust(22))
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


__all__ = [
    "ProbeSettings",
    "ProbeScores",
    "run_probes",
    "case_folds",
    "mean_and_ci",
    "mean_tile_features",
    "format_probe_table",
    "DEFAULT_SHOTS",
]
