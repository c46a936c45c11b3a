"""The Prov-GigaPath converter on the whole upstream LongNet family (CPU, offline, synthetic weights).

State dicts are built here from the upstream architecture (``gigapath/slide_encoder.py`` ``LongNetViT`` with a
torchscale Sub-LN encoder), independently of our model: the key names, shapes and the upstream table below are
written out by hand, not derived from ``wsi_clip``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from wsi_clip import SlideEncoderModel
from wsi_clip.convert_gigapath import (
    LONGNET_CONFIGS,
    GigaPathConversionError,
    convert_gigapath_checkpoint,
    convert_state_dict,
    infer_config,
)

# Upstream gigapath/torchscale/model/LongNetConfig.py: name → (layers, width, FFN, heads). Only the entries that
# LongNetViT's encoder naming ("LongNet_{depth}_layers_{dim}_dim" [+ "_mlp{r}"]) can reach.
UPSTREAM = {
    "LongNet_8_layers_256_dim_mlp2": (8, 256, 512, 16),
    "LongNet_12_layers_256_dim_mlp2": (12, 256, 512, 16),
    "LongNet_8_layers_256_dim": (8, 256, 1024, 16),
    "LongNet_12_layers_256_dim": (12, 256, 1024, 16),
    "LongNet_3_layers_384_dim": (3, 384, 1536, 16),
    "LongNet_6_layers_384_dim": (6, 384, 1536, 16),
    "LongNet_12_layers_384_dim": (12, 384, 1536, 16),
    "LongNet_12_layers_512_dim": (12, 512, 1024, 8),
    "LongNet_3_layers_768_dim": (3, 768, 3072, 16),
    "LongNet_6_layers_768_dim": (6, 768, 3072, 16),
    "LongNet_8_layers_768_dim": (8, 768, 3072, 16),
    "LongNet_12_layers_768_dim": (12, 768, 3072, 16),
    "LongNet_8_layers_1024_dim": (8, 1024, 4096, 16),
    "LongNet_24_layers_1024_dim": (24, 1024, 4096, 16),
    "LongNet_3_layers_1536_dim": (3, 1536, 6144, 16),
    "LongNet_6_layers_1536_dim": (6, 1536, 6144, 16),
    "LongNet_8_layers_1536_dim": (8, 1536, 6144, 16),
    "LongNet_12_layers_1536_dim": (12, 1536, 6144, 16),
}
FLASH = "LongNet_12_layers_384_dim"  # gigapath_slide_enc12l384d, prov-gigapath/prov-gigapath-flash
# Flash: patch_embed 384*384+384, cls 384, 12 x (4 attention projections 4*(384*384+384) + 4 LayerNorms of 384
# (inner_attn_ln, self_attn_layer_norm, final_layer_norm: 2*384 each) + fc1 384*1536+1536 + fc2 1536*384+384
# + ffn_layernorm 2*1536), encoder.layer_norm and norm 2*384 each.
FLASH_PARAMETERS = 21_489_408


def upstream_shapes(layers: int, dim: int, ffn: int, in_chans: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of upstream ``LongNetViT.state_dict()`` (pos_embed is a non-persistent buffer)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "patch_embed.proj.weight": (dim, in_chans),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(layers):
        pre = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{proj}.weight"] = (dim, dim)
            shapes[f"{pre}self_attn.{proj}.bias"] = (dim,)
        for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{pre}{norm}.weight"] = shapes[f"{pre}{norm}.bias"] = (dim,)
        shapes[f"{pre}ffn.fc1.weight"], shapes[f"{pre}ffn.fc1.bias"] = (ffn, dim), (ffn,)
        shapes[f"{pre}ffn.fc2.weight"], shapes[f"{pre}ffn.fc2.bias"] = (dim, ffn), (dim,)
        shapes[f"{pre}ffn.ffn_layernorm.weight"] = shapes[f"{pre}ffn.ffn_layernorm.bias"] = (ffn,)
    for norm in ("encoder.layer_norm", "norm"):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (dim,)
    return shapes


def meta_state_dict(layers: int, dim: int, ffn: int, in_chans: int) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in upstream_shapes(layers, dim, ffn, in_chans).items()}


def random_state_dict(layers: int, dim: int, ffn: int, in_chans: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in upstream_shapes(layers, dim, ffn, in_chans).items():
        scale = 1.0 / shape[-1] ** 0.5 if len(shape) == 2 else 0.1
        value = torch.randn(shape, generator=gen) * scale
        if key.endswith("norm.weight") or key.endswith("_ln.weight"):
            value = value + 1.0
        sd[key] = value
    return sd


def ours(upstream_key: str) -> str:
    """Our name of an upstream key (written out here, not taken from the converter)."""
    renames = {
        "patch_embed.proj.weight": "patch_embed.weight",
        "patch_embed.proj.bias": "patch_embed.bias",
        "encoder.layer_norm.weight": "layer_norm.weight",
        "encoder.layer_norm.bias": "layer_norm.bias",
        "norm.weight": "head_norm.weight",
        "norm.bias": "head_norm.bias",
    }
    if upstream_key in renames:
        return renames[upstream_key]
    return upstream_key.removeprefix("encoder.") if upstream_key.startswith("encoder.layers.") else upstream_key


def tiles(in_chans: int, n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randperm(40 * 40, generator=gen)[:n]
    coords = torch.stack([cells // 40, cells % 40], dim=-1) * 256  # (x, y) pixels of 256-px tiles
    return torch.randn(1, n, in_chans, generator=gen), coords.unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------------
# The table: every upstream configuration converts to the right config (meta tensors, no memory)
# ----------------------------------------------------------------------------------------------------------------


def test_table_is_the_upstream_table():
    assert {
        c.name: (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads)
        for c in LONGNET_CONFIGS
    } == UPSTREAM
    assert len({shape[:3] for shape in UPSTREAM.values()}) == len(UPSTREAM)  # (layers, width, FFN) → one entry
    archs = {c.timm_arch: c.name for c in LONGNET_CONFIGS if c.timm_arch}
    assert archs == {
        "gigapath_slide_enc12l768d": "LongNet_12_layers_768_dim",
        "gigapath_slide_enc24l1024d": "LongNet_24_layers_1024_dim",
        "gigapath_slide_enc12l1536d": "LongNet_12_layers_1536_dim",
        "gigapath_slide_enc12l384d": FLASH,
    }


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_every_upstream_config_converts(name):
    layers, dim, ffn, heads = UPSTREAM[name]
    in_chans = 384 if name == FLASH else 1536
    sd = meta_state_dict(layers, dim, ffn, in_chans)
    assert len(sd) == 7 + 20 * layers
    config = infer_config(sd, source=name)
    got = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads)
    assert got == (layers, dim, ffn, heads)
    assert config.input_dim == in_chans
    assert config.dilated_ratio == [1, 2, 4, 8, 16]  # make_longnet_from_name overrides the table's value
    assert config.segment_length == [1024, 5792, 32768, 185363, 1048576]  # LongNetViT's, not the table's
    weights = convert_state_dict(sd, config, source=name)
    assert set(weights) == {ours(k) for k in sd}
    assert all(weights[ours(k)].shape == v.shape for k, v in sd.items())


# ----------------------------------------------------------------------------------------------------------------
# Heads: unknown shapes, explicit overrides; the default output layer
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_shape_needs_explicit_heads(caplog):
    sd = meta_state_dict(5, 384, 1536, 384)  # no upstream LongNet has 5 layers
    with pytest.raises(GigaPathConversionError) as err:
        infer_config(sd, source="odd.pth")
    message = str(err.value)
    assert "odd.pth" in message and "5 layers, width 384, FFN 1536" in message
    assert "--num_attention_heads" in message
    assert all(name in message for name in UPSTREAM)  # lists the known configurations
    with caplog.at_level(logging.WARNING, logger="wsi_clip.convert_gigapath"):
        config = infer_config(sd, num_attention_heads=12)
    assert config.num_attention_heads == 12 and config.num_hidden_layers == 5
    assert "not an upstream LongNet configuration" in caplog.text


def test_explicit_heads_override_the_table(caplog):
    sd = meta_state_dict(12, 384, 1536, 384)
    with caplog.at_level(logging.WARNING, logger="wsi_clip.convert_gigapath"):
        assert infer_config(sd, num_attention_heads=16).num_attention_heads == 16
    assert not caplog.records  # agrees with the table: no warning
    with caplog.at_level(logging.WARNING, logger="wsi_clip.convert_gigapath"):
        assert infer_config(sd, num_attention_heads=8).num_attention_heads == 8
    assert "overrides the 16 heads" in caplog.text and FLASH in caplog.text
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        infer_config(sd, num_attention_heads=7)


@pytest.mark.parametrize(
    ("layers", "dim", "ffn", "layer"),
    [(12, 768, 3072, "11"), (12, 384, 1536, "11"), (3, 384, 1536, "final"), (24, 1024, 4096, "final")],
)
def test_default_output_layer(layers, dim, ffn, layer):
    sd = meta_state_dict(layers, dim, ffn, 1536)
    config = infer_config(sd)
    assert (config.pooling, config.embedding_layer) == ("mean", layer)
    explicit = infer_config(sd, pooling="cls", embedding_layer="final")  # the upstream default call
    assert (explicit.pooling, explicit.embedding_layer) == ("cls", "final")
    assert infer_config(sd, embedding_layer=2).embedding_layer == "2"  # ints are stored as strings


# ----------------------------------------------------------------------------------------------------------------
# Real round trips: .pth → HF folder → from_pretrained (Flash, the 8-head 512-d model, a 256-d mlp2 model)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flash_checkpoint(tmp_path_factory):
    sd = random_state_dict(12, 384, 1536, 384)
    path = tmp_path_factory.mktemp("flash") / "slide_encoder.pth"
    torch.save({"model": sd}, path)  # the layout of the released slide_encoder.pth
    return path, sd


ROUND_TRIPS = {
    FLASH: (12, 384, 1536, 384, 16, "11"),
    "LongNet_12_layers_512_dim": (12, 512, 1024, 1536, 8, "11"),
    "LongNet_8_layers_256_dim_mlp2": (8, 256, 512, 1536, 16, "final"),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip(name, tmp_path, flash_checkpoint, caplog):
    from transformers import AutoModel

    layers, dim, ffn, in_chans, heads, layer = ROUND_TRIPS[name]
    if name == FLASH:
        pth, sd = flash_checkpoint
    else:
        sd = random_state_dict(layers, dim, ffn, in_chans, seed=layers + dim)
        pth = tmp_path / "slide_encoder.pth"
        torch.save({"model": sd}, pth)
    out_dir = tmp_path / "hf"
    with caplog.at_level(logging.INFO, logger="wsi_clip.convert_gigapath"):
        model = convert_gigapath_checkpoint(pth, out_dir)
    assert name in caplog.text  # the log names the upstream configuration
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.input_dim) == (
        layers,
        dim,
        ffn,
        in_chans,
    )
    assert (cfg.num_attention_heads, cfg.pooling, cfg.embedding_layer) == (heads, "mean", layer)
    saved = json.loads((out_dir / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["input_dim"], saved["embedding_layer"]) == (heads, in_chans, layer)
    if name == FLASH:
        assert sum(p.numel() for p in model.parameters()) == FLASH_PARAMETERS  # ~21.5M

    x, coords = tiles(in_chans)
    with torch.no_grad():
        reference = model(x, coords, output_hidden_states=True)
    reloaded = SlideEncoderModel.from_pretrained(out_dir)
    auto = AutoModel.from_pretrained(out_dir)
    for loaded in (reloaded, auto):
        assert type(loaded) is SlideEncoderModel and not loaded.training
        assert {**loaded.config.to_dict(), "_name_or_path": ""} == cfg.to_dict()
        state = loaded.state_dict()
        assert set(state) == {ours(k) for k in sd}  # nothing left at random init, nothing extra
        for key, value in sd.items():
            assert torch.equal(state[ours(key)], value), key
    with torch.no_grad():  # same class, same config, same weights: one reloaded forward stands for both
        out = reloaded(x, coords)
    assert torch.allclose(out.last_hidden_state, reference.last_hidden_state, rtol=0, atol=1e-6)
    assert torch.allclose(out.pooler_output, reference.pooler_output, rtol=0, atol=1e-6)
    # the default pools upstream's all_layer_embed[11] (12 layers) or the final state, with mean pooling
    state = reference.last_hidden_state if layer == "final" else reference.hidden_states[int(layer)]
    everything = torch.ones(x.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        expected = model.pool(state, everything, "mean")
        final_mean = model.pool(reference.last_hidden_state, everything, "mean")
    assert torch.allclose(reference.pooler_output, expected, rtol=0, atol=1e-6)
    assert (layer == "final") == torch.allclose(reference.pooler_output, final_mean, atol=1e-3)
    if name == FLASH:  # the upstream default call, chosen at load time
        upstream_default = SlideEncoderModel.from_pretrained(out_dir, pooling="cls", embedding_layer="final")
        assert (upstream_default.config.pooling, upstream_default.config.embedding_layer) == ("cls", "final")
        with torch.no_grad():
            cls_out = upstream_default(x, coords).pooler_output
            expected = model.head_norm(reference.last_hidden_state[:, 0])
        assert torch.allclose(cls_out, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def test_cli_converts_flash(tmp_path, flash_checkpoint, capsys):
    from wsi_clip.commands.convert_gigapath import main

    pth, _ = flash_checkpoint
    main(["--checkpoint", str(pth), "--output_dir", str(tmp_path / "flash")])
    printed = capsys.readouterr().out
    assert f"{FLASH} (gigapath_slide_enc12l384d)" in printed and f"{FLASH_PARAMETERS:,} parameters" in printed
    saved = json.loads((tmp_path / "flash" / "config.json").read_text())
    assert (saved["input_dim"], saved["hidden_size"], saved["num_hidden_layers"]) == (384, 384, 12)
    assert (saved["num_attention_heads"], saved["intermediate_size"]) == (16, 1536)
    assert (saved["pooling"], saved["embedding_layer"]) == ("mean", "11")


def test_cli_flags(tmp_path, capsys):
    from wsi_clip.commands.convert_gigapath import main

    torch.save({"model": random_state_dict(5, 256, 512, 64)}, tmp_path / "odd.pth")  # not an upstream shape
    with pytest.raises(GigaPathConversionError, match="--num_attention_heads"):
        main(["--checkpoint", str(tmp_path / "odd.pth"), "--output_dir", str(tmp_path / "no")])
    main(
        [
            "--checkpoint",
            str(tmp_path / "odd.pth"),
            "--output_dir",
            str(tmp_path / "hf"),
            "--num_attention_heads",
            "8",
            "--pooling",
            "cls",
            "--embedding_layer",
            "3",
        ]
    )
    assert "not an upstream LongNet configuration" in capsys.readouterr().out
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["pooling"], saved["embedding_layer"]) == (8, "cls", "3")
    assert not (tmp_path / "no").exists()
