"""Multi-positive slide–text contrastive loss, exact under data parallelism (training-only module).

Several slides of one case share one report, so a batch can hold several correct pairs per row. Positives of
a row are every column with the same ``case_id`` (or the identical text: duplicated template captions are not
negatives). Each row's target is uniform over its positives (the UniCL / StableRep soft-target form); when
every case occurs once this is exactly the CLIP loss. ``text_to_slide="mil_nce"`` uses MIL-NCE for the
text→slide direction instead (``-log Σ_pos softmax``).

Distributed: features are gathered **with** gradient (``torch.distributed.nn.functional.all_gather``), ids
without; each rank computes its local rows against all global columns. The local sum is scaled by
``world_size / global_row_count`` so that DDP's gradient averaging yields exactly the gradient of the global
mean: 2 ranks × 4 rows equal 1 rank × 8 rows (tested). Rows without any positive (``case_id < 0``, e.g. a
slide without text) are dropped from the mean; an all-dropped batch gives a zero loss, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on dim 0, differentiable (gradients flow back to every rank)."""
    world, _ = _world()
    if world == 1:
        return tensor
    try:  # torch >= 2.6: the functional collective with autograd (backward = reduce-scatter of the grads)
        from torch.distributed._functional_collectives import all_gather_single_autograd

        gathered = all_gather_single_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
        return gathered.wait() if hasattr(gathered, "wait") else gathered
    except ImportError:  # older torch
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on dim 0, without gradient (ids, labels). Sizes must match."""
    world, _ = _world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    world, _ = _world()
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


@dataclass
class ContrastiveLossOutput:
    """``loss`` (scalar, scaled for DDP averaging), the two directions, and the rows that counted."""

    loss: torch.Tensor
    slide_to_text: torch.Tensor
    text_to_slide: torch.Tensor
    num_rows: int


def positive_mask(
    local_case_ids: torch.Tensor,
    global_case_ids: torch.Tensor,
    local_text_ids: torch.Tensor | None = None,
    global_text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B_local, B_global]`` bool: same case (ids ≥ 0), or identical text when text ids are given."""
    valid_rows = (local_case_ids >= 0)[:, None]
    valid_cols = (global_case_ids >= 0)[None, :]
    pos = (local_case_ids[:, None] == global_case_ids[None, :]) & valid_rows & valid_cols  # [B, G]
    if local_text_ids is not None and global_text_ids is not None:
        pos = pos | ((local_text_ids[:, None] == global_text_ids[None, :]) & valid_rows & valid_cols)
    return pos


def _soft_target_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against the uniform distribution over positives. ``[B, G]`` → ``[B]``."""
    log_prob = F.log_softmax(logits.float(), dim=-1)  # [B, G]
    target = pos.float() / pos.sum(-1, keepdim=True).clamp_min(1)
    return -(target * log_prob).sum(-1)


def _mil_nce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-row MIL-NCE: -log(Σ_pos exp(l) / Σ_all exp(l)). ``[B, G]`` → ``[B]``."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), -1)


def multi_positive_contrastive_loss(
    slide_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    case_ids: torch.Tensor,
    text_ids: torch.Tensor | None = None,
    *,
    text_to_slide: Literal["soft", "mil_nce"] = "soft",
    normalize: bool = True,
    gather: bool = True,
) -> ContrastiveLossOutput:
    """Symmetric multi-positive contrastive loss on this rank's rows against every rank's columns.

    Args:
        slide_embeds / text_embeds: ``[B, E]`` paired embeddings (row i of both belongs to sample i).
        logit_scale: the **exponentiated** temperature (a scalar tensor, e.g. ``model.logit_scale.exp()``).
        case_ids: ``[B]`` int64 case ids; negative ids mark rows without a pair (dropped from the mean).
        text_ids: optional ``[B]`` int64 ids of the texts; identical texts are positives too.
        text_to_slide: ``"soft"`` (soft-target CE, symmetric) or ``"mil_nce"``.
        normalize: L2-normalise the embeddings first.
        gather: gather columns from every rank (training); ``False`` treats the inputs as the whole set (e.g. an
            evaluation set already gathered).
    """
    if slide_embeds.shape != text_embeds.shape or slide_embeds.ndim != 2:
        raise ValueError(
            f"slide_embeds {tuple(slide_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must both be [B, E]."
        )
    if case_ids.shape != slide_embeds.shape[:1]:
        raise ValueError(f"case_ids has shape {tuple(case_ids.shape)}; expected [{slide_embeds.shape[0]}].")
    if normalize:
        slide_embeds = F.normalize(slide_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
    world = _world()[0] if gather else 1
    if world > 1:
        all_slides, all_texts = gather_with_grad(slide_embeds), gather_with_grad(text_embeds)  # [G, E]
        all_cases = gather_no_grad(case_ids)  # [G]
        all_text_ids = gather_no_grad(text_ids) if text_ids is not None else None
    else:
        all_slides, all_texts, all_cases, all_text_ids = slide_embeds, text_embeds, case_ids, text_ids

    pos = positive_mask(case_ids, all_cases, text_ids, all_text_ids)  # [B, G]
    logits_s2t = logit_scale * slide_embeds @ all_texts.t()  # [B, G]
    logits_t2s = logit_scale * text_embeds @ all_slides.t()  # [B, G]
    keep = pos.any(-1)  # [B] rows with at least one positive
    loss_s2t = _soft_target_ce(logits_s2t, pos)
    loss_t2s = _mil_nce(logits_t2s, pos) if text_to_slide == "mil_nce" else _soft_target_ce(logits_t2s, pos)
    zero = logits_s2t.sum() * 0.0  # keeps the graph (and DDP) happy when no row counts
    local_s2t = torch.where(keep, loss_s2t, torch.zeros_like(loss_s2t)).sum() + zero
    local_t2s = torch.where(keep, loss_t2s, torch.zeros_like(loss_t2s)).sum() + zero
    count = keep.sum().to(slide_embeds.device, torch.float32)
    count = (_all_reduce_sum(count) if world > 1 else count).clamp_min(1.0)
    scale = world / count
    s2t, t2s = local_s2t * scale, local_t2s * scale
    return ContrastiveLossOutput(loss=(s2t + t2s) / 2, slide_to_text=s2t, text_to_slide=t2s, num_rows=int(keep.sum()))


__all__ = [
    "multi_positive_contrastive_loss",
    "positive_mask",
    "gather_with_grad",
    "gather_no_grad",
    "ContrastiveLossOutput",
]
