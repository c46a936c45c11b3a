"""Tiny WSI-CLIP building blocks shared by the tests/wsi_clip/test_wsiclip_*.py modules (not a test module)."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BertConfig

from conftest import build_tiny_tokenizer

FEATURE_DIM = 16

TINY_SLIDE_CONFIGS = {
    "slide_encoder": dict(
        input_dim=FEATURE_DIM,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        dropout=0.0,
        drop_path_rate=0.0,
        segment_length=[8, 32],
        dilated_ratio=[1, 2],
    ),
    "abmil": dict(input_dim=FEATURE_DIM, hidden_size=24, attention_dim=8, dropout=0.0),
    "mean": dict(input_dim=FEATURE_DIM, hidden_size=24),
}


def tiny_text_config(vocab_size: int = 128) -> BertConfig:
    """A 1-layer BERT without dropout (deterministic in train mode, so runs can be compared exactly)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=512,
    )


def tiny_clip_config(tower: str = "abmil", vocab_size: int = 128, **kwargs):
    from wsi_clip import WSIClipConfig

    return WSIClipConfig(
        slide_tower=tower,
        slide_config=dict(TINY_SLIDE_CONFIGS[tower]),
        text_config=tiny_text_config(vocab_size),
        projection_dim=8,
        **kwargs,
    )


def tiny_batch(
    batch: int = 4, tiles: int = 10, seq: int = 6, vocab_size: int = 128, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random ragged slides (last slide padded) on a 256-px grid, with random token ids."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tiles, dtype=torch.bool)
    mask[-1, tiles // 2 :] = False
    cells = torch.randperm(64, generator=g)[: batch * tiles].view(batch, tiles)
    coords = torch.stack([cells % 8, cells // 8], dim=-1) * 256
    return {
        "tile_features": torch.randn(batch, tiles, FEATURE_DIM, generator=g),
        "tile_coords": coords,
        "tile_mask": mask,
        "input_ids": torch.randint(6, vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def caption_tokenizer(captions: Sequence[str]):
    """The word-level test tokenizer extended with every word of ``captions`` (so captions are distinguishable)."""
    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    return build_tiny_tokenizer(tuple(words))


def make_tiny_demo(root: Path, num_cases: int = 12, **kwargs) -> dict:
    """A small demo data set (16-d features, 20–40 tiles per slide)."""
    from demo_data import make_demo_dataset

    options = dict(num_cases=num_cases, feature_dim=FEATURE_DIM, min_tiles=20, max_tiles=40, seed=0)
    options.update(kwargs)
    return make_demo_dataset(root, **options)


def save_text_model(folder: Path, captions: Sequence[str], seed: int = 0) -> Path:
    """A tiny random BERT + a tokenizer covering ``captions``, saved like a pretrained text encoder."""
    from transformers import BertModel

    tokenizer = caption_tokenizer(captions)
    torch.manual_seed(seed)
    model = BertModel(tiny_text_config(len(tokenizer)), add_pooling_layer=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
