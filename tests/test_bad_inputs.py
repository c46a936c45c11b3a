"""The bad-input matrix (issue 7): every row gets the package's own exception naming file / row / key, what is wrong
and the fix, raised before any training step. Rows already covered elsewhere are listed here, not repeated.

| row of the matrix                                  | test                                                        |
|----------------------------------------------------|-------------------------------------------------------------|
| missing H5                                         | test_slide_io::test_bad_inputs_raise_...[missing], test_annotations::test_every_bad_row_is_reported_at_once_or_skipped, test_preflight::test_all_problems_reported_at_once_and_skip_counts |
| not HDF5 / truncated file                          | test_slide_io::...[not_hdf5], ...[truncated], test_preflight::test_truncated_file_is_reported_not_crashing |
| no ``features``                                    | test_slide_io::...[no_features]                             |
| features rank != 2                                 | test_slide_io::...[rank3]                                   |
| feature dim != model's                             | test_preflight::test_all_problems..., test_processor::test_feature_dim_and_bad_in_memory_slides_are_refused, test_slide_encoder::test_bad_inputs_raise_clear_errors; through the train script: **test_train_script_preflight_feature_dim** |
| coords shape wrong                                 | test_slide_io::...[coords_shape]                            |
| coords / features length mismatch                  | test_slide_io::...[length_mismatch]                         |
| N = 0                                              | test_slide_io::...[empty]                                   |
| NaN / Inf features                                 | test_slide_io::test_nonfinite_features_raise_or_drop, test_preflight::test_scan_is_chunked_and_finds_nan_in_a_late_chunk |
| negative coords                                    | test_slide_io::...[negative]                                |
| duplicated coords                                  | test_slide_io::...[duplicated]                              |
| coords outside the position grid (scale factor)    | test_preflight::test_grid_check_names_the_tile_and_the_rescale, test_slide_encoder::test_bad_inputs_raise_clear_errors; through the train script, skip-and-count: **test_train_script_preflight_grid_and_skip_bad_samples** |
| coords stored as float16                           | test_slide_io::...[fp16_coords], test_processor::test_feature_dim_and_bad_in_memory_slides_are_refused |
| CSV missing required columns                       | test_annotations::test_missing_columns_are_named            |
| empty caption / question / answer                  | test_annotations::test_every_bad_row_is_reported_at_once_or_skipped (caption); **test_empty_question_or_answer** |
| case id missing where the loss needs it            | test_annotations::test_case_id_required_where_the_loss_needs_it, test_preflight (row 5); through the train script: **test_train_script_requires_case_id_when_sampling_by_case** |
| placeholder token absent from tokenizer / prompt   | test_processor::test_missing_placeholder_token_is_an_error (tokenizer); **test_placeholder_absent_from_the_prompt** |
| prompt truncated (placeholder / whole answer lost) | test_processor::test_truncation_that_drops_the_answer_or_placeholder_is_an_error; through the train script: **test_train_llava_preflight_prompt_truncation** |
| LoRA target matches nothing / the slide tower      | test_wsillava_training::test_lora_targets_limited_to_language_model; through the train script: **test_train_llava_lora_targets** |
| checkpoint directory missing files                 | test_hub::test_broken_folders_are_reported; **test_checkpoint_folders_missing_files** (model folder, resume checkpoint) |
| converted checkpoint with unexpected keys          | test_slide_encoder::test_converter_reads_torch_files_and_checks_keys_strictly (conversion); **test_converted_tower_with_unexpected_keys** (loading) |
| H5 path escaping ``h5_root``                       | test_annotations::test_h5_root_confines_paths; through the scripts: **test_scripts_pass_h5_root** |
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from processing import AnnotationError, PromptError, WSIDataError, write_slide

from conftest import REPO_ROOT, grid_coords
from wsiclip_helpers import FEATURE_DIM, make_tiny_demo, save_text_model, write_rows

COLUMNS = ("h5_path", "caption", "case_id", "slide_id", "label", "split")


def load_script(name: str):
    """A module object of the entry point ``scripts/<name>.py`` (scripts are not a package); its ``main`` is the
    command's (``wsi_clip.commands`` / ``wsi_llava.commands``), so these tests go through the script."""
    import sys

    if f"_script_{name}" in sys.modules:
        return sys.modules[f"_script_{name}"]
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs_clip")
    info = make_tiny_demo(root / "data", num_cases=4, validation_fraction=0.0, test_fraction=0.0)
    from processing import load_annotations

    rows = [{k: r[k] for k in COLUMNS} for r in load_annotations(info["annotations"], "clip")]
    save_text_model(root / "text", [r["caption"] for r in rows])
    return {"root": root, "rows": rows}


