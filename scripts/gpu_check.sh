#!/usr/bin/env bash
# One command for a lent GPU (< 5 minutes on one GPU): parity of the CUDA kernels with the original encoder's outputs
# at fp32/bf16/fp16, a bf16 train step at 16k tiles, peak memory at 16k/64k/100k tiles, embedding throughput.
# Without CUDA it says so and exits 0. Extra arguments go to the check (scripts/benchmarks/bench_gpu.py), e.g.
#   bash scripts/gpu_check.sh --json_out gpu_check.json
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" "dev"
cd "$WSI_ROOT"
exec "$WSI_PY" scripts/benchmark.py gpu "$@"
