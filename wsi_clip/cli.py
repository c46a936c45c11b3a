"""Command-line plumbing shared by every command (``wsi_clip.commands``, ``wsi_llava.commands``).

* :func:`parse_args_with_config`: ``command [config.yaml|json] [--flag value ...]`` → the parser's dataclasses;
* :func:`parse_mapping`: the one rule for mapping-valued options (``slide_config``, ``token_selection_kwargs``, ...);
* :data:`RENAMED_OPTIONS`: option names that changed, still accepted with a ``FutureWarning`` naming the new one;
* :func:`setup_logging` and :func:`exit_status` for the commands' ``main`` / console-script entry points.

The flag vocabulary, the same for WSI-CLIP and WSI-LLaVA, training and evaluation: ``model_name_or_path`` (the
checkpoint a command starts from, evaluates or publishes), ``slide_encoder_name_or_path`` / ``slide_config`` (a
pretrained / new slide tower), ``tokenizer_name_or_path``, ``train_file`` / ``validation_file`` / ``test_file`` with
``train_split`` / ``validation_split`` / ``test_split``, ``h5_root``, ``max_tiles``, ``tile_sampling``,
``max_length`` (text tokens), ``class_prompts``, ``output_dir`` (a folder) and ``output`` (a result file).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .checkpointing import normalize_resume_argv

# old option name -> new one. A rename applies only to a parser that has the new name and not the old one (so e.g.
# `output` -> `output_dir` concerns the converter, whose output is a folder, not the evaluators' result file).
RENAMED_OPTIONS: dict[str, str] = {
    "model": "model_name_or_path",
    "vision_tower": "slide_encoder_name_or_path",
    "vision_tower_config": "slide_config",
    "tokenizer": "tokenizer_name_or_path",
    "eval_file": "validation_file",
    "eval_split": "validation_split",
    "data": "test_file",
    "annotations": "test_file",
    "split": "test_split",
    "classes": "class_prompts",
    "text_max_length": "max_length",
    "output": "output_dir",
}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_mapping(value: Any, name: str) -> dict[str, Any]:
    """A mapping option's value as a dict: a mapping (from a config file), a JSON or YAML mapping written inline
    (``'{"hidden_size": 256}'``, ``'{hidden_size: 256}'``), or the path of a JSON / YAML file holding one.
    ``None`` / ``""`` → ``{}``; anything else is an error naming the option."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value)
    path = Path(text).expanduser()
    source = f"--{name} {text!r}"
    try:
        if path.is_file():
            source = f"--{name} file {path}"
            text = path.read_text(encoding="utf-8")
    except OSError:  # a long inline value is no file name
        pass
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{source} is neither a JSON / YAML mapping nor a JSON / YAML file ({err}).") from err
    if not isinstance(parsed, dict):
        raise ValueError(
            f"{source} must be a JSON / YAML mapping (or a file holding one), got {type(parsed).__name__}: {value!r}."
        )
    return parsed


def _renames_for(parser: HfArgumentParser) -> dict[str, str]:
    dests = {action.dest for action in parser._actions}
    return {old: new for old, new in RENAMED_OPTIONS.items() if new in dests and old not in dests}


def _deprecated(old: str, new: str, where: str) -> None:
    warnings.warn(
        f"{where}: '{old}' was renamed to '{new}' (same meaning); the old name still works for now but "
        f"will be removed: use {new}.",
        FutureWarning,
        stacklevel=4,
    )


def rename_deprecated_flags(argv: Sequence[str], renames: Mapping[str, str]) -> list[str]:
    """``--old value`` / ``--old=value`` (or ``--old-name``) → the new flag, with a ``FutureWarning``."""
    out = []
    for token in argv:
        if token.startswith("--"):
            flag, eq, value = token[2:].partition("=")
            key = flag.replace("-", "_")
            if key in renames:
                _deprecated(f"--{flag}", f"--{renames[key]}", "command line")
                token = f"--{renames[key]}{eq}{value}"
        out.append(token)
    return out


def _read_config(path: Path, parser: HfArgumentParser, command: str, renames: Mapping[str, str]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found (YAML or JSON with the fields listed by --help).")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the config file must be a mapping of option names to values.")
    for old in [k for k in values if k in renames]:
        new = renames[old]
        if new in values:
            raise ValueError(
                f"{path}: both '{old}' and '{new}' are set; '{old}' is the old name of '{new}': keep only the new one."
            )
        _deprecated(old, new, str(path))
        values[new] = values.pop(old)
    unknown = sorted(set(values) - {action.dest for action in parser._actions})
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown}; valid keys are the options listed by "
            f"`{command} --help` (without the leading --)."
        )
    return values


def parse_args_with_config(parser: HfArgumentParser, argv: Sequence[str], command: str) -> tuple[Any, ...]:
    """``command [config.yaml|json] [--flag value ...]`` → the parser's dataclasses.

    The config file's keys become the parser's defaults (so flags given after it win); unknown keys are an error
    naming them; renamed keys (:data:`RENAMED_OPTIONS`) are accepted with a ``FutureWarning``; mapping values
    (e.g. ``slide_config: {...}``) are passed on as JSON text, as on the command line (read them with
    :func:`parse_mapping`). A bare ``--resume_from_checkpoint`` means "the latest complete checkpoint".
    """
    renames = _renames_for(parser)
    argv = normalize_resume_argv(rename_deprecated_flags(list(argv), renames))
    if argv and not argv[0].startswith("-"):
        values = _read_config(Path(argv.pop(0)), parser, command, renames)
        # mappings become the JSON text a flag would carry (the fields holding them are typed str)
        parser.set_defaults(**{k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()})
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))


def parse_command_line(dataclass_types: Any, argv: Sequence[str] | None, command: str) -> tuple[Any, ...]:
    """:func:`parse_args_with_config` with a new ``HfArgumentParser`` over ``dataclass_types`` (``argv`` ``None``:
    ``sys.argv[1:]``)."""
    import sys

    parser = HfArgumentParser(dataclass_types, prog=command)
    return parse_args_with_config(parser, sys.argv[1:] if argv is None else argv, command)


def setup_logging(training_args: Any = None) -> None:
    """Log lines on stderr: INFO on the main process, WARNING on the others (``training_args.should_log``); with
    training arguments, transformers' verbosity follows their ``log_level``."""
    level = logging.INFO if training_args is None or training_args.should_log else logging.WARNING
    logging.basicConfig(format=LOG_FORMAT, level=level)
    if training_args is not None:
        import transformers

        transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def exit_status(result: Any) -> int:
    """A command's ``main()`` result as a process exit status: its int, else 0. ``main`` returns its metrics /
    output for callers in Python; ``sys.exit(metrics)`` would print them and exit with 1."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def init_distributed(device: str | None) -> tuple[str, bool]:
    """Join the process group when launched by torchrun / accelerate (``WORLD_SIZE`` > 1); returns the device of
    this rank and whether it is the main process."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device or ("cuda" if torch.cuda.is_available() else "cpu"), True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return (f"cuda:{local_rank}" if use_cuda else "cpu"), dist.get_rank() == 0


__all__ = [
    "parse_args_with_config",
    "parse_command_line",
    "parse_mapping",
    "rename_deprecated_flags",
    "RENAMED_OPTIONS",
    "setup_logging",
    "exit_status",
    "init_distributed",
]
