"""Raw slide → tile features on the real CMU-1 Aperio slide (2220 × 2967 px, 0.499 µm/px, 20×) with a tiny randomly
initialised transformers ViT: segmentation, tiling (20× and 10×), the H5 the rest of the package reads, resume after
a kill, two processes = one, bad files reported by name."""

from __future__ import annotations

import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("openslide")
pytest.importorskip("cv2")

from processing import read_slide  # noqa: E402
from processing.feature_extraction import ExtractionOptions, extract_features, extract_slide  # noqa: E402
from processing.tile_encoders import load_tile_encoder  # noqa: E402
from processing.tiling import tile_grid  # noqa: E402
from processing.tissue_segmentation import segment_tissue  # noqa: E402
from processing.whole_slide import magnification_from_mpp, open_slide  # noqa: E402

from conftest import SHARED  # noqa: E402

CMU1 = SHARED / "data" / "openslide-cmu-small-region" / "CMU-1-Small-Region.svs"
WIDTH, HEIGHT = 2220, 2967


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def slides_dir(tmp_path):
    if not CMU1.is_file():
        pytest.skip(f"{CMU1} is absent")
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(CMU1, folder / "CMU-1.svs")
    return folder


def _options(**kwargs) -> ExtractionOptions:
    return ExtractionOptions(**{"batch_size": 16, "num_workers": 0, "thumbnail_size": 1024, **kwargs})


def test_slide_properties_and_tissue_mask():
    if not CMU1.is_file():
        pytest.skip(f"{CMU1} is absent (../shared sits beside the checkout in CI)")
    slide = open_slide(CMU1)
    assert (slide.width, slide.height, slide.level0_magnification, slide.magnification_source) == (
        WIDTH, HEIGHT, 20.0, "objective-power",
    )  # fmt: skip
    assert slide.mpp == pytest.approx(0.499)
    thumbnail, downsample = slide.thumbnail(1024)
    tissue = segment_tissue(thumbnail, downsample, slide.mpp)
    assert 0.1 < tissue.tissue_fraction < 0.8  # not empty, not the whole slide (the glass is ≈ 2/3 of it)
    geojson = tissue.to_geojson()
    assert geojson["features"] and all(f["geometry"]["type"] == "Polygon" for f in geojson["features"])
    for feature in geojson["features"]:
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all() and len(ring) >= 4  # closed
        assert (ring >= 0).all() and (ring[:, 0] <= WIDTH).all() and (ring[:, 1] <= HEIGHT).all()
    assert slide.read_tile(0, 0, 512, 256).shape == (256, 256, 3)
    slide.close()
    given = open_slide(CMU1, level0_magnification=40)
    assert given.magnification_source == "given" and given.level0_magnification == 40.0
    given.close()
    assert [magnification_from_mpp(m) for m in (0.25, 0.2527, 0.5, 1.0)] == [40.0, 40.0, 20.0, 10.0]


def test_tile_grid_geometry():
    grid = tile_grid(WIDTH, HEIGHT, 40.0, 20.0, patch_size=256, overlap=64)
    assert grid.patch_size_level0 == 512 and grid.attributes()["overlap"] == 64
    steps = np.diff(np.unique(grid.coords[:, 0]))
    assert (steps == 384).all()  # (256 - 64) target px × 2
    assert (grid.coords[:, 0] + 512 <= WIDTH).all() and (grid.coords[:, 1] + 512 <= HEIGHT).all()
    with pytest.raises(ValueError, match="above the scanned resolution"):
        tile_grid(WIDTH, HEIGHT, 20.0, 40.0)


