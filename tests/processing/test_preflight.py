"""Pre-flight check: every bad slide of a dataset reported before training, or skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from processing import SlideFormatError, WSIDataError, inspect_slide, preflight_check, write_slide
from processing.preflight import check_grid

from conftest import grid_coords, torchrun_command


def _row(path, i, case="c"):
    return {"h5_path": str(path), "row": i, "case_id": case}


def test_all_problems_reported_at_once_and_skip_counts(tmp_path):
    good = write_slide(tmp_path / "good.h5", np.ones((4, 3)), grid_coords(4))
    wrong_dim = write_slide(tmp_path / "dim.h5", np.ones((4, 5)), grid_coords(4))
    nan = np.ones((4, 3))
    nan[2, 1] = np.nan
    with_nan = write_slide(tmp_path / "nan.h5", nan, grid_coords(4), dtype="float32")
    rows = [
        _row(good, 1),
        _row(wrong_dim, 2),
        _row(tmp_path / "missing.h5", 3),
        _row(with_nan, 4),
        _row(good, 5, case=""),
    ]
    with pytest.raises(WSIDataError) as err:
        preflight_check(rows, feature_dim=3, require_case_id=True, source="train.csv")
    msg = str(err.value)
    assert "train.csv: 4 of 5 row(s) failed" in msg
    assert "row 2:" in msg and "dimension 5 but the model expects 3" in msg
    assert "row 3:" in msg and "file not found" in msg
    assert "row 4:" in msg and "NaN/Inf features (on-disk rows [2])" in msg
    assert "row 5: case_id is missing" in msg and "--skip_bad_samples" in msg
    report = preflight_check(rows, feature_dim=3, require_case_id=True, skip_bad_samples=True)
    assert report.kept_rows == [0] and report.num_skipped == 4 and report.num_slides == 1  # valid files
    assert report.num_tiles == 4 and "4 row(s) skipped" in report.summary()
    with pytest.raises(WSIDataError, match="every row failed"):
        preflight_check(rows[1:3], feature_dim=3, skip_bad_samples=True)


def test_grid_check_names_the_tile_and_the_fix(tmp_path):
    coords = grid_coords(6, columns=3, stride=512) * 2  # 40x-like coordinates: stride 1024 px
    coords[5] = [300_000, 2048]
    path = write_slide(tmp_path / "big.h5", np.ones((6, 2)), coords, patch_size_level0=256)  # a wrong attribute
    with pytest.raises(SlideFormatError) as err:
        inspect_slide(path, tile_size=256, slide_ngrids=1000)
    msg = str(err.value)
    assert "outside the position grid 0..999 at patch_size_level0 256" in msg and "(x, y) = (300000, 2048)" in msg
    assert "grid cell (1171, 8)" in msg and "pass patch_size_level0=1024" in msg
    assert inspect_slide(path, tile_size=256, slide_ngrids=1000, patch_size_level0=1024) == 6
    unstated = write_slide(tmp_path / "clam.h5", np.ones((6, 2)), coords, layout="clam")  # stride inferred: 1024
    assert inspect_slide(unstated, tile_size=256, slide_ngrids=1000) == 6
    check_grid(np.array([[0, 0], [255_744, 255_744]]), 256, 1000, "ok")  # cell 999 is inside


def test_truncated_file_is_reported_not_crashing(tmp_path):
    path = write_slide(tmp_path / "t.h5", np.ones((400, 64)), grid_coords(400))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WSIDataError, match="row 1: .*t.h5"):
        preflight_check([_row(path, 1)])


def test_scan_is_chunked_and_finds_nan_in_a_late_chunk(tmp_path, monkeypatch):
    import processing.preflight as pf

    monkeypatch.setattr(pf, "_VALUE_SCAN_ROWS", 16)
    feats = np.ones((100, 3), np.float32)
    feats[97, 0] = np.inf
    path = write_slide(tmp_path / "late.h5", feats, grid_coords(100), dtype="float32")
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    with pytest.raises(SlideFormatError, match=r"on-disk rows \[97\]"):
        inspect_slide(path)
    chunk_reads = [k for k in reads if isinstance(k, slice)]
    assert len(chunk_reads) == 7 and all(k.stop - k.start <= 16 for k in chunk_reads)


def test_two_processes_split_the_files_and_share_one_report(tmp_path):
    """Under torchrun each distinct file is inspected by exactly one process; both get the full report."""
    good = [str(write_slide(tmp_path / f"good{i}.h5", np.ones((4 + i, 3)), grid_coords(4 + i))) for i in range(4)]
    bad = str(write_slide(tmp_path / "dim.h5", np.ones((4, 5)), grid_coords(4)))
    paths = [good[0], bad, good[1], good[0], good[2], good[3], str(tmp_path / "missing.h5")]
    repo = Path(__file__).resolve().parents[2]

    def torchrun(out_dir: Path, **env: str) -> subprocess.CompletedProcess:
        out_dir.mkdir()
        cmd = torchrun_command("preflight_worker.py", out_dir, repo, *paths)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env})

    proc = torchrun(tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    inspected = [set(r["inspected"]) for r in ranks]
    assert not inspected[0] & inspected[1] and inspected[0] | inspected[1] == set(paths)
    assert all(len(r["inspected"]) == len(set(r["inspected"])) for r in ranks)  # each file once
    assert ranks[0]["kept"] == ranks[1]["kept"] == [0, 2, 3, 4, 5]
    assert ranks[0]["problems"] == ranks[1]["problems"] and len(ranks[0]["problems"]) == 2
    assert "row 2:" in ranks[0]["problems"][0] and "dimension 5" in ranks[0]["problems"][0]
    assert "row 7:" in ranks[0]["problems"][1] and "file not found" in ranks[0]["problems"][1]
    assert ranks[0]["num_slides"] == 4 and ranks[0]["num_tiles"] == 4 + 5 + 6 + 7

    # an unexpected error on one process is raised on both (instead of the other waiting in the exchange)
    proc = torchrun(tmp_path / "bug", FAIL_ON_RANK="1")
    assert proc.returncode != 0
    for r in range(2):
        assert "process 1: KeyError: 'simulated bug'" in (tmp_path / "bug" / f"rank{r}.error").read_text()


def test_value_scan_keeps_huge_finite_values_and_finds_nan_in_later_chunks(tmp_path, monkeypatch):
    import processing.preflight as preflight

    monkeypatch.setattr(preflight, "_VALUE_SCAN_ROWS", 4)  # several chunks
    huge = write_slide(tmp_path / "huge.h5", np.full((10, 3), 3e38, np.float32), grid_coords(10), dtype="float32")
    assert inspect_slide(huge) == 10  # row sums overflow, values do not
    feats = np.ones((10, 3), np.float16)
    feats[9, 2] = np.inf
    late = write_slide(tmp_path / "late.h5", feats, grid_coords(10), dtype="float16")
    with pytest.raises(SlideFormatError, match=r"on-disk rows \[9\]"):
        inspect_slide(late)
