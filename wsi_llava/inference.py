"""Batched question answering over slides: left-padded prompts + slides → ``generate()`` → text.

Training-side helper (not Hub-shipped). Prompts come from ``WSIProcessor.build_generation_example``, which tokenises
them piece by piece exactly like ``build_instruction_example`` tokenises training conversations, so a generation
prompt is the training prefix of its answer token for token (and the question mask covers the same question).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature


def build_generation_inputs(
    processor: Any,
    slides: Sequence[Any] | None,
    questions: Sequence[str | Sequence[dict]],
    *,
    max_tiles: int | None = None,
    tile_sampling: str | None = None,
    patch_size_level0: int | None = None,
) -> BatchFeature:
    """Slides (H5 paths, ``SlideFeatures``, tensors …) + questions (strings or conversations ending with a user turn)
    → ``tile_features``/``tile_coords``/``tile_mask`` and **left-padded** ``input_ids``/``attention_mask``/
    ``question_mask`` (the tokens of each prompt's last question, for prompt-guided token selection).
    ``slides=None``: text-only prompts without the slide placeholder (the no-slide baseline); ``patch_size_level0``
    overrides the slides' tile side (``WSIProcessor.load_slide``)."""
    if slides is not None and len(slides) != len(questions):
        raise ValueError(f"got {len(slides)} slides but {len(questions)} questions; pass one question per slide.")
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    data: dict[str, torch.Tensor] = {}
    if slides is not None:
        loaded = [
            processor.load_slide(
                s, max_tiles=max_tiles, tile_sampling=tile_sampling, patch_size_level0=patch_size_level0
            )
            for s in slides
        ]
        data.update(processor.pad_slides(loaded))
    prompts = [processor.build_generation_example(q, with_slide=slides is not None) for q in questions]
    length = max(len(p["input_ids"]) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # [B, T] left padded
    attention = torch.zeros((len(prompts), length), dtype=torch.long)  # [B, T]
    question = torch.zeros((len(prompts), length), dtype=torch.bool)  # [B, T]
    for i, prompt in enumerate(prompts):
        n = len(prompt["input_ids"])
        input_ids[i, length - n :] = torch.tensor(prompt["input_ids"], dtype=torch.long)
        question[i, length - n :] = torch.tensor(prompt["question_mask"], dtype=torch.bool)
        attention[i, length - n :] = 1
    data.update(input_ids=input_ids, attention_mask=attention, question_mask=question)
    return BatchFeature(data=data, tensor_type="pt")


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    slides: Sequence[Any] | None,
    questions: Sequence[str | Sequence[dict]],
    *,
    batch_size: int = 8,
    max_tiles: int | None = None,
    tile_sampling: str | None = None,
    patch_size_level0: int | None = None,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``questions[i]`` about ``slides[i]`` in batches; greedy unless ``do_sample=True`` is passed.

    Returns the decoded new text of each answer (``processor.batch_decode(..., skip_special_tokens=True)``).
    ``slides=None`` answers from the text alone (the no-slide baseline).
    """
    from tqdm.auto import tqdm

    generate_kwargs.setdefault("max_new_tokens", 64)
    generate_kwargs.setdefault("do_sample", False)
    tokenizer = processor.tokenizer
    generate_kwargs.setdefault(
        "pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if tokenizer.eos_token_id is not None:
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        batch = build_generation_inputs(
            processor,
            None if slides is None else slides[start : start + batch_size],
            questions[start : start + batch_size],
            max_tiles=max_tiles,
            tile_sampling=tile_sampling,
            patch_size_level0=patch_size_level0,
        ).to(device)
        ids = model.generate(**batch, **generate_kwargs)
        if slides is None:  # a plain LM generate returns prompt + new tokens; keep the new ones, as with slides
            ids = ids[:, batch["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True))
    return answers


__all__ = ["build_generation_inputs", "generate_answers"]
