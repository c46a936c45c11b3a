"""processing.read_slide / write_slide: every layout, dtype, sampling mode and bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from processing import (
    SlideFeatures,
    SlideFormatError,
    WSIDataError,
    infer_tile_stride,
    read_slide,
    sample_tile_indices,
    slide_num_tiles,
    write_slide,
)

from conftest import grid_coords


def _slide(n: int = 30, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    coords = grid_coords(n)  # row-major already
    perm = rng.permutation(n)  # written shuffled: reading must sort
    return feats[perm], coords[perm]


@pytest.mark.parametrize("layout", ["seed", "clam", "trident"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_layout_round_trips_sorted_row_major(tmp_path, layout, dtype):
    feats, coords = _slide()
    path = write_slide(tmp_path / "s.h5", feats, coords, layout=layout, dtype=dtype, patch_size_level0=256)
    slide = read_slide(path)
    assert slide.source_layout == layout
    assert slide.features.dtype == torch.float32 and slide.coords.dtype == torch.int64
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(slide.coords.numpy(), coords[order])
    np.testing.assert_allclose(slide.features.numpy(), feats[order].astype(dtype).astype(np.float32))
    # row-major by (y, x): y non-decreasing, x increasing within a row
    y, x = slide.coords[:, 1], slide.coords[:, 0]
    assert bool((y[1:] >= y[:-1]).all()) and bool(((y[1:] > y[:-1]) | (x[1:] > x[:-1])).all())
    # CLAM feature files state no tile size: it is the coordinates' tile stride
    assert slide.patch_size_level0 == 256
    assert slide.patch_size_source == ("inferred" if layout == "clam" else "file")
    assert slide.path == str(path)


def test_seed_layout_stores_yx_and_coords_wins_when_both(tmp_path):
    feats, coords = _slide(n=8)
    path = write_slide(tmp_path / "seed.h5", feats, coords, layout="seed")
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["coords_yx"][()], coords[:, ::-1])
    with h5py.File(path, "a") as f:  # add a (different) (x, y) dataset: it must win
        f["coords"] = coords + 512
    slide = read_slide(path)
    assert slide.source_layout == "clam"
    assert int(slide.coords.min()) == 512


def test_clam_coordinate_attributes_give_patch_size(tmp_path):
    feats, coords = _slide(n=6)
    path = write_slide(tmp_path / "c.h5", feats, coords * 4, layout="clam")  # level-0 stride of 256-px tiles at level 1
    with h5py.File(path, "a") as f:
        f["coords"].attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
    assert read_slide(path).patch_size_level0 == 1024


def test_real_clam_coordinate_file(shared_dir, tmp_path):
    """A real CLAM coords file (TCGA-LIHC) plus synthetic features reads in canonical order."""
    src = next((shared_dir / "data" / "clam-tcga-lihc-coords").glob("TCGA-2V-*.h5"))
    with h5py.File(src, "r") as f:
        coords = f["coords"][()]
        attrs = dict(f["coords"].attrs)
    path = tmp_path / "real.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.random.default_rng(0).standard_normal((len(coords), 4)).astype(np.float16)
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update({k: v for k, v in attrs.items() if k in ("patch_size", "patch_level", "downsample")})
    slide = read_slide(path)
    assert slide.num_tiles == 1481 and slide.patch_size_level0 == 512
    assert infer_tile_stride(slide.coords) == 512
    keys = slide.coords[:, 1] * 10**6 + slide.coords[:, 0]
    assert bool((keys[1:] > keys[:-1]).all())


def test_rows_are_returned_in_caller_order(tmp_path):
    feats, coords = _slide()
    path = write_slide(tmp_path / "s.h5", feats, coords, dtype="float32")
    rows = [17, 3, 25, 3]
    slide = read_slide(path, rows=rows)
    np.testing.assert_array_equal(slide.features.numpy(), feats[rows])
    np.testing.assert_array_equal(slide.coords.numpy(), coords[rows])
    with pytest.raises(SlideFormatError, match="outside 0..29"):
        read_slide(path, rows=[0, 30])


def test_sampling_strategies(tmp_path):
    feats, coords = _slide(n=100)
    path = write_slide(tmp_path / "s.h5", feats, coords, dtype="float32")
    full = read_slide(path)
    uni = read_slide(path, max_tiles=10, tile_sampling="uniform")
    assert uni.num_tiles == 10
    # deterministic stride over the spatial order: bin centres
    expected = ((np.arange(10) + 0.5) * 10).astype(int)
    np.testing.assert_array_equal(uni.coords.numpy(), full.coords.numpy()[expected])
    r1 = read_slide(path, max_tiles=10, tile_sampling="random", seed=3)
    r2 = read_slide(path, max_tiles=10, tile_sampling="random", seed=3)
    r3 = read_slide(path, max_tiles=10, tile_sampling="random", seed=4)
    assert torch.equal(r1.coords, r2.coords) and not torch.equal(r1.coords, r3.coords)
    assert len({tuple(c) for c in r1.coords.tolist()}) == 10  # without replacement
    keys = r1.coords[:, 1] * 10**6 + r1.coords[:, 0]
    assert bool((keys[1:] > keys[:-1]).all())  # still spatially ordered
    assert read_slide(path, max_tiles=10, tile_sampling="all").num_tiles == 100
    assert read_slide(path, max_tiles=1000, tile_sampling="random").num_tiles == 100
    torch.manual_seed(0)
    a = sample_tile_indices(100, 10, "random")
    torch.manual_seed(0)
    assert np.array_equal(a, sample_tile_indices(100, 10, "random"))  # seed=None follows torch's RNG
    with pytest.raises(ValueError, match="tile_sampling"):
        sample_tile_indices(100, 10, "stride")
    with pytest.raises(ValueError, match="max_tiles"):
        sample_tile_indices(100, 0, "uniform")


@pytest.mark.parametrize("chunked", [False, True])
def test_sampled_read_touches_only_chosen_rows(tmp_path, monkeypatch, chunked):
    """Contiguous datasets are gathered through a memory map, chunked ones through an h5py row selection;
    neither reads the whole feature matrix."""
    import processing.feature_reader as feature_reader

    feats, coords = _slide(n=200)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, chunks=(16, 6) if chunked else None)
        f["coords"] = coords
    h5_keys, mapped_rows = [], []
    original_get, original_map = h5py.Dataset.__getitem__, feature_reader._memmap_rows

    def spy_get(self, key, *args, **kwargs):
        if self.name == "/features":
            h5_keys.append(key)
        return original_get(self, key, *args, **kwargs)

    def spy_map(ds, rows):
        out = original_map(ds, rows)
        mapped_rows.append(None if out is None else len(rows))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy_get)
    monkeypatch.setattr(feature_reader, "_memmap_rows", spy_map)
    slide = read_slide(path, max_tiles=16, tile_sampling="random", seed=0)
    assert slide.num_tiles == 16
    if chunked:
        assert mapped_rows == [None] and len(h5_keys) == 1 and np.asarray(h5_keys[0]).size == 16
    else:
        assert mapped_rows == [16] and h5_keys == []
    full = read_slide(path)
    picked = {tuple(c) for c in slide.coords.tolist()}
    mask = np.array([tuple(c) in picked for c in full.coords.tolist()])
    np.testing.assert_array_equal(slide.features.numpy(), full.features.numpy()[mask])


def test_nonfinite_features_raise_or_drop(tmp_path):
    feats, coords = _slide(n=10)
    feats[[2, 7], 1] = [np.nan, np.inf]
    path = write_slide(tmp_path / "nan.h5", feats, coords, dtype="float32")
    with pytest.raises(SlideFormatError, match=r"2 tile\(s\) have NaN/Inf.*nonfinite='drop'") as err:
        read_slide(path)
    assert str(path) in str(err.value)
    kept = read_slide(path, nonfinite="drop")
    assert kept.num_tiles == 8 and torch.isfinite(kept.features).all()
    bad_coords = {tuple(coords[2]), tuple(coords[7])}
    assert not bad_coords & {tuple(c) for c in kept.coords.tolist()}


@pytest.fixture
def parallel_direct_read(monkeypatch):
    """Make the direct reader split even a small file into many pieces over two threads."""
    import processing.feature_reader as feature_reader

    monkeypatch.setattr(feature_reader, "_READ_PIECE_BYTES", 7 * 4 * 16)  # 7 rows of 16 float32 per piece
    monkeypatch.setattr(feature_reader, "_PARALLEL_READ_MIN_BYTES", 0)
    monkeypatch.setattr(feature_reader.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(feature_reader.os, "cpu_count", lambda: 2)
    pools = []

    class CountingPool(feature_reader.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(feature_reader, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(feature_reader, "pools_started", pools, raising=False)  # read by the tests below
    return feature_reader


@pytest.mark.parametrize(
    "storage", ["contiguous_f32", "contiguous_f16", "contiguous_userblock", "chunked", "gzip", "big_endian", "float64"]
)
def test_full_read_is_exact_for_every_storage_and_finds_nonfinite_rows(
    tmp_path, parallel_direct_read, monkeypatch, storage
):
    """The direct (threaded, piecewise) reader and the h5py fallback give the same float32 values, the same
    row-major order and the same NaN/Inf rows, wherever in the file they are."""
    n, d = 103, 16
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((n, d)) * 100).astype(np.float32)
    coords = grid_coords(n, columns=11)
    perm = rng.permutation(n)
    dtype = {"contiguous_f16": np.float16, "big_endian": ">f4", "float64": np.float64}.get(storage, np.float32)
    options = {"chunked": {"chunks": (10, d)}, "gzip": {"chunks": (10, d), "compression": "gzip"}}.get(storage, {})
    path = tmp_path / "s.h5"
    with h5py.File(path, "w", userblock_size=512 if storage == "contiguous_userblock" else 0) as f:
        f.create_dataset("features", data=feats.astype(dtype), **options)
        f["coords"] = coords
    expected = feats.astype(dtype).astype(np.float32)
    direct_used = []
    original = parallel_direct_read._read_all_rows_direct

    def spy(ds, p):
        result = original(ds, p)
        direct_used.append(result is not None)
        return result

    monkeypatch.setattr(parallel_direct_read, "_read_all_rows_direct", spy)
    slide = read_slide(path)
    np.testing.assert_array_equal(slide.features.numpy(), expected)
    shuffled = tmp_path / "shuffled.h5"  # written out of order: the full read is gathered in row-major order
    write_slide(shuffled, expected[perm], coords[perm], layout="clam", dtype="float32")
    np.testing.assert_array_equal(read_slide(shuffled).features.numpy(), expected)
    rows = np.concatenate([perm[:80], perm[:5]])  # most rows, caller order, duplicates
    np.testing.assert_array_equal(read_slide(path, rows=rows).features.numpy(), expected[rows])
    # the direct reader was tried each time; it reads contiguous float16/float32 (on two threads) and declines the rest
    assert direct_used == [storage.startswith("contiguous"), True, storage.startswith("contiguous")]
    assert len(parallel_direct_read.pools_started) == sum(direct_used)

    bad = [0, 57, 102]  # first, middle and last piece
    with h5py.File(path, "r+") as f:
        data = f["features"][()]
        data[bad, [3, 0, 15]] = [np.nan, np.inf, -np.inf]
        f["features"][...] = data
    with pytest.raises(SlideFormatError, match=r"3 tile\(s\) have NaN/Inf features \(on-disk rows \[0, 57, 102\]"):
        read_slide(path)
    kept = read_slide(path, nonfinite="drop")
    assert kept.num_tiles == n - 3 and bool(torch.isfinite(kept.features).all())


def test_huge_finite_values_are_not_reported_as_nonfinite(tmp_path, parallel_direct_read):
    """A row whose sum overflows float32 is re-checked element-wise and kept."""
    feats = np.full((20, 16), 3e38, np.float32)
    path = write_slide(tmp_path / "big.h5", feats, grid_coords(20), dtype="float32")
    assert read_slide(path).num_tiles == 20


def test_short_read_is_reported_as_truncated(tmp_path, parallel_direct_read, monkeypatch):
    feats, coords = _slide(n=40, d=16)
    path = write_slide(tmp_path / "cut.h5", feats, coords, dtype="float32")
    real_read_into = parallel_direct_read._read_into
    monkeypatch.setattr(
        parallel_direct_read, "_read_into", lambda file, buffer, offset: real_read_into(file, buffer, offset) - 1
    )
    with pytest.raises(SlideFormatError, match=r"cut\.h5: 'features' is truncated"):
        read_slide(path)


def _write_raw(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return path


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", "file not found"),
        ("not_hdf5", "not an HDF5 file"),
        ("truncated", "cannot be opened|not an HDF5 file"),
        ("no_features", "no 'features' dataset"),
        ("rank3", r"rank 3.*Drop the leading batch axis"),
        ("int_features", "expected float16/float32"),
        ("no_coords", "no tile coordinates"),
        ("coords_shape", r"shape \(5, 3\); expected \[N, 2\]"),
        ("length_mismatch", "'features' has 5 rows but 'coords' has 4"),
        ("empty", r"no tiles \(N = 0\)"),
        ("negative", r"negative coordinates \(first: row 1"),
        ("duplicated", r"duplicated tile coordinate.*rows 0 and 3"),
        ("fp16_coords", "stored as float16"),
    ],
)
def test_bad_inputs_raise_one_exception_type_naming_the_file(tmp_path, case, pattern):
    path = tmp_path / f"{case}.h5"
    f5 = np.zeros((5, 4), np.float32)
    c5 = grid_coords(5)
    if case == "not_hdf5":
        path.write_bytes(b"PK\x03\x04 not hdf5 at all")
    elif case == "truncated":
        _write_raw(path, features=np.zeros((500, 64), np.float32), coords=grid_coords(500))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "no_features":
        _write_raw(path, feats=f5, coords=c5)
    elif case == "rank3":
        _write_raw(path, features=f5[None], coords=c5)
    elif case == "int_features":
        _write_raw(path, features=f5.astype(np.int32), coords=c5)
    elif case == "no_coords":
        _write_raw(path, features=f5)
    elif case == "coords_shape":
        _write_raw(path, features=f5, coords=np.zeros((5, 3), np.int64))
    elif case == "length_mismatch":
        _write_raw(path, features=f5, coords=c5[:4])
    elif case == "empty":
        _write_raw(path, features=np.zeros((0, 4), np.float32), coords=np.zeros((0, 2), np.int64))
    elif case == "negative":
        c = c5.copy()
        c[1, 0] = -256
        _write_raw(path, features=f5, coords=c)
    elif case == "duplicated":
        c = c5.copy()
        c[3] = c[0]
        _write_raw(path, features=f5, coords=c)
    elif case == "fp16_coords":
        _write_raw(path, features=f5, coords=c5.astype(np.float16))
    with pytest.raises(SlideFormatError, match=pattern) as err:
        read_slide(path)
    assert isinstance(err.value, WSIDataError) and isinstance(err.value, ValueError)
    assert str(path) in str(err.value)


def test_float_coords_are_floored_and_num_tiles_reads_metadata(tmp_path):
    coords = grid_coords(6).astype(np.float64) + 0.75
    path = _write_raw(tmp_path / "f.h5", features=np.ones((6, 3), np.float32), coords=coords)
    slide = read_slide(path)
    assert slide.coords.dtype == torch.int64 and int(slide.coords[0, 0]) == 0
    assert slide_num_tiles(path) == 6


def test_slide_features_select_and_stride():
    s = SlideFeatures(torch.arange(12.0).view(6, 2), torch.from_numpy(grid_coords(6, columns=3, stride=224)))
    sub = s.select([4, 1])
    assert sub.features[:, 0].tolist() == [8.0, 2.0] and sub.num_tiles == 2 and sub.feature_dim == 2
    assert infer_tile_stride(s.coords) == 224
    assert infer_tile_stride(np.array([[5, 5]])) is None
