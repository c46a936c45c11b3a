"""Mean over the real positions of a padded batch: the one masked mean every tower and head uses.

Hub-shipped with the modeling files (imports only torch).
"""

from __future__ import annotations

from torch import Tensor


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden ``[B, T, D]``, mask ``[B, T]`` (True / 1 = real) → ``[B, D]``; an all-padding row gives zeros."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # [B, D]


__all__ = ["masked_mean"]
