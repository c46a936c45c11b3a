"""Visual-token selection between the slide tower and the projector, as a registry of named hooks.

Hub-shipped (a sibling of ``modeling_wsillava.py``): imports only stdlib and torch.

One signature for every selector, built-in or user-defined::

    @register_token_selector("my_selector", requires=("cls_attention", "keys", "question_embedding"))
    def my_selector(inputs: TokenSelectionInputs, **options) -> TokenSelectionOutput: ...

``inputs`` carries the tower outputs (tile tokens, mask, grid cells) and — only when listed in ``requires`` — the
last layer's CLS→tile attention and keys (``"cls_attention"``, ``"keys"``), the question's embedding in LM space
(``"question_embedding"``). ``options`` come from ``config.token_selection_kwargs`` or the per-call
``token_selection_kwargs``. The output holds the kept (possibly merged) tokens in tower space, left-aligned per
slide in their original order, with a mask: K may differ per slide, the model splices each slide's own K tokens.
A class works too: it is instantiated once (no arguments) and its instances are called with the same signature.

Every built-in is vectorised over tiles and slides (no Python loop over tokens) and treats slides independently
(per-slide quantiles, per-slide K), so a slide's selection does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

KNOWN_REQUIREMENTS = ("cls_attention", "keys", "question_embedding")


@dataclass
class TokenSelectionInputs:
    """What a selector sees (B slides, N tile slots, D tower width, H attention heads, E LM width).

    Args:
        tokens: ``[B, N, D]`` tower token states of the tiles (CLS removed), in the slide's tile order.
        token_mask: ``[B, N]`` bool, True on real tiles (padding may sit anywhere).
        grid: ``[B, N, 2]`` int64 ``(gx, gy)`` tile grid cells (``floor(coords / tile_size)``), or ``None``.
        cls_attention: ``[B, H, N]`` last layer's CLS→tile softmax attention, zeros on padding (if required).
        keys: ``[B, N, D]`` last layer's tile keys, heads concatenated (if required).
        question_embedding: ``[B, E]`` mean LM input embedding of each prompt's question tokens (if required).
        project: the model's projector ``[..., D] → [..., E]`` (to score tokens in LM space).
    """

    tokens: Tensor
    token_mask: Tensor
    grid: Tensor | None = None
    cls_attention: Tensor | None = None
    keys: Tensor | None = None
    question_embedding: Tensor | None = None
    project: Callable[[Tensor], Tensor] | None = None


@dataclass
class TokenSelectionOutput:
    """What a selector returns (K = most tokens kept by one slide of the batch).

    Args:
        tokens: ``[B, K, D]`` kept (possibly merged) tokens in tower space, each slide's first ``K_b`` rows real.
        token_mask: ``[B, K]`` bool, True on real visual tokens.
        indices: ``[B, K]`` int64 source tile index of each token; ``-1`` for padding and for synthetic tokens
            (e.g. PruMerge's summary token). Used for heatmaps.
    """

    tokens: Tensor
    token_mask: Tensor
    indices: Tensor


class TokenSelector(Protocol):
    def __call__(self, inputs: TokenSelectionInputs, **options: Any) -> TokenSelectionOutput: ...


@dataclass(frozen=True)
class _Registered:
    fn: TokenSelector
    requires: tuple[str, ...]


_REGISTRY: dict[str, _Registered] = {}


def register_token_selector(
    name: str, *, requires: tuple[str, ...] | list[str] = (), overwrite: bool = False
) -> Callable[[Any], Any]:
    """Decorator registering a token selector under ``name`` (then usable as ``config.token_selection``).

    ``requires`` lists the optional inputs the selector reads, so the model computes them only when needed:
    ``"cls_attention"`` and ``"keys"`` (last tower layer, O(N)), ``"question_embedding"``. Classes are
    instantiated once without arguments. Re-registering a name needs ``overwrite=True``.
    """
    requires = tuple(requires)
    unknown = [r for r in requires if r not in KNOWN_REQUIREMENTS]
    if unknown:
        raise ValueError(
            f"register_token_selector({name!r}): unknown requirement(s) {unknown}; choose from {KNOWN_REQUIREMENTS}."
        )

    def decorator(obj: Any) -> Any:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].fn is not obj:
            raise ValueError(
                f"a token selector named {name!r} is already registered; pass overwrite=True to "
                "replace it or choose another name."
            )
        fn = obj() if isinstance(obj, type) else obj
        if not callable(fn):
            raise TypeError(f"register_token_selector({name!r}) needs a function or a class with __call__.")
        _REGISTRY[name] = _Registered(fn, requires)
        return obj

    return decorator


def available_token_selectors() -> list[str]:
    return sorted(_REGISTRY)


def get_token_selector(name: str) -> _Registered:
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown token selector {name!r}; registered: {available_token_selectors()}. Register yours "
            "with @wsi_llava.register_token_selector(name) before building or calling the model."
        )
    return _REGISTRY[name]


def run_token_selector(name: str, inputs: TokenSelectionInputs, **options: Any) -> TokenSelectionOutput:
    """Run a registered selector and check its output contract (shapes, dtypes, at least one token per slide)."""
    entry = get_token_selector(name)
    for req in entry.requires:
        if getattr(inputs, req) is None:
            raise ValueError(f"token selector {name!r} requires {req!r} but it was not computed/passed.")
    out = entry.fn(inputs, **options)
    batch, _, dim = inputs.tokens.shape
    if not isinstance(out, TokenSelectionOutput):
        raise TypeError(f"token selector {name!r} must return a TokenSelectionOutput, got {type(out).__name__}.")
    k = out.tokens.shape[1] if out.tokens.dim() == 3 else -1
    if (
        out.tokens.dim() != 3
        or out.tokens.shape[0] != batch
        or out.tokens.shape[2] != dim
        or tuple(out.token_mask.shape) != (batch, k)
        or tuple(out.indices.shape) != (batch, k)
    ):
        raise ValueError(
            f"token selector {name!r} returned tokens {tuple(out.tokens.shape)}, mask "
            f"{tuple(out.token_mask.shape)}, indices {tuple(out.indices.shape)}; expected [B={batch}, K, "
            f"D={dim}], [B, K], [B, K]."
        )
    if not bool(out.token_mask.any(dim=1).all()):
        raise ValueError(f"token selector {name!r} kept no token for some slide; keep at least one per slide.")
    return out


# ------------------------------------------------------------------------------------------------ helpers
def compact(keep: Tensor, tokens: Tensor, extra_len: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gather each slide's kept tokens to the front, original order kept (stable sort on ``~keep``).

    keep ``[B, N]`` bool, tokens ``[B, N, D]`` → tokens ``[B, K, D]``, mask ``[B, K]``, indices ``[B, K]`` (-1 on
    padding), with ``K = max_b count_b + extra_len`` (``extra_len`` free slots, e.g. for a summary token).
    """
    counts = keep.sum(dim=1)  # [B]
    k = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # [B, K]
    mask = torch.arange(k, device=keep.device)[None, :] < counts[:, None]  # [B, K]
    kept = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # [B, K, D]
    kept = kept * mask.unsqueeze(-1).to(kept.dtype)
    indices = order.masked_fill(~mask, -1)
    if extra_len:
        kept = torch.cat([kept, kept.new_zeros(kept.shape[0], extra_len, kept.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra_len)], dim=1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], extra_len), -1)], dim=1)
    return kept, mask, indices


