#!/usr/bin/env python
"""Convert the original Prov-GigaPath slide encoder checkpoint into a Hugging Face folder.

    python scripts/convert_gigapath.py --checkpoint slide_encoder.pth --output gigapath-slide-encoder \
        [--max-wsi-size 262144] [--tile-size 256] [--pooling cls|mean]

The folder loads with ``SlideEncoderModel.from_pretrained(DIR)`` or ``AutoModel.from_pretrained(DIR)`` after
``import wsi_clip`` (or with ``trust_remote_code=True`` without the package); the pooling can also be chosen at
load time: ``from_pretrained(DIR, pooling="mean")``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

try:
    import wsi_clip  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_clip.convert_gigapath import convert_gigapath_checkpoint


@dataclass
class ConvertArgs:
    checkpoint: str = field(metadata={"help": "original slide_encoder.pth (its 'model' dict) or a .safetensors "
                                              "state dict with the original key names"})
    output: str = field(metadata={"help": "output folder (config.json + model.safetensors + modeling code)"})
    max_wsi_size: int = field(default=262144, metadata={"help": "largest slide side in coordinate units; sets the "
                                                                "dilated-attention segment lengths (upstream 262144)"})
    tile_size: int = field(default=256, metadata={"help": "tile stride in coordinate units (upstream 256)"})
    pooling: str = field(default="cls", metadata={"help": "pooler_output: 'cls' (upstream default call) or 'mean' "
                                                          "(upstream global_pool=True)", "choices": ["cls", "mean"]})
    num_attention_heads: int = field(default=16, metadata={"help": "attention heads (16 in every upstream model)"})
    slide_ngrids: int = field(default=1000, metadata={"help": "valid grid cells per axis (upstream 1000)"})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ConvertArgs).parse_args_into_dataclasses(args=argv)
    model = convert_gigapath_checkpoint(args.checkpoint, args.output, max_wsi_size=args.max_wsi_size,
                                        tile_size=args.tile_size, pooling=args.pooling,
                                        num_attention_heads=args.num_attention_heads, slide_ngrids=args.slide_ngrids)
    cfg = model.config
    print(f"converted {args.checkpoint} -> {args.output}: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}, input {cfg.input_dim}, "
          f"segment_length {cfg.segment_length}, dilated_ratio {cfg.dilated_ratio}, pooling {cfg.pooling!r}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
