"""Token selectors against hand-checked small cases: per-slide IQR, merge weights, order, per-slide K."""

from __future__ import annotations

import pytest
import torch

import wsi_llava
from wsi_llava.token_selection import (
    TokenSelectionInputs,
    TokenSelectionOutput,
    iqr_outliers,
    run_token_selector,
    spatial_uniform_keep,
    uniform_keep,
)


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
        alone = run_token_selector(
            "prumerge",
            TokenSelectionInputs(
                tokens[b : b + 1, :n],
                mask[b : b + 1, :n],
                cls_attention=attn[b : b + 1, None, :n],
                keys=keys[b : b + 1, :n],
            ),
        )
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
    out = run_token_selector(
        "prumerge_plus",
        _inputs(attn, tokens=torch.randn(1, n, 4), keys=torch.randn(1, n, 4), grid=grid),
        add_back=15,
        summary_token=False,
    )
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
    inputs = TokenSelectionInputs(
        tokens, torch.ones(1, 5, dtype=torch.bool), question_embedding=torch.tensor([[1.0, 0.0]])
    )
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


def test_selection_on_large_inputs_keeps_some_but_not_all_tiles():
    # 2 slides x 8192 tiles (its speed is measured by scripts/benchmark.py, not here)
    gen = torch.Generator().manual_seed(0)
    n = 8192
    i = torch.arange(n)
    grid = torch.stack([i % 91, i // 91], dim=1).expand(2, n, 2)
    inputs = TokenSelectionInputs(
        torch.randn(2, n, 64, generator=gen),
        torch.ones(2, n, dtype=torch.bool),
        grid=grid,
        cls_attention=torch.rand(2, 4, n, generator=gen).softmax(-1),
        keys=torch.randn(2, n, 64, generator=gen),
    )
    out = run_token_selector("prumerge_plus", inputs)
    assert 0 < int(out.token_mask.sum(1).min()) < n


# ------------------------------------------------------------------------------------------ max_tokens: a hard cap
BUDGETED = ("prumerge", "prumerge_plus", "uniform", "topk_prompt")


def _slide_batch(gen, sizes, width=8, grid="row", attention="peaked"):
    """Slides of ``sizes[b]`` real tiles, padded to max(sizes) with the padding scattered at random positions."""
    b, n = len(sizes), max(sizes)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for s, size in enumerate(sizes):  # a loop over slides, test setup only
        mask[s, torch.randperm(n, generator=gen)[:size]] = True
    side = int(n**0.5) + 1
    i = torch.arange(n)
    if grid == "row":  # row-major layout, as in the benchmark
        cells = torch.stack([i % side, i // side], dim=1).expand(b, n, 2).clone()
    elif grid == "scattered":  # sparse, irregular tissue
        cells = torch.randint(0, 4 * side, (b, n, 2), generator=gen)
    else:
        cells = None
    if attention == "peaked":
        attn = torch.rand(b, 2, n, generator=gen) ** 8
    elif attention == "spikes":  # many clear outliers
        attn = torch.rand(b, 2, n, generator=gen) * 1e-3
        attn[torch.rand(b, 2, n, generator=gen) < 0.2] = 0.5
    else:  # flat
        attn = torch.full((b, 2, n), 1.0 / n)
    attn = attn * mask[:, None]
    return TokenSelectionInputs(
        torch.randn(b, n, width, generator=gen),
        mask,
        grid=cells,
        cls_attention=attn,
        keys=torch.randn(b, n, width, generator=gen),
        question_embedding=torch.randn(b, width, generator=gen),
    )


def _check_selection(out, inputs, max_tokens, summary_token=True, min_tokens=1):
    counts = out.token_mask.sum(1)  # [B]
    assert bool((counts <= max_tokens).all()), (counts.tolist(), max_tokens)
    assert bool((counts >= 1).all())
    for b in range(out.token_mask.shape[0]):  # a loop over slides, checks only
        idx = out.indices[b][out.token_mask[b]]
        real = idx[idx >= 0]
        assert real.unique().numel() == real.numel()  # unique
        assert bool(inputs.token_mask[b, real].all())  # valid, real tiles
        assert int((idx < 0).sum()) <= int(summary_token)  # at most one synthetic (summary) token
        assert real.numel() >= min(min_tokens, 1)  # a real tile (min_tokens=0: the summary alone may be left)
        assert bool((out.indices[b][~out.token_mask[b]] == -1).all())


def test_max_tokens_is_a_hard_cap_on_random_slides():
    gen = torch.Generator().manual_seed(1234)
    for case in range(48):
        sizes = torch.randint(
            1, 3001 if case % 4 == 0 else 400, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen
        ).tolist()
        if case % 6 == 1:
            sizes[0] = 1  # one-tile slides
        inputs = _slide_batch(
            gen, sizes, grid=("row", "scattered", None)[case % 3], attention=("peaked", "spikes", "flat")[case % 5 % 3]
        )
        max_tokens = (1, 2, 3, 16, 64)[case % 5] if case % 2 else int(torch.randint(1, 65, (1,), generator=gen))
        add_back = (0, 1, 2, 3, 4, 5, 0.5)[case % 7]
        summary_token = case % 8 != 3
        min_tokens = (1, 0, 5, 100)[case % 4]
        for name in BUDGETED:
            options = dict(max_tokens=max_tokens)
            if name.startswith("prumerge"):
                options.update(summary_token=summary_token, min_tokens=min_tokens, merge_neighbors=4)
            if name == "prumerge_plus":
                options["add_back"] = add_back
            out = run_token_selector(name, inputs, **options)
            prumerge = name.startswith("prumerge")
            _check_selection(
                out,
                inputs,
                max_tokens,
                summary_token=prumerge and summary_token,
                min_tokens=min_tokens if prumerge else 1,
            )
            if name in ("uniform", "topk_prompt"):  # exactly min(max_tokens, n) tiles
                assert out.token_mask.sum(1).tolist() == [min(max_tokens, s) for s in sizes]


def test_prumerge_plus_reported_case_max_tokens_16():
    # the issue: 445 tiles laid out row-major (as in the benchmark), heavy-tailed attention → ~110 IQR outliers.
    # Before the fix max_tokens only capped the outliers (16), then add_back=3 added ~3 x 16 spatial tiles and the
    # summary token on top: 59 tokens for max_tokens=16.
    n, side = 445, int(445**0.5) + 1
    i = torch.arange(n)
    grid = torch.stack([i % side, i // side], dim=1).unsqueeze(0)
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(1, n, generator=gen) ** 8
    inputs = TokenSelectionInputs(
        torch.randn(1, n, 8, generator=gen),
        torch.ones(1, n, dtype=torch.bool),
        grid=grid,
        cls_attention=attn[:, None],
        keys=torch.randn(1, n, 8, generator=gen),
    )
    assert int(run_token_selector("prumerge_plus", inputs).token_mask.sum()) > 100  # no cap: adaptive, large
    out = run_token_selector("prumerge_plus", inputs, max_tokens=16)
    assert int(out.token_mask.sum()) == 16  # 15 tile slots + summary, all used
    kept = out.indices[0][out.token_mask[0]]
    assert kept[-1] == -1  # the summary token, last
    # outliers: the floor(15 / (1 + 3)) = 3 most attended tiles; the 12 others are spatial add-back tiles
    assert set(attn[0].topk(3).indices.tolist()) <= set(kept.tolist())
    for max_tokens in range(1, 65):
        out = run_token_selector("prumerge_plus", inputs, max_tokens=max_tokens)
        _check_selection(out, inputs, max_tokens)


def test_prumerge_budget_counts_the_summary_token():
    attn = torch.tensor([[0.01] * 16 + [0.5, 0.6, 0.7, 0.8]])  # four outliers
    inputs = _inputs(attn, keys=torch.randn(1, 20, 4))
    out = run_token_selector("prumerge", inputs, max_tokens=2)  # 1 outlier + summary
    assert out.indices.tolist() == [[19, -1]] and out.token_mask.tolist() == [[True, True]]
    out = run_token_selector("prumerge", inputs, max_tokens=3, min_tokens=10)  # min_tokens lowered to fit
    assert out.indices.tolist() == [[18, 19, -1]]
    for name in ("prumerge", "prumerge_plus"):  # max_tokens=1: no room for a summary, the most attended tile
        for min_tokens in (0, 1, 5):
            out = run_token_selector(name, inputs, max_tokens=1, min_tokens=min_tokens)
            assert out.indices.tolist() == [[19]] and out.token_mask.tolist() == [[True]]
    flat = _inputs(torch.full((1, 20), 0.05), keys=torch.randn(1, 20, 4))  # no outlier, min_tokens=0: summary only
    out = run_token_selector("prumerge", flat, min_tokens=0, max_tokens=4)
    assert out.indices[out.token_mask].tolist() == [-1]
    out = run_token_selector("prumerge", flat, min_tokens=0, max_tokens=1)  # ... unless the budget drops it
    assert out.indices.tolist() == [[0]]


def test_prumerge_plus_budget_with_room_changes_nothing():
    n = 64  # 8 x 8 grid, one outlier: 1 + ~3 add-back + summary, far under the budget
    i = torch.arange(n)
    grid = torch.stack([i % 8, i // 8], dim=1).unsqueeze(0)
    attn = torch.full((1, n), 0.01)
    attn[0, 10] = 0.9
    inputs = _inputs(attn, tokens=torch.randn(1, n, 4), keys=torch.randn(1, n, 4), grid=grid)
    free = run_token_selector("prumerge_plus", inputs)
    capped = run_token_selector("prumerge_plus", inputs, max_tokens=64)
    assert free.indices.tolist() == capped.indices.tolist()
    torch.testing.assert_close(free.tokens, capped.tokens)
    # max_tokens=3: 1 outlier, room for 1 add-back tile, but the one cell's best tile is the outlier itself
    # (add-back tiles are a union with the outliers, as without a budget): under the cap, not always at it
    tight = run_token_selector("prumerge_plus", inputs, max_tokens=3)
    assert tight.indices.tolist() == [[10, -1]]


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_budgeted_selection_is_batch_independent(name):
    gen = torch.Generator().manual_seed(7)
    for grid in ("row", "scattered", None):
        inputs = _slide_batch(gen, [300, 37, 1, 180], grid=grid, attention="spikes")
        for max_tokens in (1, 2, 9, 16):
            out = run_token_selector(name, inputs, max_tokens=max_tokens, add_back=3)
            _check_selection(out, inputs, max_tokens)
            for b in range(4):  # each slide alone (its padding removed) gives the same tokens
                m = inputs.token_mask[b]
                alone_inputs = TokenSelectionInputs(
                    inputs.tokens[b : b + 1, m],
                    inputs.token_mask[b : b + 1, m],
                    grid=None if inputs.grid is None else inputs.grid[b : b + 1, m],
                    cls_attention=inputs.cls_attention[b : b + 1][..., m],
                    keys=inputs.keys[b : b + 1, m],
                )
                alone = run_token_selector(name, alone_inputs, max_tokens=max_tokens, add_back=3)
                k = int(alone.token_mask.sum())
                assert int(out.token_mask[b].sum()) == k
                source = m.nonzero().flatten()  # alone's tile i is the batch's tile source[i]
                mapped = torch.where(alone.indices[0, :k] >= 0, source[alone.indices[0, :k].clamp_min(0)], -1)
                assert out.indices[b, :k].tolist() == mapped.tolist()
                torch.testing.assert_close(out.tokens[b, :k], alone.tokens[0, :k])


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, True, "16"])
def test_max_tokens_must_be_a_whole_number_at_least_one(name, max_tokens):
    inputs = _slide_batch(torch.Generator().manual_seed(0), [20, 12])
    with pytest.raises(ValueError, match="max_tokens"):
        run_token_selector(name, inputs, max_tokens=max_tokens)


def test_prumerge_plus_rejects_negative_add_back():
    inputs = _slide_batch(torch.Generator().manual_seed(0), [20])
    with pytest.raises(ValueError, match="add_back"):
        run_token_selector("prumerge_plus", inputs, add_back=-1)


def test_trim_evenly_keeps_all_that_fit_else_spreads_over_the_grid():
    from wsi_llava.token_selection import trim_evenly

    i = torch.arange(16)  # 4 x 4 grid, stored column-major so tile order != grid order
    grid = torch.stack([i // 4, i % 4], dim=1).unsqueeze(0)
    keep = torch.ones(1, 16, dtype=torch.bool)
    assert trim_evenly(keep, grid, torch.tensor([16])).all()
    assert not trim_evenly(keep, grid, torch.tensor([0])).any()
    picked = trim_evenly(keep, grid, torch.tensor([4]))
    # row-major order (gy, gx): every 4th → the first tile of each grid row
    assert sorted((int(grid[0, t, 1]), int(grid[0, t, 0])) for t in picked[0].nonzero().flatten()) == [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 0),
    ]
    assert trim_evenly(keep, None, torch.tensor([4]))[0].nonzero().flatten().tolist() == [0, 4, 8, 12]