def rank_descending(scores: Tensor, mask: Tensor) -> Tensor:
    """Rank of each real token by descending score within its slide (0 = best); padding ranks last. ``[B, N]``."""
    order = torch.argsort(scores.masked_fill(~mask, float("-inf")), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def uniform_keep(mask: Tensor, budget: Tensor) -> Tensor:
    """Keep ``min(budget_b, n_b)`` real tokens of slide ``b`` evenly spaced in tile order: the first token of each of
    ``k_b`` equal-size bins of the real tokens. mask ``[B, N]``, budget ``[B]`` → keep ``[B, N]``."""
    n = mask.sum(dim=1, keepdim=True)  # [B, 1]
    k = torch.minimum(budget.view(-1, 1).to(n.dtype), n).clamp_min(1)  # [B, 1]
    rank = mask.long().cumsum(dim=1) - 1  # [B, N] rank among real tokens
    bin_now = torch.div(rank * k, n.clamp_min(1), rounding_mode="floor")
    bin_prev = torch.div((rank - 1) * k, n.clamp_min(1), rounding_mode="floor")
    return mask & ((rank == 0) | (bin_now != bin_prev))


def iqr_outliers(scores: Tensor, mask: Tensor, whisker: float = 1.5) -> Tensor:
    """``score > Q3 + whisker · (Q3 − Q1)`` with quartiles computed **per slide** over its real tokens only
    (upstream PruMerge pools the quartiles over the whole batch). scores, mask ``[B, N]`` → ``[B, N]`` bool."""
    values = scores.float().masked_fill(~mask, float("nan"))
    q1, q3 = torch.nanquantile(values, torch.tensor([0.25, 0.75], device=scores.device), dim=1, keepdim=True)
    return mask & (scores.float() > q3 + whisker * (q3 - q1))


def spatial_uniform_keep(grid: Tensor, mask: Tensor, scores: Tensor, budget: Tensor) -> Tensor:
    """About ``budget_b`` tiles spread evenly over slide ``b``'s tissue: square cells of side
    ``round(sqrt(n_b / budget_b))`` grid units over the tile grid, one tile per occupied cell (the one with the
    highest score). grid ``[B, N, 2]``, mask / scores ``[B, N]``, budget ``[B]`` → keep ``[B, N]``."""
    batch, num = mask.shape
    n = mask.sum(dim=1).clamp_min(1).double()  # [B]
    side = torch.sqrt(n / budget.double().clamp_min(1)).round().clamp_min(1).long()  # [B]
    cells = torch.div(grid.long(), side.view(-1, 1, 1), rounding_mode="floor")  # [B, N, 2]
    span = int(cells.max()) + 2
    key = (torch.arange(batch, device=mask.device).view(-1, 1) * span + cells[..., 1]) * span + cells[..., 0]
    key = key.masked_fill(~mask, -1).reshape(-1)  # [B*N]
    # best score first, then group by cell (stable): the first entry of each cell's run is its best tile
    by_score = torch.argsort(
        scores.reshape(-1).float().masked_fill(~mask.reshape(-1), float("-inf")), descending=True, stable=True
    )
    by_cell = by_score[torch.argsort(key[by_score], stable=True)]
    sorted_key = key[by_cell]
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    keep = torch.zeros(batch * num, dtype=torch.bool, device=mask.device)
    keep[by_cell[first & (sorted_key >= 0)]] = True
    return keep.view(batch, num)


def check_max_tokens(selector: str, max_tokens: Any) -> int:
    """``max_tokens`` as an int, or a clear ``ValueError`` unless it is a whole number ``>= 1``."""
    whole = (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)) or (
        isinstance(max_tokens, float) and max_tokens.is_integer()
    )
    if not whole or max_tokens < 1:
        raise ValueError(
            f"{selector}: max_tokens={max_tokens!r} must be a whole number >= 1 (the most visual tokens "
            "a slide may emit)."
        )
    return int(max_tokens)


