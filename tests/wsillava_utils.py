"""Tiny WSI-LLaVA builders shared by the tests/wsi_llava/test_wsillava*.py files (CPU, seconds)."""

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
    vision = dict(
        input_dim=TILE_DIM,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        dropout=0.0,
        drop_path_rate=0.0,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=1024,
    )
    return WSILlavaConfig(
        vision_config=vision,
        text_config=text,
        slide_token_id=processor.slide_token_id,
        token_selection=token_selection,
        **kwargs,
    )


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


# The preamble of test_wsillava_model.REMOTE_SCRIPT: a fresh interpreter in which the editable install's finder is
# gone and the checkout is off sys.path, so wsi_llava / wsi_clip / processing cannot be imported (remote code only).
WITHOUT_PACKAGE_PREAMBLE = """
import importlib.util, sys
REPO = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", ".", REPO) and not p.startswith(REPO + "/tests")]
for name in ("wsi_llava", "wsi_clip", "processing"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the test would prove nothing"
"""


def run_without_package(script: str, *args: str, tmp_path, timeout: int = 240):
    """Run ``script`` (its ``sys.argv[1:]`` = ``args``) where the package cannot be imported, as the remote-code
    tests of test_wsillava_model.py do; returns the ``CompletedProcess``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE_PREAMBLE + script, repo, *map(str, args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
