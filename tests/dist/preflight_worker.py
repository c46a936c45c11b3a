"""Run under ``torchrun --nproc_per_node 2``: the pre-flight pass splits the distinct slide files between the
processes and every process ends with the same report. Each rank writes the files it inspected and its report.

argv: out_dir, repo root, then the slide paths of the rows (repeated paths = several rows of one slide).
With ``FAIL_ON_RANK=r`` in the environment, inspecting a file on rank r raises an unexpected error (a bug, not a
data problem): every rank must then fail with it instead of waiting forever for rank r.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # repo root, for processing in a plain checkout
import processing.preflight as preflight  # noqa: E402


def main(out_dir: str, paths: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inspected = []
    real_inspect = preflight.inspect_slide

    def counting_inspect(path, **kwargs):
        if os.environ.get("FAIL_ON_RANK") == str(rank):
            raise KeyError("simulated bug")
        inspected.append(str(path))
        return real_inspect(path, **kwargs)

    preflight.inspect_slide = counting_inspect
    rows = [{"h5_path": p, "row": i + 1} for i, p in enumerate(paths)]
    try:
        report = preflight.preflight_check(rows, feature_dim=3, skip_bad_samples=True, source="train.csv")
    except RuntimeError as err:
        Path(out_dir, f"rank{rank}.error").write_text(str(err))
        raise
    result = {"inspected": inspected, "kept": report.kept_rows, "problems": report.problems,
              "num_slides": report.num_slides, "num_tiles": report.num_tiles}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3:])
