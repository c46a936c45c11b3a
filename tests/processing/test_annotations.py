"""load_annotations: CSV / JSON / JSONL, path resolution and confinement, all-at-once validation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from processing import AnnotationError, load_annotations, write_slide

from conftest import grid_coords

SEED = ["h5_path", "caption", "question", "answer", "slide_id", "dataset"]


def _slides(folder, names):
    for name in names:
        write_slide(folder / name, np.zeros((3, 2)), grid_coords(3))


def _csv(path, header, rows):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_seed_csv_clip_and_llava(tmp_path):
    (tmp_path / "h5").mkdir()
    _slides(tmp_path / "h5", ["a.h5", "b.h5"])
    path = _csv(
        tmp_path / "ann.csv",
        SEED + ["case_id", "split", "label"],
        [
            ["h5/a.h5", "cap a", "q a", "ans a", "A", "tcga", "C1", "train", "BRCA"],
            ["h5/b.h5", "cap b", "q b", "ans b", "", "tcga", "", "test", "LUAD"],
        ],
    )
    ds = load_annotations(path, "clip")
    assert len(ds) == 2 and ds[0]["h5_path"] == str((tmp_path / "h5" / "a.h5").resolve())
    assert ds[1]["slide_id"] == "b" and ds[1]["case_id"] == "b"  # defaults: file stem, then the slide itself
    assert ds[0]["case_id"] == "C1" and ds[0]["label"] == "BRCA" and ds[0]["row"] == 1
    llava = load_annotations(path, "llava", split="test")
    assert len(llava) == 1 and llava[0]["conversations"] == [
        {"role": "user", "content": "q b"},
        {"role": "assistant", "content": "ans b"},
    ]


def test_llava_json_and_wsibench_jsonl(tmp_path):
    _slides(tmp_path, ["S1.h5", "S2.h5"])
    conv = [
        {
            "id": "x",
            "image": "S1.pt",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat grade?"},
                {"from": "gpt", "value": "G2"},
                {"from": "human", "value": "Necrosis?"},
                {"from": "gpt", "value": "No"},
            ],
        }
    ]
    (tmp_path / "c.json").write_text(json.dumps(conv))
    ds = load_annotations(tmp_path / "c.json", "llava")
    assert ds[0]["question"] == "What grade?" and ds[0]["answer"] == "G2" and len(ds[0]["conversations"]) == 4
    assert ds[0]["h5_path"].endswith("S1.h5")
    clip = load_annotations(tmp_path / "c.json", "clip")
    assert clip[0]["caption"] == "G2"
    (tmp_path / "w.jsonl").write_text(
        json.dumps(
            {
                "question_id": "q1",
                "image": "S2.pt",
                "question": "Subtype?",
                "T-answer": "Luminal B.",
                "metadata": "Subtype",
            }
        )
        + "\n"
    )
    ds = load_annotations(tmp_path / "w.jsonl", "llava")
    assert ds[0]["answer"] == "Luminal B." and ds[0]["metadata"] == "Subtype"


def test_real_wsi_bench_and_slidechat_files_parse(shared_dir):
    ds = load_annotations(
        shared_dir / "data/wsi-bench/per_task_test/Diagnosis_choice_test.json", "llava", check_files=False
    )
    assert len(ds) > 10 and ds[0]["h5_path"].endswith(".h5") and ds[0]["answer"] in "ABCD"
    assert "<image>" not in ds[0]["question"]
    ds = load_annotations(shared_dir / "data/slidebench/slidechat_train_data_example.json", "llava", check_files=False)
    assert len(ds) == 3 and ds[0]["h5_path"].endswith("TCGA-A7-A0CJ-01Z-00-DX2.h5")


def test_missing_columns_are_named(tmp_path):
    path = _csv(tmp_path / "a.csv", ["h5_path", "question"], [["x.h5", "q"]])
    with pytest.raises(AnnotationError, match=r"missing required column\(s\) \['caption'\] for task 'clip'"):
        load_annotations(path, "clip")
    with pytest.raises(AnnotationError, match=r"\['answer'\] for task 'llava'"):
        load_annotations(path, "llava")


def test_every_bad_row_is_reported_at_once_or_skipped(tmp_path):
    _slides(tmp_path, ["ok.h5"])
    path = _csv(
        tmp_path / "a.csv",
        SEED,
        [
            ["ok.h5", "fine", "q", "a", "s1", "d"],
            ["gone.h5", "cap", "q", "a", "s2", "d"],
            ["ok.h5", "  ", "q", "a", "s3", "d"],
            ["", "cap", "q", "a", "s4", "d"],
        ],
    )
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, "clip")
    msg = str(err.value)
    assert "3 of 4 row(s)" in msg and "row 2: H5 file 'gone.h5' not found" in msg
    assert "row 3: empty caption" in msg and "row 4: empty h5_path" in msg and "on_error='skip'" in msg
    ds = load_annotations(path, "clip", on_error="skip")
    assert ds["slide_id"] == ["s1"]


def test_h5_root_confines_paths(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _slides(root, ["in.h5"])
    _slides(tmp_path, ["outside.h5"])
    path = _csv(
        tmp_path / "a.csv",
        SEED,
        [
            ["in.h5", "c", "q", "a", "s", "d"],
            ["../outside.h5", "c", "q", "a", "s", "d"],
            [str(tmp_path / "outside.h5"), "c", "q", "a", "s", "d"],
        ],
    )
    with pytest.raises(AnnotationError, match=r"row 2: h5_path '../outside.h5' resolves to .* outside h5_root"):
        load_annotations(path, "clip", h5_root=root)
    ds = load_annotations(path, "clip", h5_root=root, on_error="skip")
    assert ds["h5_path"] == [str((root / "in.h5").resolve())]


def test_unsupported_and_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(AnnotationError, match="unsupported annotation format"):
        load_annotations(tmp_path / "a.txt")
    (tmp_path / "e.csv").write_text(",".join(SEED) + "\n")
    with pytest.raises(AnnotationError, match="no rows"):
        load_annotations(tmp_path / "e.csv")
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "nope.csv")


def test_case_id_required_where_the_loss_needs_it(tmp_path):
    _slides(tmp_path, ["a.h5", "b.h5"])
    no_col = _csv(tmp_path / "a.csv", SEED, [["a.h5", "c", "q", "a", "s", "d"]])
    assert load_annotations(no_col, "clip")[0]["case_id"] == "s"  # default: the slide itself
    with pytest.raises(AnnotationError, match="no 'case_id' column, but the loss groups slides by case"):
        load_annotations(no_col, "clip", require_case_id=True)
    empty = _csv(
        tmp_path / "b.csv",
        SEED + ["case_id"],
        [["a.h5", "c", "q", "a", "s", "d", "C1"], ["b.h5", "c", "q", "a", "t", "d", ""]],
    )
    with pytest.raises(AnnotationError, match="row 2: empty case_id"):
        load_annotations(empty, "clip", require_case_id=True)
