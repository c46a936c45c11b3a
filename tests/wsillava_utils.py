"""Tiny WSI-LLaVA builders shared by the tests/test_wsillava*.py files (CPU, seconds)."""

from __future__ import annotations

import torch

from conftest import build_tiny_tokenizer

LETTERS = ("A", "B", "C", "D", "BRCA", "LUAD", "COAD", "LGG")
TILE_DIM = 16


def tiny_processor(max_tiles=None):
    from processing import WSIProcessor

    processor = WSIProcessor(tokenizer=build_tiny_tokenizer(LETTERS), max_tiles=max_tiles, feature_dim=TILE_DIM)
    processor.ensure_slide_token()
    return processor


def tiny_config(processor, token_selection: str = "none", **kwargs):
    from transformers import LlamaConfig

    from wsi_llava import WSILlavaConfig

    tok = processor.tokenizer
    vision = dict(input_dim=TILE_DIM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, dropout=0.0, drop_path_rate=0.0)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=1024)
    return WSILlavaConfig(vision_config=vision, text_config=text, slide_token_id=processor.slide_token_id,
                          token_selection=token_selection, **kwargs)


def tiny_model(processor, seed: int = 0, **kwargs):
    from wsi_llava import WSILlavaForConditionalGeneration

    torch.manual_seed(seed)
    return WSILlavaForConditionalGeneration(tiny_config(processor, **kwargs)).eval()


def random_slides(sizes, seed: int = 0, columns: int = 7):
    """In-memory slides ``(features [N, D], coords [N, 2])`` on a 256-px grid."""
    gen = torch.Generator().manual_seed(seed)
    slides = []
    for n in sizes:
        i = torch.arange(n)
        coords = torch.stack([(i % columns) * 256, (i // columns) * 256], dim=1)
        slides.append((torch.randn(n, TILE_DIM, generator=gen), coords))
    return slides
