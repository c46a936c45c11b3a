"""WSI-CLIP data plumbing (training-side): the collator with class labels and the case-grouped sampler.

Case-grouped sampling puts all slides of a sampled case into the same per-device batch, so every multi-slide case
contributes its full set of positives to a step (by-slide sampling, the Trainer's default random sampler, scatters
them over steps, where they act as ordinary pairs).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from processing.collators import ContrastiveCollator

logger = logging.getLogger(__name__)

SAMPLE_BY = ("slide", "case")


@dataclass
class WSIClipCollator(ContrastiveCollator):
    """:class:`~processing.collators.ContrastiveCollator` plus ``class_labels [B]`` (int64, -1 = unknown) taken
    from the rows' ``label`` column and indexed in ``class_names`` order (the zero-shot classes), for evaluation."""

    class_names: Sequence[str] | None = None
    label_column: str = "label"

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        if self.class_names is not None:
            index = {str(name): i for i, name in enumerate(self.class_names)}
            batch["class_labels"] = torch.tensor(
                [index.get(str(row.get(self.label_column, "")), -1) for row in rows], dtype=torch.long
            )
        return batch


class CaseGroupedSampler(Sampler[int]):
    """Index sampler whose consecutive runs of ``batch_size`` indices are whole cases.

    Used with a ``DataLoader(batch_size=batch_size)`` (the Trainer's), every batch holds complete cases: cases are
    shuffled each epoch (``set_epoch``) and packed first-fit into batches of exactly ``batch_size`` slides (equal
    batch sizes are needed by the cross-rank gather). A case with more slides than ``batch_size`` is split into
    chunks (warned once). The number of batches is a multiple of ``num_replicas`` (accelerate deals batches to
    ranks round-robin) and the same every epoch (short epochs re-use random batches; long ones are truncated).

    Args:
        case_ids: case id of every dataset row.
        batch_size: per-device batch size.
        num_replicas: number of data-parallel processes.
        seed: shuffling seed (the same on every rank).
    """

    def __init__(self, case_ids: Sequence[Any], batch_size: int, num_replicas: int = 1, seed: int = 0):
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(
                f"CaseGroupedSampler: batch_size={batch_size} and num_replicas={num_replicas} must be >= 1."
            )
        groups: OrderedDict[str, list[int]] = OrderedDict()
        for index, case in enumerate(case_ids):
            groups.setdefault(str(case), []).append(index)
        self.cases: list[list[int]] = []
        oversized = 0
        for members in groups.values():
            if len(members) > batch_size:
                oversized += 1
            self.cases.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
        if oversized:
            logger.warning(
                "CaseGroupedSampler: %d case(s) have more slides than batch_size=%d and are split over "
                "batches; raise per_device_train_batch_size to keep them whole.",
                oversized,
                batch_size,
            )
        self.batch_size, self.num_replicas, self.seed, self.epoch = batch_size, num_replicas, seed, 0
        self.num_batches = (len(self._pack(0)) // num_replicas) * num_replicas
        if self.num_batches == 0:
            raise ValueError(
                f"CaseGroupedSampler: {len(case_ids)} slides in {len(groups)} cases cannot fill "
                f"{num_replicas} batch(es) of {batch_size} slides; lower the batch size or add data."
            )

    def _pack(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.cases), generator=generator).tolist()
        open_batches: list[list[int]] = []
        full: list[list[int]] = []
        for case_index in order:
            case = self.cases[case_index]
            target = next((b for b in open_batches if len(b) + len(case) <= self.batch_size), None)
            if target is None:
                target = []
                open_batches.append(target)
            target.extend(case)
            if len(target) == self.batch_size:
                open_batches.remove(target)
                full.append(target)
        return full  # partly filled batches are dropped (like drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        batches = self._pack(self.epoch)
        if len(batches) < self.num_batches:  # rare: a packing with fewer full batches than epoch 0's
            generator = torch.Generator().manual_seed(self.seed + self.epoch + 10_000)
            extra = torch.randint(len(batches), (self.num_batches - len(batches),), generator=generator).tolist()
            batches += [batches[i] for i in extra]
        for batch in batches[: self.num_batches]:
            yield from batch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


__all__ = ["WSIClipCollator", "CaseGroupedSampler", "SAMPLE_BY"]
