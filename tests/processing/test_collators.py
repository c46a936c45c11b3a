"""Collators read slides lazily at collate time, in DataLoader workers, and build correct batches."""

from __future__ import annotations

import gc

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from processing import ContrastiveCollator, InstructionCollator, WSIProcessor, stable_id, write_slide

from conftest import grid_coords


@pytest.fixture
def rows(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, (n, case) in enumerate([(12, "c1"), (5, "c1"), (9, "c2"), (7, "c3")]):
        path = write_slide(
            tmp_path / f"s{i}.h5",
            rng.standard_normal((n, 4)),
            grid_coords(n),
            layout=["seed", "clam", "trident", "seed"][i],
        )
        out.append(
            {
                "h5_path": str(path),
                "caption": "invasive ductal carcinoma" if case == "c1" else f"tumor {i}",
                "case_id": case,
                "slide_id": f"s{i}",
                "question": "what is the grade ?",
                "answer": "high grade",
                "row": i + 1,
            }
        )
    return out


@pytest.fixture
def processor(tiny_tokenizer):
    proc = WSIProcessor(tiny_tokenizer, max_tiles=10, tile_sampling="random", feature_dim=4)
    proc.ensure_slide_token()
    return proc


def test_contrastive_batch(processor, rows):
    batch = ContrastiveCollator(processor)(rows)
    assert batch["tile_features"].shape == (4, 10, 4) and batch["tile_mask"].sum(1).tolist() == [10, 5, 9, 7]
    cases = batch["case_ids"].tolist()
    assert cases[0] == cases[1] != cases[2] and cases[0] == stable_id("c1")
    assert batch["text_ids"][0] == batch["text_ids"][1] and batch["text_ids"][2] != batch["text_ids"][3]
    assert batch["input_ids"].shape[0] == 4


def test_instruction_batch_masks_prompt_and_padding(processor, rows):
    rows[1]["conversations"] = [
        {"role": "user", "content": "what is the type ?"},
        {"role": "assistant", "content": "invasive ductal carcinoma of the breast"},
    ]
    batch = InstructionCollator(processor, tile_sampling="uniform")(rows)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == attn.shape
    slide_id = processor.slide_token_id
    assert ((ids == slide_id).sum(1) == 1).all()
    assert (labels[ids == slide_id] == -100).all() and (labels[attn == 0] == -100).all()
    tok = processor.tokenizer
    trained0 = tok.decode(ids[0][labels[0] != -100])
    assert trained0 == "high grade </s>"
    assert attn[1].sum() > attn[0].sum()  # longer answer, right padded
    assert batch["tile_mask"].sum(1).tolist() == [10, 5, 9, 7]


def test_workers_read_lazily_and_close_files(processor, rows):
    loader = DataLoader(rows, batch_size=2, num_workers=2, collate_fn=ContrastiveCollator(processor))
    shapes = [b["tile_features"].shape[0] for b in loader]
    assert shapes == [2, 2]
    gc.collect()
    # no HDF5 handle is left open in this process (files are opened and closed per batch)
    ContrastiveCollator(processor)(rows)
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == 0


def test_random_sampling_differs_between_batches_but_follows_the_seed(processor, rows):
    collate = ContrastiveCollator(processor)
    torch.manual_seed(0)
    a = collate(rows[:1])["tile_coords"]
    b = collate(rows[:1])["tile_coords"]
    torch.manual_seed(0)
    assert torch.equal(a, collate(rows[:1])["tile_coords"]) and not torch.equal(a, b)


def test_stable_ids_are_non_negative_and_process_independent():
    import subprocess
    import sys

    ids = [stable_id(f"case-{i}") for i in range(200)]
    assert min(ids) >= 0 and len(set(ids)) == 200  # negative ids mean "no pair" to the loss
    other = subprocess.run(
        [sys.executable, "-c", "from processing import stable_id; print(stable_id('case-7'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert int(other) == ids[7]
