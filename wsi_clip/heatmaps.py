"""Per-tile heatmaps drawn at the tiles' slide positions (PNG), optionally over the slide's thumbnail.

Scores of any kind — ABMIL attention, the slide encoder's CLS attention, text-to-tile similarity, or which
tiles a token selector kept — are rasterised on the tile grid (one cell per tile, ``floor(coords /
tile_size)``), so drawing 100k tiles costs one image, not 100k rectangles. Needs the ``viz`` extra
(matplotlib); drawing over a slide image needs ``openslide-python`` + ``openslide-bin``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _as_numpy(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def tile_grid(coords: np.ndarray, values: np.ndarray, tile_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Rasterise per-tile ``values [N]`` at ``floor(coords / tile_size)``: ``[rows, cols]`` float (NaN = no tile),
    and the grid origin cell ``(x0, y0)`` (the raster starts at the first occupied row/column)."""
    cells = coords.astype(np.int64) // int(tile_size)  # [N, 2] (gx, gy)
    origin = cells.min(axis=0)
    cells = cells - origin
    grid = np.full((int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1), np.nan, dtype=np.float32)
    grid[cells[:, 1], cells[:, 0]] = values
    return grid, (int(origin[0]), int(origin[1]))


def render_tile_heatmap(
    coords: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor | None,
    output: str | Path,
    *,
    tile_size: int,
    title: str = "",
    score_label: str = "score",
    kept: np.ndarray | torch.Tensor | None = None,
    slide_path: str | Path | None = None,
    kept_labels: tuple[str, str] = ("kept", "dropped"),
    cmap: str = "inferno",
    alpha: float = 0.6,
    thumbnail_side: int = 1024,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Draw one slide's per-tile ``scores [N]`` (and/or a ``kept [N]`` selection mask) as a PNG.

    Args:
        coords: ``[N, 2]`` (x, y) level-0 pixel coordinates of the tiles.
        scores: ``[N]`` values (e.g. attention); ``None`` when only ``kept`` is drawn.
        tile_size: tile side in level-0 pixels (sets the cell size).
        kept: ``[N]`` bool, tiles kept by a token selector: kept tiles are drawn in colour (with ``scores``) or
            in one colour, dropped tiles in grey, with a legend named by ``kept_labels`` (e.g. ``("lesion",
            "background")`` for a ground-truth mask).
        slide_path: an OpenSlide-readable slide: the heatmap is drawn over its thumbnail, in level-0 frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    xy = _as_numpy(coords).astype(np.int64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] == 0:
        raise ValueError(f"coords must be a non-empty [N, 2] array, got shape {xy.shape}.")
    n = xy.shape[0]
    values = None if scores is None else _as_numpy(scores).astype(np.float32).reshape(-1)
    mask = None if kept is None else _as_numpy(kept).astype(bool).reshape(-1)
    for name, arr in (("scores", values), ("kept", mask)):
        if arr is not None and arr.shape[0] != n:
            raise ValueError(f"{name} has {arr.shape[0]} entries but coords has {n} tiles.")
    if values is None and mask is None:
        raise ValueError("give scores, kept, or both.")

    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    if slide_path is not None:
        import openslide

        with openslide.OpenSlide(str(slide_path)) as slide:
            width, height = slide.dimensions
            thumb = slide.get_thumbnail((thumbnail_side, thumbnail_side))
        ax.imshow(thumb, extent=(0, width, height, 0))
    handles = []
    if mask is not None:
        grid, origin = tile_grid(xy, np.where(mask, 1.0, 0.0), tile_size)
        extent = _extent(grid, origin, tile_size)
        ax.imshow(
            np.where(grid == 0, 1.0, np.nan),
            extent=extent,
            cmap=ListedColormap(["#b0b0b0"]),
            alpha=alpha,
            interpolation="nearest",
        )
        handles = [
            Patch(color="#b0b0b0", label=f"{kept_labels[1]} ({int((~mask).sum())})"),
            Patch(color="#1f77b4" if values is None else "#f0a030", label=f"{kept_labels[0]} ({int(mask.sum())})"),
        ]
        if values is None:
            ax.imshow(
                np.where(grid == 1, 1.0, np.nan),
                extent=extent,
                cmap=ListedColormap(["#1f77b4"]),
                alpha=alpha,
                interpolation="nearest",
            )
    if values is not None:
        shown = values if mask is None else np.where(mask, values, np.nan)
        grid, origin = tile_grid(xy, shown, tile_size)
        image = ax.imshow(
            grid,
            extent=_extent(grid, origin, tile_size),
            cmap=cmap,
            alpha=alpha if slide_path else 1.0,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=score_label)
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_title(title or f"{n} tiles", fontsize=10)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    if slide_path is None:
        ax.set_facecolor("#f4f1ec")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


def _extent(grid: np.ndarray, origin: tuple[int, int], tile_size: int) -> tuple[float, float, float, float]:
    x0, y0 = origin[0] * tile_size, origin[1] * tile_size
    return (x0, x0 + grid.shape[1] * tile_size, y0 + grid.shape[0] * tile_size, y0)


# ---------------------------------------------------------------------------------------------- tile scores
@torch.no_grad()
def tile_attention(
    model, tile_features: torch.Tensor, tile_coords: torch.Tensor, tile_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N]`` attention of one slide's tiles: ABMIL attention (WSI-CLIP ``abmil`` tower) or the slide encoder's last-
    layer CLS attention averaged over heads (WSI-CLIP ``slide_encoder`` tower, or a bare ``SlideEncoderModel``)."""
    if hasattr(model, "get_slide_features") and hasattr(model, "slide_projection"):
        out = model.get_slide_features(tile_features, tile_coords, tile_mask, output_tile_attention=True)
        if out.tile_attention is None:
            raise ValueError("this WSI-CLIP slide tower has no tile attention (mean pooling); use 'similarity'.")
        return out.tile_attention[0].float()
    if hasattr(model, "cls_attention"):
        return model.cls_attention(tile_features, tile_coords, tile_mask)[0].float().mean(0)
    raise TypeError(f"{type(model).__name__} gives no tile attention; use a WSI-CLIP or slide encoder checkpoint.")


@torch.no_grad()
def tile_text_similarity(
    model,
    processor,
    prompt: str,
    tile_features: torch.Tensor,
    tile_coords: torch.Tensor,
    tile_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[N]`` cosine similarity between each tile's token (slide tower output, through the slide projection) and
    the embedding of ``prompt`` in the joint WSI-CLIP space (LongNet towers: contextualised tile tokens; ABMIL / mean
    towers: their per-tile hidden states)."""
    tower = model.slide_model
    tokens = tower(tile_features, tile_coords, tile_mask).last_hidden_state  # [1, N(+1), H]
    if tokens.shape[1] == tile_features.shape[1] + 1:  # LongNet: drop CLS, apply the head norm the pooled token gets
        tokens = tower.head_norm(tokens[:, 1:]) if hasattr(tower, "head_norm") else tokens[:, 1:]
    tiles = torch.nn.functional.normalize(
        model.slide_projection(tokens.to(model.slide_projection.weight.dtype))[0], dim=-1
    )  # [N, E]
    text = processor(text=[prompt])
    embed = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    return tiles @ torch.nn.functional.normalize(embed[0], dim=-1)  # [N]


__all__ = ["render_tile_heatmap", "tile_grid", "tile_attention", "tile_text_similarity"]
