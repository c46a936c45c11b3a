"""The distribution as users install it: a wheel and an sdist built from this tree, the wheel installed on its own
(no checkout, no editable finder), and every checkpoint kind saved with it loading with the Auto classes and with
``trust_remote_code=True`` where the package is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from wsillava_utils import WITHOUT_PACKAGE_PREAMBLE

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("processing", "wsi_clip", "wsi_llava")
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"
)

# Runs inside the bare interpreter (package hidden), with the installed wheel put back first on sys.path
# (argv: wheel target, output folder). Saves one checkpoint of each kind with the wheel's code, then loads each
# in-process with the Auto classes.
SAVE_AND_LOAD = """
TARGET, OUT = sys.argv[1], sys.argv[2]
sys.path.insert(0, TARGET)
import torch
import processing, wsi_clip, wsi_llava
for module in (processing, wsi_clip, wsi_llava):
    assert module.__file__.startswith(TARGET), module.__file__
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, BertConfig, BertModel, LlamaConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from peft import LoraConfig, get_peft_model

words = ["[PAD]", "[UNK]", "<s>", "</s>", "what", "grade", "?", "high", "low", "USER", "ASSISTANT", ":"]
core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                              eos_token="</s>")
processor = processing.WSIProcessor(tokenizer=tok, feature_dim=8)
processor.ensure_slide_token()
torch.manual_seed(0)
vision = dict(input_dim=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
tower = wsi_clip.SlideEncoderModel(wsi_clip.SlideEncoderConfig(**vision))
text = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32), add_pooling_layer=False)
clip = wsi_clip.WSIClipModel.from_towers(slide_encoder=tower, text_model=text, projection_dim=8)
lm = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=len(tok), pad_token_id=0)
llava = wsi_llava.WSILlavaForConditionalGeneration(wsi_llava.WSILlavaConfig(
    vision_config=vision, text_config=lm, slide_token_id=processor.slide_token_id))
merged = get_peft_model(llava, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).merge_and_unload()
kinds = {"slide_encoder": (tower, AutoModel), "clip": (clip, AutoModel),
         "llava": (llava, AutoModelForImageTextToText), "llava_merged": (merged, AutoModelForImageTextToText)}
for name, (model, auto) in kinds.items():
    model.save_pretrained(f"{OUT}/{name}")
    processor.save_pretrained(f"{OUT}/{name}")
    loaded = auto.from_pretrained(f"{OUT}/{name}")
    assert type(loaded) is type(model), (name, type(loaded))
    assert type(AutoProcessor.from_pretrained(f"{OUT}/{name}")) is processing.WSIProcessor
print("SAVED", *kinds)
"""

# Runs where the package cannot be imported at all: remote code only (argv: output folder).
LOAD_REMOTE = """
OUT = sys.argv[1]
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
for name, auto in (("slide_encoder", AutoModel), ("clip", AutoModel), ("llava", AutoModelForImageTextToText),
                   ("llava_merged", AutoModelForImageTextToText), ("llava", AutoModel)):
    model = auto.from_pretrained(f"{OUT}/{name}", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), (name, type(model).__module__)
    processor = AutoProcessor.from_pretrained(f"{OUT}/{name}", trust_remote_code=True)
    assert type(processor).__name__ == "WSIProcessor", (name, type(processor))
print("REMOTE_OK")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Wheel and sdist built by setuptools' PEP 517 backend from a copy of the working tree."""
    root = tmp_path_factory.mktemp("dist")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=SKIP, symlinks=True)
    names = []
    for kind in ("wheel", "sdist"):  # one process each: a second build in the same process finds stale state
        code = f"from setuptools import build_meta as b; import sys; print('BUILT', b.build_{kind}(sys.argv[1]))"
        result = subprocess.run(
            [sys.executable, "-c", code, str(root / "out")], cwd=source, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        names.append([line for line in result.stdout.splitlines() if line.startswith("BUILT ")][-1].split()[1])
    wheel_name, sdist_name = names
    return {"wheel": root / "out" / wheel_name, "sdist": root / "out" / sdist_name, "root": root}


def test_the_tree_holds_no_symlinks_and_no_second_copy_of_a_source_file():
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not [line for line in listed.splitlines() if line.startswith("120000")]
    sources = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    by_content: dict[bytes, list[Path]] = {}
    for path in sources:
        if path.read_bytes().strip():
            by_content.setdefault(path.read_bytes(), []).append(path)
    assert not [paths for paths in by_content.values() if len(paths) > 1]


def test_wheel_and_sdist_hold_the_packages_and_nothing_else(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(PACKAGES), tops
    for package in PACKAGES:
        expected = {str(p.relative_to(REPO)) for p in (REPO / package).rglob("*.py")}
        assert expected <= set(names), sorted(expected - set(names))
    assert "wsi_llava/modeling_slide_encoder.py" not in names  # one copy: wsi_clip's
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(built["wheel"]).read(entry_points).decode()
    assert "[wsi_mm.model_kinds]" in text and "wsi_llava = wsi_llava" in text
    with tarfile.open(built["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {
        "setup.cfg",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "wsi_clip/slide_towers.py",
        "wsi_llava/remote_code.py",
        "processing/processing_wsi.py",
    } <= members
    assert not [m for m in members if m.startswith((".venv", ".git/", "runs/"))]


def test_installed_wheel_saves_every_checkpoint_kind_and_each_loads_with_and_without_the_package(built, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(built["wheel"]),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = tmp_path / "ckpts"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    saved = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE_PREAMBLE + SAVE_AND_LOAD, str(REPO), str(target), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert saved.returncode == 0 and "SAVED" in saved.stdout, saved.stderr[-3000:]
    assert (out / "llava" / "modeling_slide_encoder.py").is_file() and (out / "llava" / "remote_code.py").is_file()
    remote = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE_PREAMBLE + LOAD_REMOTE, str(REPO), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert remote.returncode == 0 and "REMOTE_OK" in remote.stdout, remote.stderr[-3000:]
