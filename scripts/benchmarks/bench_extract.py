"""``python scripts/benchmark.py extract``: tiles/s of reading + encoding with DataLoader workers (what
``wsi-extract-features`` runs) against a plain single-process loop over the same tiles and model, in one run.

The slide is the real CMU-1 Aperio crop (``../shared/data``; ``--slide`` for another), tiled at
``--target_magnification`` with every tile kept (``--repeats`` passes over it for a longer run). The encoder is a
randomly initialised ``transformers`` ViT (default 2 layers, 192-d, 224-px input: a small encoder, so that reading
matters; ``--num_layers 12`` is ViT-Tiny; the speed does not depend on the weights) with its image processor. The
baseline reads, preprocesses and encodes batch after batch in one process; the pipeline reads and preprocesses in
``--num_workers`` workers while the encoder runs (with the command's thread policy). Both must give the same features.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from processing.feature_extraction import TileDataset, encoder_threads
from processing.tile_encoders import load_tile_encoder
from processing.tiling import tile_grid
from processing.whole_slide import open_slide

REPO = Path(__file__).resolve().parents[2]
CMU1 = REPO.parent / "shared" / "data" / "openslide-cmu-small-region" / "CMU-1-Small-Region.svs"


@dataclass
class Args:
    slide: str = str(CMU1)
    target_magnification: float = 20.0
    patch_size: int = 256
    overlap: int = 128  # more tiles from the small crop
    repeats: int = 2
    image_size: int = 224
    hidden_size: int = 192
    num_layers: int = 2
    num_heads: int = 3
    batch_size: int = 32
    num_workers: int = 2
    dtype: str = "fp32"
    device: str = "cpu"


def _encoder_folder(root: Path, args: Args) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=args.image_size, patch_size=16, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, intermediate_size=4 * args.hidden_size,
    )  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(root)
    ViTImageProcessor(size={"height": args.image_size, "width": args.image_size}).save_pretrained(root)
    return root


def run(args: Args) -> None:
    slide = open_slide(args.slide)
    grid = tile_grid(slide.width, slide.height, slide.level0_magnification, args.target_magnification,
                     args.patch_size, args.overlap)  # fmt: skip
    coords = np.concatenate([grid.coords] * args.repeats)  # [T, 2]
    with tempfile.TemporaryDirectory() as tmp:
        encoder = load_tile_encoder(str(_encoder_folder(Path(tmp), args)), dtype=args.dtype, device=args.device)
    print(f"{len(coords)} tiles of {args.patch_size} px at {args.target_magnification}x from {Path(args.slide).name};"
          f" encoder ViT {args.num_layers} x {args.hidden_size}-d at {args.image_size} px, batch {args.batch_size},"
          f" {torch.get_num_threads()} torch threads")  # fmt: skip
    encoder(torch.zeros(2, 3, args.image_size, args.image_size))  # warm-up

    start = time.perf_counter()
    baseline = []
    for begin in range(0, len(coords), args.batch_size):
        tiles = [slide.read_tile(int(x), int(y), grid.patch_size_level0, grid.patch_size)
                 for x, y in coords[begin : begin + args.batch_size]]  # fmt: skip
        baseline.append(encoder(torch.stack([encoder.preprocess(t) for t in tiles])))
    plain_s = time.perf_counter() - start

    dataset = TileDataset(args.slide, coords, grid, encoder.preprocess, {})
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    start = time.perf_counter()
    with encoder_threads(encoder, args.num_workers):  # as wsi-extract-features runs it
        piped = [encoder(batch) for batch in loader]
    piped_s = time.perf_counter() - start

    torch.testing.assert_close(torch.cat(piped), torch.cat(baseline), rtol=1e-4, atol=1e-4)
    encode_s = time.perf_counter()
    batch = torch.stack([encoder.preprocess(slide.read_tile(0, 0, grid.patch_size_level0, grid.patch_size))] *
                        args.batch_size)  # fmt: skip
    for _ in range(3):
        encoder(batch)
    encode_only = (time.perf_counter() - encode_s) / (3 * args.batch_size)
    n = len(coords)
    print(f"plain loop (read + preprocess + encode, 1 process): {n / plain_s:8.1f} tiles/s")
    print(f"DataLoader, {args.num_workers} workers reading beside the encoder: {n / piped_s:8.1f} tiles/s")
    print(f"encoder alone (upper bound):                      {1 / encode_only:8.1f} tiles/s")
    print(f"speed-up: {plain_s / piped_s:.2f}x (same features: yes)")
