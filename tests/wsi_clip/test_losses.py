"""Multi-positive contrastive loss: CLIP equivalence, soft targets, dropped rows, MIL-NCE, 2-process exactness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wsi_clip.losses import multi_positive_contrastive_loss, positive_mask

from conftest import torchrun_command

DIST = Path(__file__).resolve().parents[1] / "dist"


def _embeds(b=6, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, e, generator=g), torch.randn(b, e, generator=g)


def test_equals_clip_when_every_case_is_unique():
    s, t = _embeds()
    scale = torch.tensor(14.0)
    out = multi_positive_contrastive_loss(s, t, scale, torch.arange(6))
    logits = scale * F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).t()
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(out.loss, clip)
    assert out.num_rows == 6


def test_soft_targets_are_uniform_over_positives():
    s, t = _embeds(b=4)
    cases = torch.tensor([7, 7, 8, 9])
    out = multi_positive_contrastive_loss(s, t, torch.tensor(1.0), cases)
    logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).t()
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    s2t = -(target * logits.log_softmax(-1)).sum(-1).mean()
    t2s = -(target * logits.t().log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out.slide_to_text, s2t)
    torch.testing.assert_close(out.text_to_slide, t2s)
    mil = multi_positive_contrastive_loss(s, t, torch.tensor(1.0), cases, text_to_slide="mil_nce")
    lt = logits.t()
    expected = (
        lt.logsumexp(-1) - torch.stack([lt[0, :2].logsumexp(0), lt[1, :2].logsumexp(0), lt[2, 2], lt[3, 3]])
    ).mean()
    torch.testing.assert_close(mil.text_to_slide, expected)


def test_identical_texts_are_positives():
    pos = positive_mask(torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([5, 5]), torch.tensor([5, 5]))
    assert pos.all()


def test_rows_without_positive_are_dropped_never_nan():
    s, t = _embeds(b=4)
    s.requires_grad_()
    out = multi_positive_contrastive_loss(s, t, torch.tensor(3.0), torch.tensor([0, 1, -1, -1]))
    assert out.num_rows == 2
    logits = 3.0 * F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).t()
    expected = -(logits[:2].log_softmax(-1)[[0, 1], [0, 1]]).mean()  # unpaired columns stay as negatives
    torch.testing.assert_close(out.slide_to_text, expected)
    none = multi_positive_contrastive_loss(s, t, torch.tensor(3.0), torch.full((4,), -1))
    assert none.loss.item() == 0.0 and not torch.isnan(none.loss)
    none.loss.backward()
    assert torch.isfinite(s.grad).all()


def test_shape_errors():
    s, t = _embeds()
    with pytest.raises(ValueError, match=r"must both be \[B, E\]"):
        multi_positive_contrastive_loss(s, t[:3], torch.tensor(1.0), torch.arange(6))
    with pytest.raises(ValueError, match="case_ids has shape"):
        multi_positive_contrastive_loss(s, t, torch.tensor(1.0), torch.arange(5))


@pytest.mark.slow
def test_two_processes_equal_one_process_batch_of_eight(tmp_path):
    sys.path.insert(0, str(DIST))
    from loss_reference import make_problem

    proj_s, proj_t, scale, xs, xt, cases, texts = make_problem()
    ref = multi_positive_contrastive_loss(xs @ proj_s, xt @ proj_t, scale.exp(), cases, texts)
    ref.loss.backward()
    out_file = tmp_path / "dist.pt"
    repo = Path(__file__).resolve().parents[2]
    cmd = torchrun_command("loss_worker.py", out_file, repo)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out_file, weights_only=True)
    torch.testing.assert_close(got["loss"], ref.loss.detach(), atol=1e-5, rtol=1e-5)
    for g, p in zip(got["grads"], (proj_s, proj_t, scale)):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)
