"""Synthetic demo data set: layouts, planted signal, splits, real texts, determinism (CPU, a few seconds)."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from processing.coordinates import spatial_order
from processing.slide_io import SOURCE_LAYOUTS, read_slide

from demo_data import CSV_COLUMNS, DEMO_CLASSES, DEMO_TEXTS_DIR, SPLITS, load_demo_texts, main, make_demo_dataset

NUM_CASES, FEATURE_DIM = 64, 64


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("demo")
    summary = make_demo_dataset(out, num_cases=NUM_CASES, feature_dim=FEATURE_DIM, seed=0)
    return out, summary, _rows(out / "annotations.csv")


@pytest.fixture(scope="module")
def slides(demo) -> dict[str, dict[str, np.ndarray]]:
    """Per slide: canonical features [N, D], coords [N, 2] and the lesion mask [N] (from lesion_tiles.json)."""
    out, _, rows = demo
    lesions = json.loads((out / "lesion_tiles.json").read_text())
    result = {}
    for row in rows:
        slide = read_slide(out / row["h5_path"])
        coords = slide.coords.numpy()
        lesion_xy = {tuple(xy) for xy in lesions[row["slide_id"]]["lesion_coords"]}
        mask = np.array([tuple(xy) in lesion_xy for xy in coords.tolist()])
        result[row["slide_id"]] = {
            "features": slide.features.numpy(),
            "coords": coords,
            "lesion": mask,
            "layout": slide.source_layout,
        }
    return result


def test_files_layouts_and_dtypes(demo, slides):
    out, summary, rows = demo
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == summary["num_slides"] == len(slides) and summary["num_cases"] == NUM_CASES
    for split in SPLITS:
        assert _rows(out / f"{split}.csv") == [r for r in rows if r["split"] == split]
        for kind in ("caption", "instruct"):
            assert json.loads((out / f"llava_{kind}_{split}.json").read_text())
    seen_layouts, seen_dtypes = defaultdict(set), set()
    for row in rows:
        assert not Path(row["h5_path"]).is_absolute() and (out / row["h5_path"]).is_file()
        with h5py.File(out / row["h5_path"], "r") as f:
            dtype = str(f["features"].dtype)
            raw_layout = (
                "seed" if "coords_yx" in f else "trident" if "patch_size_level0" in f["coords"].attrs else "clam"
            )
        assert slides[row["slide_id"]]["layout"] == raw_layout
        seen_layouts[raw_layout].add(dtype)
        seen_dtypes.add(dtype)
    # every layout occurs, each with fp16 and fp32 features
    assert set(seen_layouts) == set(SOURCE_LAYOUTS)
    assert all(dtypes == {"float16", "float32"} for dtypes in seen_layouts.values())
    prompts = json.loads((out / "class_prompts.json").read_text())
    assert set(prompts["classnames"]) == set(DEMO_CLASSES) and all("{}" in t for t in prompts["templates"])


def test_geometry_scale_and_disk_order(demo, slides):
    out, _, rows = demo
    unsorted_layouts = set()
    for row in rows:
        s = slides[row["slide_id"]]
        coords, features = s["coords"], s["features"]
        assert 60 <= len(coords) <= 400 and features.shape[1] == FEATURE_DIM
        assert ((coords - coords.min(axis=0)) % 256 == 0).all()  # one 256-px level-0 grid
        assert (coords // 256).max() < 1000  # inside GigaPath's 1000 x 1000 position grid
        assert np.array_equal(spatial_order(coords), np.arange(len(coords)))  # read back row-major
        with h5py.File(out / row["h5_path"], "r") as f:
            raw = f["coords_yx"][()][:, ::-1] if "coords_yx" in f else f["coords"][()]
        if not np.array_equal(spatial_order(raw), np.arange(len(raw))):
            unsorted_layouts.add(s["layout"])
    assert unsorted_layouts == set(SOURCE_LAYOUTS)  # sorting at read time matters in every layout
    norms = np.concatenate([np.linalg.norm(s["features"], axis=1) for s in slides.values()])
    assert 31.0 < norms.mean() < 35.0 and norms.std() < 4.0  # like real Prov-GigaPath tile embeddings


def test_planted_signal_is_a_minority_and_needs_lesion_aware_pooling(demo, slides):
    _, summary, rows = demo
    classes = summary["classes"]
    labels = np.array([classes.index(r["label"]) for r in rows])
    train = np.array([r["split"] == "train" for r in rows])
    bags = [slides[r["slide_id"]] for r in rows]
    for bag in bags:  # a contiguous minority: 10-25 % of the tiles (± one tile of rounding)
        n = len(bag["lesion"])
        assert 0.10 * n - 1 <= bag["lesion"].sum() <= 0.25 * n + 1

    # class directions estimated on training slides from their lesion tiles (like tile-level supervision)
    lesion_means = np.stack([b["features"][b["lesion"]].mean(0) for b in bags])  # [S, D]
    background_means = np.stack([b["features"][~b["lesion"]].mean(0) for b in bags])  # [S, D]
    centre = background_means[train].mean(0)  # [D]
    directions = np.stack([lesion_means[train & (labels == k)].mean(0) - centre for k in range(len(classes))])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)  # [K, D]
    scores = [(b["features"] - centre) @ directions.T for b in bags]  # per slide [N, K] tile class scores
    held_out = ~train
    mean_pool = np.mean([s.mean(0).argmax() == y for s, y in zip(scores, labels)], where=held_out)
    max_pool = np.mean([s.max(0).argmax() == y for s, y in zip(scores, labels)], where=held_out)

    def nearest_centroid(pooled: np.ndarray) -> float:
        pooled = pooled - pooled[train].mean(0)
        centroids = np.stack([pooled[train & (labels == k)].mean(0) for k in range(len(classes))])
        cos = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)) @ (
            centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        ).T
        return float((cos.argmax(1) == labels)[held_out].mean())

    chance = 1 / len(classes)
    assert max_pool >= 0.9, max_pool  # the same tile scorer, max-pooled, finds the lesion
    assert mean_pool <= max_pool - 0.3, (mean_pool, max_pool)  # ... mean-pooled, it is diluted and confounded
    assert nearest_centroid(lesion_means) >= 0.9  # the lesion carries the class ...
    assert nearest_centroid(background_means) <= chance + 0.2  # ... the background does not
    assert nearest_centroid(np.stack([b["features"].mean(0) for b in bags])) <= 0.6  # mean pooling is weak


def test_split_by_case_and_shared_texts(demo):
    out, summary, rows = demo
    by_case = defaultdict(list)
    for row in rows:
        by_case[row["case_id"]].append(row)
    for case_id, case_rows in by_case.items():
        assert re.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", case_id)
        assert all(r["slide_id"].startswith(case_id) for r in case_rows)
        for column in ("split", "caption", "question", "answer", "label", "dataset"):
            assert len({r[column] for r in case_rows}) == 1, (case_id, column)  # no leakage, one shared text
    sizes = {len(v) for v in by_case.values()}
    assert 1 in sizes and max(sizes) >= 2 and max(sizes) <= 3  # single- and multi-slide cases
    assert len({r["slide_id"] for r in rows}) == len(rows)
    for split in SPLITS:
        assert {r["label"] for r in rows if r["split"] == split} == set(summary["classes"])
        for kind in ("caption", "instruct"):
            for rec in json.loads((out / f"llava_{kind}_{split}.json").read_text()):
                assert rec["split"] == split and (out / rec["image"]).is_file()
                assert rec["conversations"][0]["value"].startswith("<image>\n")
    instruct = json.loads((out / "llava_instruct_train.json").read_text())
    assert any(len(rec["conversations"]) >= 4 for rec in instruct)  # multi-turn conversations exist


def test_texts_are_real(demo):
    out, _, rows = demo
    shipped = {}
    for name, key in (("captions.jsonl", "caption"), ("reports.jsonl", "report")):
        for line in (DEMO_TEXTS_DIR / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            shipped[rec[key]] = rec
    questions = {}
    for line in (DEMO_TEXTS_DIR / "vqa.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        questions[(rec["slide_id"], rec["question"])] = rec
    for row in rows:
        source = shipped[row["caption"]]  # KeyError: a caption that is not a shipped real text
        assert source["label"] == row["label"] and source["case_id"] == row["case_id"]
        stem, *options = row["question"].split("\n")
        real = questions[(source["slide_id"], stem)]
        assert options == [f"{k}) {v}" for k, v in real["options"].items()] and row["answer"] == real["answer"]
    captions = json.loads((out / "llava_caption_train.json").read_text())
    assert all(rec["conversations"][1]["value"] in shipped for rec in captions)


def test_shipped_texts_are_small_attributed_and_consistent():
    files = sorted(DEMO_TEXTS_DIR.iterdir())
    assert {p.name for p in files} >= {"captions.jsonl", "reports.jsonl", "vqa.jsonl", "NOTICE.md"}
    assert sum(p.stat().st_size for p in files) < 600_000
    notice = (DEMO_TEXTS_DIR / "NOTICE.md").read_text(encoding="utf-8")
    for needle in (
        "Apache License 2.0",
        "ecf7a916286a16358048a39fc4e9016047b1c333",
        "4935038d9f1cfb0bd1dfe98c4816cca2163ba200",
        "SlideChat",
        "WSI-LLaVA",
        "synthetic",
    ):
        assert needle in notice
    texts = load_demo_texts()
    assert set(texts) == set(DEMO_CLASSES)
    for label, records in texts.items():
        assert len(records) >= 20
        for rec in records:
            assert rec.label == label and rec.case_id == rec.slide_id[:12] and rec.questions
            assert all(q.answer in q.options for q in rec.questions)


def test_deterministic_given_seed(tmp_path):
    options = dict(num_cases=8, feature_dim=16, min_tiles=20, max_tiles=60)
    a, b, c = (tmp_path / name for name in "abc")
    make_demo_dataset(a, seed=3, **options)
    make_demo_dataset(b, seed=3, **options)
    make_demo_dataset(c, seed=4, **options)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "lesion_tiles.json").read_bytes() != (c / "lesion_tiles.json").read_bytes()


def test_errors_and_cli(tmp_path):
    with pytest.raises(ValueError, match="num_cases <= "):
        make_demo_dataset(tmp_path / "big", num_cases=10_000, feature_dim=8)
    with pytest.raises(ValueError, match="no shipped texts"):
        make_demo_dataset(tmp_path / "bad", classes=["XYZ"], feature_dim=8)
    out = tmp_path / "cli"
    main(
        [
            "--output_dir",
            str(out),
            "--num_cases",
            "6",
            "--feature_dim",
            "8",
            "--classes",
            "BRCA",
            "LGG",
            "--max_tiles",
            "80",
        ]
    )
    rows = _rows(out / "annotations.csv")
    assert {r["label"] for r in rows} == {"BRCA", "LGG"} and len({r["case_id"] for r in rows}) == 6
    with pytest.raises(FileExistsError, match="overwrite"):
        main(["--output_dir", str(out), "--num_cases", "6", "--feature_dim", "8"])
    main(["--output_dir", str(out), "--num_cases", "4", "--feature_dim", "8", "--overwrite"])
    assert len(list((out / "slides").glob("*.h5"))) == len(_rows(out / "annotations.csv"))


def test_annotation_files_load_with_the_package_loader(demo):
    from processing.annotations import load_annotations

    out, summary, _ = demo
    clip = load_annotations(out / "annotations.csv", "clip", split="train")
    assert len(clip) == summary["slides_per_split"]["train"] and "label" in clip.column_names
    llava = load_annotations(out / "llava_instruct_validation.json", "llava")
    assert all(Path(p).is_file() for p in llava["h5_path"])


def test_diagnosis_questions_are_grounded_in_the_planted_class(tmp_path):
    from demo_data import CLASS_PROMPTS, make_demo_dataset

    out = make_demo_dataset(tmp_path / "d", num_cases=12, feature_dim=8, min_tiles=20, max_tiles=40)
    records = json.loads(Path(out["llava"]["diagnosis"]["train"]).read_text())
    assert records and all(r["split"] == "train" for r in records)
    classes = list(CLASS_PROMPTS)
    for r in records:
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>\nWhich tumour type")
        letter = gpt["value"]
        assert f"{letter}) {CLASS_PROMPTS[r['label']][0]}" in human["value"]
        assert letter == "ABCD"[classes.index(r["label"])]