@pytest.mark.parametrize(("magnification", "size_level0"), [(20.0, 256), (10.0, 512)])
def test_extracted_h5_reads_back_with_its_patch_size(tiny_vit, slides_dir, tmp_path, magnification, size_level0):
    """10× tiles on this 20× scan stand for the 40× case: the patch size at level 0 is twice the tile size."""
    encoder = load_tile_encoder(str(tiny_vit))
    out = tmp_path / "features"
    result = extract_slide(slides_dir / "CMU-1.svs", out, encoder, _options(target_magnification=magnification))
    slide = read_slide(out / "CMU-1.h5")
    assert slide.patch_size_level0 == size_level0 and slide.patch_size_source == "file"
    assert slide.features.shape == (result.num_tiles, 32) and result.num_tiles > 4
    coords = slide.coords.numpy()
    assert (coords % size_level0 == 0).all()
    assert (coords[:, 0] + size_level0 <= WIDTH).all() and (coords[:, 1] + size_level0 <= HEIGHT).all()
    assert result.num_tiles < (WIDTH // size_level0) * (HEIGHT // size_level0)  # the glass is left out
    with h5py.File(out / "CMU-1.h5") as f:
        attrs = dict(f["coords"].attrs)
    assert attrs["target_magnification"] == magnification and attrs["level0_magnification"] == 20.0
    assert (attrs["level0_width"], attrs["level0_height"], attrs["overlap"]) == (WIDTH, HEIGHT, 0)
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == size_level0
    assert (out / "segmentation" / "CMU-1.png").stat().st_size > 1000
    assert json.loads((out / "segmentation" / "CMU-1.geojson").read_text())["type"] == "FeatureCollection"
    # the features are the encoder's on the very tiles the coordinates name
    x, y = coords[0]
    tile = open_slide(CMU1).read_tile(int(x), int(y), size_level0, 256)
    expected = encoder(encoder.preprocess(tile)[None])[0]
    torch.testing.assert_close(slide.features[0], expected, rtol=1e-4, atol=1e-4)


def test_resume_after_a_kill_and_bad_files_reported(tiny_vit, slides_dir, tmp_path, monkeypatch):
    (slides_dir / "broken.svs").write_bytes(b"not a slide" * 100)
    shutil.copy(CMU1, slides_dir / "second.svs")
    encoder = load_tile_encoder(str(tiny_vit))
    out = tmp_path / "features"
    calls = {"n": 0}
    forward = type(encoder).forward

    def killed_on_the_second_batch(self, pixel_values):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        return forward(self, pixel_values)

    monkeypatch.setattr(type(encoder), "forward", killed_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_features(slides_dir, out, encoder, _options())
    assert not list(out.glob("*.h5"))  # nothing half-written under a final name
    monkeypatch.setattr(type(encoder), "forward", forward)
    (out / ".broken.h5.partial").write_bytes(b"truncated")  # what a kill during a write leaves (a slide that fails)

    results = {r.slide: r for r in extract_features(slides_dir, out, encoder, _options())}
    assert results["CMU-1"].status == "done" and results["second"].status == "done"
    assert not (out / ".broken.h5.partial").exists()
    assert results["broken"].status == "failed" and "broken.svs" in results["broken"].error
    assert "OpenSlide cannot read it" in results["broken"].error
    written = (out / "CMU-1.h5").stat().st_mtime_ns
    again = {r.slide: r.status for r in extract_features(slides_dir, out, encoder, _options())}
    assert again == {"CMU-1": "skipped", "second": "skipped", "broken": "failed"}
    assert (out / "CMU-1.h5").stat().st_mtime_ns == written
    with (out / "extraction_report.csv").open() as fh:
        report = {row["slide"]: row for row in csv.DictReader(fh)}
    assert report["CMU-1"]["status"] == "done" and int(report["CMU-1"]["num_tiles"]) == results["CMU-1"].num_tiles
    assert report["broken"]["status"] == "failed"
    with pytest.raises(Exception, match="broken.svs"):
        extract_features([slides_dir / "broken.svs"], tmp_path / "strict", encoder, _options(), stop_on_error=True)


def test_two_processes_equal_one_and_workers_equal_no_workers(tiny_vit, slides_dir, tmp_path):
    shutil.copy(CMU1, slides_dir / "second.svs")
    encoder = load_tile_encoder(str(tiny_vit))
    extract_features(slides_dir, tmp_path / "one", encoder, _options())
    shares = [
        extract_features(slides_dir, tmp_path / "two", encoder, _options(num_workers=2), rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert [[r.slide for r in share] for share in shares] == [["CMU-1"], ["second"]]  # each slide once
    for name in ("CMU-1", "second"):
        one, two = read_slide(tmp_path / "one" / f"{name}.h5"), read_slide(tmp_path / "two" / f"{name}.h5")
        torch.testing.assert_close(two.features, one.features, rtol=1e-5, atol=1e-5)
        assert torch.equal(two.coords, one.coords)


def test_command_line_and_timm_path(tiny_vit, slides_dir, tmp_path):
    from wsi_clip.commands.extract_features import main

    summary = main(["--slides", str(slides_dir), "--out", str(tmp_path / "f"), "--encoder", str(tiny_vit),
                    "--num_workers", "0", "--batch_size", "8", "--device", "cpu"])  # fmt: skip
    assert summary["done"] == 1 and not summary["failed"] and summary["tiles"] > 0
    with pytest.raises(OSError, match="--allow_download true fetches it"):
        load_tile_encoder("someone/not-here")
    try:
        import timm  # noqa: F401
    except Exception as err:  # timm pulls torchvision, whose PyPI build may not match the CPU torch
        pytest.skip(f"timm path not tested: timm does not import here ({type(err).__name__}: {err})")
    with pytest.raises(ValueError, match="give local weights"):
        load_tile_encoder("timm:vit_tiny_patch16_224")


@pytest.mark.slow
def test_extracted_folder_feeds_embedding_clip_and_llava_as_it_is(tiny_vit, slides_dir, tmp_path):
    """Raw slides → features → WSI-CLIP training → cohort embeddings → WSI-LLaVA stage 2, on the files as written."""
    from wsi_clip.commands.embed import main as embed
    from wsi_clip.commands.extract_features import main as extract
    from wsi_clip.commands.train import main as train_clip
    from wsi_llava.commands.train import main as train_llava

    from wsiclip_helpers import save_text_model, write_rows

    for name in ("second", "third"):
        shutil.copy(CMU1, slides_dir / f"{name}.svs")
    features = tmp_path / "features"
    extract(["--slides", str(slides_dir), "--output_dir", str(features), "--encoder", str(tiny_vit),
             "--num_workers", "0", "--target_magnification", "10"])  # fmt: skip
    captions = ["squamous epithelium.", "keratinised skin.", "squamous epithelium."]
    rows = [{"h5_path": f"{n}.h5", "caption": c, "case_id": f"c{i}"}
            for i, (n, c) in enumerate(zip(("CMU-1", "second", "third"), captions))]  # fmt: skip
    annotations = write_rows(features / "annotations.csv", rows)
    text = save_text_model(tmp_path / "text", captions)
    common = ["--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--max_steps", "2",
              "--per_device_train_batch_size", "3"]  # fmt: skip
    train_clip(["--train_file", str(annotations), "--text_model_name_or_path", str(text), "--slide_tower", "abmil",
                "--slide_config", '{"hidden_size": 16, "attention_dim": 8}', "--projection_dim", "8",
                "--output_dir", str(tmp_path / "clip"), *common])  # fmt: skip
    summary = embed(["--model_name_or_path", str(tmp_path / "clip"), "--slides", str(features),
                     "--output_dir", str(tmp_path / "emb")])  # fmt: skip
    assert summary["written"] == 3 and not summary["failed"]
    conversations = [
        {"id": n, "image": f"{n}.h5", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the slide."}, {"from": "gpt", "value": c}]}
        for n, c in zip(("CMU-1", "second", "third"), captions)
    ]  # fmt: skip
    (features / "instruct.json").write_text(json.dumps(conversations))
    metrics = train_llava([
        "--train_file", str(features / "instruct.json"), "--stage", "2", "--tokenizer_name_or_path", "word",
        "--slide_config", '{"input_dim": 32, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, '
        '"intermediate_size": 64}',
        "--language_model_config", '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, '
        '"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}',
        "--max_tiles", "16", "--output_dir", str(tmp_path / "llava"), *common,
    ])  # fmt: skip
    assert np.isfinite(metrics["train_loss"])


@pytest.mark.slow
def test_torchrun_two_processes_split_the_slides_and_report_together(tiny_vit, slides_dir, tmp_path):
    """A real 2-process launch (gloo): each slide once, the features of a one-process run, one merged report, exit
    status 1 because one file is not a slide."""
    import subprocess

    from conftest import REPO_ROOT, torchrun_command

    shutil.copy(CMU1, slides_dir / "second.svs")
    (slides_dir / "broken.svs").write_bytes(b"not a slide" * 100)
    flags = ["--slides", slides_dir, "--encoder", tiny_vit, "--num_workers", "0", "--device", "cpu"]
    done = subprocess.run(
        torchrun_command(REPO_ROOT / "scripts" / "extract_features.py", *flags, "--output_dir", tmp_path / "two"),
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr  # a slide failed
    assert "failed: broken" in done.stdout
    encoder = load_tile_encoder(str(tiny_vit))
    extract_features([slides_dir / "CMU-1.svs", slides_dir / "second.svs"], tmp_path / "one", encoder, _options())
    for name in ("CMU-1", "second"):
        one, two = read_slide(tmp_path / "one" / f"{name}.h5"), read_slide(tmp_path / "two" / f"{name}.h5")
        torch.testing.assert_close(two.features, one.features, rtol=1e-5, atol=1e-5)
    with (tmp_path / "two" / "extraction_report.csv").open() as fh:
        assert {row["slide"]: row["status"] for row in csv.DictReader(fh)} == {
            "CMU-1": "done", "second": "done", "broken": "failed",
        }  # fmt: skip
