"""Linear probe, k-NN and few-shot on slide embeddings: folds by case, confidence intervals, the mean-of-tiles
reference, and the ``wsi-probe-embeddings`` command over ``wsi-embed-slides`` output."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from processing import write_slide
from wsi_clip import SlideEncoderConfig, SlideEncoderModel
from wsi_clip.commands.embed import main as embed_main
from wsi_clip.commands.probe import main as probe_main
from wsi_clip.probes import ProbeSettings, case_folds, mean_and_ci, run_probes


def _cases(num_cases: int, classes: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Labels and case ids of slides: 1–3 slides per case, classes assigned round-robin to cases."""
    rng = np.random.default_rng(seed)
    labels, cases = [], []
    for case in range(num_cases):
        for _ in range(int(rng.integers(1, 4))):
            labels.append(case % classes)
            cases.append(f"case{case:03d}")
    return np.asarray(labels), cases


def test_folds_keep_every_case_on_one_side_and_cover_each_slide_once():
    labels, cases = _cases(40, 4)
    seen = np.zeros(len(labels), dtype=int)
    cases_arr = np.asarray(cases)
    for train, test in case_folds(labels, cases, folds=5, seed=0):
        assert not set(cases_arr[train]) & set(cases_arr[test])
        assert set(labels[test]) == set(range(4))  # stratified: every class in every test fold
        seen[test] += 1
    assert (seen == 1).all()
    with pytest.raises(ValueError, match="at least 2 cases per class"):
        list(case_folds(np.array([0, 1, 1]), ["a", "b", "c"], 5, 0))


def test_probes_find_a_signal_and_report_intervals():
    labels, cases = _cases(60, 3)
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 32)) * 1.5
    x = centres[labels] + rng.standard_normal((len(labels), 32))  # [S, 32], a clear but noisy class signal
    metrics = run_probes(x, labels, cases, ProbeSettings(folds=5, shots=(1, 16), episodes=3))
    for method in ("linear_probe", "knn", "few_shot_16"):
        key = f"{method}_balanced_accuracy"
        assert metrics[key] > 0.85, (method, metrics[key])
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
        assert metrics[f"{method}_macro_auroc"] > 0.9
    assert metrics["few_shot_1_balanced_accuracy"] < metrics["few_shot_16_balanced_accuracy"]
    noise = run_probes(rng.standard_normal(x.shape), labels, cases, ProbeSettings(shots=(4,), episodes=2))
    assert noise["linear_probe_balanced_accuracy"] < 0.6  # chance is 1/3


def test_slides_of_one_case_do_not_leak_across_folds():
    """Near-identical slides per case with labels random per case: only a by-slide split could score high."""
    rng = np.random.default_rng(2)
    case_vectors, case_labels = rng.standard_normal((40, 16)), rng.integers(0, 2, 40)
    rows = [c for c in range(40) for _ in range(3)]
    x = case_vectors[rows] + 0.01 * rng.standard_normal((len(rows), 16))
    metrics = run_probes(x, case_labels[rows], [f"c{c}" for c in rows], ProbeSettings(shots=(1,), episodes=2))
    assert metrics["knn_balanced_accuracy"] < 0.75  # a slide-level split would give ~1.0 (its case's twins)


def test_mean_and_ci():
    mean, low, high = mean_and_ci([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and low == pytest.approx(0.9 - 0.2484, abs=1e-3) and high > 1.0
    assert mean_and_ci([0.5]) == (0.5, 0.5, 0.5)


def test_probe_command_over_embed_slides_output(tmp_path):
    """A cohort with a class signal in a few tiles: embeddings → probes, beside the mean-of-tiles reference."""
    rng = np.random.default_rng(3)
    rows = []
    for case in range(24):
        label = ("tumour", "normal")[case % 2]
        for s in range(1 + case % 2):
            n = int(rng.integers(60, 120))
            feats = rng.standard_normal((n, 16)).astype(np.float32)
            feats[: n // 5, 0] += 3.0 if label == "tumour" else -3.0  # the signal, in 20 % of the tiles
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 256
            path = write_slide(tmp_path / "slides" / f"c{case}_s{s}.h5", feats, coords, dtype="float32")
            rows.append({"h5_path": str(path), "case_id": f"c{case}", "label": label})
    with (tmp_path / "cohort.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    torch.manual_seed(0)
    config = SlideEncoderConfig(
        input_dim=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pooling="mean"
    )
    SlideEncoderModel(config).save_pretrained(tmp_path / "encoder")
    embed_main(["--model_name_or_path", str(tmp_path / "encoder"), "--slides", str(tmp_path / "cohort.csv"),
                "--output_dir", str(tmp_path / "emb")])  # fmt: skip
    features = tmp_path / "emb" / "slide_features_encoder"
    results = probe_main(
        ["--embeddings", str(features), "--test_file", str(tmp_path / "cohort.csv"), "--probe_folds", "4",
         "--few_shot", "1", "4", "--few_shot_episodes", "2"]
    )  # fmt: skip
    reference = results["mean of tile features (reference)"]
    assert reference["linear_probe_balanced_accuracy"] > 0.9  # the signal is in the mean of the tiles
    model = results[str(tmp_path / "encoder")]
    assert model["num_slides"] == len(rows) and model["num_cases"] == 24
    assert 0.0 <= model["knn_balanced_accuracy"] <= 1.0 and "few_shot_4_macro_auroc_ci_high" in model
    saved = json.loads((features / "probes.json").read_text())
    assert saved["classes"] == ["normal", "tumour"] and set(saved["results"]) == set(results)