def clip_argv(data: dict, csv: Path, out: Path, **overrides) -> list[str]:
    options = {
        "train_file": csv,
        "text_model_name_or_path": data["root"] / "text",
        "slide_tower": "abmil",
        "slide_config": json.dumps({"hidden_size": 16, "attention_dim": 8}),
        "projection_dim": 8,
        "max_tiles": 8,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "output_dir": out,
    }
    options.update(overrides)
    return [str(a) for k, v in options.items() for a in (f"--{k}", v)]


def assert_no_training_started(out: Path) -> None:
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))


def test_train_script_preflight_feature_dim(clip_data, tmp_path):
    csv = write_rows(tmp_path / "train.csv", clip_data["rows"])
    config = json.dumps({"hidden_size": 16, "attention_dim": 8, "input_dim": FEATURE_DIM * 2})
    with pytest.raises(WSIDataError) as err:
        load_script("train_clip").main(clip_argv(clip_data, csv, tmp_path / "out", slide_config=config))
    message = str(err.value)
    assert f"{csv}: {len(clip_data['rows'])} of {len(clip_data['rows'])} row(s) failed the pre-flight" in message
    assert (
        f"row 1: {clip_data['rows'][0]['h5_path']}: tile features have dimension {FEATURE_DIM} but the model "
        f"expects {FEATURE_DIM * 2}" in message
    )
    assert "Use features from the model's tile encoder" in message and "--skip_bad_samples" in message
    assert_no_training_started(tmp_path / "out")


def test_train_script_preflight_grid_and_skip_bad_samples(clip_data, tmp_path, caplog):
    rows = [dict(r) for r in clip_data["rows"]]
    far = grid_coords(12) * 1000  # coordinates at the wrong scale: grid cells far beyond 0..999
    rows[1]["h5_path"] = str(write_slide(tmp_path / "far.h5", np.ones((12, FEATURE_DIM)), far))
    csv = write_rows(tmp_path / "train.csv", rows)
    tower = json.dumps(
        {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "segment_length": [8],
            "dilated_ratio": [1],
        }
    )
    argv = clip_argv(clip_data, csv, tmp_path / "out", slide_tower="slide_encoder", slide_config=tower)
    script = load_script("train_clip")
    with pytest.raises(WSIDataError) as err:
        script.main(argv)
    message = str(err.value)
    assert f"row 2: {tmp_path / 'far.h5'}: " in message
    assert "outside the position grid 0..999 at patch_size_level0 256" in message
    assert "The tiles are 256000 px apart" in message and "pass patch_size_level0=256000" in message
    assert_no_training_started(tmp_path / "out")

    with caplog.at_level("WARNING"):
        metrics = script.main(argv + ["--skip_bad_samples", "true"])
    assert "train_loss" in metrics
    assert f"skipped 1 of {len(rows)} row(s) that failed the pre-flight check" in caplog.text


def test_train_script_requires_case_id_when_sampling_by_case(clip_data, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "case_id"} for r in clip_data["rows"]]
    csv = write_rows(tmp_path / "train.csv", rows)
    with pytest.raises(AnnotationError, match=f"{csv}: no 'case_id' column, but the loss groups slides by case"):
        load_script("train_clip").main(clip_argv(clip_data, csv, tmp_path / "out", sample_by="case"))
    assert_no_training_started(tmp_path / "out")


