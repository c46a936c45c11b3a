#!/usr/bin/env python
"""Per-tile heatmaps of one slide as a PNG, optionally drawn over the slide's thumbnail.

    python scripts/visualize.py --model_name_or_path runs/demo/clip --slide slide.h5 --mode attention \\
        --output attn.png
    python scripts/visualize.py --model_name_or_path runs/demo/clip --slide slide.h5 --mode similarity \\
        --prompt "colon adenocarcinoma" --output sim.png
    python scripts/visualize.py --model_name_or_path runs/demo/llava_stage3/merged --slide slide.h5 \\
        --mode selection --token_selection prumerge --output kept.png
    ... --slide_image CMU-1-Small-Region.svs     # draw over an OpenSlide-readable slide (viz extra)

Modes: ``attention`` (ABMIL attention of a WSI-CLIP ABMIL tower, or the slide encoder's CLS attention for WSI-CLIP
LongNet towers and bare slide encoders), ``similarity`` (tile ↔ text prompt in the joint WSI-CLIP space),
``selection`` (tiles a WSI-LLaVA token selector keeps). The slide's tiles are all used unless ``--max_tiles``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from wsi_clip.cli import parse_command_line, setup_logging

logger = logging.getLogger(__name__)

MODES = ("attention", "similarity", "selection")


@dataclass
class VisualizeArguments:
    model_name_or_path: str = field(
        metadata={"help": "WSI-CLIP, slide encoder or WSI-LLaVA checkpoint (with its processor)"}
    )
    slide: str = field(metadata={"help": "the slide's H5 feature file"})
    output: str = field(metadata={"help": "PNG to write"})
    mode: str = field(default="attention", metadata={"help": f"one of {MODES}"})
    prompt: str | None = field(default=None, metadata={"help": "text for --mode similarity"})
    token_selection: str | None = field(
        default=None, metadata={"help": "selector for --mode selection (default: the model's)"}
    )
    slide_image: str | None = field(default=None, metadata={"help": "OpenSlide-readable slide to draw over"})
    max_tiles: int | None = field(default=None, metadata={"help": "tile cap (uniform sample); default: all tiles"})
    title: str | None = field(default=None, metadata={"help": "figure title"})


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_command_line(VisualizeArguments, argv, "python scripts/visualize.py")
    setup_logging()
    if args.mode not in MODES:
        raise SystemExit(f"--mode {args.mode!r}: choose one of {MODES}")
    if args.mode == "similarity" and not args.prompt:
        raise SystemExit("--mode similarity needs --prompt 'a class name or description'")

    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    import wsi_clip  # noqa: F401  (registers the Auto classes)
    import wsi_llava  # noqa: F401
    from processing import WSIProcessor
    from wsi_clip.heatmaps import render_tile_heatmap, tile_attention, tile_text_similarity
    from wsi_clip.hub import require_checkpoint_files
    from wsi_llava.heatmaps import selected_tiles

    require_checkpoint_files(args.model_name_or_path)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    loader = AutoModelForImageTextToText if config.model_type == "wsi_llava" else AutoModel
    model = loader.from_pretrained(args.model_name_or_path).eval()
    processor = WSIProcessor.from_pretrained(args.model_name_or_path)
    batch = processor(
        slides=[args.slide], max_tiles=args.max_tiles, tile_sampling="uniform" if args.max_tiles else "all"
    )
    feats, coords, mask = batch["tile_features"], batch["tile_coords"], batch["tile_mask"]
    tile_size = int(
        getattr(
            getattr(config, "slide_config", None) or getattr(config, "vision_config", None) or config, "tile_size", 256
        )
    )
    name = Path(args.slide).stem
    if args.mode == "attention":
        out = render_tile_heatmap(
            coords[0],
            tile_attention(model, feats, coords, mask),
            args.output,
            tile_size=tile_size,
            score_label="attention",
            slide_path=args.slide_image,
            title=args.title or f"{name}: tile attention",
        )
    elif args.mode == "similarity":
        scores = tile_text_similarity(model, processor, args.prompt, feats, coords, mask)
        out = render_tile_heatmap(
            coords[0],
            scores,
            args.output,
            tile_size=tile_size,
            score_label="cosine similarity",
            slide_path=args.slide_image,
            title=args.title or f"{name}: tile ↔ '{args.prompt}'",
        )
    else:
        kept = selected_tiles(model, feats, coords, mask, token_selection=args.token_selection)
        strategy = args.token_selection or model.config.token_selection
        out = render_tile_heatmap(
            coords[0],
            None,
            args.output,
            tile_size=tile_size,
            kept=kept,
            slide_path=args.slide_image,
            title=args.title or f"{name}: tiles kept by {strategy}",
        )
    logger.info("heatmap written to %s", out)
    return out


if __name__ == "__main__":
    main()
