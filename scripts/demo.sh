#!/usr/bin/env bash
# The README's first command: the offline end-to-end demo (≈ 5-10 minutes on 2 CPU cores).
#   bash scripts/demo.sh            full demo, writes runs/demo/
#   bash scripts/demo.sh --quick    the ≈ 2-minute version the test suite runs
# Extra arguments go to scripts/run_demo.py (e.g. --output_dir /tmp/demo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "demo,viz,metrics"
cd "$WSI_ROOT"
exec "$WSI_PY" scripts/run_demo.py "$@"
