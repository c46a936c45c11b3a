"""Batch collators that read slides lazily, at collate time.

Datasets hold only paths and texts; each batch opens its H5 files (inside DataLoader workers when
``num_workers > 0``), reads only the sampled rows and closes them again. No handle is kept open across calls,
so workers forked from the main process never share an HDF5 handle, and memory stays flat as the dataset grows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .annotations import row_patch_size
from .processing_wsi import WSIProcessor


def stable_id(value: Any) -> int:
    """A process-independent, non-negative int64 id of a string (Python's ``hash`` is salted per process).

    Non-negative because the contrastive loss reserves negative ids for "no pair" rows.
    """
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class _SlideBatcher:
    """Lazy slide reading shared by the collators.

    With ``seed`` set, each row's random tiles are drawn from ``(seed, epoch, row, h5_path)`` rather than torch's
    global RNG: the same tiles whatever the DataLoader worker, the number of processes, or a resume from a
    checkpoint (the trainers' ``ResumableTrainerMixin`` sets ``epoch``). ``seed=None`` uses the global RNG.
    """

    processor: WSIProcessor
    max_tiles: int | None = None
    tile_sampling: str | None = None
    seed: int | None = None
    epoch: int = 0
    patch_size_level0: int | None = None  # override of every file's tile side (a row's column wins)

    def row_seed(self, row: dict[str, Any]) -> int | None:
        """The tile-sampling seed of ``row`` in the current epoch (``None`` without a collator seed).

        Keyed by the file *name*, not its absolute path, so a data set moved to another folder samples the same tiles.
        """
        if self.seed is None:
            return None
        return stable_id(f"{self.seed}/{self.epoch}/{row.get('row', '')}/{Path(str(row['h5_path'])).name}")

    def _slides(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        slides = [
            self.processor.load_slide(
                row["h5_path"],
                max_tiles=self.max_tiles,
                tile_sampling=self.tile_sampling,
                seed=self.row_seed(row),
                patch_size_level0=row_patch_size(row, self.patch_size_level0),
            )
            for row in rows
        ]
        return self.processor.pad_slides(slides)


@dataclass
class ContrastiveCollator(_SlideBatcher):
    """Rows ``{h5_path, caption, case_id}`` → slides, tokenised captions and ids for multi-positive losses.

    Returns ``tile_features [B, N, D]``, ``tile_coords [B, N, 2]``, ``tile_mask [B, N]``, ``input_ids`` /
    ``attention_mask [B, T]``, ``case_ids [B]`` (int64, equal for slides of one case on every rank) and
    ``text_ids [B]`` (int64 hash of the caption, so identical texts can be treated as positives).
    """

    text_max_length: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._slides(rows)
        captions = [str(row["caption"]) for row in rows]
        batch.update(self.processor(text=captions, padding=True, truncation=True, max_length=self.text_max_length).data)
        batch["case_ids"] = torch.tensor(
            [stable_id(row.get("case_id") or row.get("slide_id") or row["h5_path"]) for row in rows], dtype=torch.long
        )
        batch["text_ids"] = torch.tensor([stable_id(c) for c in captions], dtype=torch.long)
        return batch


@dataclass
class InstructionCollator(_SlideBatcher):
    """Rows ``{h5_path, conversations | question+answer}`` → slides + prompt tokens + labels + question mask.

    Labels are -100 on every prompt token (system/user turns, template text, the slide placeholder) and on
    padding; only assistant replies are trained. ``question_mask [B, T]`` marks the tokens of the question answered
    first (what prompt-guided token selection reads, as at inference). Right padding (training); generation pads
    left itself.
    """

    max_length: int | None = None
    text_only: bool = False  # the no-slide baseline: same prompts without the placeholder, no slide read

    def example(self, row: dict[str, Any]) -> dict[str, list[int]]:
        """Token ids + labels of one row; :class:`~processing.errors.PromptError` naming the file and annotation row
        when the placeholder is missing or truncation drops it or the answer (the pre-flight calls this too)."""
        conversation = row.get("conversations") or [
            {"role": "user", "content": str(row["question"])},
            {"role": "assistant", "content": str(row["answer"])},
        ]
        source = f"{row.get('h5_path', '?')} (annotation row {row.get('row', '?')})"
        return self.processor.build_instruction_example(
            conversation, self.max_length, source, with_slide=not self.text_only
        )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {} if self.text_only else self._slides(rows)
        examples = [self.example(row) for row in rows]
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(rows), length), -100, dtype=torch.long)  # [B, T]
        attention = torch.zeros((len(rows), length), dtype=torch.long)  # [B, T]
        question = torch.zeros((len(rows), length), dtype=torch.bool)  # [B, T]
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            question[i, :n] = torch.tensor(e["question_mask"], dtype=torch.bool)
            attention[i, :n] = 1
        batch.update(input_ids=input_ids, attention_mask=attention, labels=labels, question_mask=question)
        return batch


__all__ = ["ContrastiveCollator", "InstructionCollator", "stable_id"]