def trim_evenly(keep: Tensor, grid: Tensor | None, budget: Tensor) -> Tensor:
    """At most ``budget_b`` of slide ``b``'s kept tokens, evenly spaced in row-major grid order ``(gy, gx)`` (tile
    order without a grid); all of them where they fit. keep ``[B, N]``, grid ``[B, N, 2]``, budget ``[B]`` →
    ``[B, N]``."""
    fits = (budget > 0).unsqueeze(1)  # [B, 1] a budget of 0 keeps nothing
    if grid is None:
        return uniform_keep(keep, budget) & fits
    g = grid.long()  # [B, N, 2]
    order = torch.argsort(g[..., 0], dim=1, stable=True)  # [B, N] by gx, then (stable) by gy: row-major
    order = order.gather(1, torch.argsort(g[..., 1].gather(1, order), dim=1, stable=True))  # [B, N]
    picked = uniform_keep(keep.gather(1, order), budget)  # [B, N] in row-major order
    return torch.zeros_like(keep).scatter(1, order, picked) & fits


# ------------------------------------------------------------------------------------------------ built-ins
@register_token_selector("none")
def select_none(inputs: TokenSelectionInputs, **options: Any) -> TokenSelectionOutput:
    """Every real tile is a visual token (SlideChat-style; the baseline)."""
    return TokenSelectionOutput(*compact(inputs.token_mask, inputs.tokens))


