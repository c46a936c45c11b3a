#!/usr/bin/env bash
# The README's test command: sets up the environment (idempotent), runs ruff (lint + format check) and the CPU test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k slide_io -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "dev,viz,metrics,slides"
cd "$WSI_ROOT"
# lint and format first (configured in pyproject.toml): a style error fails fast, before the 5-minute suite
"$WSI_VENV/bin/ruff" check .
"$WSI_VENV/bin/ruff" format --check .
exec "$WSI_PY" -m pytest tests -q "$@"
