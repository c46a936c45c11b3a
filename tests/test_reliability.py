"""Interrupted training, distributed runs and safe loading (issue 7).

* A WSI-CLIP and a WSI-LLaVA (stage 3, LoRA) run SIGKILLed mid-training / mid-save resume with a bare
  ``--resume_from_checkpoint`` and end with the weights of an uninterrupted run (random tile sampling included).
* Checkpoints are published atomically: a save killed half-way leaves no ``checkpoint-N`` folder.
* 2 processes (gloo): LLaVA stage 3 trains; CLIP evaluation on an odd number of slides equals 1 process.
* Safe loading: no pickle weights, ``weights_only=True`` for every ``torch.load``, no ``trust_remote_code=True``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, free_port
from wsiclip_helpers import make_tiny_demo, save_text_model, write_rows

SCRIPTS = REPO_ROOT / "scripts"
CRASH_RUNNER = REPO_ROOT / "tests" / "dist" / "crash_runner.py"
COLUMNS = ("h5_path", "caption", "case_id", "slide_id", "label", "split")


def run(command: list[str], cwd: Path, expect_kill: bool = False) -> subprocess.CompletedProcess:
    """Run a script with one thread per process; assert it succeeded (or was SIGKILLed when ``expect_kill``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    expected = -9 if expect_kill else 0
    assert result.returncode == expected, (
        f"{' '.join(map(str, command))}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=atol, msg=key)


def assert_resumable_folder(folder: Path) -> None:
    from wsi_clip.checkpointing import checkpoint_problems

    assert checkpoint_problems(folder) == []
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory) -> dict:
    """Tiny CLIP data (odd-sized test split) + a tiny text tower + a script config with random tile sampling."""
    root = tmp_path_factory.mktemp("clip_reliability")
    info = make_tiny_demo(root / "data", num_cases=10, validation_fraction=0.0, test_fraction=0.3)
    from processing import load_annotations

    rows = [dict(r) for r in load_annotations(info["annotations"], "clip")]
    train = [{k: r[k] for k in COLUMNS} for r in rows if r["split"] == "train"][:10]
    test = [{k: r[k] for k in COLUMNS} for r in rows if r["split"] == "test"]
    if len(test) % 2 == 0:
        test = test[:-1]
    assert len(test) >= 3 and len(test) % 2 == 1
    write_rows(root / "train.csv", train)
    write_rows(root / "test.csv", test)
    save_text_model(root / "text", [r["caption"] for r in rows])
    config = {
        "train_file": str(root / "train.csv"),
        "text_model_name_or_path": str(root / "text"),
        "slide_tower": "abmil",
        "slide_config": {"hidden_size": 24, "attention_dim": 8, "dropout": 0.0},
        "projection_dim": 8,
        "max_tiles": 8,
        "tile_sampling": "random",
        "text_attn_implementation": "eager",
        "max_steps": 6,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "linear",
        "per_device_train_batch_size": 4,
        "dataloader_drop_last": True,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    (root / "clip.json").write_text(json.dumps(config))
    return {"root": root, "config": root / "clip.json", "info": info, "num_test": len(test)}


@pytest.mark.slow
def test_clip_killed_while_saving_resumes_to_the_uninterrupted_weights(clip_setup, tmp_path):
    """Kill while checkpoint-4 is being written: only checkpoint-2 is published, and resuming from it (found
    automatically) ends at the weights of a run that was never interrupted."""
    script = SCRIPTS / "train_clip.py"
    config = clip_setup["config"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run([sys.executable, script, config, "--output_dir", reference], cwd=tmp_path)
    run(
        [sys.executable, CRASH_RUNNER, 4, "save", script, config, "--output_dir", crashed],
        cwd=tmp_path,
        expect_kill=True,
    )
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (crashed / ".checkpoint-staging" / "checkpoint-4").is_dir()  # the half-written save, never published
    assert_resumable_folder(crashed / "checkpoint-2")
    result = run([sys.executable, script, config, "--output_dir", crashed, "--resume_from_checkpoint"], cwd=tmp_path)
    assert f"resuming from the latest complete checkpoint {crashed / 'checkpoint-2'}" in result.stderr
    assert_same_weights(reference / "model.safetensors", crashed / "model.safetensors")
    last = Path("checkpoint-6") / "model.safetensors"
    assert_same_weights(reference / last, crashed / last)
    assert_resumable_folder(crashed / "checkpoint-6")

    # the same run, evaluated by 2 processes on an odd number of slides, gives the 1-process metrics exactly
    evaluate = SCRIPTS / "evaluate_clip.py"
    data = clip_setup["root"] / "test.csv"
    common = [
        "--model_name_or_path",
        reference,
        "--test_file",
        data,
        "--class_prompts",
        clip_setup["info"]["class_prompts"],
        "--batch_size",
        2,
    ]
    run([sys.executable, evaluate, *common, "--output", tmp_path / "one.json"], cwd=tmp_path)
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            2,
            "--master_port",
            free_port(),
            evaluate,
            *common,
            "--output",
            tmp_path / "two.json",
        ],
        cwd=tmp_path,
    )
    one = json.loads((tmp_path / "one.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two.json").read_text())["metrics"]
    assert one["num_slides"] == two["num_slides"] == clip_setup["num_test"]
    assert one["retrieval_num_slides"] == clip_setup["num_test"]  # no padding duplicates, nothing dropped
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def llava_config(tmp_path_factory) -> Path:
    """Stage 3 from a fresh tiny tower + tiny Llama + word tokenizer, random tile sampling, constant LR."""
    root = tmp_path_factory.mktemp("llava_reliability")
    from demo_data import make_demo_dataset

    make_demo_dataset(root / "data", num_cases=6, feature_dim=16, min_tiles=20, max_tiles=40, seed=0)
    config = {
        "train_file": str(root / "data" / "llava_instruct_train.json"),
        "slide_config": {
            "input_dim": 16,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "dropout": 0.0,
            "drop_path_rate": 0.0,
        },
        "language_model_config": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
        },
        "tokenizer_name_or_path": "word",
        "stage": 3,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "max_tiles": 8,
        "tile_sampling": "random",
        "max_length": 256,
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "projector_lr": 1e-3,
        "lr_scheduler_type": "constant",
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "ddp_find_unused_parameters": False,
    }
    path = root / "llava.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_llava_stage3_killed_mid_training_resumes_and_two_processes_train(llava_config, tmp_path):
    """SIGKILL after checkpoint-4: a bare --resume_from_checkpoint picks checkpoint-4 and ends at the uninterrupted
    adapters. Then 2 processes x 1 slide (gloo) train stage 3 to the weights of 1 process x 2 slides."""
    script = SCRIPTS / "train_llava.py"
    reference, crashed, two = tmp_path / "reference", tmp_path / "crashed", tmp_path / "two"
    run([sys.executable, script, llava_config, "--output_dir", reference], cwd=tmp_path)
    run(
        [sys.executable, CRASH_RUNNER, 5, "step", script, llava_config, "--output_dir", crashed],
        cwd=tmp_path,
        expect_kill=True,
    )
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert_resumable_folder(crashed / "checkpoint-4")
    result = run(
        [sys.executable, script, llava_config, "--output_dir", crashed, "--resume_from_checkpoint", "--seed", 0],
        cwd=tmp_path,
    )
    assert f"resuming from the latest complete checkpoint {crashed / 'checkpoint-4'}" in result.stderr
    assert_same_weights(reference / "adapter_model.safetensors", crashed / "adapter_model.safetensors")

    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            2,
            "--master_port",
            free_port(),
            script,
            llava_config,
            "--output_dir",
            two,
            "--per_device_train_batch_size",
            1,
            "--max_steps",
            2,
            "--save_strategy",
            "no",
        ],
        cwd=tmp_path,
    )
    assert_same_weights(
        reference / "checkpoint-2" / "adapter_model.safetensors", two / "adapter_model.safetensors", atol=1e-4
    )


