#!/usr/bin/env python
"""Performance harness: every speed / memory target of the project is measured here, never in tests.

    python scripts/benchmark.py io [--sizes 10000 50000 ...]
    python scripts/benchmark.py encoder [...]

Each suite lives in ``scripts/benchmarks/bench_<suite>.py`` and defines a dataclass ``Args`` (parsed with
``HfArgumentParser`` from the remaining command-line arguments) and ``run(args) -> None``. Suites print
ratios measured side by side in one run, so numbers compare across machines.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from transformers import HfArgumentParser

BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"


def available_suites() -> list[str]:
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(BENCH_DIR)]) if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    suites = available_suites()
    if not argv or argv[0] not in suites:
        sys.exit(
            f"usage: python scripts/benchmark.py {{{','.join(suites)}}} [suite options]\n"
            f"unknown or missing suite {argv[:1]}; choose one of {suites}"
        )
    # the suites are plain files beside this script, not a package (the installed package never ships them): put
    # their folder on the path so `bench_<suite>` imports; the package itself comes from the installation
    sys.path.insert(0, str(BENCH_DIR))
    module = importlib.import_module(f"bench_{argv[0]}")
    (args,) = HfArgumentParser(module.Args).parse_args_into_dataclasses(args=argv[1:])
    module.run(args)


if __name__ == "__main__":
    main()
