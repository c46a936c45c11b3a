"""Input standardisation of the slide towers: statistics, the transform, checkpoint round trip, training command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from processing import tile_feature_statistics, write_slide
from wsi_clip import ABMILModel, MeanPoolingModel, SlideEncoderModel
from wsi_clip.configuration_slide_encoder import SlideEncoderConfig
from wsi_clip.configuration_wsiclip import ABMILConfig, MeanPoolingConfig

DIM = 24
TOWERS = {
    "slide_encoder": lambda norm: SlideEncoderModel(
        SlideEncoderConfig(
            input_dim=DIM, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            dropout=0.0, drop_path_rate=0.0, normalize_tile_features=norm,
        )
    ),
    "abmil": lambda norm: ABMILModel(ABMILConfig(input_dim=DIM, hidden_size=16, attention_dim=8, dropout=0.0,
                                                 normalize_tile_features=norm)),
    "mean": lambda norm: MeanPoolingModel(MeanPoolingConfig(input_dim=DIM, hidden_size=16,
                                                            normalize_tile_features=norm)),
}  # fmt: skip


def _slides(tmp_path, count: int = 4, offset: float = 50.0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    shift = offset * rng.standard_normal(DIM)
    paths, every = [], []
    for i in range(count):
        n = 20 + 7 * i
        feats = (shift + rng.standard_normal((n, DIM)) * rng.uniform(0.5, 3.0, DIM)).astype(np.float32)
        coords = np.stack([np.arange(n) % 5, np.arange(n) // 5], axis=1) * 256
        paths.append(str(write_slide(tmp_path / f"s{i}.h5", feats, coords, dtype="float32")))
        every.append(feats)
    return paths, np.concatenate(every)


def test_statistics_equal_numpy_over_all_tiles(tmp_path):
    paths, every = _slides(tmp_path)
    mean, std, count = tile_feature_statistics(paths + paths[:1], max_tiles_per_slide=10_000)  # duplicates once
    assert count == len(every)
    np.testing.assert_allclose(mean.numpy(), every.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(std.numpy(), every.std(0, ddof=1), rtol=1e-4)
    sub_mean, _, sub_count = tile_feature_statistics(paths, max_tiles_per_slide=8, max_slides=2)
    assert sub_count == 16 and torch.allclose(sub_mean, mean, atol=3.0)  # a sample, near the full mean
    with pytest.raises(ValueError, match="at least one"):
        tile_feature_statistics([])


def test_mixed_dimensions_rejected(tmp_path):
    paths, _ = _slides(tmp_path, count=1)
    other = write_slide(
        tmp_path / "other.h5", np.ones((3, DIM + 1), np.float32), [[0, 0], [256, 0], [512, 0]], dtype="float32"
    )
    with pytest.raises(ValueError, match="other.h5: 25-d"):
        tile_feature_statistics([*paths, str(other)])


@pytest.mark.parametrize("tower", list(TOWERS))
def test_tower_applies_the_transform_and_round_trips(tmp_path, tower):
    paths, every = _slides(tmp_path)
    mean, std, _ = tile_feature_statistics(paths, max_tiles_per_slide=10_000)
    torch.manual_seed(0)
    plain = TOWERS[tower](False).eval()
    normed = TOWERS[tower](True).eval()
    normed.load_state_dict(plain.state_dict(), strict=False)  # same weights; buffers stay identity
    x = torch.from_numpy(every[:30]).view(1, 30, DIM)
    coords = (torch.stack([torch.arange(30) % 6, torch.arange(30) // 6], dim=1) * 256).view(1, 30, 2)
    with torch.no_grad():
        torch.testing.assert_close(normed(x, coords).pooler_output, plain(x, coords).pooler_output)  # identity
        normed.tile_normalization.set_statistics(mean, std)
        expected = plain((x - mean) / std, coords).pooler_output
        got = normed(x, coords).pooler_output
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, plain(x, coords).pooler_output, atol=1e-3)
        normed.save_pretrained(tmp_path / tower)
        loaded = type(normed).from_pretrained(tmp_path / tower).eval()
        torch.testing.assert_close(loaded.tile_normalization.std, std.clamp_min(1e-6))
        torch.testing.assert_close(loaded(x, coords).pooler_output, got)
    with pytest.raises(ValueError, match=rf"\[{DIM}\]"):
        normed.tile_normalization.set_statistics(mean[:3], std[:3])
    with pytest.raises(ValueError, match="NaN"):
        normed.tile_normalization.set_statistics(mean * float("nan"), std)
    assert plain.tile_normalization is None


@pytest.mark.parametrize("flag", [True, False])
def test_train_command_builds_and_standardises_a_new_tower(tmp_path, flag):
    """``normalize_tile_features`` reaches a new tower's config; the command's helper fills its buffers."""
    import json

    from wsi_clip.arguments import ModelArguments
    from wsi_clip.commands.train import build_model, standardize_tile_inputs

    from wsiclip_helpers import save_text_model

    paths, every = _slides(tmp_path)
    text = save_text_model(tmp_path / "text", ["a report."])
    args = ModelArguments(
        slide_tower="abmil",
        slide_config=json.dumps({"hidden_size": 16, "attention_dim": 8}),
        text_model_name_or_path=str(text),
        projection_dim=8,
        normalize_tile_features=flag,
    )
    model = build_model(args, DIM)
    assert model.config.slide_config.normalize_tile_features is flag
    standardize_tile_inputs(model, paths, seed=0)
    if not flag:
        assert model.slide_model.tile_normalization is None
        return
    torch.testing.assert_close(
        model.slide_model.tile_normalization.mean, torch.from_numpy(every.mean(0)), atol=1e-4, rtol=1e-5
    )
