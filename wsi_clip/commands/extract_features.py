"""``wsi-extract-features``: a folder (or CSV) of raw slides → one tile-feature H5 per slide, resumable.

    wsi-extract-features --slides slides/ --output_dir features/ --encoder owkin/phikon-v2 --allow_download true
    wsi-extract-features --slides slides/ --output_dir features/ --encoder /models/phikon-v2      # offline
    torchrun --nproc_per_node 4 -m wsi_clip.commands.extract_features --slides cohort.csv --output_dir f/ ...

Per slide: tissue segmentation on a thumbnail (``segmentation/<slide>.geojson`` + a QC PNG), tiles at
``--target_magnification`` / ``--patch_size``, encoded in batches while DataLoader workers read the next tiles,
written in TRIDENT's layout (:mod:`processing.feature_extraction`). A rerun skips finished slides; bad slides are
listed with their reason in ``extraction_report.csv`` and do not stop the others. The output folder is what
``wsi-embed-slides``, ``wsi-train-clip`` and ``wsi-train-llava`` read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..arguments import ExtractArguments
from ..cli import init_distributed, parse_command_line, setup_logging

logger = logging.getLogger(__name__)

COMMAND = "wsi-extract-features"


def _same_named(args: ExtractArguments, options: type, skip: tuple[str, ...] = ()) -> dict:
    """The flags that share a name with a field of the ``options`` dataclass (the flags are named after them)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(options)
        if f.name not in skip and hasattr(args, f.name)
    }


def extract(args: ExtractArguments) -> dict:
    """Run the job; returns its summary (done / skipped / failed slides, tiles, tiles per second)."""
    import torch.distributed as dist

    from processing.feature_extraction import ExtractionOptions, extract_features, write_report
    from processing.tile_encoders import load_tile_encoder
    from processing.tissue_segmentation import SegmentationOptions

    device, is_main = init_distributed(args.device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    encoder = load_tile_encoder(
        args.encoder,
        weights=args.encoder_weights,
        dtype=args.dtype,
        device=device,
        pooling=args.encoder_pooling,
        allow_download=args.allow_download,
    )
    options = ExtractionOptions(
        **_same_named(args, ExtractionOptions, skip=("segmentation",)),
        segmentation=SegmentationOptions(**_same_named(args, SegmentationOptions)),
    )
    if is_main:
        logger.info("%s (%d-d, %s) on %s, %d process(es)", encoder.name, encoder.embed_dim, args.dtype, device, world)
    error: BaseException | None = None
    try:
        results = extract_features(
            args.slides, args.output_dir, encoder, options, rank=rank, world_size=world,
            stop_on_error=args.stop_on_error,
        )  # fmt: skip
    except Exception as err:  # --stop_on_error (or a job-level error): stop every rank, not only this one
        if not distributed:
            raise
        error, results = err, []
    shares = [results]
    if distributed:
        shares = [None] * world
        dist.all_gather_object(shares, (results, repr(error) if error else None))
        failures = [failure for _, failure in shares if failure]
        shares = [share for share, _ in shares]
        if error is not None:
            raise error
        if failures:
            raise RuntimeError(f"another process stopped the extraction: {failures[0]}")
    results = [r for share in shares for r in share]
    summary = {
        "output_dir": str(args.output_dir),
        "encoder": encoder.name,
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": {r.slide: r.error for r in results if r.status == "failed"},
        "tiles": sum(r.num_tiles for r in results),
    }
    seconds = max((sum(r.seconds for r in share) for share in shares), default=0.0)  # the slowest process
    summary["tiles_per_second"] = round(summary["tiles"] / seconds, 1) if seconds else None
    if is_main:
        report = write_report(args.output_dir)  # every process has written its status files
        print(
            f"{summary['done']} slide(s) extracted, {summary['skipped']} already there, {len(summary['failed'])} "
            f"failed -> {Path(args.output_dir)} (report: {report.name}"
            + (f", {summary['tiles_per_second']} tiles/s)" if summary["tiles_per_second"] else ")")
        )
        for slide, reason in summary["failed"].items():
            print(f"  failed: {slide}: {reason}")
    if distributed:
        dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_command_line(ExtractArguments, argv, COMMAND)
    setup_logging()
    return extract(args)


def cli() -> int:
    """The ``wsi-extract-features`` console script; exit status 1 when a slide failed."""
    return 1 if main()["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(cli())
