"""``scripts/benchmark.py llava``: the trained-mode code path end to end on a tiny random WSI-LLaVA (seconds), the
benchmark's prefill against the model's own forward, and the enlarged slides. Numbers are not checked here (the
benchmark measures them); only that every section runs and reports what it should."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"))

import bench_llava  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A finished-demo layout: data/ (tiny demo data set + llava_stage3_train.json) and a saved tiny model."""
    from processing import WSIProcessor
    from wsi_llava.word_tokenizer import build_word_tokenizer

    from demo_data import make_demo_dataset
    from wsillava_utils import TILE_DIM, tiny_model

    root = tmp_path_factory.mktemp("demo")
    data = root / "data"
    make_demo_dataset(data, num_cases=12, feature_dim=TILE_DIM, min_tiles=20, max_tiles=40, seed=3)
    train = json.loads((data / "llava_caption_train.json").read_text()) + json.loads(
        (data / "llava_diagnosis_train.json").read_text()
    )
    (data / "llava_stage3_train.json").write_text(json.dumps(train))
    texts = []
    for path in data.glob("llava_*.json"):
        texts += [t["value"] for r in json.loads(path.read_text()) for t in r["conversations"]]
    processor = WSIProcessor(tokenizer=build_word_tokenizer(texts, ["<slide>"]), max_tiles=32, feature_dim=TILE_DIM)
    processor.ensure_slide_token()
    model = tiny_model(processor, token_selection="prumerge_plus", token_selection_kwargs={"max_tokens": 8})
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root


def test_trained_mode_runs_every_section(demo_run, capsys):
    args = bench_llava.Args(
        model=str(demo_run / "model"),
        data_dir=str(demo_run / "data"),
        max_tokens=8,
        report_items=2,
        report_max_new_tokens=4,
        prefill_items=2,
        prefill_repeats=1,
        large_tiles=[96],
        large_repeats=1,
        large_accuracy_tiles=96,
        large_accuracy_items=2,
        train_batch=2,
        train_repeats=1,
        train_max_tiles=32,
        train_max_length=400,
        output=str(demo_run / "bench.json"),
    )
    report = bench_llava.run(args)
    out = capsys.readouterr().out
    held = {r["strategy"]: r for r in report["held_out"]["strategies"]}
    assert list(held) == bench_llava.ALL_STRATEGIES
    for name, row in held.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["prefill_s"] > 0 and "rouge_l" in row
        if name in bench_llava.CAPPED:
            assert row["kept_max"] <= 8, (name, row["kept_max"])
    assert held["none"]["kept_mean"] == pytest.approx(report["held_out"]["tiles_mean"])
    big = report["enlarged"]["sizes"][0]
    assert big["tiles"] == 96 and big["strategies"]["none"]["kept_mean"] == 96
    assert big["strategies"]["prumerge_plus"]["kept_mean"] <= 8
    assert set(report["enlarged"]["accuracy"]["strategies"]) == set(bench_llava.ALL_STRATEGIES)
    step = report["train_step"]
    assert step["slide"]["step_s"] > 0 and step["text_only"]["step_s"] > 0 and step["ratio"] > 0
    assert step["slide"]["sequence"] > step["text_only"]["sequence"] - 1  # the slide adds visual tokens
    for heading in (
        "## Held-out test split",
        "## Enlarged slides",
        "## Training step",
        "## Targets",
        "| strategy | visual tokens kept | prefill ms | speed-up vs none |",
    ):
        assert heading in out, heading
    assert json.loads((demo_run / "bench.json").read_text())["verdicts"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="run_demo.py"):
        bench_llava.run(bench_llava.Args(model=str(tmp_path / "nope"), data_dir=str(tmp_path)))


@torch.no_grad()
@pytest.mark.parametrize("prepend", [False, True])
@pytest.mark.parametrize("name", bench_llava.ALL_STRATEGIES)
def test_spliced_prefill_matches_the_model_forward(demo_run, name, prepend):
    """The timed path (cached tower outputs → selection → projector → splice → LM prefill) gives the logits of
    the model's own forward at the last prompt position, and splices as many visual tokens."""
    from processing import WSIProcessor, load_annotations
    from wsi_llava import WSILlavaForConditionalGeneration, build_generation_inputs
    from wsi_llava.evaluation import evaluation_items

    model = WSILlavaForConditionalGeneration.from_pretrained(demo_run / "model").eval()
    model.config.prepend_slide_embedding = prepend  # new models put the slide embedding first (from_parts)
    processor = WSIProcessor.from_pretrained(demo_run / "model")
    item = evaluation_items(load_annotations(demo_run / "data" / "llava_diagnosis_test.json", "llava"))[0]
    batch = build_generation_inputs(processor, [item["h5_path"]], [item["history"]])
    options = bench_llava.selection_kwargs(name, 8)
    logits, kept = bench_llava.SplicedPrefill(model, batch, "cpu")(name, options)
    reference = model(**batch, token_selection=name, token_selection_kwargs=options)
    torch.testing.assert_close(logits[0, -1], reference.logits[0, -1], rtol=1e-4, atol=1e-4)
    assert kept == int(reference.visual_token_counts[0])


def test_enlarged_slide_has_exactly_the_tiles_asked_on_distinct_cells():
    from processing.slide_io import SlideFeatures

    gen = torch.Generator().manual_seed(0)
    slides = []
    for n, columns in ((30, 5), (17, 4)):
        i = torch.arange(n)
        coords = torch.stack([(i % columns) * 256 + 512, (i // columns) * 256 + 1024], 1)
        slides.append(SlideFeatures(torch.randn(n, 4, generator=gen), coords, 256, None, "memory"))
    block = bench_llava._block_cells(slides, 256)
    features, coords = bench_llava.enlarge_slide(slides, 200, block, 256, slide_ngrids=1000)
    assert features.shape == (200, 4) and coords.shape == (200, 2)
    assert len({tuple(c) for c in coords.tolist()}) == 200  # no two tiles on one cell
    assert torch.equal(features[:30], slides[0].features)  # the item's own slide comes first, whole
    assert int(coords.min()) == 0
    with pytest.raises(ValueError, match="slide_ngrids"):
        bench_llava.enlarge_slide(slides, 5000, block, 256, slide_ngrids=20)


@torch.no_grad()
def test_text_only_floor_is_the_prompt_without_the_slide(demo_run):
    from processing import WSIProcessor, load_annotations
    from wsi_llava import WSILlavaForConditionalGeneration, build_generation_inputs
    from wsi_llava.evaluation import evaluation_items

    model = WSILlavaForConditionalGeneration.from_pretrained(demo_run / "model").eval()
    processor = WSIProcessor.from_pretrained(demo_run / "model")
    item = evaluation_items(load_annotations(demo_run / "data" / "llava_diagnosis_test.json", "llava"))[0]
    runner = bench_llava.SplicedPrefill(
        model, build_generation_inputs(processor, [item["h5_path"]], [item["history"]]), "cpu"
    )
    text = build_generation_inputs(processor, None, [item["history"]])  # the same prompt without the placeholder
    torch.testing.assert_close(
        runner.text_only()[0, -1], model(input_ids=text["input_ids"]).logits[0, -1], rtol=1e-4, atol=1e-4
    )
