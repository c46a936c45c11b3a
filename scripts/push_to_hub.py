#!/usr/bin/env python
"""Publish a checkpoint folder to the Hugging Face Hub with a generated model card.

    python scripts/push_to_hub.py --model runs/demo/clip --repo-id user/wsi-clip-demo [--private]
    python scripts/push_to_hub.py --model runs/demo/clip --repo-id user/wsi-clip-demo --dry-run

``--dry-run`` writes the exact folder that would be uploaded (``--output_dir``, default ``<model>-hub``) and
validates it locally: the card's metadata parses, every ``auto_map`` / sibling module file is present, and the
model loads both with the package installed and with ``trust_remote_code=True`` where the package is hidden.
Nothing is uploaded on a dry run; a real push validates first and refuses to upload a folder that fails.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout
from wsi_clip.hub import push_checkpoint, stage_checkpoint, validate_checkpoint  # noqa: E402


@dataclass
class PushArguments:
    model: str = field(metadata={"help": "checkpoint folder (save_pretrained output, processor included)"})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. user/wsi-clip-tcga"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    dry_run: bool = field(default=False, metadata={"help": "stage and validate locally, upload nothing"})
    output_dir: str | None = field(default=None, metadata={"help": "staging folder (default: <model>-hub)"})
    metrics_file: str | None = field(default=None, metadata={"help": "metrics JSON for the card (default: "
                                                                     "<model>/metrics.json if present)"})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids used for training"})
    skip_load_check: bool = field(default=False, metadata={"help": "skip the two loading checks (faster)"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=argv)
    staged_dir = Path(args.output_dir or f"{Path(args.model).resolve()}-hub")
    staged = stage_checkpoint(args.model, staged_dir, repo_id=args.repo_id, metrics_file=args.metrics_file,
                              datasets=args.datasets or None)
    print(f"staged {args.model} -> {staged} (model card: {staged / 'README.md'})")
    report = validate_checkpoint(staged, check_loading=not args.skip_load_check)
    print(report)
    if not report.ok:
        print("validation failed: nothing uploaded. Fix the items above.", file=sys.stderr)
        return 1
    if args.dry_run:
        print("dry run: nothing uploaded.")
        return 0
    print(f"uploaded: {push_checkpoint(staged, args.repo_id, private=args.private, token=args.token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
