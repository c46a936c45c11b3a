"""Command-line parsing shared by the training scripts: a YAML / JSON config file, then flags that override it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from transformers import HfArgumentParser

from .checkpointing import normalize_resume_argv


def parse_args_with_config(parser: HfArgumentParser, argv: Sequence[str], script: str) -> tuple[Any, ...]:
    """``script [config.yaml|json] [--flag value ...]`` → the parser's dataclasses.

    The config file's keys become the parser's defaults (so flags given after it win); unknown keys are an error
    naming them; mapping values (e.g. ``slide_config: {...}``) are passed on as JSON text, as on the command line. A bare ``--resume_from_checkpoint`` means "the latest complete checkpoint".
    """
    argv = normalize_resume_argv(list(argv))
    if argv and not argv[0].startswith("-"):
        path = Path(argv.pop(0))
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
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are the options listed by "
                             f"`python scripts/{script} --help` (without the leading --).")
        # mappings become the JSON text a flag would carry (the fields holding them are typed str)
        parser.set_defaults(**{k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()})
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))


__all__ = ["parse_args_with_config"]
