"""Importing the packages is cheap: no model is built, heavy data libraries load only on use, and each package
registers what it defines with the Auto classes itself."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> dict:
    probe = (
        f"import sys, json\n{code}\n"
        "print(json.dumps({m: (m in sys.modules) for m in ('datasets', 'transformers', 'h5py', 'peft')}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_processing_is_lazy():
    loaded = _modules_after("import processing")
    # transformers: registering WSIProcessor with AutoProcessor needs it; the data libraries wait for their use
    assert not loaded["datasets"] and not loaded["peft"]


def test_import_processing_alone_makes_auto_processor_return_a_wsi_processor(tmp_path):
    from processing import WSIProcessor

    from conftest import build_tiny_tokenizer

    WSIProcessor(tokenizer=build_tiny_tokenizer()).save_pretrained(tmp_path)
    code = (
        "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "import processing\n"
        "from transformers import AutoProcessor\n"
        f"processor = AutoProcessor.from_pretrained({str(tmp_path)!r})\n"
        "assert type(processor) is processing.WSIProcessor, type(processor)\n"
        "assert 'wsi_clip' not in __import__('sys').modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lazy_names_resolve():
    loaded = _modules_after("import processing; processing.load_annotations; processing.WSIProcessor")
    assert loaded["datasets"] is False  # load_annotations imports datasets only when called
    assert loaded["transformers"] is True


def test_import_model_packages_builds_nothing_and_needs_no_network():
    code = (
        "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "import torch.nn as nn\n"
        "built = []\n"
        "orig = nn.Module.__init__\n"
        "def spy(self, *a, **k):\n"
        "    orig(self, *a, **k)\n"
        "    if type(self).__module__.split('.')[0] in ('wsi_clip', 'wsi_llava', 'processing') or isinstance(\n"
        "            self, (nn.Linear, nn.Embedding, nn.LayerNorm)):\n"
        "        built.append(type(self).__name__)\n"
        "nn.Module.__init__ = spy\n"
        "import wsi_clip, wsi_llava, processing\n"
        "nn.Linear(2, 2)\n"
        "assert built == ['Linear'], built  # only the probe's own Linear: importing built nothing"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
