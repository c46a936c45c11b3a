"""Token selectors against hand-checked small cases: per-slide IQR, merge weights, order, per-slide K."""

from __future__ import annotations

import pytest
import torch

import wsi_llava
from wsi_llava.token_selection import (TokenSelectionInputs, TokenSelectionOutput, iqr_outliers, run_token_selector,
                                       spatial_uniform_keep, uniform_keep)


def _inputs(attn, tokens=None, keys=None, mask=None, grid=None):
    attn = torch.as_tensor(attn, dtype=torch.float32)  # [B, N]
    b, n = attn.shape
    tokens = torch.arange(b * n * 2, dtype=torch.float32).view(b, n, 2) if tokens is None else tokens
    keys = torch.eye(n).expand(b, n, n).clone() if keys is None else keys
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    return TokenSelectionInputs(tokens=tokens, token_mask=mask, cls_attention=attn.unsqueeze(1), keys=keys, grid=grid)


def test_iqr_outliers_are_per_slide():
    # slide 0 has one clear outlier (0.05 among 0.01s); slide 1 is flat at 0.2. Per slide: slide 0 keeps its
    # outlier, slide 1 nothing. Pooled over the batch (upstream): Q1 = 0.01, Q3 = 0.2 → threshold 0.485 → the
    # slide-0 outlier is lost because of what else is in the batch.
    a = torch.tensor([[0.01, 0.01, 0.01, 0.01, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    keep = iqr_outliers(a, torch.ones_like(a, dtype=torch.bool))
    assert keep.tolist() == [[False, False, False, False, True], [False] * 5]
    values = a.flatten()
    q1, q3 = values.quantile(0.25), values.quantile(0.75)
    assert not bool((a[0] > q3 + 1.5 * (q3 - q1)).any())  # what the batch-pooled IQR would keep


def test_iqr_ignores_padding():
    a = torch.tensor([[0.1, 0.1, 0.1, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False, False]])
    assert iqr_outliers(a, mask).tolist() == [[False, False, False, True, False, False]]


def test_prumerge_merge_weights_by_hand():
    # 4 tiles, 1 slide; tile 2 is the only outlier. keys: tile 2's nearest other key is tile 0.
    attn = torch.tensor([[0.1, 0.05, 0.6, 0.05]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]]])
    inputs = _inputs(attn, tokens, keys)
    out = run_token_selector("prumerge", inputs, merge_neighbors=1, summary_token=True)
    # kept: [merged tile 2, summary]; average merge: (0.6*[2,2] + 0.1*[1,0]) / 0.7
    expected = (0.6 * torch.tensor([2.0, 2.0]) + 0.1 * torch.tensor([1.0, 0.0])) / 0.7
    assert out.token_mask.tolist() == [[True, True]] and out.indices.tolist() == [[2, -1]]
    torch.testing.assert_close(out.tokens[0, 0], expected)
    # summary: attention-weighted mean of the pruned tiles 0, 1, 3
    pruned = (0.1 * tokens[0, 0] + 0.05 * tokens[0, 1] + 0.05 * tokens[0, 3]) / 0.2
    torch.testing.assert_close(out.tokens[0, 1], pruned)
    upstream = run_token_selector("prumerge", inputs, merge_neighbors=1, merge="upstream", summary_token=False)
    torch.testing.assert_close(upstream.tokens[0, 0], tokens[0, 2] + 0.1 * tokens[0, 0])  # F_i + Σ a_j F_j
    assert upstream.token_mask.shape == (1, 1)


def test_prumerge_per_slide_k_and_batch_independence():
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 40, generator=gen) * 0.01
    attn[0, [3, 17]] = 0.5  # two outliers
    attn[1, 30] = 0.9  # one outlier
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 25:] = False  # a shorter slide
    attn[2, 5] = 0.4
    attn[2, 30] = 5.0  # padding: must be ignored
    tokens = torch.randn(3, 40, 8, generator=gen)
    keys = torch.randn(3, 40, 8, generator=gen)
    out = run_token_selector("prumerge", TokenSelectionInputs(tokens, mask, cls_attention=attn[:, None], keys=keys))
    assert out.token_mask.sum(1).tolist() == [3, 2, 2]  # outliers + summary token
    assert out.indices[0, :2].tolist() == [3, 17] and out.indices[1, 0] == 30 and out.indices[2, 0] == 5
    for b in range(3):  # each slide alone gives the same tokens
        n = int(mask[b].sum())
        alone = run_token_selector("prumerge", TokenSelectionInputs(
            tokens[b:b + 1, :n], mask[b:b + 1, :n], cls_attention=attn[b:b + 1, None, :n], keys=keys[b:b + 1, :n]))
        k = int(alone.token_mask.sum())
        torch.testing.assert_close(out.tokens[b, :k], alone.tokens[0, :k])


