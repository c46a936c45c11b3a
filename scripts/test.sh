#!/usr/bin/env bash
# The README's test command: sets up the environment (idempotent) and runs the CPU test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k slide_io -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "dev,viz,metrics"
cd "$WSI_ROOT"
exec "$WSI_PY" -m pytest tests -q "$@"
