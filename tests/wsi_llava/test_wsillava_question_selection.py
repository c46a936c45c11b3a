"""Prompt-guided Top-K sees the same question in training and at inference: the current user turn's tokens only —
not later turns, not gold answers of earlier turns, no template text — with or without labels."""

from __future__ import annotations

import pytest
import torch

from wsi_llava import build_generation_inputs

from wsillava_utils import random_slides, tiny_model, tiny_processor

TURNS = [
    {"role": "user", "content": "what is the diagnosis ?"},
    {"role": "assistant", "content": "carcinoma B"},
    {"role": "user", "content": "is necrosis present ?"},
    {"role": "assistant", "content": "yes"},
]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model(processor):
    return tiny_model(processor)


def _training_batch(processor, slides, conversation):
    example = processor.build_instruction_example(conversation)
    batch = processor.pad_slides([processor.load_slide(s) for s in slides])
    batch.update(
        input_ids=torch.tensor([example["input_ids"]]),
        labels=torch.tensor([example["labels"]]),
        attention_mask=torch.ones(1, len(example["input_ids"]), dtype=torch.long),
        question_mask=torch.tensor([example["question_mask"]], dtype=torch.bool),
    )
    return batch


@torch.no_grad()
def test_question_embedding_is_the_question_words_only(processor, model):
    batch = _training_batch(processor, random_slides([20]), TURNS)
    got = model.model.question_embedding(batch["input_ids"], batch["question_mask"])
    words = processor.tokenizer("what is the diagnosis ?", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[words].float().mean(0, keepdim=True)
    torch.testing.assert_close(got, expected)


@torch.no_grad()
def test_topk_prompt_selects_the_same_tiles_in_training_and_generation(processor, model):
    slides = random_slides([40])
    options = {"token_selection": "topk_prompt", "token_selection_kwargs": {"max_tokens": 5}}
    batch = _training_batch(processor, slides, TURNS)
    trained = model(**batch, **options).selection_indices
    unlabelled = model(**{k: v for k, v in batch.items() if k != "labels"}, **options).selection_indices
    gen = build_generation_inputs(processor, slides, [TURNS[:1]])
    _, at_inference = model.model.prepare_multimodal_inputs(
        gen["input_ids"],
        gen["tile_features"],
        gen["tile_coords"],
        gen["tile_mask"],
        gen["attention_mask"],
        question_mask=gen["question_mask"],
        padding_side="left",
        **options,
    )
    assert trained.tolist() == unlabelled.tolist() == at_inference.selection_indices.tolist()
    # the second turn at inference (gold history) reads its own question, not the first one or its answer
    second = build_generation_inputs(processor, slides, [TURNS[:3]])
    q2 = model.model.question_embedding(second["input_ids"], second["question_mask"])
    words = processor.tokenizer("is necrosis present ?", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(q2, model.get_input_embeddings().weight[words].float().mean(0, keepdim=True))


def test_topk_prompt_without_question_mask_is_an_error(processor, model):
    batch = _training_batch(processor, random_slides([10]), TURNS)
    batch.pop("question_mask")
    with pytest.raises(ValueError, match="question_mask"):
        model(**batch, token_selection="topk_prompt")
