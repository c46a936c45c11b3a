"""``wsi-embed-slides``: a cohort of tile-feature H5 files → one slide embedding per slide.

    wsi-embed-slides --model_name_or_path gigapath-slide-encoder --slides features/ --output_dir embeddings/
    torchrun --nproc_per_node 8 -m wsi_clip.commands.embed --model_name_or_path ... --slides cohort.csv ...

Writes TRIDENT's layout, ``<output_dir>/slide_features_<name>/<slide_id>.h5`` (``features [D]``, attributes naming the
model, layer, pooling and source file), plus ``embeddings.safetensors`` (``embeddings [S, D]``) and ``index.csv`` for
the whole cohort, and ``embedding_report.json`` (written / skipped / failed slides). A rerun skips the slides already
written. Several processes split the slides, each slide once (:mod:`wsi_clip.slide_embedding`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..arguments import EmbedArguments
from ..cli import exit_status, init_distributed, parse_command_line, setup_logging

logger = logging.getLogger(__name__)

COMMAND = "wsi-embed-slides"


def embed(args: EmbedArguments) -> dict:
    """Embed the cohort; returns the run's summary (the main process also writes the cohort files)."""
    import torch.distributed as dist

    from processing import list_slide_files
    from wsi_clip.slide_embedding import (
        REPORT_FILE,
        EmbeddingReport,
        embed_cohort,
        load_embedding_model,
        write_cohort_file,
    )

    device, is_main = init_distributed(args.device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    slides = list_slide_files(args.slides, args.h5_root)
    model = load_embedding_model(
        args.model_name_or_path,
        embedding_layer=args.embedding_layer,
        pooling=args.pooling,
        projected=args.projected,
        device=device,
        dtype=args.dtype,
        name=args.name,
    )
    if is_main:
        logger.info(
            "embedding %d slides with %s (%s, embedding_layer %s, pooling %s%s) on %d process(es)",
            len(slides),
            model.source,
            model.model_type,
            model.embedding_layer,
            model.pooling,
            ", projected" if model.projected else "",
            world,
        )
    report = embed_cohort(
        slides,
        model,
        args.output_dir,
        max_tiles=args.max_tiles or None,
        batch_size=args.batch_size or (8 if str(device).startswith("cuda") else 1),
        max_batch_tiles=args.max_batch_tiles,
        patch_size_level0=args.patch_size_level0,
        skip_bad_samples=args.skip_bad_samples,
        rank=rank,
        world_size=world,
        progress=is_main,
    )
    if distributed:
        shares: list = [None] * world
        dist.all_gather_object(shares, report)
        report = EmbeddingReport()
        for share in shares:
            report.merge(share)
    features_dir = Path(args.output_dir) / f"slide_features_{model.name}"
    summary = {
        "model": model.source,
        "features_dir": str(features_dir),
        "slides": len(slides),
        "written": len(report.written),
        "skipped_existing": len(report.skipped),
        "failed": report.failed,
        "seconds": round(report.seconds, 3),
        "slides_per_second": round(len(report.written) / report.seconds, 3) if report.seconds else None,
    }
    if is_main:
        cohort = write_cohort_file(slides, features_dir)
        summary["cohort_file"] = str(cohort) if cohort else None
        (features_dir / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(
            f"{summary['written']} slide(s) embedded, {summary['skipped_existing']} already there, "
            f"{len(report.failed)} failed -> {features_dir}"
            + (f" ({summary['slides_per_second']} slides/s)" if summary["slides_per_second"] else "")
        )
        for slide_id, reason in report.failed.items():
            print(f"  failed: {slide_id}: {reason}")
    if distributed:
        dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_command_line(EmbedArguments, argv, COMMAND)
    setup_logging()
    return embed(args)


def cli() -> int:
    """The ``wsi-embed-slides`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
