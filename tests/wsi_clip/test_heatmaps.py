"""Tile heatmaps: rasterisation puts each tile's value in its grid cell; PNGs are written, over a real slide too."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from wsi_clip.heatmaps import render_tile_heatmap, tile_grid  # noqa: E402


def test_tile_grid_places_values_at_their_cells():
    coords = np.array([[512, 256], [768, 256], [512, 768]])
    grid, origin = tile_grid(coords, np.array([1.0, 2.0, 3.0]), tile_size=256)
    assert origin == (2, 1) and grid.shape == (3, 2)
    assert grid[0, 0] == 1.0 and grid[0, 1] == 2.0 and grid[2, 0] == 3.0
    assert np.isnan(grid[1]).all() and np.isnan(grid[2, 1])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_scores_and_selection_pngs(tmp_path):
    coords = np.stack(np.meshgrid(np.arange(10) * 256, np.arange(8) * 256), -1).reshape(-1, 2)
    scores = np.linspace(0, 1, len(coords))
    out = render_tile_heatmap(coords, scores, tmp_path / "a.png", tile_size=256, title="attention")
    assert _png_size(out)[0] > 400
    out = render_tile_heatmap(coords, None, tmp_path / "b.png", tile_size=256, kept=scores > 0.8)
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="scores has 3 entries but coords has 80"):
        render_tile_heatmap(coords, scores[:3], tmp_path / "c.png", tile_size=256)
    with pytest.raises(ValueError, match="give scores, kept, or both"):
        render_tile_heatmap(coords, None, tmp_path / "d.png", tile_size=256)


def test_over_a_real_slide_thumbnail(tmp_path, shared_dir):
    pytest.importorskip("openslide")
    svs = shared_dir / "data" / "openslide-cmu-small-region" / "CMU-1-Small-Region.svs"
    coords = np.stack(np.meshgrid(np.arange(9) * 224, np.arange(12) * 224), -1).reshape(-1, 2)
    out = render_tile_heatmap(
        coords, np.random.default_rng(0).random(len(coords)), tmp_path / "svs.png", tile_size=224, slide_path=svs
    )
    assert out.stat().st_size > 20_000  # the thumbnail is in there
