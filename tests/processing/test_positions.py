"""Tile positions in tile units at any scan magnification, and the collapsed-grid refusal.

A 40x scan tiled for 20x features stores level-0 coordinates of 512-px tiles; the same slide written at 20x
stores 256-px tiles. Both must reach the slide encoder as the same grid (TRIDENT's ``floor(coords /
patch_size_level0)``), whatever layout states (or does not state) the tile size.
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import torch

from processing import ContrastiveCollator, SlideFormatError, WSIProcessor, read_slide, write_slide
from processing.preflight import inspect_slide
from wsi_clip import SlideEncoderConfig, SlideEncoderModel
from wsi_clip.modeling_slide_encoder import SlideInputError


def _contours_40x() -> np.ndarray:
    """Level-0 (x, y) of 512-px tiles on a 40x scan: two tissue contours whose grids start at odd offsets (as
    CLAM and TRIDENT tile each contour from its own bounding box)."""
    a = np.stack(np.meshgrid(np.arange(8), np.arange(6), indexing="xy"), -1).reshape(-1, 2) * 512 + [1037, 2213]
    b = np.stack(np.meshgrid(np.arange(5), np.arange(5), indexing="xy"), -1).reshape(-1, 2) * 512 + [9333, 745]
    return np.concatenate([a, b]).astype(np.int64)


def _tiny_encoder(dim: int = 16) -> SlideEncoderModel:
    torch.manual_seed(0)
    config = SlideEncoderConfig(
        input_dim=dim, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pooling="mean"
    )
    return SlideEncoderModel(config).eval()


@pytest.fixture
def cohort(tmp_path):
    """The same slide as five files: 40x (TRIDENT attrs, CLAM attrs, no attrs) and 20x (TRIDENT, seed)."""
    coords40 = _contours_40x()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(coords40), 16)).astype(np.float32)
    perm = rng.permutation(len(coords40))  # written shuffled, as extractors do
    coords20 = coords40 // 2
    paths = {
        "trident40": write_slide(
            tmp_path / "t40.h5",
            feats[perm],
            coords40[perm],
            layout="trident",
            patch_size_level0=512,
            level0_magnification=40,
            target_magnification=20,
            dtype="float32",
        ),
        "clam40": write_slide(tmp_path / "c40.h5", feats[perm], coords40[perm], layout="clam", dtype="float32"),
        "bare40": write_slide(tmp_path / "b40.h5", feats[perm], coords40[perm], layout="clam", dtype="float32"),
        "trident20": write_slide(
            tmp_path / "t20.h5", feats[perm], coords20[perm], layout="trident", patch_size_level0=256, dtype="float32"
        ),
        "seed20": write_slide(
            tmp_path / "s20.h5", feats[perm], coords20[perm], layout="seed", patch_size_level0=256, dtype="float32"
        ),
    }
    with h5py.File(paths["clam40"], "a") as f:  # CLAM's own coordinate attributes
        f["coords"].attrs.update({"patch_size": 512, "patch_level": 0, "downsample": np.array([1.0, 1.0])})
    return paths, coords40, feats


def test_trident_attributes_state_the_magnification(cohort):
    paths, _, _ = cohort
    with h5py.File(paths["trident40"]) as f:
        attrs = dict(f["coords"].attrs)
    assert attrs["patch_size_level0"] == 512 and attrs["patch_size"] == 256
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
    sources = {name: (read_slide(p).patch_size_level0, read_slide(p).patch_size_source) for name, p in paths.items()}
    assert sources == {
        "trident40": (512, "file"),
        "clam40": (512, "file"),
        "bare40": (512, "inferred"),  # a CLAM feature file states nothing: the tile stride
        "trident20": (256, "file"),
        "seed20": (256, "file"),
    }


def test_40x_and_20x_give_the_same_model_inputs_and_embedding(cohort, tiny_tokenizer):
    paths, coords40, _ = cohort
    processor = WSIProcessor(tiny_tokenizer, max_tiles=None, tile_sampling="all", tile_size=256)
    names = list(paths)
    batch = processor(slides=[paths[n] for n in names])
    coords, feats = batch["tile_coords"], batch["tile_features"]  # [5, N, 2], [5, N, 16]
    for i in range(1, len(names)):
        assert torch.equal(coords[i], coords[0]), names[i]
        assert torch.equal(feats[i], feats[0]), names[i]
    # the model's grid floor(tile_coords / 256) is the TRIDENT grid floor(level-0 coords / 512)
    order = np.lexsort((coords40[:, 0], coords40[:, 1]))
    np.testing.assert_array_equal(coords[0].numpy() // 256, coords40[order] // 512)

    model = _tiny_encoder()
    with torch.no_grad():
        emb = model(**batch).pooler_output  # [5, 32]
        torch.testing.assert_close(emb, emb[:1].expand_as(emb), rtol=0, atol=1e-6)
        # what a direct call with the raw 40x coordinates gives (the original's rule, tiles two cells apart)
        slide = read_slide(paths["trident40"])
        raw = model(slide.features[None], slide.coords[None]).pooler_output
    assert (raw - emb[:1]).abs().max() > 1e-3

    # the training collators take the same path; an annotation column or an override fixes a wrong attribute
    rows = [{"h5_path": str(paths[n]), "caption": "x", "case_id": n} for n in names]
    collated = ContrastiveCollator(processor, max_tiles=None, tile_sampling="all")(rows)
    assert torch.equal(collated["tile_coords"], coords)
    wrong = write_slide(paths["trident40"].with_name("wrong.h5"), slide.features, slide.coords, patch_size_level0=256)
    assert not torch.equal(processor(slides=wrong)["tile_coords"][0], coords[0])
    assert torch.equal(processor(slides=wrong, patch_size_level0=512)["tile_coords"][0], coords[0])
    row = {"h5_path": str(wrong), "caption": "x", "case_id": "w", "patch_size_level0": "512"}
    assert torch.equal(ContrastiveCollator(processor, max_tiles=None)([row])["tile_coords"][0], coords[0])


def test_in_memory_slides_use_their_stride(cohort, tiny_tokenizer):
    _, coords40, feats = cohort
    processor = WSIProcessor(tiny_tokenizer, max_tiles=None, tile_sampling="all", tile_size=256)
    at40 = processor(slides=[(torch.from_numpy(feats), torch.from_numpy(coords40))])["tile_coords"][0]
    at20 = processor(slides=[(torch.from_numpy(feats), torch.from_numpy(coords40 // 2))])["tile_coords"][0]
    assert torch.equal(at40, at20)
    assert processor.load_slide((torch.from_numpy(feats), torch.from_numpy(coords40))).patch_size_source == "inferred"


def test_real_clam_40x_layout_matches_its_20x_version(shared_dir, tmp_path, tiny_tokenizer):
    """A real TCGA CLAM coordinate file (40x, 512-px level-0 patches, grids restarting per contour)."""
    src = next((shared_dir / "data" / "clam-tcga-lihc-coords").glob("TCGA-2Y-A9GW-*.h5"))
    with h5py.File(src) as f:
        coords40 = f["coords"][()]
        attrs = {k: v for k, v in f["coords"].attrs.items() if k in ("patch_size", "patch_level", "downsample")}
    feats = np.random.default_rng(1).standard_normal((len(coords40), 16)).astype(np.float32)
    path40 = tmp_path / "real40.h5"
    with h5py.File(path40, "w") as f:
        f["features"] = feats
        f.create_dataset("coords", data=coords40).attrs.update(attrs)
    path20 = write_slide(tmp_path / "real20.h5", feats, coords40 // 2, layout="trident", patch_size_level0=256)
    processor = WSIProcessor(tiny_tokenizer, max_tiles=None, tile_sampling="all", tile_size=256)
    batch = processor(slides=[path40, path20])
    assert torch.equal(batch["tile_coords"][0], batch["tile_coords"][1])
    assert int(batch["tile_coords"][0].max()) // 256 == int(coords40.max()) // 512


@pytest.mark.parametrize(
    "name, transform, stated",
    [
        ("normalised", lambda c: np.round(c / c.max() * 1000).astype(np.int64), 256),  # coords scaled to [0, 1000]
        ("coarser level", lambda c: c // 16, 512),  # level-4 pixels labelled as level-0
    ],
)
def test_collapsed_grid_is_refused_with_file_count_and_fix(tmp_path, tiny_tokenizer, name, transform, stated):
    coords = _contours_40x()
    path = write_slide(tmp_path / "bad.h5", np.ones((len(coords), 4)), transform(coords), patch_size_level0=stated)
    with pytest.raises(SlideFormatError) as err:
        read_slide(path)
    msg = str(err.value)
    assert str(path) in msg and f"of {len(coords)} tiles share a grid cell" in msg
    assert f"patch_size_level0={stated} (stated by the file)" in msg and "Fix:" in msg
    with pytest.raises(SlideFormatError, match="share a grid cell"):
        WSIProcessor(tiny_tokenizer)(slides=path)
    with pytest.raises(SlideFormatError, match="share a grid cell"):
        inspect_slide(path, tile_size=256, slide_ngrids=1000)  # the pre-flight reports it before training


def test_overlapping_tiles_name_the_stride_to_pass(tmp_path):
    coords = np.stack(np.meshgrid(np.arange(10), np.arange(10), indexing="xy"), -1).reshape(-1, 2) * 128
    path = write_slide(tmp_path / "overlap.h5", np.ones((100, 4)), coords, patch_size_level0=256)  # 50 % overlap
    with pytest.raises(SlideFormatError, match=r"75 of 100 tiles .* pass patch_size_level0=128"):
        read_slide(path)
    assert read_slide(path, patch_size_level0=128).patch_size_source == "given"


def test_a_few_shared_cells_only_warn(tmp_path, caplog):
    coords = np.stack(np.meshgrid(np.arange(10), np.arange(10), indexing="xy"), -1).reshape(-1, 2) * 256
    coords[-1] = coords[-2] + [40, 0]  # one tile from a neighbouring contour's grid, 40 px off
    path = write_slide(tmp_path / "few.h5", np.ones((100, 4)), coords, patch_size_level0=256)
    with caplog.at_level(logging.WARNING):
        assert read_slide(path).num_tiles == 100
    assert "1 of 100 tiles share a grid cell" in caplog.text


def test_model_refuses_collapsed_coordinates_in_a_direct_call():
    model = _tiny_encoder()
    coords = torch.from_numpy(_contours_40x())
    normalised = torch.round(coords / coords.max() * 1000)[None]  # [1, N, 2], what a broken integration passed
    with pytest.raises(SlideInputError, match=r"slide 0: \d+ of 73 tiles share a grid cell"):
        model(torch.randn(1, 73, 16), normalised)
    mask = torch.ones(2, 73, dtype=torch.bool)
    mask[1, 40:] = False  # padding never counts as a shared cell
    with torch.no_grad():
        out = model(torch.randn(2, 73, 16), torch.stack([coords, coords]), mask)
    assert out.pooler_output.shape == (2, 32)