@register_token_selector("uniform")
def select_uniform(inputs: TokenSelectionInputs, max_tokens: int = 1024, **options: Any) -> TokenSelectionOutput:
    """At most ``max_tokens`` tiles per slide (a hard cap), evenly spaced in tile order (row-major after reading)."""
    max_tokens = check_max_tokens("uniform", max_tokens)
    budget = torch.full((inputs.tokens.shape[0],), max_tokens, device=inputs.tokens.device)
    return TokenSelectionOutput(*compact(uniform_keep(inputs.token_mask, budget), inputs.tokens))


@register_token_selector("topk_prompt", requires=("question_embedding",))
def select_topk_prompt(inputs: TokenSelectionInputs, max_tokens: int = 256, **options: Any) -> TokenSelectionOutput:
    """The ``max_tokens`` tiles whose projected token is most cosine-similar to the question embedding (LM input
    space), in original tile order (a hard cap: fewer only on slides with fewer tiles). Without a projector,
    similarity is taken in tower space."""
    max_tokens = check_max_tokens("topk_prompt", max_tokens)
    tokens, mask = inputs.tokens, inputs.token_mask
    query = inputs.question_embedding  # [B, E]
    space = inputs.project(tokens) if inputs.project is not None else tokens  # [B, N, E]
    if query.shape[-1] != space.shape[-1]:
        raise ValueError(
            f"topk_prompt: question embedding has dimension {query.shape[-1]} but visual tokens have "
            f"{space.shape[-1]}; pass a question embedding in the LM's input space."
        )
    scores = F.cosine_similarity(space.float(), query.float().unsqueeze(1), dim=-1)  # [B, N]
    keep = mask & (rank_descending(scores, mask) < max_tokens)
    return TokenSelectionOutput(*compact(keep, tokens))


