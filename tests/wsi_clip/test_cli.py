"""The command-line plumbing every command shares (``wsi_clip.cli``): one rule for mapping-valued options, renamed
options accepted with a warning naming the new one, console scripts declared for every command."""

from __future__ import annotations

import configparser
import importlib
import json

import pytest

from wsi_clip.cli import parse_mapping

from conftest import REPO_ROOT


def test_parse_mapping_reads_every_form_and_names_the_option(tmp_path):
    expected = {"hidden_size": 16, "pooling": "cls"}
    (tmp_path / "tower.yaml").write_text("hidden_size: 16\npooling: cls\n")
    (tmp_path / "tower.json").write_text(json.dumps(expected))
    for value in (
        expected,
        json.dumps(expected),
        "{hidden_size: 16, pooling: cls}",
        str(tmp_path / "tower.yaml"),
        str(tmp_path / "tower.json"),
    ):
        assert parse_mapping(value, "slide_config") == expected, value
    assert parse_mapping(None, "slide_config") == {} and parse_mapping("", "slide_config") == {}
    with pytest.raises(ValueError, match=r"--slide_config .* must be a JSON / YAML mapping"):
        parse_mapping("[1, 2]", "slide_config")
    with pytest.raises(ValueError, match=r"--token_selection_kwargs .* neither a JSON / YAML mapping"):
        parse_mapping("{max_tokens: [", "token_selection_kwargs")


def test_renamed_options_are_accepted_with_a_warning_naming_the_new_one(tmp_path):
    from wsi_llava.commands.train import parse_arguments

    old = tmp_path / "old.yaml"
    old.write_text("train_file: t.json\neval_file: v.json\nvision_tower_config: {input_dim: 8}\ntokenizer: word\n")
    with pytest.warns(FutureWarning) as caught:
        model_args, data_args, _ = parse_arguments([str(old), "--eval_split", "val", "--output_dir", str(tmp_path)])
    messages = " ".join(str(w.message) for w in caught)
    for before, after in (
        ("eval_file", "validation_file"),
        ("vision_tower_config", "slide_config"),
        ("tokenizer", "tokenizer_name_or_path"),
        ("--eval_split", "--validation_split"),
    ):
        assert f"'{before}' was renamed to '{after}'" in messages
    assert data_args.validation_file == "v.json" and data_args.validation_split == "val"
    assert json.loads(model_args.slide_config) == {"input_dim": 8} and model_args.tokenizer_name_or_path == "word"

    both = tmp_path / "both.yaml"
    both.write_text("train_file: t.json\neval_file: v.json\nvalidation_file: w.json\n")
    with pytest.raises(ValueError, match="both 'eval_file' and 'validation_file' are set"):
        parse_arguments([str(both)])


def test_evaluate_flags_share_the_training_vocabulary():
    from wsi_clip.arguments import EvaluationArguments as ClipEvaluation
    from wsi_clip.cli import parse_command_line
    from wsi_clip.commands.evaluate import COMMAND as CLIP_EVALUATE
    from wsi_llava.arguments import EvaluationArguments as LlavaEvaluation

    new = ["--model_name_or_path", "ckpt", "--test_file", "a.csv", "--test_split", "test", "--max_length", "32"]
    (clip,) = parse_command_line(ClipEvaluation, new + ["--class_prompts", "p.json"], CLIP_EVALUATE)
    (llava,) = parse_command_line(LlavaEvaluation, new, "wsi-evaluate-llava")
    for args in (clip, llava):
        assert (args.model_name_or_path, args.test_file, args.test_split, args.max_length) == (
            "ckpt",
            "a.csv",
            "test",
            32,
        )
    with pytest.warns(FutureWarning) as caught:
        (old,) = parse_command_line(
            ClipEvaluation,
            ["--model", "ckpt", "--data", "a.csv", "--split", "test", "--classes", "p.json", "--text_max_length", "32"],
            CLIP_EVALUATE,
        )
    assert old == clip and "'--data' was renamed to '--test_file'" in " ".join(str(w.message) for w in caught)
    with pytest.warns(FutureWarning) as caught:
        (old,) = parse_command_line(
            LlavaEvaluation,
            ["--model", "ckpt", "--annotations", "a.csv", "--split", "test", "--max_length", "32"],
            "wsi-evaluate-llava",
        )
    assert old == llava and "'--annotations' was renamed to '--test_file'" in " ".join(str(w.message) for w in caught)


def test_every_command_has_a_console_script():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].split("\n") if line)
    for name in (
        "wsi-train-clip",
        "wsi-evaluate-clip",
        "wsi-convert-gigapath",
        "wsi-embed-slides",
        "wsi-probe-embeddings",
        "wsi-push-to-hub",
        "wsi-train-llava",
        "wsi-evaluate-llava",
        "wsi-prepare-language-model",
    ):
        module, function = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), function)), scripts[name]
        assert callable(importlib.import_module(module).main)