def test_empty_question_or_answer(tmp_path):
    from processing import load_annotations

    write_slide(tmp_path / "a.h5", np.zeros((3, 2)), grid_coords(3))
    records = [
        {"h5_path": "a.h5", "question": "what grade ?", "answer": " "},
        {"h5_path": "a.h5", "question": "", "answer": "high grade"},
        {
            "image": "a.pt",
            "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": ""}],
        },
    ]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, "llava")
    message = str(err.value)
    assert f"{path}: 3 of 3 row(s) are unusable for task 'llava'" in message
    assert "row 1: empty answer" in message and "row 2: empty question" in message
    assert "row 3: conversation has no non-empty assistant answer" in message and "on_error='skip'" in message


def _llava_processor():
    from processing import WSIProcessor

    from conftest import build_tiny_tokenizer

    processor = WSIProcessor(build_tiny_tokenizer(), feature_dim=4)
    processor.ensure_slide_token()
    return processor


def test_placeholder_absent_from_the_prompt(tmp_path):
    from processing import InstructionCollator, preflight_check

    processor = _llava_processor()
    processor.chat_template = "{% for m in messages %}{{ m['role'] }}: ok\n{% endfor %}"  # drops every message text
    slide = write_slide(tmp_path / "s.h5", np.ones((3, 4)), grid_coords(3))
    row = {
        "h5_path": str(slide),
        "row": 7,
        "conversations": [{"role": "user", "content": "what grade ?"}, {"role": "assistant", "content": "high"}],
    }
    collator = InstructionCollator(processor)
    with pytest.raises(
        PromptError,
        match=rf"{slide} \(annotation row 7\): the prompt must contain the slide "
        r"placeholder '<slide>' exactly once, found 0",
    ):
        collator.example(row)
    with pytest.raises(WSIDataError, match=r"row 7: .*found 0"):  # the pre-flight reports it before training
        preflight_check([row], row_check=collator.example)
    processor.chat_template = None
    twice = dict(
        row,
        conversations=[{"role": "user", "content": "<slide> what <slide> ?"}, {"role": "assistant", "content": "high"}],
    )
    with pytest.raises(PromptError, match="exactly once, found 2 .*also written in the question"):
        collator.example(twice)


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs_llava")
    from demo_data import make_demo_dataset

    make_demo_dataset(root, num_cases=4, feature_dim=16, min_tiles=20, max_tiles=30, seed=0)
    return {"train": root / "llava_instruct_train.json"}


def llava_argv(data: dict, out: Path, *extra: str) -> list[str]:
    tower = {
        "input_dim": 16,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    lm = {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
    }
    return [
        "--stage",
        "3",
        "--train_file",
        str(data["train"]),
        "--slide_config",
        json.dumps(tower),
        "--language_model_config",
        json.dumps(lm),
        "--tokenizer_name_or_path",
        "word",
        "--max_tiles",
        "8",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_train_llava_preflight_prompt_truncation(llava_data, tmp_path):
    with pytest.raises(WSIDataError) as err:
        load_script("train_llava").main(llava_argv(llava_data, tmp_path / "out", "--max_length", "6"))
    message = str(err.value)
    assert f"{llava_data['train']}: " in message and "failed the pre-flight check" in message
    assert "(annotation row 1): max_length=6 cuts off the whole answer" in message
    assert "raise max_length or shorten the question" in message
    assert_no_training_started(tmp_path / "out")


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (r"model\.language_model\..*\.c_attn", r"matches no linear layer .*Fix: adapt the regex"),
        (
            r".*(q_proj|fc1)",
            r"also matches modules outside the language model \(slide tower / projector\).*vision_tower",
        ),
    ],
)
def test_train_llava_lora_targets(llava_data, tmp_path, pattern, expected):
    from wsi_llava.assembly import LoraTargetError

    with pytest.raises(LoraTargetError, match=r"lora_target_modules regex .*" + expected):
        load_script("train_llava").main(llava_argv(llava_data, tmp_path / "out", "--lora_target_modules", pattern))
    assert_no_training_started(tmp_path / "out")


