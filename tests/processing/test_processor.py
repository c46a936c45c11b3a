"""WSIProcessor: inputs of every kind, padding, feature-dim checks, prompts/labels, save/load round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from processing import PromptError, SlideFeatures, SlideFormatError, WSIProcessor, read_slide, write_slide

from conftest import grid_coords


@pytest.fixture
def processor(tiny_tokenizer):
    proc = WSIProcessor(tiny_tokenizer, max_tiles=8, tile_sampling="uniform", feature_dim=4)
    assert proc.ensure_slide_token() == 1 and proc.ensure_slide_token() == 0
    return proc


def test_batch_of_mixed_inputs_is_padded_with_a_mask(processor, tmp_path):
    rng = np.random.default_rng(0)
    path = write_slide(tmp_path / "a.h5", rng.standard_normal((20, 4)), grid_coords(20), layout="trident")
    sf = SlideFeatures(torch.randn(3, 4), torch.from_numpy(grid_coords(3)))
    feats = torch.randn(5, 4)
    batch = processor(
        slides=[path, sf, (feats, grid_coords(5)), torch.randn(2, 4)],
        text=["the tumor", "a", "invasive ductal carcinoma", "normal"],
    )
    assert batch["tile_features"].shape == (4, 8, 4) and batch["tile_features"].dtype == torch.float32
    assert batch["tile_coords"].shape == (4, 8, 2) and batch["tile_coords"].dtype == torch.int64
    assert batch["tile_mask"].sum(1).tolist() == [8, 3, 5, 2]
    assert float(batch["tile_features"][1, 3:].abs().sum()) == 0.0  # padding is zeros
    assert not batch["tile_mask"][1, 3:].any()
    torch.testing.assert_close(batch["tile_features"][2, :5], feats)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape
    # the capped file slide is the uniform sample of the full slide
    full = read_slide(path)
    idx = ((np.arange(8) + 0.5) * 20 / 8).astype(int)
    torch.testing.assert_close(batch["tile_features"][0], full.features[idx])


def test_single_slide_and_text_only(processor):
    assert processor(slides=torch.randn(3, 4))["tile_features"].shape == (1, 3, 4)
    out = processor(text="the tumor")
    assert set(out) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="needs `slides`, `text`"):
        processor()


def test_feature_dim_and_bad_in_memory_slides_are_refused(processor):
    with pytest.raises(SlideFormatError, match="dimension 5 but this processor / model expects 4"):
        processor(slides=[torch.randn(3, 5)])
    with pytest.raises(SlideFormatError, match=r"coords must be \[N, 2\]"):
        processor(slides=[(torch.randn(3, 4), torch.zeros(2, 2))])
    with pytest.raises(SlideFormatError, match="float16 coordinates"):
        processor(slides=[(torch.randn(2, 4), torch.tensor([[0.0, 0.0], [256.0, 0.0]]).half())])
    with pytest.raises(SlideFormatError, match="duplicated"):
        processor(slides=[(torch.randn(2, 4), torch.zeros(2, 2, dtype=torch.long))])
    with pytest.raises(SlideFormatError, match="NaN"):
        processor(slides=[torch.full((2, 4), float("nan"))])


def test_instruction_labels_cover_only_answers(processor, tiny_tokenizer):
    conv = [
        {"role": "user", "content": "what is the grade ?"},
        {"role": "assistant", "content": "high grade"},
        {"role": "user", "content": "is necrosis present ?"},
        {"role": "assistant", "content": "yes"},
    ]
    ex = processor.build_instruction_example(conv)
    tokens = tiny_tokenizer.convert_ids_to_tokens(ex["input_ids"])
    trained = [t for t, lab in zip(tokens, ex["labels"]) if lab != -100]
    assert trained == ["high", "grade", "</s>", "yes", "</s>"]
    assert tokens.count("<slide>") == 1 and tokens.index("<slide>") < tokens.index("what")
    assert ex["labels"][tokens.index("<slide>")] == -100


def test_truncation_that_drops_the_answer_or_placeholder_is_an_error(processor):
    conv = [{"role": "user", "content": "what is the type of the tumor ?"}, {"role": "assistant", "content": "b"}]
    full = processor.build_instruction_example(conv)
    n = len(full["input_ids"])
    assert len(processor.build_instruction_example(conv, max_length=n - 1)["input_ids"]) == n - 1  # eos cut
    with pytest.raises(PromptError, match="cuts off the whole answer"):
        processor.build_instruction_example(conv, max_length=n - 3)
    with pytest.raises(PromptError, match="cuts off the slide placeholder"):
        processor.build_instruction_example(conv, max_length=2)


def test_missing_placeholder_token_is_an_error(tiny_tokenizer):
    proc = WSIProcessor(tiny_tokenizer)
    with pytest.raises(PromptError, match="ensure_slide_token"):
        proc.build_instruction_example([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_chat_template_spans(processor):
    processor.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    conv = [{"role": "user", "content": "what is the grade ?"}, {"role": "assistant", "content": "low grade"}]
    ex = processor.build_instruction_example(conv)
    tokens = processor.tokenizer.convert_ids_to_tokens(ex["input_ids"])
    trained = [t for t, lab in zip(tokens, ex["labels"]) if lab != -100]
    assert trained[:2] == ["low", "grade"] and "what" not in trained
    assert processor.build_generation_prompt("what is the grade ?").endswith("<s>assistant:")


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["max_tiles"] == 8 and config["feature_dim"] == 4 and config["slide_token"] == "<slide>"
    loaded = WSIProcessor.from_pretrained(tmp_path)
    assert (loaded.max_tiles, loaded.tile_sampling, loaded.feature_dim) == (8, "uniform", 4)
    assert loaded.slide_token_id == processor.slide_token_id
    text = ["invasive ductal carcinoma of the breast"]
    assert loaded(text=text)["input_ids"].tolist() == processor(text=text)["input_ids"].tolist()


def test_auto_processor_loads_without_remote_code(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "WSIProcessor" and loaded.max_tiles == 8