def test_prumerge_min_and_max_tokens():
    attn = torch.full((1, 10), 0.1)  # no outlier at all
    out = run_token_selector("prumerge", _inputs(attn), min_tokens=3, summary_token=False)
    assert int(out.token_mask.sum()) == 3
    attn = torch.tensor([[0.01] * 16 + [0.5, 0.6, 0.7, 0.8]])  # four outliers
    out = run_token_selector("prumerge", _inputs(attn, keys=torch.randn(1, 20, 4)), max_tokens=2, summary_token=False)
    assert out.indices.tolist() == [[18, 19]]


def test_prumerge_plus_adds_spatially_uniform_tiles():
    n = 64  # 8 x 8 grid
    i = torch.arange(n)
    grid = torch.stack([i % 8, i // 8], dim=1).unsqueeze(0)
    attn = torch.full((1, n), 0.01)
    attn[0, 0] = 0.9
    out = run_token_selector("prumerge_plus", _inputs(attn, tokens=torch.randn(1, n, 4), keys=torch.randn(1, n, 4),
                                                      grid=grid), add_back=15, summary_token=False)
    kept = out.indices[0][out.token_mask[0]]
    assert 0 in kept.tolist()
    # budget 15 → cells of side round(sqrt(64/15)) = 2 → 16 cells, one tile each (tile 0 wins its cell)
    assert kept.numel() == 16
    cells = {(int(c[0]) // 2, int(c[1]) // 2) for c in grid[0][kept]}
    assert len(cells) == 16
    assert kept.tolist() == sorted(kept.tolist())  # original order


def test_spatial_keep_picks_best_tile_per_cell():
    grid = torch.tensor([[[0, 0], [1, 0], [0, 1], [1, 1]]])
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    keep = spatial_uniform_keep(grid, torch.ones(1, 4, dtype=torch.bool), scores, torch.tensor([1]))
    assert keep.tolist() == [[False, True, False, False]]


def test_uniform_keeps_evenly_spaced_per_slide():
    mask = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    keep = uniform_keep(mask, torch.tensor([4, 4]))
    assert keep[0].nonzero().flatten().tolist() == [0, 3, 5, 8]
    assert keep[1].nonzero().flatten().tolist() == [0, 1, 2]  # fewer tiles than the budget: all


def test_topk_prompt_keeps_original_order():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]]])
    inputs = TokenSelectionInputs(tokens, torch.ones(1, 5, dtype=torch.bool),
                                  question_embedding=torch.tensor([[1.0, 0.0]]))
    out = run_token_selector("topk_prompt", inputs, max_tokens=3)
    assert out.indices.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(out.tokens[0], tokens[0, [0, 2, 3]])


def test_none_compacts_padding():
    tokens = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = run_token_selector("none", TokenSelectionInputs(tokens, mask))
    assert out.indices.tolist() == [[0, 2, -1], [0, 1, 2]]
    assert out.token_mask.tolist() == [[True, True, False], [True, True, True]]


def test_register_custom_selector_function_and_class():
    @wsi_llava.register_token_selector("test_first_two")
    def first_two(inputs: TokenSelectionInputs, **options) -> TokenSelectionOutput:
        keep = inputs.token_mask & (inputs.token_mask.long().cumsum(1) <= 2)
        from wsi_llava.token_selection import compact

        return TokenSelectionOutput(*compact(keep, inputs.tokens))

    @wsi_llava.register_token_selector("test_last", requires=("cls_attention",))
    class Last:
        def __call__(self, inputs, **options):
            from wsi_llava.token_selection import compact

            keep = torch.zeros_like(inputs.token_mask)
            keep[:, -1] = True
            return TokenSelectionOutput(*compact(keep, inputs.tokens))

    assert {"test_first_two", "test_last"} <= set(wsi_llava.available_token_selectors())
    out = run_token_selector("test_first_two", TokenSelectionInputs(torch.randn(1, 5, 2), torch.ones(1, 5).bool()))
    assert out.indices.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="requires 'cls_attention'"):
        run_token_selector("test_last", TokenSelectionInputs(torch.randn(1, 5, 2), torch.ones(1, 5).bool()))
    with pytest.raises(ValueError, match="already registered"):
        wsi_llava.register_token_selector("test_first_two")(lambda inputs, **o: None)
    with pytest.raises(KeyError, match="unknown token selector"):
        run_token_selector("nope", TokenSelectionInputs(torch.randn(1, 5, 2), torch.ones(1, 5).bool()))


def test_selection_is_vectorised_on_large_inputs():
    # 2 slides x 8192 tiles: must run in well under a second (no Python loop over tokens)
    import time

    gen = torch.Generator().manual_seed(0)
    n = 8192
    i = torch.arange(n)
    grid = torch.stack([i % 91, i // 91], dim=1).expand(2, n, 2)
    inputs = TokenSelectionInputs(torch.randn(2, n, 64, generator=gen), torch.ones(2, n, dtype=torch.bool),
                                  grid=grid, cls_attention=torch.rand(2, 4, n, generator=gen).softmax(-1),
                                  keys=torch.randn(2, n, 64, generator=gen))
    start = time.perf_counter()
    out = run_token_selector("prumerge_plus", inputs)
    assert time.perf_counter() - start < 5.0
    assert 0 < int(out.token_mask.sum(1).min()) < n
