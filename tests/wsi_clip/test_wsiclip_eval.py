"""WSI-CLIP evaluation metrics against hand-computed cases, zero-shot on a constructed case, data plumbing."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_clip.data import CaseGroupedSampler, WSIClipCollator
from wsi_clip.evaluation import (
    ClassPrompts,
    balanced_accuracy,
    binary_auroc,
    build_zero_shot_classifier,
    classification_metrics,
    contrastive_loss_full,
    load_class_prompts,
    macro_auroc,
    retrieval_metrics,
    weighted_f1,
    zero_shot_scores,
)
from wsi_clip.losses import multi_positive_contrastive_loss

from conftest import build_tiny_tokenizer
from wsiclip_helpers import make_tiny_demo


# ------------------------------------------------------------------------------------------------ classification
def test_classification_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 2])
    assert math.isclose(balanced_accuracy(y_true, y_pred), (2 / 3 + 1 / 2 + 1) / 3)
    assert math.isclose(weighted_f1(y_true, y_pred), (3 * 2 / 3 + 2 * 0.5 + 1 * 1.0) / 6)
    assert math.isclose(binary_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])), 0.75)
    assert math.isclose(binary_auroc(np.array([0, 1]), np.array([0.5, 0.5])), 0.5)  # ties count one half
    assert math.isnan(binary_auroc(np.array([1, 1]), np.array([0.1, 0.2])))
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.3], [0.2, 0.4, 0.2], [0.3, 0.1, 0.6]])
    assert math.isclose(macro_auroc(np.array([0, 1, 2, 2]), scores), (1 + 1 / 3 + 3 / 4) / 3)
    metrics = classification_metrics(torch.tensor([0, 1, 2, 2, -1]), torch.tensor(np.vstack([scores, [[1, 0, 0]]])))
    assert metrics["zero_shot_num_samples"] == 4  # the unlabelled row is ignored
    assert math.isclose(metrics["zero_shot_accuracy"], 2 / 4)  # argmax: 0, 2, 1, 2
    assert math.isclose(metrics["zero_shot_balanced_accuracy"], (1 + 0 + 1 / 2) / 3)


# ------------------------------------------------------------------------------------------------ retrieval
def test_retrieval_multi_positive_by_hand():
    # cases A, A, B; the two A slides share one report (identical text id), so there are 2 candidate texts
    slides = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(slides, texts, torch.tensor([10, 10, 11]), torch.tensor([5, 5, 6]), ks=(1, 2))
    assert m["retrieval_num_texts"] == 2 and m["retrieval_num_slides"] == 3
    assert math.isclose(m["slide_to_text_recall_at_1"], 2 / 3, rel_tol=1e-6)  # slide 1 ranks report A second
    assert m["slide_to_text_recall_at_2"] == 1.0
    assert math.isclose(m["slide_to_text_map"], (1 + 1 / 2 + 1) / 3, rel_tol=1e-6)
    assert m["text_to_slide_recall_at_1"] == 1.0
    assert math.isclose(m["text_to_slide_map"], 1.0)  # report A: slides 0, 1 are ranks 1, 2 → AP 1


def test_retrieval_perfect_and_random():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g)
    perfect = retrieval_metrics(x, x, torch.arange(50), torch.arange(50))
    assert perfect["slide_to_text_recall_at_1"] == perfect["text_to_slide_map"] == 1.0
    noise = retrieval_metrics(x, torch.randn(50, 16, generator=g), torch.arange(50), torch.arange(50))
    assert noise["slide_to_text_recall_at_1"] < 0.2


def test_full_set_loss_matches_the_training_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    cases, texts = torch.tensor([1, 1, 2, 3, 3, 4]), torch.tensor([7, 7, 8, 9, 10, 11])
    expected = multi_positive_contrastive_loss(s, t, torch.tensor(10.0), cases, texts).loss
    assert math.isclose(contrastive_loss_full(s, t, 10.0, cases, texts), float(expected), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ zero-shot
class _BagOfWordsClip(torch.nn.Module):
    """Text tower stand-in: a text's embedding is the normalised sum of fixed word vectors."""

    def __init__(self, tokenizer, word_vectors: dict[str, list[float]]):
        super().__init__()
        vocab = tokenizer.get_vocab()
        table = torch.zeros(len(vocab), 2)
        for word, vector in word_vectors.items():
            table[vocab[word]] = torch.tensor(vector)
        self.table = torch.nn.Embedding.from_pretrained(table)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=True):
        summed = (self.table(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        return type("Out", (), {"text_embeds": F.normalize(summed, dim=-1)})()


def test_zero_shot_prediction_on_a_constructed_case(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = _BagOfWordsClip(tokenizer, {"carcinoma": [1, 0], "tumor": [1, 0], "normal": [0, 1], "tissue": [0, 1]})
    path = tmp_path / "classes.yaml"
    path.write_text(
        "classnames:\n  TUMOR: [carcinoma, tumor cells]\n  NORMAL: [normal tissue]\n"
        "templates: ['{}.', 'a slide of {}']\n"
    )
    prompts = load_class_prompts(path)
    assert prompts.labels == ["TUMOR", "NORMAL"] and len(prompts.prompts("TUMOR")) == 4
    classifier = build_zero_shot_classifier(model, tokenizer, prompts)
    torch.testing.assert_close(classifier, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    slides = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.2, 1.0], [0.9, 0.5]])
    scores = zero_shot_scores(slides, classifier)
    assert scores.argmax(1).tolist() == [0, 1, 1, 0]
    metrics = classification_metrics(torch.tensor([0, 1, 1, 0]), scores)
    assert metrics["zero_shot_balanced_accuracy"] == metrics["zero_shot_macro_auroc"] == 1.0
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        ClassPrompts.from_dict({"classnames": {"A": ["a"]}, "templates": ["no placeholder"]})
    assert ClassPrompts.from_dict({"A": "alpha", "B": ["beta"]}).templates == ["{}."]


# ------------------------------------------------------------------------------------------------ data
def test_collator_class_labels_and_non_negative_ids(tmp_path):
    from processing import WSIProcessor, load_annotations

    info = make_tiny_demo(tmp_path, num_cases=8)
    rows = list(load_annotations(info["annotations"], "clip"))
    labels = json.loads((tmp_path / "class_prompts.json").read_text())["classnames"]
    collator = WSIClipCollator(WSIProcessor(build_tiny_tokenizer(), max_tiles=8), class_names=list(labels))
    batch = collator(rows)
    assert batch["tile_features"].shape[:2] == (len(rows), 8)
    assert batch["class_labels"].tolist() == [list(labels).index(r["label"]) for r in rows]
    assert (batch["case_ids"] >= 0).all() and (batch["text_ids"] >= 0).all()  # negative ids mean "no pair"
    same_case = [i for i, r in enumerate(rows) if r["case_id"] == rows[0]["case_id"]]
    assert len(set(batch["case_ids"][same_case].tolist())) == 1


def test_case_grouped_sampler_keeps_cases_whole(caplog):
    case_ids = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "g", "h", "h", "i", "j"]
    sampler = CaseGroupedSampler(case_ids, batch_size=4, num_replicas=2, seed=3)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) and len(sampler) % (4 * 2) == 0
        for start in range(0, len(order), 4):
            batch = order[start : start + 4]
            counts = Counter(case_ids[i] for i in batch)
            for case, count in counts.items():  # every case in a batch is complete
                assert count == case_ids.count(case), (epoch, batch)
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch
    with caplog.at_level("WARNING"):
        big = CaseGroupedSampler(["x"] * 5 + ["y", "z", "w"], batch_size=4)
    assert "split over batches" in caplog.text and len(big) == 8
    with pytest.raises(ValueError, match="cannot fill"):
        CaseGroupedSampler(["a", "b"], batch_size=4)
