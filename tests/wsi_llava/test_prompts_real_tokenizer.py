"""Prompts with SmolLM2's real byte-level BPE tokenizer: the generation prompt of every turn is the training prefix
of that turn's answer token for token, and the question mask covers exactly the current question.

Byte-level BPE tokenizes ``'ASSISTANT: 3'`` as ``[..., ':', 'Ġ', '3']``: when the prompt and the answer are
tokenized as one string, the space becomes an untrained prompt token in training while the generation prompt ends at
``':'`` — the model is then asked to produce a token it never learned to produce.
"""

from __future__ import annotations

import copy

import pytest

from processing import WSIProcessor

ANSWERS = ("3", "yes", "B", "high grade", "12.5 mm")


@pytest.fixture(scope="module")
def processors(smollm2_tokenizer):
    """One processor per prompt format (building one copies and extends a 49k-token vocabulary: seconds)."""
    built = {}
    for chat in (False, True):
        tok = copy.deepcopy(smollm2_tokenizer)
        if not chat:
            tok.chat_template = None  # the plain USER: ... ASSISTANT: format
        processor = WSIProcessor(tok, feature_dim=4)
        processor.ensure_slide_token()
        built[chat] = processor
    return built


def _first_label(labels: list[int], after: int = 0) -> int:
    return next(i for i, label in enumerate(labels) if label != -100 and i >= after)


def _answer_starts(labels: list[int]) -> list[int]:
    """Index of the first token of every trained answer run."""
    return [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_generation_prompt_is_the_training_prefix(processors, smollm2_tokenizer, chat, answer):
    processor = processors[chat]
    question = "What is the tumour grade? Options: 1, 2, 3."
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    example = processor.build_instruction_example(conversation)
    start = _first_label(example["labels"])
    prompt = processor.build_generation_example(question)["input_ids"]
    assert example["input_ids"][:start] == prompt
    # what is trained after the prompt decodes to the answer (the plain format trains the space before it too)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    text = smollm2_tokenizer.decode(trained, skip_special_tokens=True)
    assert text.strip() == answer


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_multi_turn_generation_prompts_are_training_prefixes(processors, chat):
    processor = processors[chat]
    turns = [
        {"role": "user", "content": "Is there necrosis?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Which option, A) G1 B) G2 C) G3?"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "How many mitoses per 10 HPF?"},
        {"role": "assistant", "content": "3"},
    ]
    example = processor.build_instruction_example(turns)
    starts = _answer_starts(example["labels"])
    assert len(starts) == 3
    for k, start in enumerate(starts):
        history = turns[: 2 * k + 1]  # gold earlier turns + the current question
        prompt = processor.build_generation_example(history)["input_ids"]
        assert example["input_ids"][:start] == prompt, f"turn {k}"


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_question_mask_is_the_current_question_only(processors, chat):
    processor = processors[chat]
    tok = processor.tokenizer

    def marked(ids, mask):
        return tok.decode([t for t, m in zip(ids, mask) if m]).strip()

    turns = [
        {"role": "user", "content": "Is there necrosis?"},
        {"role": "assistant", "content": "yes, focal"},
        {"role": "user", "content": "What is the grade?"},
        {"role": "assistant", "content": "high grade"},
    ]
    example = processor.build_instruction_example(turns)
    # training: the question answered first; never the later turn, the answer, or template text
    assert marked(example["input_ids"], example["question_mask"]) == "Is there necrosis?"
    # inference on the first turn: the same question, the same tokens
    first = processor.build_generation_example(turns[:1])
    assert marked(first["input_ids"], first["question_mask"]) == "Is there necrosis?"
    start = _first_label(example["labels"])
    assert example["question_mask"][:start] == first["question_mask"]
    # inference on the second turn (gold history): only the current question, not the earlier answer
    second = processor.build_generation_example(turns[:3])
    assert marked(second["input_ids"], second["question_mask"]) == "What is the grade?"
    # the slide placeholder is never a question token
    slide = processor.slide_token_id
    assert all(not m for t, m in zip(example["input_ids"], example["question_mask"]) if t == slide)


def test_text_only_prompts_have_no_placeholder(processors):
    processor = processors[True]
    conversation = [{"role": "user", "content": "Describe the slide."}, {"role": "assistant", "content": "B"}]
    example = processor.build_instruction_example(conversation, with_slide=False)
    assert processor.slide_token_id not in example["input_ids"]
    prompt = processor.build_generation_example("Describe the slide.", with_slide=False)["input_ids"]
    assert example["input_ids"][: _first_label(example["labels"])] == prompt
