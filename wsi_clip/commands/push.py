"""``wsi-push-to-hub``: publish a checkpoint folder of any kind (WSI-CLIP, slide encoder, WSI-LLaVA, or any kind a
package registers with :mod:`wsi_clip.hub`) to the Hugging Face Hub with a generated model card.

    wsi-push-to-hub --model_name_or_path runs/demo/clip --repo_id user/wsi-clip-demo [--private]
    wsi-push-to-hub --model_name_or_path runs/demo/llava_stage3/merged --repo_id user/wsi-llava-demo --dry_run

``--dry_run`` writes the exact folder that would be uploaded (``--output_dir``, default ``<model_name_or_path>-hub``)
and validates it locally: the card's metadata parses, every ``auto_map`` / sibling module file is present, and the
model loads both with the package installed and with ``trust_remote_code=True`` where the package is hidden.
Nothing is uploaded on a dry run; a real push validates first and refuses to upload a folder that fails.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..arguments import PushArguments
from ..cli import parse_command_line, setup_logging

logger = logging.getLogger(__name__)

COMMAND = "wsi-push-to-hub"


def main(argv: list[str] | None = None) -> int:
    """Stage, validate and (unless ``--dry_run``) upload; returns the exit status (1: validation failed)."""
    (args,) = parse_command_line(PushArguments, argv, COMMAND)
    setup_logging()
    from wsi_clip.hub import push_checkpoint, stage_checkpoint, validate_checkpoint

    staged_dir = Path(args.output_dir or f"{Path(args.model_name_or_path).resolve()}-hub")
    staged = stage_checkpoint(
        args.model_name_or_path,
        staged_dir,
        repo_id=args.repo_id,
        metrics_file=args.metrics_file,
        datasets=args.datasets or None,
    )
    logger.info("staged %s -> %s (model card: %s)", args.model_name_or_path, staged, staged / "README.md")
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


def cli() -> int:
    """The ``wsi-push-to-hub`` console script."""
    return main()


if __name__ == "__main__":
    sys.exit(main())
