"""Batched question answering over slides: left-padded prompts + slides → ``generate()`` → text.

Training-side helper (not Hub-shipped). Prompts are tokenised exactly like ``WSIProcessor.build_instruction_example``
tokenises training conversations (same template, same BOS rule), so the model sees at inference what it saw in
training up to the assistant prefix.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import BatchFeature


def _prompt_ids(processor: Any, question: str | Sequence[dict[str, str]]) -> list[int]:
    tokenizer = processor.tokenizer
    text = processor.build_generation_prompt(question)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos) \
            and not text.startswith(tokenizer.bos_token or "\0"):
        ids = [bos] + ids
    return ids


def build_generation_inputs(processor: Any, slides: Sequence[Any], questions: Sequence[str | Sequence[dict]], *,
                            max_tiles: int | None = None, tile_sampling: str | None = None) -> BatchFeature:
    """Slides (H5 paths, ``SlideFeatures``, tensors …) + questions (strings or conversations ending with a user turn)
    → ``tile_features``/``tile_coords``/``tile_mask`` and **left-padded** ``input_ids``/``attention_mask``."""
    if len(slides) != len(questions):
        raise ValueError(f"got {len(slides)} slides but {len(questions)} questions; pass one question per slide.")
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    loaded = [processor.load_slide(s, max_tiles=max_tiles, tile_sampling=tile_sampling) for s in slides]
    data: dict[str, torch.Tensor] = dict(processor.pad_slides(loaded))
    prompts = [_prompt_ids(processor, q) for q in questions]
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # [B, T] left padded
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[i, length - len(ids):] = 1
    data.update(input_ids=input_ids, attention_mask=attention)
    return BatchFeature(data=data, tensor_type="pt")


@torch.no_grad()
def generate_answers(model: Any, processor: Any, slides: Sequence[Any], questions: Sequence[str | Sequence[dict]], *,
                     batch_size: int = 8, max_tiles: int | None = None, tile_sampling: str | None = None,
                     progress: bool = False, **generate_kwargs: Any) -> list[str]:
    """Answer ``questions[i]`` about ``slides[i]`` in batches; greedy unless ``do_sample=True`` is passed.

    Returns the decoded new text of each answer (``processor.batch_decode(..., skip_special_tokens=True)``).
    """
    from tqdm.auto import tqdm

    generate_kwargs.setdefault("max_new_tokens", 64)
    generate_kwargs.setdefault("do_sample", False)
    tokenizer = processor.tokenizer
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else tokenizer.eos_token_id)
    if tokenizer.eos_token_id is not None:
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        batch = build_generation_inputs(processor, slides[start:start + batch_size],
                                        questions[start:start + batch_size], max_tiles=max_tiles,
                                        tile_sampling=tile_sampling).to(device)
        ids = model.generate(**batch, **generate_kwargs)
        answers.extend(t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True))
    return answers


__all__ = ["build_generation_inputs", "generate_answers"]
