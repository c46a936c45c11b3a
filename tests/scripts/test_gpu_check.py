"""``scripts/gpu_check.sh`` / ``benchmark.py gpu``: skips cleanly without CUDA, and its code runs (on the CPU, tiny
sizes) so the check is ready for when a GPU is lent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run scripts/gpu_check.sh itself")


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "gpu", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_without_cuda_it_says_so_and_exits_0():
    result = _benchmark()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped, CUDA is not available" in result.stdout


def test_the_check_runs_on_cpu_at_tiny_sizes(shared_dir, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = _benchmark(
        "--device", "cpu", "--fixtures", str(shared_dir / "fixtures" / "gigapath"), "--dtypes", "fp32",
        "--sizes", "300", "--train_tiles", "300", "--hidden_size", "64", "--num_layers", "2", "--input_dim", "32",
        "--embed_slides", "3", "--embed_min_tiles", "100", "--embed_max_tiles", "400", "--json_out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu check: all within tolerance" in result.stdout
    assert "ratio" in result.stdout or "one slide at a time" in result.stdout
    import json

    report = json.loads(out.read_text())
    assert report["parity"] and all(r["ok"] for r in report["parity"])  # CPU fp32, both kernels: ≤ 1e-4
    assert report["train_step"]["finite"] and [r["tiles"] for r in report["memory"]] == [300]
