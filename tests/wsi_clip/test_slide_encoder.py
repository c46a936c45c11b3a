"""Slide encoder: parity with the original Prov-GigaPath outputs, conversion round trip, ragged batches,
input validation, configuration. Tiny configs except the (3-layer, 384-d) parity fixtures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import wsi_clip
from wsi_clip import SlideEncoderConfig, SlideEncoderModel, SlideInputError
from wsi_clip.configuration_slide_encoder import gigapath_segment_length
from wsi_clip.convert_gigapath import (
    GigaPathConversionError,
    convert_gigapath_checkpoint,
    load_original_state_dict,
    original_key_map,
)
from wsi_clip.modeling_slide_encoder import sincos_2d_position_embedding

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "gigapath"
PREFIXES = ["gigapath_3l384d_n1024", "gigapath_3l384d_n3000_wsi16384"]


def _fixture(prefix: str) -> dict:
    if not FIXTURES.is_dir():
        pytest.skip(f"Prov-GigaPath parity fixtures not found at {FIXTURES} (../shared sits beside the checkout in CI)")
    return {
        "meta": json.loads((FIXTURES / f"{prefix}.meta.json").read_text())["config"],
        "inputs": load_file(str(FIXTURES / f"{prefix}.inputs.safetensors")),
        "outputs": load_file(str(FIXTURES / f"{prefix}.outputs.safetensors")),
        "state_dict": FIXTURES / f"{prefix}.state_dict.safetensors",
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module", params=PREFIXES)
def converted(request, tmp_path_factory):
    """(fixture, model converted by the library converter and saved to disk, output dir)."""
    fx = _fixture(request.param)
    out_dir = tmp_path_factory.mktemp(request.param)
    model = convert_gigapath_checkpoint(
        fx["state_dict"],
        out_dir,
        max_wsi_size=fx["meta"]["max_wsi_size"],
        slide_ngrids=fx["meta"]["slide_ngrids"],
        pooling="cls",
        embedding_layer="final",
    )
    return fx, model, out_dir


# ----------------------------------------------------------------------------------------------------------------
# Parity with the original code (B = 1, fp32): every stored output, relative max difference <= 1e-4
# ----------------------------------------------------------------------------------------------------------------


def test_parity_with_original(converted):
    fx, model, _ = converted
    meta, x, coords, ref = fx["meta"], fx["inputs"]["x"].float(), fx["inputs"]["coords"], fx["outputs"]
    assert model.config.segment_length == meta["segment_length"]
    assert model.config.dilated_ratio == meta["dilated_ratio"]
    everything = torch.ones(x.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        out = model(x, coords, output_hidden_states=True)
        cls_layers = model.all_layer_embeddings(x, coords, pooling="cls")
        mean_layers = [model.pool(h, everything, "mean") for h in out.hidden_states]  # = all_layer_embeddings(mean)
        mean_pooled = model.pool(out.last_hidden_state, everything, "mean")

    grid = torch.floor(coords / meta["tile_size"]).long()
    assert torch.equal(grid[..., 0] * meta["slide_ngrids"] + grid[..., 1] + 1, ref["pos_index"])
    pos = sincos_2d_position_embedding(grid, meta["embed_dim"])
    assert _rel(pos, ref["pos_embed_gathered"]) <= 1e-6
    projected = out.hidden_states[0][:, 1:] - pos  # input embedding minus position = projected patches
    with torch.no_grad():
        assert _rel(projected, model.patch_embed(x)) <= 1e-5
    assert out.last_hidden_state.shape == ref["encoder_out"].shape
    results = {
        "encoder_out": _rel(out.last_hidden_state, ref["encoder_out"]),
        "out_default": _rel(out.pooler_output, ref["out_default"]),
        "out_default_gp": _rel(mean_pooled, ref["out_default_gp"]),
        "all_layer_embed": _rel(torch.stack(cls_layers), ref["all_layer_embed"]),
        "all_layer_embed_gp": _rel(torch.stack(mean_layers), ref["all_layer_embed_gp"]),
    }
    if "hidden_states" in ref:
        results["hidden_states"] = _rel(torch.stack(out.hidden_states), ref["hidden_states"])
    assert len(cls_layers) == meta["depth"] + 1
    assert max(results.values()) <= 1e-4, results
    # the two upstream "last layer" views really differ on these perturbed weights (LN∘LN ≠ LN)
    assert (out.pooler_output - cls_layers[-1]).abs().max() > 0.1


def test_conversion_round_trip_auto_model(tmp_path):
    from transformers import AutoConfig, AutoModel

    fx = _fixture(PREFIXES[1])
    out_dir = tmp_path / "hf"
    model = convert_gigapath_checkpoint(
        fx["state_dict"], out_dir, max_wsi_size=16384, slide_ngrids=128, pooling="cls", embedding_layer="final"
    )

    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["model_type"] == "wsi_slide_encoder"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_slide_encoder.SlideEncoderConfig",
        "AutoModel": "modeling_slide_encoder.SlideEncoderModel",
    }
    assert saved["segment_length"] == fx["meta"]["segment_length"]
    for name in (
        "model.safetensors",
        "configuration_slide_encoder.py",
        "modeling_slide_encoder.py",
        "dilated_attention.py",
    ):
        assert (out_dir / name).is_file(), name
    assert isinstance(AutoConfig.from_pretrained(out_dir), SlideEncoderConfig)
    loaded = AutoModel.from_pretrained(out_dir)
    assert type(loaded) is SlideEncoderModel and not loaded.training
    x, coords = fx["inputs"]["x"], fx["inputs"]["coords"]
    with torch.no_grad():
        a, b = model(x, coords), loaded(x, coords)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-5  # GEMM rounding may depend on alignment
    assert _rel(b.pooler_output, fx["outputs"]["out_default"]) <= 1e-4
    mean_model = SlideEncoderModel.from_pretrained(out_dir, pooling="mean")
    assert mean_model.config.pooling == "mean"
    with torch.no_grad():
        assert _rel(mean_model(x, coords).pooler_output, fx["outputs"]["out_default_gp"]) <= 1e-4


def test_remote_code_loads_without_the_package(tmp_path):
    """The saved folder is self-contained: a fresh process that cannot import wsi_clip loads it."""
    fx = _fixture(PREFIXES[0])
    out_dir = tmp_path / "hf"
    convert_gigapath_checkpoint(
        fx["state_dict"], out_dir, slide_ngrids=fx["meta"]["slide_ngrids"], pooling="cls", embedding_layer="final"
    )
    code = (
        "import sys; sys.modules['wsi_clip'] = None\n"
        "import torch\nfrom safetensors.torch import load_file\nfrom transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(out_dir)!r}, trust_remote_code=True)\n"
        "assert 'transformers_modules' in type(m).__module__, type(m).__module__\n"
        f"inp = load_file({str(FIXTURES / (PREFIXES[0] + '.inputs.safetensors'))!r})\n"
        f"ref = load_file({str(FIXTURES / (PREFIXES[0] + '.outputs.safetensors'))!r})\n"
        "with torch.no_grad(): out = m(inp['x'], inp['coords']).pooler_output\n"
        "print(float((out - ref['out_default']).abs().max() / ref['out_default'].abs().max()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=out_dir.parent,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-4


def test_convert_script_cli(tmp_path):
    fx = _fixture(PREFIXES[1])
    out_dir = tmp_path / "hf"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "convert_gigapath.py"),
            "--checkpoint",
            str(fx["state_dict"]),
            "--output_dir",
            str(out_dir),
            "--max_wsi_size",
            "16384",
            "--pooling",
            "mean",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["segment_length"] == [1024, 1448, 2048, 2896, 4096] and config["pooling"] == "mean"
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 384 and config["input_dim"] == 1536


def test_converter_reads_torch_files_and_checks_keys_strictly(tmp_path):
    fx = _fixture(PREFIXES[0])
    original = load_file(str(fx["state_dict"]))
    assert set(original) == set(original_key_map(3))
    assert len(original_key_map(12)) == 247  # the released 12-layer model

    pth = tmp_path / "slide_encoder.pth"
    torch.save({"model": original}, pth)  # the layout of the released file
    model = convert_gigapath_checkpoint(pth, max_wsi_size=16384)
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 1536
    assert torch.equal(model.head_norm.weight, original["norm.weight"].float())

    broken = dict(original)
    del broken["encoder.layers.1.ffn.ffn_layernorm.bias"]
    broken["encoder.layers.1.ffn.extra.weight"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(GigaPathConversionError) as err:
        convert_gigapath_checkpoint(tmp_path / "broken.safetensors")
    message = str(err.value)
    assert "broken.safetensors" in message and "encoder.layers.1.ffn.ffn_layernorm.bias" in message
    assert "encoder.layers.1.ffn.extra.weight" in message and "fix:" in message

    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gigapath_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": original, "args": {"lr": 1}}, tmp_path / "nested.pth")  # extra non-tensor entries: fine
    assert convert_gigapath_checkpoint(tmp_path / "nested.pth").config.hidden_size == 384
    torch.save({"optimizer": {"step": 3}}, tmp_path / "other.pth")
    with pytest.raises(GigaPathConversionError, match="'model' state_dict"):
        load_original_state_dict(tmp_path / "other.pth")


# ----------------------------------------------------------------------------------------------------------------
# Ragged batches, pooling, autocast (tiny configs)
# ----------------------------------------------------------------------------------------------------------------


def _tiny_model(**overrides) -> SlideEncoderModel:
    config = dict(
        input_dim=24,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        segment_length=[8, 16, 64],
        dilated_ratio=[1, 2, 4, 8],
        dropout=0.0,
        drop_path_rate=0.0,
        slide_ngrids=64,
        inference_chunk_size=16,
    )
    config["segment_length"] = [8, 16, 32, 64]
    config.update(overrides)
    torch.manual_seed(0)
    return SlideEncoderModel(SlideEncoderConfig(**config)).eval()


def _slide(tiles: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 24, generator=g) * 3, torch.randint(0, 64 * 256, (tiles, 2), generator=g)


@pytest.mark.parametrize("holes", [False, True])
def test_ragged_batch_equals_single_slides(holes):
    model = _tiny_model()
    sizes = [37, 20, 5, 37, 1]
    slides = [_slide(n, seed) for seed, n in enumerate(sizes)]
    width = max(sizes) + 3
    features = torch.full((len(sizes), width, 24), float("nan"))  # padding content must never matter
    coords = torch.full((len(sizes), width, 2), 10**9, dtype=torch.long)  # nor padding coordinates
    mask = torch.zeros(len(sizes), width, dtype=torch.bool)
    positions = []
    for b, ((f, c), n) in enumerate(zip(slides, sizes)):
        # right padding, or real tiles scattered between padding slots (order preserved)
        idx = torch.arange(n) * 2 if holes and 2 * n <= width else torch.arange(n)
        features[b, idx], coords[b, idx], mask[b, idx] = f, c, True
        positions.append(idx)
    with torch.no_grad():
        batch = model(features, coords, mask, output_hidden_states=True, output_cls_attention=True)
        for pooling in ("cls", "mean"):
            layers = model.all_layer_embeddings(features, coords, mask, pooling=pooling)
            for b, (f, c) in enumerate(slides):
                alone = model.all_layer_embeddings(f[None], c[None], pooling=pooling)
                assert max((x[b] - y[0]).abs().max().item() for x, y in zip(layers, alone)) <= 1e-5
        for b, ((f, c), idx) in enumerate(zip(slides, positions)):
            single = model(f[None], c[None], output_hidden_states=True, output_cls_attention=True)
            tokens = torch.cat([torch.zeros(1, dtype=torch.long), idx + 1])
            assert (batch.last_hidden_state[b, tokens] - single.last_hidden_state[0]).abs().max() <= 1e-5
            assert (batch.pooler_output[b] - single.pooler_output[0]).abs().max() <= 1e-5
            for hb, hs in zip(batch.hidden_states, single.hidden_states):
                assert (hb[b, tokens] - hs[0]).abs().max() <= 1e-5
            assert (batch.cls_attention[b][:, idx] - single.cls_attention[0]).abs().max() <= 1e-6
            assert (batch.tile_keys[b, idx] - single.tile_keys[0]).abs().max() <= 1e-5
        assert torch.isfinite(batch.last_hidden_state).all() and torch.isfinite(batch.pooler_output).all()
        padded = ~mask
        assert batch.cls_attention.permute(0, 2, 1)[padded].abs().max() == 0


def test_ragged_batch_with_gradients_matches_single():
    """Training path (autograd, materialised padding) is ragged-exact too, and padding gets no gradient."""
    model = _tiny_model()
    (f1, c1), (f2, c2) = _slide(30, 1), _slide(11, 2)
    features = torch.zeros(2, 30, 24)
    features[0], features[1, :11] = f1, f2
    coords = torch.zeros(2, 30, 2, dtype=torch.long)
    coords[0], coords[1, :11] = c1, c2
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0], mask[1, :11] = True, True
    features.requires_grad_()
    out = model(features, coords, mask)
    out.pooler_output[1].sum().backward()
    single_in = f2[None].clone().requires_grad_()
    single = model(single_in, c2[None])
    single.pooler_output.sum().backward()
    assert (out.pooler_output[1] - single.pooler_output[0]).abs().max() <= 1e-5
    assert (features.grad[1, :11] - single_in.grad[0]).abs().max() <= 1e-5
    assert features.grad[1, 11:].abs().max() == 0 and features.grad[0].abs().max() == 0


def test_mean_pooling_and_output_shapes():
    model = _tiny_model(pooling="mean")
    f, c = _slide(12, 0)
    with torch.no_grad():
        out = model(f[None], c[None], output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 13, 32) and out.pooler_output.shape == (1, 32)
    assert len(out.hidden_states) == 3 and out.cls_attention is None
    expected = model.head_norm(out.last_hidden_state[:, 1:].mean(1))
    assert torch.allclose(out.pooler_output, expected, atol=1e-6)
    as_tuple = model(f[None], c[None], return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[1], out.pooler_output, atol=1e-6)


def test_autocast_bf16_fp16_features_are_finite_and_close():
    """Realistic fp16 tile features (GigaPath tile embeddings have norm ~33) under bf16 autocast."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(0)
    features = (torch.randn(2, 40, 24, generator=g) * 33 / math.sqrt(24)).half()
    coords = torch.randint(0, 64 * 256, (2, 40, 2), generator=g)
    with torch.no_grad():
        ref = model(features, coords).pooler_output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(features, coords).pooler_output
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_autocast_bf16_training_step_has_finite_gradients_close_to_fp32():
    """A training step under bf16 autocast (the fused CPU kernel in bf16, branches regathered in backward)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    features = (torch.randn(2, 40, 24, generator=g) * 33 / math.sqrt(24)).half()
    coords = torch.randint(0, 64 * 256, (2, 40, 2), generator=g)

    def gradient(autocast: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(features, coords).pooler_output.float().square().mean()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref, low = gradient(False), gradient(True)
    assert torch.isfinite(low).all()
    assert torch.nn.functional.cosine_similarity(low, ref, dim=0) > 0.98


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = _tiny_model()
    f, c = _slide(6, 0)
    with pytest.raises(SlideInputError, match="dimension 25 .* input_dim=24"):
        model(torch.randn(1, 6, 25), c[None])
    with pytest.raises(SlideInputError, match=r"unsqueeze\(0\)"):
        model(f, c)
    with pytest.raises(SlideInputError, match="tile_coords must be"):
        model(f[None], c[None, :5])
    with pytest.raises(SlideInputError, match="16-bit floats"):
        model(f[None], c[None].half())
    with pytest.raises(SlideInputError, match="tile_mask must be"):
        model(f[None], c[None], torch.ones(1, 5, dtype=torch.bool))
    far = c.clone()
    far[4] = torch.tensor([64 * 256 + 5, 17])  # x grid cell 64 on a 64-cell grid
    with pytest.raises(SlideInputError) as err:
        model(f[None], far[None])
    message = str(err.value)
    assert "tile 4 of slide 0" in message and "(64, 0)" in message and "0..63" in message
    assert "tile_size >= 257" in message and "rescale" in message
    negative = c.clone()
    negative[2, 1] = -3
    with pytest.raises(SlideInputError, match="tile 2 of slide 0.*non-negative"):
        model(f[None], negative[None])
    # out-of-grid coordinates of padded tiles are ignored
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 4] = False
    with torch.no_grad():
        assert torch.isfinite(model(f[None], far[None], mask).pooler_output).all()
    # float32 coordinates are floored in float64, exactly like integer ones
    with torch.no_grad():
        a = model(f[None], c[None]).pooler_output
        b = model(f[None], c[None].float() + 0.5).pooler_output
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and positions
# ----------------------------------------------------------------------------------------------------------------


def _numpy_segment_length(max_wsi_size: int, tile_size: int) -> list[int]:
    """Upstream LongNetViT.get_optimal_segment_length (with the numpy-2 fix)."""
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(np.log2(1024), int(np.log2(max_seq_len)), 5)
    return np.power(2, exponents).astype(int).tolist()


def test_segment_length_matches_upstream_formula():
    assert SlideEncoderConfig().segment_length == [1024, 5792, 32768, 185363, 1048576]
    assert gigapath_segment_length(250000, 256) == [1024, 4870, 23170, 110217, 524288]  # run_panda.sh
    for max_wsi in (16384, 65536, 100000, 131072, 250000, 262144, 300000, 524288):
        for tile in (224, 256, 512):
            assert gigapath_segment_length(max_wsi, tile) == _numpy_segment_length(max_wsi, tile), (max_wsi, tile)
    config = SlideEncoderConfig(max_wsi_size=16384)
    reloaded = SlideEncoderConfig.from_dict(config.to_dict())
    assert reloaded.segment_length == [1024, 1448, 2048, 2896, 4096]
    assert SlideEncoderConfig(embed_dim=384, depth=3, num_heads=16).hidden_size == 384
    with pytest.raises(ValueError, match="pooling"):
        SlideEncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="num_attention_heads"):
        SlideEncoderConfig(hidden_size=100, num_attention_heads=16)


def test_position_embedding_matches_mae_table():
    """Upstream builds MAE's table in float64 numpy; row gx * ngrids + gy + 1 is our (gx, gy) embedding."""
    dim, ngrids = 16, 7

    def sincos_1d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(ngrids, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_h, grid_h), axis=0).reshape(2, 1, ngrids, ngrids)
    table = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    table = torch.from_numpy(table).float()  # [ngrids², dim] (row 0 of the upstream table is the CLS zero row)
    cells = torch.tensor([[0, 0], [3, 5], [6, 1], [2, 6]])
    ours = sincos_2d_position_embedding(cells, dim)
    assert torch.equal(ours, table[cells[:, 0] * ngrids + cells[:, 1]])


def test_package_import_registers_auto_classes():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "wsi_slide_encoder",
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        input_dim=8,
    )
    assert isinstance(config, SlideEncoderConfig)
    assert type(AutoModel.from_config(config)) is SlideEncoderModel
    assert wsi_clip.__version__
