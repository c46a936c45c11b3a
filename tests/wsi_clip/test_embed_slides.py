"""``wsi-embed-slides`` (scripts/embed_slides.py): a cohort of H5 files → TRIDENT-layout slide embeddings + one
safetensors file; ragged batches equal one-slide calls, resume after a kill, 2 processes = 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from processing import WSIDataError, pad_slides, read_slide, write_slide
from wsi_clip import SlideEncoderConfig, SlideEncoderModel
from wsi_clip.commands.embed import main as embed_main
from wsi_clip.slide_embedding import batches_by_size, load_cohort_embeddings, read_slide_embedding

from conftest import REPO_ROOT, torchrun_command
from wsiclip_helpers import FEATURE_DIM, tiny_clip_config

SCRIPT = REPO_ROOT / "scripts" / "embed_slides.py"
SIZES = (400, 420, 350, 900, 330, 860)  # batches of 4 by size: [900, 860], [420, 400, 350, 330] (ragged)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Six slides (40x TRIDENT, CLAM without attributes, seed), a converted-style LongNet encoder folder."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    layouts = ("trident", "clam", "seed")
    for i, n in enumerate(SIZES):
        side = int(np.ceil(np.sqrt(n)))
        cells = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
        coords = cells * 512 + rng.integers(0, 40, size=2)  # a 40x grid with an odd origin
        write_slide(
            root / "slides" / f"slide_{i}.h5",
            rng.standard_normal((n, FEATURE_DIM)),
            coords[rng.permutation(n)],
            layout=layouts[i % 3],
            patch_size_level0=512,
            dtype="float32",
        )
    torch.manual_seed(0)
    config = SlideEncoderConfig(
        input_dim=FEATURE_DIM,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        pooling="mean",
        embedding_layer="2",
        segment_length=[64, 128],
        dilated_ratio=[1, 2],
    )
    SlideEncoderModel(config).save_pretrained(root / "encoder")
    return {"root": root, "slides": root / "slides", "encoder": root / "encoder"}


def _argv(cohort: dict, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(cohort["encoder"]),
        "--slides",
        str(cohort["slides"]),
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        *extra,
    ]


def _one_slide_reference(cohort: dict) -> dict[str, torch.Tensor]:
    """What one-slide-at-a-time calls of the same model give (the original's way of running)."""
    model = SlideEncoderModel.from_pretrained(cohort["encoder"]).eval()
    with torch.no_grad():
        return {
            p.stem: model(**pad_slides([read_slide(p)], 256)).pooler_output[0]
            for p in sorted(cohort["slides"].glob("*.h5"))
        }


def _run(command: list[str], expect_kill: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == (-9 if expect_kill else 0), f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_output_is_tridents_layout_and_equals_one_slide_calls(cohort, tmp_path):
    summary = embed_main(_argv(cohort, tmp_path / "out"))
    features = tmp_path / "out" / "slide_features_encoder"
    assert summary["written"] == 6 and summary["skipped_existing"] == 0 and not summary["failed"]
    reference = _one_slide_reference(cohort)
    for slide_id, expected in reference.items():
        with h5py.File(features / f"{slide_id}.h5") as f:  # what TRIDENT's readers open
            assert f["features"].shape == (32,) and f["features"].dtype == np.float32
            attrs = dict(f["features"].attrs)
        assert attrs["model"] == str(cohort["encoder"]) and attrs["embedding_layer"] == "2"
        assert attrs["pooling"] == "mean" and attrs["source_file"].endswith(f"{slide_id}.h5")
        assert attrs["patch_size_level0"] == 512 and attrs["num_tiles"] == SIZES[int(slide_id[-1])]
        vector, _ = read_slide_embedding(features / f"{slide_id}.h5")
        torch.testing.assert_close(vector, expected, rtol=0, atol=2e-5)
    embeddings, slide_ids, meta = load_cohort_embeddings(features / "embeddings.safetensors")
    assert slide_ids == sorted(reference) and embeddings.shape == (6, 32)
    torch.testing.assert_close(embeddings, torch.stack([reference[s] for s in slide_ids]), rtol=0, atol=2e-5)
    assert meta["embedding_layer"] == "2" and meta["model_type"] == "wsi_slide_encoder"
    index = (features / "index.csv").read_text().splitlines()
    assert index[0].startswith("index,slide_id,h5_path") and len(index) == 7
    report = json.loads((features / "embedding_report.json").read_text())
    assert report["written"] == 6 and report["slides_per_second"] > 0

    # a rerun skips everything; other settings into the same folder are refused, not mixed in
    assert embed_main(_argv(cohort, tmp_path / "out"))["skipped_existing"] == 6
    with pytest.raises(WSIDataError, match="written by a run with other settings .*embedding_layer"):
        embed_main(_argv(cohort, tmp_path / "out", "--embedding_layer", "final"))
    layer3 = embed_main(_argv(cohort, tmp_path / "out", "--embedding_layer", "final", "--name", "final_layer"))
    assert layer3["written"] == 6


def test_batches_are_sorted_ragged_and_bounded():
    assert batches_by_size([900, 420, 260, 150, 70, 33], 4, 65536, min_fill=0.0) == [[0, 1, 2, 3], [4, 5]]
    assert batches_by_size([900, 420, 400, 390], 4, 1000, min_fill=0.0) == [[0], [1, 2], [3]]  # 3 x 420 > 1000
    assert batches_by_size([900, 800, 500, 400, 390], 8, 65536) == [[0, 1], [2, 3, 4]]  # >= 0.75 x the largest


def test_resume_after_a_kill_leaves_no_truncated_file(cohort, tmp_path):
    out = tmp_path / "out"
    _run([sys.executable, REPO_ROOT / "tests" / "dist" / "embed_crash_runner.py", 3, SCRIPT, *_argv(cohort, out)], True)
    features = out / "slide_features_encoder"
    done = sorted(p.stem for p in features.glob("*.h5"))
    assert len(done) == 2 and len(list(features.glob(".*.tmp"))) == 1  # killed between write and rename
    for slide_id in done:
        read_slide_embedding(features / f"{slide_id}.h5")  # every published file is whole
    result = _run([sys.executable, SCRIPT, *_argv(cohort, out)])
    assert "4 slide(s) embedded, 2 already there, 0 failed" in result.stdout
    assert not list(features.glob(".*.tmp"))  # the killed run's leftover is cleaned up
    embeddings, slide_ids, _ = load_cohort_embeddings(features)
    reference = _one_slide_reference(cohort)
    torch.testing.assert_close(embeddings, torch.stack([reference[s] for s in slide_ids]), rtol=0, atol=2e-5)


def test_two_processes_equal_one_each_slide_once(cohort, tmp_path):
    _run(torchrun_command(SCRIPT, *_argv(cohort, tmp_path / "two")))
    features = tmp_path / "two" / "slide_features_encoder"
    report = json.loads((features / "embedding_report.json").read_text())
    assert report["written"] == 6 and report["skipped_existing"] == 0  # each slide once across the two ranks
    embeddings, slide_ids, _ = load_cohort_embeddings(features)
    reference = _one_slide_reference(cohort)
    assert slide_ids == sorted(reference)
    torch.testing.assert_close(embeddings, torch.stack([reference[s] for s in slide_ids]), rtol=0, atol=2e-5)


def test_bad_slide_stops_the_run_unless_skipped(cohort, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for p in cohort["slides"].glob("*.h5"):
        (slides / p.name).symlink_to(p)
    (slides / "broken.h5").write_bytes(b"not an hdf5 file")
    argv = _argv(cohort, tmp_path / "out")
    argv[argv.index("--slides") + 1] = str(slides)
    with pytest.raises(WSIDataError, match=r"slide broken: .*broken.h5: not an HDF5 file.*--skip_bad_samples"):
        embed_main(argv)
    summary = embed_main(argv + ["--skip_bad_samples", "true"])
    assert summary["written"] == 6 and list(summary["failed"]) == ["broken"]
    report = json.loads((tmp_path / "out" / "slide_features_encoder" / "embedding_report.json").read_text())
    assert "not an HDF5 file" in report["failed"]["broken"]


def test_wsiclip_checkpoint_tower_and_projected(cohort, tmp_path):
    from wsi_clip import WSIClipModel

    torch.manual_seed(0)
    clip = WSIClipModel(tiny_clip_config("abmil")).eval()
    clip.save_pretrained(tmp_path / "clip")
    argv = _argv(cohort, tmp_path / "out")
    argv[1] = str(tmp_path / "clip")
    tower = embed_main(argv)
    projected = embed_main(argv + ["--projected", "true", "--name", "clip_projected"])
    assert tower["written"] == projected["written"] == 6
    tower_emb, ids, meta = load_cohort_embeddings(tmp_path / "out" / "slide_features_clip")
    proj_emb, _, proj_meta = load_cohort_embeddings(tmp_path / "out" / "slide_features_clip_projected")
    assert meta["model_type"] == "wsi_abmil" and proj_meta["projected"] == "true"
    assert tower_emb.shape == (6, 24) and proj_emb.shape == (6, 8)
    slide = read_slide(cohort["slides"] / f"{ids[0]}.h5")
    with torch.no_grad():
        expected = clip.get_slide_features(**pad_slides([slide], 256)).pooler_output[0]
    torch.testing.assert_close(proj_emb[0], expected, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="one output"):
        embed_main(argv + ["--embedding_layer", "1", "--name", "x"])