def _package_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for folder in ("wsi_clip", "wsi_llava", "processing", "scripts"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    calls.append((f"{path.relative_to(REPO_ROOT)}:{node.lineno}", node))
    return calls


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def test_safe_loading_static_checks():
    """Weights only as safetensors: no torch.save / pickle anywhere in the package, every torch.load with
    weights_only=True, no save_pretrained(safe_serialization=False), and no trust_remote_code=True in code."""
    problems = []
    for where, call in _package_calls():
        name, keywords = _name(call.func), {k.arg: k.value for k in call.keywords}
        if name in ("torch.save", "pickle.dump", "pickle.load", "pickle.loads"):
            problems.append(f"{where}: {name}")
        if name == "torch.load" and not (
            isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
        ):
            problems.append(f"{where}: torch.load without weights_only=True")
        if isinstance(keywords.get("safe_serialization"), ast.Constant) and not keywords["safe_serialization"].value:
            problems.append(f"{where}: safe_serialization=False")
        if isinstance(keywords.get("trust_remote_code"), ast.Constant) and keywords["trust_remote_code"].value:
            problems.append(f"{where}: trust_remote_code=True")
    assert not problems, problems


def test_trainer_writes_no_pickled_training_args(tmp_path):
    """The trainers' final save (and every checkpoint) holds training_args.json, not a pickled training_args.bin."""
    from transformers import TrainingArguments

    from processing import WSIProcessor
    from wsi_clip import WSIClipModel
    from wsi_clip.trainer import WSIClipTrainer

    from conftest import build_tiny_tokenizer
    from wsiclip_helpers import tiny_clip_config

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = WSIClipTrainer(
        WSIClipModel(tiny_clip_config("abmil")), args, processing_class=WSIProcessor(build_tiny_tokenizer())
    )
    trainer.save_model(str(tmp_path / "final"))
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert "model.safetensors" in names and "training_args.json" in names and "training_args.bin" not in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
