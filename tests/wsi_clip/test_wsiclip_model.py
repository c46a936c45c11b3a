"""WSI-CLIP model: config, the three slide towers, output conventions, loss through the model, save/load, Hub."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoProcessor

from wsi_clip import ABMILConfig, SlideEncoderConfig, SlideEncoderModel, WSIClipConfig, WSIClipModel, WSIProcessor
from wsi_clip.configuration_wsiclip import MeanPoolingConfig

from conftest import build_tiny_tokenizer
from wsiclip_helpers import TINY_SLIDE_CONFIGS, tiny_batch, tiny_clip_config, tiny_text_config

TOWERS = ("slide_encoder", "abmil", "mean")


def _model(tower: str = "abmil", seed: int = 0, **kwargs) -> WSIClipModel:
    torch.manual_seed(seed)
    return WSIClipModel(tiny_clip_config(tower, **kwargs)).eval()


# ------------------------------------------------------------------------------------------------ config
def test_config_selects_tower_by_one_field_and_round_trips(tmp_path):
    for tower, cls in (("slide_encoder", SlideEncoderConfig), ("abmil", ABMILConfig), ("mean", MeanPoolingConfig)):
        config = tiny_clip_config(tower)
        assert type(config.slide_config) is cls and config.slide_tower == tower
        config.save_pretrained(tmp_path / tower)
        loaded = AutoConfig.from_pretrained(tmp_path / tower)
        assert type(loaded) is WSIClipConfig and type(loaded.slide_config) is cls
        assert loaded.slide_config.to_dict() == config.slide_config.to_dict()
        assert loaded.text_config.model_type == "bert" and loaded.text_config.hidden_size == 32
    # a config object's model_type wins over slide_tower
    config = WSIClipConfig(slide_tower="mean", slide_config=ABMILConfig(input_dim=8))
    assert config.slide_tower == "abmil"
    assert math.isclose(WSIClipConfig().logit_scale_init_value, math.log(1 / 0.07))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slide_tower": "transmil"}, "slide_tower='transmil'"),
        ({"slide_config": {"model_type": "bert"}}, "model_type 'bert'"),
        ({"text_pooling": "max"}, "text_pooling='max'"),
        ({"text_to_slide_loss": "hinge"}, "text_to_slide_loss='hinge'"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WSIClipConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("tower", TOWERS)
def test_forward_shapes_and_conventions(tower):
    model = _model(tower)
    batch = tiny_batch()
    out = model(**batch, output_tile_attention=True)
    b, n = batch["tile_mask"].shape
    assert out.slide_embeds.shape == out.text_embeds.shape == (b, 8)
    torch.testing.assert_close(out.slide_embeds.norm(dim=-1), torch.ones(b))
    assert out.logits_per_slide.shape == out.logits_per_text.shape == (b, b)
    torch.testing.assert_close(out.logits_per_slide, out.logits_per_text.t())
    torch.testing.assert_close(out.logits_per_slide, out.logit_scale * out.slide_embeds @ out.text_embeds.t())
    assert out.loss is None
    if tower == "mean":
        assert out.tile_attention is None
    else:
        assert out.tile_attention.shape == (b, n)
        assert (out.tile_attention[~batch["tile_mask"]] == 0).all()
        if tower == "abmil":
            torch.testing.assert_close(out.tile_attention.sum(-1), torch.ones(b))
    # get_*_features: projected, NOT normalised, in .pooler_output (transformers 5.x convention)
    slide = model.get_slide_features(batch["tile_features"], batch["tile_coords"], batch["tile_mask"])
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    assert slide.pooler_output.shape == text.pooler_output.shape == (b, 8)
    assert not torch.allclose(slide.pooler_output.norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(F.normalize(slide.pooler_output, dim=-1), out.slide_embeds)
    torch.testing.assert_close(F.normalize(text.pooler_output, dim=-1), out.text_embeds)
    # a padded slide alone gives the same embedding as inside the ragged batch
    last = batch["tile_mask"][-1]
    alone = model(tile_features=batch["tile_features"][-1:, last], tile_coords=batch["tile_coords"][-1:, last])
    torch.testing.assert_close(alone.slide_embeds[0], out.slide_embeds[-1], atol=1e-5, rtol=1e-4)
    # one modality at a time; tuple output
    assert model(input_ids=batch["input_ids"]).slide_embeds is None
    assert model(**{k: batch[k] for k in ("tile_features", "tile_coords", "tile_mask")}).logits_per_slide is None
    assert isinstance(model(**batch, return_dict=False), tuple)


def test_slide_encoder_tower_needs_coordinates_and_model_needs_inputs():
    model = _model("slide_encoder")
    with pytest.raises(ValueError, match="tile_coords"):
        model.get_slide_features(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="needs slides"):
        model()
    with pytest.raises(ValueError, match="return_loss=True needs both"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), return_loss=True)


def test_text_pooling_modes_and_no_unused_pooler():
    for pooling in ("mean", "cls", "pooler"):
        model = _model("mean", text_pooling=pooling)
        has_pooler = getattr(model.text_model, "pooler", None) is not None
        assert has_pooler == (pooling == "pooler")  # an unused pooler would break DDP(find_unused_parameters=False)
        out = model(**tiny_batch(), return_loss=True)
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_logit_scale_init_and_clamp():
    model = _model()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(model(**tiny_batch()).logit_scale.item(), 100.0, rel_tol=1e-5)
    unclamped = _model(logit_scale_max=None)
    with torch.no_grad():
        unclamped.logit_scale.fill_(5.0)
    assert math.isclose(unclamped.scale().item(), math.exp(5.0), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ loss
def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(-1)).sum(-1)


def test_loss_multi_slide_case_by_hand():
    model = _model()
    out = model(**tiny_batch(), case_ids=torch.tensor([7, 7, 8, 9]), return_loss=True)
    logits = out.logit_scale * out.slide_embeds @ out.text_embeds.t()
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    expected = (_soft_ce(logits, target).mean() + _soft_ce(logits.t(), target).mean()) / 2
    torch.testing.assert_close(out.loss, expected)


def test_loss_equals_clip_without_case_ids():
    model = _model()
    out = model(**tiny_batch(), return_loss=True)
    labels = torch.arange(4)
    clip = (F.cross_entropy(out.logits_per_slide, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2
    torch.testing.assert_close(out.loss, clip)


def test_loss_identical_texts_are_positives_by_hand():
    batch = tiny_batch()
    batch["input_ids"][1] = batch["input_ids"][0]  # a duplicated caption
    text_ids = torch.tensor([5, 5, 6, 7])
    cases = torch.tensor([0, 1, 2, 3])
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    model = _model()
    out = model(**batch, case_ids=cases, text_ids=text_ids, return_loss=True)
    logits = out.logit_scale * out.slide_embeds @ out.text_embeds.t()
    expected = (_soft_ce(logits, target).mean() + _soft_ce(logits.t(), target).mean()) / 2
    torch.testing.assert_close(out.loss, expected)
    # switched off: the duplicate is a negative again (plain CLIP targets)
    off = _model(identical_texts_are_positives=False)
    out = off(**batch, case_ids=cases, text_ids=text_ids, return_loss=True)
    labels = torch.arange(4)
    torch.testing.assert_close(
        out.loss, (F.cross_entropy(out.logits_per_slide, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2
    )


def test_loss_rows_without_positive_are_dropped():
    model = _model()
    batch = tiny_batch()
    out = model(**batch, case_ids=torch.tensor([0, 1, -1, -1]), return_loss=True)
    logits = out.logit_scale * out.slide_embeds @ out.text_embeds.t()
    expected = (
        -(logits[:2].log_softmax(-1)[[0, 1], [0, 1]].mean() + logits.t()[:2].log_softmax(-1)[[0, 1], [0, 1]].mean()) / 2
    )  # unpaired columns still count as negatives
    torch.testing.assert_close(out.loss, expected)
    none = model(**batch, case_ids=torch.full((4,), -1), return_loss=True)
    assert none.loss.item() == 0.0


def test_loss_mil_nce_text_to_slide_by_hand():
    model = _model(text_to_slide_loss="mil_nce")
    out = model(**tiny_batch(), case_ids=torch.tensor([7, 7, 8, 9]), return_loss=True)
    logits = out.logit_scale * out.slide_embeds @ out.text_embeds.t()
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    lt = logits.t()
    t2s = (lt.logsumexp(-1) - torch.stack([lt[0, :2].logsumexp(0), lt[1, :2].logsumexp(0), lt[2, 2], lt[3, 3]])).mean()
    torch.testing.assert_close(out.loss, (_soft_ce(logits, target).mean() + t2s) / 2)


# ------------------------------------------------------------------------------------------------ towers
def test_from_towers_keeps_pretrained_weights_and_freeze(tmp_path):
    from transformers import BertModel

    torch.manual_seed(1)
    encoder = SlideEncoderModel(SlideEncoderConfig(**TINY_SLIDE_CONFIGS["slide_encoder"]))
    encoder.save_pretrained(tmp_path / "slide")
    text = BertModel(tiny_text_config(), add_pooling_layer=False)
    text.save_pretrained(tmp_path / "text")
    reference = {k: v.clone() for k, v in encoder.state_dict().items()}

    model = WSIClipModel.from_towers(
        slide_encoder=tmp_path / "slide", text_model=str(tmp_path / "text"), projection_dim=8
    )
    assert model.config.slide_tower == "slide_encoder" and model.config.projection_dim == 8
    for key, value in model.slide_model.state_dict().items():
        torch.testing.assert_close(value, reference[key], msg=key)
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight
    )
    assert model.slide_model.config is model.config.slide_config  # one config object, saved once

    in_memory = WSIClipModel.from_towers(slide_encoder=encoder, text_model=text, projection_dim=8)
    torch.testing.assert_close(in_memory.slide_model.patch_embed.weight, reference["patch_embed.weight"])
    with_pooler = WSIClipModel.from_towers(slide_encoder=encoder, text_model=BertModel(tiny_text_config()))
    assert with_pooler.text_model.pooler is None  # mean pooling: the unused pooler is dropped

    model.freeze(slide_model=True)
    model.train()
    assert not model.slide_model.training and model.text_model.training  # frozen towers stay in eval mode
    assert not any(p.requires_grad for p in model.slide_model.parameters())

    model.save_pretrained(tmp_path / "clip")
    from_clip = WSIClipModel.from_towers(slide_encoder=str(tmp_path / "clip"), text_model=text, projection_dim=4)
    torch.testing.assert_close(from_clip.slide_model.patch_embed.weight, reference["patch_embed.weight"])

    with pytest.raises(ValueError, match="model_type 'bert'"):
        WSIClipModel.from_towers(slide_encoder=str(tmp_path / "text"), text_model=text)


# ------------------------------------------------------------------------------------------------ save / load
def _save(model: WSIClipModel, folder: Path, vocab_size: int = 128) -> WSIProcessor:
    model.save_pretrained(folder)
    processor = WSIProcessor(build_tiny_tokenizer(), max_tiles=64, feature_dim=16)
    processor.save_pretrained(folder)
    return processor


@pytest.mark.parametrize("tower", TOWERS)
def test_save_load_round_trip_registered(tmp_path, tower):
    model = _model(tower)
    _save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_wsiclip.WSIClipConfig",
        "AutoModel": "modeling_wsiclip.WSIClipModel",
    }
    shipped = {p.name for p in tmp_path.glob("*.py")}
    assert {
        "configuration_wsiclip.py",
        "modeling_wsiclip.py",
        "mil_pooling.py",
        "losses.py",
        "configuration_slide_encoder.py",
        "modeling_slide_encoder.py",
        "dilated_attention.py",
    } <= shipped
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is WSIClipModel and loaded.config.slide_tower == tower
    batch = tiny_batch()
    a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.slide_embeds, b.slide_embeds)
    torch.testing.assert_close(a.text_embeds, b.text_embeds)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is WSIProcessor and processor.max_tiles == 64
    # the slide tower alone (WSI-LLaVA takes it from here)
    model.slide_model.save_pretrained(tmp_path / "tower")
    assert type(AutoModel.from_pretrained(tmp_path / "tower")) is type(model.slide_model)


REMOTE_SCRIPT = r"""
import importlib.util, sys
sys.path[:0] = [sys.argv[2]]           # site-packages WITHOUT processing its .pth files (the editable finder)
for name in ("wsi_clip", "processing", "wsi_llava"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the test would prove nothing"
import torch
from transformers import AutoModel, AutoProcessor
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
batch = torch.load(folder + "/batch.pt")
with torch.no_grad():
    out = model(**batch)
text = processor(text=["tumor cells", "normal tissue"])
torch.save({"slide": out.slide_embeds, "text": out.text_embeds, "ids": text["input_ids"],
            "slide_type": type(model.slide_model).__name__}, folder + "/remote.pt")
print("REMOTE OK")
"""


@pytest.mark.slow
def test_remote_code_loads_without_the_package(tmp_path):
    model = _model("slide_encoder")
    processor = _save(model, tmp_path)
    batch = tiny_batch()
    torch.save(batch, tmp_path / "batch.pt")
    assert (
        json.loads((tmp_path / "processor_config.json").read_text())["auto_map"]["AutoProcessor"]
        == "processing_wsi.WSIProcessor"
    )
    site_packages = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # -S: no site module, so the editable install's finder (.pth) never runs; -I: no cwd / PYTHON* / user site
    result = subprocess.run(
        [sys.executable, "-S", "-I", "-c", REMOTE_SCRIPT, str(tmp_path), site_packages],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REMOTE OK" in result.stdout, result.stderr[-4000:]
    remote = torch.load(tmp_path / "remote.pt")
    with torch.no_grad():
        out = model(**batch)
    assert remote["slide_type"] == "SlideEncoderModel"
    torch.testing.assert_close(remote["slide"], out.slide_embeds)
    torch.testing.assert_close(remote["text"], out.text_embeds)
    torch.testing.assert_close(remote["ids"], processor(text=["tumor cells", "normal tissue"])["input_ids"])