def _prumerge(
    inputs: TokenSelectionInputs,
    *,
    add_back: float,
    whisker: float,
    merge_neighbors: int,
    merge: str,
    summary_token: bool,
    min_tokens: int,
    max_tokens: int | None,
    name: str = "prumerge",
) -> TokenSelectionOutput:
    """Shared body of PruMerge / PruMerge+ (see :func:`select_prumerge`, :func:`select_prumerge_plus`)."""
    if merge not in ("average", "upstream"):
        raise ValueError(f"{name}: merge={merge!r} must be 'average' (paper) or 'upstream' (released code).")
    if add_back < 0:
        raise ValueError(f"{name}: add_back={add_back!r} must be >= 0.")
    tokens, mask = inputs.tokens, inputs.token_mask
    attn = inputs.cls_attention.float().mean(dim=1).masked_fill(~mask, 0.0)  # [B, N] mean over heads
    rank = rank_descending(attn, mask)  # [B, N]
    keep = iqr_outliers(attn, mask, whisker) | (mask & (rank < int(min_tokens)))  # [B, N]

    def spatial(budget: Tensor) -> Tensor:  # [B] → [B, N] about budget_b spatially uniform tiles
        return (
            spatial_uniform_keep(inputs.grid, mask, attn, budget)
            if inputs.grid is not None
            else uniform_keep(mask, budget)
        )

    if max_tokens is None:
        if add_back > 0:  # PruMerge+: spatially uniform samples, about add_back × |outliers| more
            keep |= spatial((keep.sum(dim=1).float() * add_back).round().long().clamp_min(1))
    else:  # hard cap: at most max_tokens tokens per slide, the summary token included
        max_tokens = check_max_tokens(name, max_tokens)
        if summary_token and max_tokens == 1:  # no room beside a real token: no summary token, and the most
            summary_token = False  # attended tile is kept even with min_tokens=0 (a slide needs one token)
            keep |= mask & (rank < 1)
        real = max_tokens - int(summary_token)  # tile tokens allowed per slide, >= 1
        found = keep.sum(dim=1)  # [B] outliers (and min_tokens) before the cap
        cap = max(math.floor(real / (1.0 + add_back)), min(int(min_tokens), real), 1)  # <= real
        keep &= rank < cap  # the cap most attended outliers
        if add_back > 0:  # fill up to the room left, never more
            room = real - keep.sum(dim=1)  # [B] >= 0
            want = torch.minimum((found.float() * add_back).round().long().clamp_min(1), room)  # [B]
            extra = spatial(want.clamp_min(1)) & ~keep  # [B, N] about want_b new tiles
            keep |= trim_evenly(extra, inputs.grid, room)  # surplus dropped evenly over the grid

    kept, kept_mask, indices = compact(keep, tokens, extra_len=int(summary_token))  # [B, K(+1), D]
    k = kept.shape[1] - int(summary_token)
    idx = indices[:, :k].clamp_min(0)  # [B, K]
    keys = F.normalize(inputs.keys.float(), dim=-1)  # [B, N, D]
    query = keys.gather(1, idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))  # [B, K, D]
    sim = query @ keys.transpose(1, 2)  # [B, K, N] key cosine similarity
    self_hit = torch.arange(keys.shape[1], device=sim.device).view(1, 1, -1) == idx.unsqueeze(-1)
    sim = sim.masked_fill(self_hit | ~mask.unsqueeze(1), float("-inf"))
    m = min(int(merge_neighbors), keys.shape[1] - 1)
    weights_self = attn.gather(1, idx) * kept_mask[:, :k]  # [B, K]
    merged = kept[:, :k].float()
    if m > 0:
        nb_sim, nb_idx = sim.topk(m, dim=-1)  # [B, K, m]
        nb_w = attn.gather(1, nb_idx.flatten(1)).view_as(nb_idx) * torch.isfinite(nb_sim)  # [B, K, m]
        nb_tok = tokens.gather(1, nb_idx.flatten(1).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        nb_sum = (nb_w.unsqueeze(-1) * nb_tok.view(*nb_idx.shape, -1).float()).sum(dim=2)  # [B, K, D]
        if merge == "upstream":  # y_i = F_i + Σ a_j F_j (unnormalised, as in the released code)
            merged = merged + nb_sum
        else:  # paper: attention-weighted average of the token and its key-similar neighbours
            total = (weights_self + nb_w.sum(dim=-1)).clamp_min(1e-12).unsqueeze(-1)
            merged = (weights_self.unsqueeze(-1) * merged + nb_sum) / total
    merged = merged * kept_mask[:, :k].unsqueeze(-1)
    if summary_token:
        pruned = (mask & ~keep).float() * attn  # [B, N]
        summary = (pruned.unsqueeze(-1) * tokens.float()).sum(dim=1)  # [B, D]
        if merge == "average":
            summary = summary / pruned.sum(dim=1, keepdim=True).clamp_min(1e-12)
        has = (mask & ~keep).any(dim=1)  # [B] a summary token only where something was pruned
        counts = kept_mask[:, :k].sum(dim=1)  # [B] summary goes right after each slide's kept tokens
        slot = torch.nn.functional.one_hot(counts, k + 1).bool() & has.unsqueeze(1)  # [B, K+1]
        merged = torch.cat([merged, merged.new_zeros(merged.shape[0], 1, merged.shape[2])], dim=1)
        merged = torch.where(slot.unsqueeze(-1), summary.unsqueeze(1), merged)
        kept_mask = kept_mask[:, :k]
        kept_mask = torch.cat([kept_mask, kept_mask.new_zeros(kept_mask.shape[0], 1)], dim=1) | slot
        indices = indices.masked_fill(slot, -1)
    return TokenSelectionOutput(merged.to(tokens.dtype), kept_mask, indices)


@register_token_selector("prumerge", requires=("cls_attention", "keys"))
def select_prumerge(
    inputs: TokenSelectionInputs,
    whisker: float = 1.5,
    merge_neighbors: int = 32,
    merge: str = "average",
    summary_token: bool = True,
    min_tokens: int = 1,
    max_tokens: int | None = None,
    **options: Any,
) -> TokenSelectionOutput:
    """LLaVA-PruMerge (adaptive K per slide).

    1. ``a`` = last layer's CLS→tile attention, mean over heads (computed in O(N), never the full matrix).
    2. Keep the IQR outliers ``a > Q3 + whisker·IQR`` with quartiles **per slide** (at least ``min_tokens``, the
       most attended first).
    3. Merge each kept token with its ``merge_neighbors`` most key-similar other tiles (kept or not, like the
       released code), weighted by attention: ``merge="average"`` is the paper's weighted average
       ``(a_i F_i + Σ a_j F_j) / (a_i + Σ a_j)``; ``merge="upstream"`` the released code's ``F_i + Σ a_j F_j``
       (unnormalised: with 10⁴ tiles the ``a_j`` are ~10⁻⁴ and the merge all but vanishes).
    4. ``summary_token``: one extra token, the attention-weighted mean (``upstream``: sum) of the pruned tiles
       (only on slides where something was pruned).

    ``max_tokens`` (default ``None``: no cap) is a **hard** cap on the tokens each slide emits, **the summary token
    included**: at most ``max_tokens − 1`` outliers (the most attended; ``min_tokens`` is lowered to fit) plus the
    summary token. ``max_tokens=1`` leaves no room for a summary beside a real token, so it is dropped and the
    slide emits its single most attended tile (even with ``min_tokens=0``). ``max_tokens < 1`` raises
    ``ValueError``.
    """
    return _prumerge(
        inputs,
        add_back=0.0,
        whisker=whisker,
        merge_neighbors=merge_neighbors,
        merge=merge,
        summary_token=summary_token,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        name="prumerge",
    )


@register_token_selector("prumerge_plus", requires=("cls_attention", "keys"))
def select_prumerge_plus(
    inputs: TokenSelectionInputs,
    add_back: float = 3.0,
    whisker: float = 1.5,
    merge_neighbors: int = 32,
    merge: str = "average",
    summary_token: bool = True,
    min_tokens: int = 1,
    max_tokens: int | None = None,
    **options: Any,
) -> TokenSelectionOutput:
    """PruMerge+: PruMerge's outliers plus about ``add_back`` × as many spatially uniform tiles (one per cell of a
    square grid over the tissue, the most attended tile of each cell; upstream adds every ``N/(3K)``-th patch, i.e.
    ~3× the outliers), then the same merge and summary token.

    ``max_tokens`` (default ``None``: no cap) is a **hard** cap on the tokens each slide emits, **the summary token
    included**, whatever the tile count, attention, grid or ``add_back``. With ``S = 1`` if ``summary_token`` (and
    ``max_tokens > 1``; ``max_tokens=1`` drops it and keeps at least the most attended tile) else ``0``, and
    ``R = max_tokens − S`` tile slots:

    1. keep the most attended outliers, at most ``max(floor(R / (1 + add_back)), min(min_tokens, R), 1)``;
    2. add back ``min(round(add_back × |outliers found before step 1|), R − |kept outliers|)`` spatially uniform
       tiles — a slide whose outliers were capped asks for all its free slots; one that fits (outliers within
       the cap, add-back within the room) keeps exactly what it keeps without ``max_tokens``.
       :func:`spatial_uniform_keep` gives *about* the requested number (a cell whose best tile is an outlier adds
       none, so a slide may end under the cap); the surplus is dropped evenly in row-major grid order
       (:func:`trim_evenly`);
    3. the summary token, if anything was pruned: ``≤ R + S = max_tokens`` tokens in all.

    ``max_tokens < 1`` or ``add_back < 0`` raise ``ValueError``."""
    return _prumerge(
        inputs,
        add_back=add_back,
        whisker=whisker,
        merge_neighbors=merge_neighbors,
        merge=merge,
        summary_token=summary_token,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        name="prumerge_plus",
    )


__all__ = [
    "TokenSelectionInputs",
    "TokenSelectionOutput",
    "TokenSelector",
    "register_token_selector",
    "available_token_selectors",
    "get_token_selector",
    "run_token_selector",
    "compact",
    "iqr_outliers",
    "uniform_keep",
    "spatial_uniform_keep",
    "rank_descending",
    "trim_evenly",
    "check_max_tokens",
    "KNOWN_REQUIREMENTS",
]
