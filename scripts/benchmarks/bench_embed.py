"""``python scripts/benchmark.py embed``: slides/s of ``embed_cohort`` (``wsi-embed-slides``) against
one-slide-at-a-time calls of the same model on the same mixed-size cohort, in one run.

The model is GigaPath-Flash's shape by default (12 layers, 384-d, 16 heads, 384-d tile features; random weights:
the speed does not depend on them). Slide sizes are log-uniform between ``min_tiles`` and ``max_tiles``. The
baseline is what the original pipeline does: read one slide, run the model on a batch of one, write its vector.
Both paths write the same per-slide H5 files, and the benchmark checks that they give the same embeddings.
``embed_cohort`` runs with the command's default batch size for the device (1 on CPU, 8 on CUDA) and with
``--batch_size`` (default 8) ragged batches.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from processing import pad_slides, read_slide, write_slide
from wsi_clip import SlideEncoderConfig, SlideEncoderModel
from wsi_clip.slide_embedding import (
    embed_cohort,
    load_cohort_embeddings,
    load_embedding_model,
    write_cohort_file,
    write_slide_embedding,
)


@dataclass
class Args:
    num_slides: int = 24
    min_tiles: int = 200
    max_tiles: int = 6000
    feature_dim: int = 384
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 16
    batch_size: int = 8  # the ragged-batch run (the default-size run uses the command's default for the device)
    max_batch_tiles: int = 65536
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    workdir: str | None = None


def _cohort(root: Path, args: Args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    sizes = np.exp(rng.uniform(np.log(args.min_tiles), np.log(args.max_tiles), args.num_slides)).astype(int)
    rows = []
    for i, n in enumerate(sizes):
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * 512
        path = write_slide(
            root / "slides" / f"slide_{i:03d}.h5",
            rng.standard_normal((n, args.feature_dim), dtype=np.float32),
            coords,
            layout="trident",
            patch_size_level0=512,
        )
        rows.append({"slide_id": path.stem, "h5_path": str(path)})
    return rows


def run(args: Args) -> None:
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        rows = _cohort(root, args)
        config = SlideEncoderConfig(
            input_dim=args.feature_dim,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            intermediate_size=4 * args.hidden_size,
            pooling="mean",
            embedding_layer=str(min(11, args.num_layers)),
        )
        SlideEncoderModel(config).save_pretrained(root / "encoder")
        model = load_embedding_model(str(root / "encoder"), device=args.device, dtype=args.dtype)
        tiles = sum(read_slide(r["h5_path"]).num_tiles for r in rows)  # also warms the page cache
        print(
            f"cohort: {len(rows)} slides, {tiles:,} tiles ({args.min_tiles}-{args.max_tiles} per slide, log-uniform), "
            f"{args.num_layers}L/{args.hidden_size}d encoder, {args.dtype} on {args.device}, "
            f"{torch.get_num_threads()} threads"
        )
        warm = pad_slides([read_slide(rows[0]["h5_path"])], model.tile_size)
        model(warm)

        single_dir = root / "single" / "slide_features_encoder"
        single_dir.mkdir(parents=True)
        start = time.perf_counter()
        for row in rows:  # the original way: one slide, one forward, one file
            slide = read_slide(row["h5_path"])
            vector = model(pad_slides([slide], model.tile_size))[0]
            write_slide_embedding(single_dir / f"{row['slide_id']}.h5", vector, {"name": row["slide_id"]})
        single = time.perf_counter() - start

        default_batch = 8 if args.device.startswith("cuda") else 1
        runs = {"one slide at a time": (single, single_dir)}
        for batch_size in dict.fromkeys((default_batch, args.batch_size)):
            out = root / f"batch{batch_size}"
            start = time.perf_counter()
            embed_cohort(rows, model, out, batch_size=batch_size, max_batch_tiles=args.max_batch_tiles, progress=False)
            runs[f"embed_cohort, batch_size {batch_size}"] = (
                time.perf_counter() - start,
                out / "slide_features_encoder",
            )

        write_cohort_file(rows, single_dir)
        reference, _, _ = load_cohort_embeddings(single_dir)
        print(f"{'path':<30} {'seconds':>8} {'slides/s':>9} {'tiles/s':>9} {'ratio':>6} {'max |diff|':>10}")
        for name, (seconds, folder) in runs.items():
            embeddings, _, _ = load_cohort_embeddings(write_cohort_file(rows, folder))
            diff = float((embeddings - reference).abs().max())
            print(
                f"{name:<30} {seconds:8.2f} {len(rows) / seconds:9.2f} {tiles / seconds:9,.0f} "
                f"{single / seconds:5.2f}x {diff:10.1e}"
            )