def _tiny_tower_folder(folder: Path) -> Path:
    from wsi_clip import SlideEncoderConfig, SlideEncoderModel

    config = SlideEncoderConfig(
        input_dim=FEATURE_DIM,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        segment_length=[8],
        dilated_ratio=[1],
    )
    SlideEncoderModel(config).save_pretrained(folder)
    return folder


def test_checkpoint_folders_missing_files(llava_data, tmp_path):
    from wsi_clip.checkpointing import resolve_resume_checkpoint
    from wsi_clip.hub import CheckpointError

    tower = _tiny_tower_folder(tmp_path / "tower")
    (tower / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{tower}: no \*.safetensors weights .*Re-save it"):
        load_script("train_llava").main(
            llava_argv(llava_data, tmp_path / "out", "--slide_encoder_name_or_path", str(tower))
        )

    # a resume checkpoint whose save was cut short: refused by path, skipped by "auto"
    out = tmp_path / "run"
    for step, files in (
        (2, ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")),
        (4, ("model.safetensors",)),
    ):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_bytes(b"x")
        (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-4: not a complete training checkpoint: no optimizer.pt.*"
        r"no scheduler.pt.*no rng_state\*.pth.*--resume_from_checkpoint auto",
    ):
        resolve_resume_checkpoint(str(out / "checkpoint-4"), out)
    assert resolve_resume_checkpoint("auto", out) == str(out / "checkpoint-2")
    assert resolve_resume_checkpoint(True, tmp_path / "empty") is None  # nothing yet: start from scratch
    assert resolve_resume_checkpoint("false", out) is None


def test_converted_tower_with_unexpected_keys(tmp_path):
    from wsi_clip import WSIClipModel
    from wsi_clip.slide_towers import SlideCheckpointError, load_slide_tower

    tower = _tiny_tower_folder(tmp_path / "tower")
    weights = load_file(tower / "model.safetensors")
    weights["encoder.layers.0.extra.weight"] = torch.zeros(3)  # an unconverted / foreign key
    del weights["patch_embed.bias"]
    save_file(weights, str(tower / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SlideCheckpointError) as err:
        load_slide_tower(str(tower))
    message = str(err.value)
    assert str(tower) in message and "unexpected keys (1): encoder.layers.0.extra.weight" in message
    assert "missing keys (1): patch_embed.bias" in message and "wsi-convert-gigapath" in message
    with pytest.raises(SlideCheckpointError, match="unexpected keys"):
        WSIClipModel.from_towers(slide_encoder=str(tower), text_model=None)


def test_scripts_pass_h5_root(clip_data, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    write_slide(tmp_path / "outside.h5", np.ones((3, FEATURE_DIM)), grid_coords(3))
    rows = [dict(clip_data["rows"][0], h5_path="../outside.h5")]
    csv = write_rows(tmp_path / "train.csv", rows)
    with pytest.raises(AnnotationError, match=r"row 1: h5_path '../outside.h5' resolves to .* outside h5_root"):
        load_script("train_clip").main(clip_argv(clip_data, csv, tmp_path / "out", h5_root=root))

    bench = tmp_path / "bench.csv"
    bench.write_text("Slide,Question,A,B,Answer\n../outside,what grade ?,low,high,B\n")
    from wsi_llava.arguments import EvaluationArguments
    from wsi_llava.commands import evaluate as evaluate_llava

    args = EvaluationArguments(model_name_or_path="unused", test_file=str(bench), h5_root=str(root))
    with pytest.raises(AnnotationError, match="outside h5_root"):
        evaluate_llava.load_items(args, str(bench))
    (root / "inside.h5").write_bytes((tmp_path / "outside.h5").read_bytes())
    bench.write_text("Slide,Question,A,B,Answer\ninside,what grade ?,low,high,B\n")
    items = evaluate_llava.load_items(args, str(bench))
    assert items[0]["h5_path"] == str((root / "inside.h5").resolve())
