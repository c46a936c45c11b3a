"""Fine-tuning a converted Prov-GigaPath slide encoder: layer-wise LR decay, the frozen-then-unfrozen schedule and
the output layer, on the reduced upstream checkpoint of the parity fixtures (3 layers, 384-d, 1536-d inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from processing import write_slide
from wsi_clip import WSIClipModel
from wsi_clip.optimization import SLIDE_TOWER_GROUP, parameter_groups, slide_layer_id
from wsi_clip.trainer import WSIClipTrainer

from conftest import SHARED
from wsiclip_helpers import save_text_model, tiny_clip_config, write_rows

REDUCED_GIGAPATH = SHARED / "fixtures" / "gigapath" / "gigapath_3l384d_n1024.state_dict.safetensors"


@pytest.mark.parametrize(
    ("name", "model_type", "layer"),
    [
        ("patch_embed.weight", "wsi_slide_encoder", 0),
        ("cls_token", "wsi_slide_encoder", 0),
        ("layers.0.ffn.fc1.weight", "wsi_slide_encoder", 1),
        ("layers.2.self_attn.q_proj.bias", "wsi_slide_encoder", 3),
        ("layer_norm.weight", "wsi_slide_encoder", 4),
        ("head_norm.bias", "wsi_slide_encoder", 4),
        ("tile_mlp.0.weight", "wsi_abmil", 1),
        ("tile_mlp.3.weight", "wsi_abmil", 2),
        ("attention_w.weight", "wsi_abmil", 4),
    ],
)
def test_layer_ids(name, model_type, layer):
    assert slide_layer_id(name, model_type, 3) == layer


def test_parameter_groups_decay_by_depth_and_keep_every_parameter_once():
    model = WSIClipModel(tiny_clip_config("slide_encoder"))  # 2 layers
    decay_names = [n for n, _ in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    groups = parameter_groups(model, 1e-3, 0.05, decay_names, layer_lr_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(params) == len(lr_of)
    expected = {
        "slide_model.patch_embed.weight": 1e-3 * 0.5**3,
        "slide_model.cls_token": 1e-3 * 0.5**3,
        "slide_model.layers.0.ffn.fc1.weight": 1e-3 * 0.5**2,
        "slide_model.layers.1.ffn.fc1.weight": 1e-3 * 0.5,
        "slide_model.head_norm.weight": 1e-3,
        "slide_projection.weight": 1e-3,
        "text_model.encoder.layer.0.output.dense.weight": 1e-3,
        "logit_scale": 1e-3,
    }
    for name, lr in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    assert wd_of[id(params["slide_model.layers.0.ffn.fc1.weight"])] == 0.05
    assert wd_of[id(params["slide_model.head_norm.weight"])] == 0.0
    assert not groups[0][SLIDE_TOWER_GROUP] and groups[0]["lr"] == 1e-3  # the Trainer logs group 0
    with pytest.raises(ValueError, match=r"layer_lr_decay=1.5 must be in \(0, 1\]"):
        parameter_groups(model, 1e-3, 0.0, decay_names, layer_lr_decay=1.5)


def test_frozen_phase_holds_the_tower_then_ramps(tmp_path):
    model = WSIClipModel(tiny_clip_config("slide_encoder"))
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="constant_with_warmup",
        use_cpu=True, report_to="none",
    )  # fmt: skip
    trainer = WSIClipTrainer(model=model, args=args, layer_lr_decay=0.5, freeze_slide_encoder_steps=3)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    groups = trainer.optimizer.param_groups
    head = next(i for i, g in enumerate(groups) if not g[SLIDE_TOWER_GROUP])
    top = next(i for i, g in enumerate(groups) if g[SLIDE_TOWER_GROUP] and g["lr_scale"] == 1.0)
    embed = next(i for i, g in enumerate(groups) if g[SLIDE_TOWER_GROUP] and g["lr_scale"] == 0.125)
    seen = []
    for _ in range(6):
        seen.append([groups[i]["lr"] for i in (head, top, embed)])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [
        [0.0, 0.0, 0.0],
        [5e-4, 0.0, 0.0],
        [1e-3, 0.0, 0.0],
        [1e-3, 5e-4, 5e-4 * 0.125],  # unfrozen at step 3, ramped over the 2 warm-up steps
        [1e-3, 1e-3, 1e-3 * 0.125],
        [1e-3, 1e-3, 1e-3 * 0.125],
    ]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)

    frozen = WSIClipModel(tiny_clip_config("slide_encoder"))
    frozen.freeze(slide_model=True)
    trainer = WSIClipTrainer(model=frozen, args=args, freeze_slide_encoder_steps=3)
    with pytest.raises(ValueError, match="needs a trainable slide tower"):
        trainer.create_optimizer_and_scheduler(num_training_steps=10)


def _cohort(tmp_path, num_slides: int = 8, tiles: int = 24) -> tuple:
    rng = np.random.default_rng(0)
    labels = ["tumour", "normal"]
    rows = []
    for i in range(num_slides):
        cells = rng.permutation(64)[:tiles]
        coords = np.stack([cells % 8, cells // 8], axis=1) * 256
        feats = rng.standard_normal((tiles, 1536)).astype(np.float32)
        write_slide(tmp_path / f"s{i}.h5", feats, coords, dtype="float32")
        rows.append({"h5_path": f"s{i}.h5", "caption": f"{labels[i % 2]} tissue.", "case_id": f"c{i}"})
    captions = [r["caption"] for r in rows]
    return write_rows(tmp_path / "train.csv", rows), save_text_model(tmp_path / "text", captions)


def test_fine_tune_a_converted_gigapath_encoder(tmp_path):
    """Frozen for every step of the run → the tower equals the converted checkpoint; the layers above the chosen
    output layer are frozen as unused; the projections learn; the output choice is saved with the checkpoint."""
    from wsi_clip.commands.convert_gigapath import main as convert
    from wsi_clip.commands.train import main as train

    if not REDUCED_GIGAPATH.is_file():
        pytest.skip(f"{REDUCED_GIGAPATH} is absent (../shared sits beside the checkout in CI)")
    encoder = tmp_path / "gigapath"
    convert(["--checkpoint", str(REDUCED_GIGAPATH), "--output_dir", str(encoder)])
    train_csv, text = _cohort(tmp_path)
    common = [
        "--train_file", str(train_csv), "--slide_encoder_name_or_path", str(encoder),
        "--text_model_name_or_path", str(text), "--projection_dim", "8", "--max_tiles", "16",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "1",
        "--slide_config", json.dumps({"pooling": "mean", "embedding_layer": "2"}), "--layer_lr_decay", "0.9",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--seed", "0",
    ]  # fmt: skip
    out = tmp_path / "held"
    train([*common, "--output_dir", str(out), "--max_steps", "3", "--freeze_slide_encoder_steps", "3"])
    before = load_file(str(encoder / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for key, value in before.items():
        torch.testing.assert_close(after[f"slide_model.{key}"], value, rtol=0, atol=0, msg=key)
    config = json.loads((out / "config.json").read_text())["slide_config"]
    assert (config["pooling"], config["embedding_layer"]) == ("mean", "2")

    out = tmp_path / "unfrozen"
    train([*common, "--output_dir", str(out), "--max_steps", "4", "--freeze_slide_encoder_steps", "2"])
    after = load_file(str(out / "model.safetensors"))
    changed = {key for key, value in before.items() if not torch.equal(after[f"slide_model.{key}"], value)}
    assert "layers.1.ffn.fc1.weight" in changed and "patch_embed.weight" in changed
    assert not any(key.startswith(("layers.2.", "layer_norm.")) for key in changed)  # above the output layer

    with pytest.raises(ValueError, match=r"only the output can be chosen"):
        train([*common, "--output_dir", str(tmp_path / "bad"), "--slide_config", json.dumps({"hidden_size": 8})])


def test_pretrained_mil_tower_warm_starts_without_slide_config(tmp_path):
    """A pretrained ABMIL tower keeps its own config (input_dim included); output options are LongNet-only."""
    from wsi_clip import ABMILModel
    from wsi_clip.arguments import ModelArguments
    from wsi_clip.commands.train import build_model
    from wsi_clip.configuration_wsiclip import ABMILConfig

    ABMILModel(ABMILConfig(input_dim=24, hidden_size=16, attention_dim=8)).save_pretrained(tmp_path / "abmil")
    text = save_text_model(tmp_path / "text", ["a report."])
    args = ModelArguments(
        slide_encoder_name_or_path=str(tmp_path / "abmil"), text_model_name_or_path=str(text), projection_dim=8
    )
    model = build_model(args, feature_dim=1536)  # the data's dimension does not overwrite the tower's
    assert model.config.slide_config.input_dim == 24 and model.config.slide_config.model_type == "wsi_abmil"
    args.slide_config = json.dumps({"pooling": "mean"})
    with pytest.raises(ValueError, match="chooses the output of a LongNet slide encoder"):
        build_model(args, feature_dim=24)
