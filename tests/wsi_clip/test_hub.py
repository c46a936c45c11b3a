"""Hub publishing: the dry run stages the exact folder, its card parses, both loading paths are proven."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import wsi_clip
    from processing import WSIProcessor

    folder = tmp_path_factory.mktemp("ckpt") / "encoder"
    config = wsi_clip.SlideEncoderConfig(
        input_dim=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    wsi_clip.SlideEncoderModel(config).save_pretrained(folder)
    WSIProcessor(build_tiny_tokenizer(), feature_dim=8).save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"test": {"balanced_accuracy": 0.91, "recall@1": 0.5}}))
    return folder


def test_dry_run_stages_validates_and_uploads_nothing(checkpoint, tmp_path):
    staged = tmp_path / "staged"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "push_to_hub.py"),
            "--model_name_or_path",
            str(checkpoint),
            "--repo_id",
            "someone/wsi-encoder",
            "--dry_run",
            "--output_dir",
            str(staged),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: nothing uploaded" in proc.stdout
    assert proc.stdout.count("[x]") == 4 and "package hidden: ok" in proc.stdout
    card = (staged / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "feature-extraction"
    assert "pathology" in meta["tags"] and "test/balanced_accuracy" in meta["metrics"]
    assert "| test/balanced_accuracy | 0.91 |" in card and "trust_remote_code=True" in card
    assert (staged / "modeling_slide_encoder.py").is_file() and (staged / "model.safetensors").is_file()


def test_broken_folders_are_reported(checkpoint, tmp_path):
    import shutil

    from wsi_clip.hub import CheckpointError, missing_checkpoint_files, stage_checkpoint, validate_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "dilated_attention.py").unlink()
    assert missing_checkpoint_files(broken) == ["dilated_attention.py (imported by modeling_slide_encoder.py)"]
    staged = stage_checkpoint(broken, tmp_path / "staged", repo_id="a/b")
    report = validate_checkpoint(staged, check_loading=False)
    assert not report.ok and "missing" in str(report)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        missing_checkpoint_files(broken)
    with pytest.raises(CheckpointError, match="no config.json"):
        missing_checkpoint_files(tmp_path)


def test_push_uploads_the_staged_folder(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    from wsi_clip.hub import push_checkpoint, stage_checkpoint

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls["upload"] = (sorted(p.name for p in Path(folder_path).iterdir()), repo_id)
            return type("Info", (), {"commit_url": "https://example/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    staged = stage_checkpoint(checkpoint, tmp_path / "s", repo_id="me/enc")
    assert push_checkpoint(staged, "me/enc", private=True) == "https://example/commit/1"
    assert calls["create"] == ("me/enc", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert "README.md" in calls["upload"][0] and "model.safetensors" in calls["upload"][0]
