"""WSI-LLaVA model: splice of ragged visual tokens, gamma rule, batched generation, loading (registered + remote)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import wsi_llava
from wsi_llava import WSILlavaForConditionalGeneration, WSILlavaModel, build_generation_inputs

from wsillava_utils import random_slides, tiny_model, tiny_processor

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model(processor):
    return tiny_model(processor)


def _training_batch(processor, sizes, conversations):
    from processing import InstructionCollator

    collator = InstructionCollator(processor)
    slides = [processor.load_slide(s) for s in random_slides(sizes)]
    batch = processor.pad_slides(slides)
    rows = [{"h5_path": "mem", "conversations": c} for c in conversations]
    examples = [processor.build_instruction_example(c) for c in conversations]
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(rows), length), processor.tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    question = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        question[i, : len(e["input_ids"])] = torch.tensor(e["question_mask"], dtype=torch.bool)
        mask[i, : len(e["input_ids"])] = 1
    del collator
    return dict(batch, input_ids=ids, attention_mask=mask, labels=labels, question_mask=question)


def test_splice_by_hand(model):
    s = model.config.slide_token_id
    ids = torch.tensor([[7, s, 8, 9], [7, 8, s, 0]])  # row 1 right padded
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 8, 9], [-100, -100, -100, -100]])
    embeds = torch.arange(8, dtype=torch.float32).view(2, 4, 1).expand(2, 4, 2).clone()
    visual = torch.tensor([[[100.0] * 2, [101.0] * 2, [0.0] * 2], [[200.0] * 2, [201.0] * 2, [202.0] * 2]])
    vmask = torch.tensor([[True, True, False], [True, True, True]])  # K = 2 and 3
    out, mask, lab, pos = model.model.splice(ids, embeds, visual, vmask, attn, labels, "right")
    assert out[..., 0].tolist() == [[0, 100, 101, 2, 3, 0], [4, 5, 200, 201, 202, 7]]  # 7: the (masked) pad
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
    assert lab.tolist() == [[-100, -100, -100, 8, 9, -100], [-100] * 6]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 4]]
    left_ids = torch.tensor([[7, s, 8, 9], [0, 7, 8, s]])
    left_attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    out, mask, lab, pos = model.model.splice(left_ids, embeds, visual, vmask, left_attn, None, "left")
    assert out[..., 0].tolist() == [[0, 0, 100, 101, 2, 3], [4, 5, 6, 200, 201, 202]]
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 1, 2, 3, 4], [0, 0, 1, 2, 3, 4]] and lab is None


def test_splice_requires_one_placeholder(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="exactly once"):
        model.model.splice(ids, torch.zeros(1, 3, 32), torch.zeros(1, 2, 32), torch.ones(1, 2).bool())


def test_ragged_batch_equals_single_rows(processor, model):
    convs = [
        [{"role": "user", "content": "what is the diagnosis ?"}, {"role": "assistant", "content": "B"}],
        [{"role": "user", "content": "grade ?"}, {"role": "assistant", "content": "high grade"}],
    ]
    batch = _training_batch(processor, [12, 30], convs)
    for selection in ("none", "prumerge", "topk_prompt"):
        kwargs = {"max_tokens": 5} if selection == "topk_prompt" else None
        out = model(**batch, token_selection=selection, token_selection_kwargs=kwargs)
        counts = out.visual_token_counts.tolist()
        assert out.tile_counts.tolist() == [12, 30]
        for b in range(2):
            n = int(batch["tile_mask"][b].sum())
            t = int(batch["attention_mask"][b].sum())
            single = {k: v[b : b + 1] for k, v in batch.items()}
            single.update(
                tile_features=single["tile_features"][:, :n],
                tile_coords=single["tile_coords"][:, :n],
                tile_mask=single["tile_mask"][:, :n],
                input_ids=single["input_ids"][:, :t],
                attention_mask=single["attention_mask"][:, :t],
                labels=single["labels"][:, :t],
                question_mask=single["question_mask"][:, :t],
            )
            alone = model(**single, token_selection=selection, token_selection_kwargs=kwargs)
            length = alone.logits.shape[1]
            assert alone.visual_token_counts.tolist() == [counts[b]]
            assert length == t - 1 + counts[b]
            torch.testing.assert_close(out.logits[b, :length], alone.logits[0], atol=1e-4, rtol=1e-4)
            assert out.labels[b, :length].tolist() == alone.labels[0].tolist()
            assert int(out.attention_mask[b].sum()) == length
        # labels: visual tokens never trained, answers kept
        answer = processor.tokenizer(" B", add_special_tokens=False)["input_ids"][0]
        assert answer in out.labels[0].tolist()
    loss = model(**batch).loss
    assert torch.isfinite(loss)


@torch.no_grad()
def test_gamma_rule_matches_embedding_rms(model):
    emb = model.get_input_embeddings().weight
    probe = torch.randn(4096, model.config.vision_config.hidden_size)
    projected = model.multi_modal_projector(probe)
    ratio = float(projected.pow(2).mean().sqrt() / emb.pow(2).mean().sqrt())
    assert 0.9 < ratio < 1.1
    tokens = torch.randn(50, model.config.vision_config.hidden_size) * 3 + 1
    model.model.reset_projector_gamma(tokens)
    ratio = float(model.multi_modal_projector(tokens).pow(2).mean().sqrt() / emb.pow(2).mean().sqrt())
    assert abs(ratio - 1) < 1e-4
    model.model.reset_projector_gamma()


def _until_eos(ids, processor):
    ids = ids.tolist()
    eos = processor.tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_batched_greedy_generation_equals_one_by_one(processor, model):
    processor.tokenizer.padding_side = "left"
    slides = random_slides([20, 9, 33], seed=3)
    questions = ["what is the diagnosis ?", "grade ?", "which type of tumor is present in the slide ?"]
    for selection in ("none", "prumerge"):
        batch = build_generation_inputs(processor, slides, questions)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, token_selection=selection)
        together = model.generate(**batch, **kwargs)
        counts = model.last_selection_stats["visual_token_counts"]
        assert model.last_selection_stats["tile_counts"] == [20, 9, 33]
        for i in range(3):
            alone = model.generate(
                **build_generation_inputs(processor, slides[i : i + 1], questions[i : i + 1]), **kwargs
            )
            assert model.last_selection_stats["visual_token_counts"] == [counts[i]]
            assert _until_eos(together[i], processor) == _until_eos(alone[0], processor)
    texts = processor.batch_decode(together, skip_special_tokens=True)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    torch.manual_seed(0)
    sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (3, 4)
    answers = wsi_llava.generate_answers(model, processor, slides, questions, max_new_tokens=3, batch_size=2)
    assert len(answers) == 3


def test_generate_refuses_right_padding(processor, model):
    batch = build_generation_inputs(processor, random_slides([5, 6]), ["grade ?", "what is the diagnosis ?"])
    batch["input_ids"] = batch["input_ids"].flip(1)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(**batch, max_new_tokens=2)


def test_slide_inputs_never_reach_decode_steps(model):
    ids = torch.tensor([[3, 4]])
    inputs = model.prepare_inputs_for_generation(
        ids,
        attention_mask=torch.ones_like(ids),
        tile_features=torch.ones(1),
        tile_coords=torch.ones(1),
        token_selection="none",
    )
    assert not {"tile_features", "tile_coords", "token_selection"} & set(inputs)


def test_save_and_registered_loading(processor, model, tmp_path):
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_wsillava.WSILlavaForConditionalGeneration"
    for name in (
        "modeling_wsillava.py",
        "configuration_wsillava.py",
        "token_selection.py",
        "modeling_slide_encoder.py",
        "configuration_slide_encoder.py",
        "dilated_attention.py",
    ):
        assert (tmp_path / name).is_file() and not (tmp_path / name).is_symlink()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is WSILlavaForConditionalGeneration
    assert loaded.multi_modal_projector.gamma.item() == pytest.approx(model.multi_modal_projector.gamma.item())
    batch = build_generation_inputs(processor, random_slides([10, 4]), ["grade ?", "what is the diagnosis ?"])
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is WSILlavaModel
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "WSIProcessor"


REMOTE_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", sys.argv[2]) and not p.startswith(sys.argv[2] + "/tests")]
    for name in ("wsi_llava", "wsi_clip", "processing"):
        assert importlib.util.find_spec(name) is None, name
    import torch
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ref = torch.load(sys.argv[1] + "/ref.pt")
    out = model(**ref["inputs"], token_selection="prumerge")
    assert torch.allclose(out.logits, ref["logits"], atol=1e-5), (out.logits - ref["logits"]).abs().max()
    gen = model.generate(**ref["gen_inputs"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.tolist() == ref["generated"].tolist()
    print("REMOTE_OK", type(model).__module__)
""")


def test_remote_code_loading_without_the_package(processor, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    batch = build_generation_inputs(processor, random_slides([10, 4]), ["grade ?", "what is the diagnosis ?"])
    inputs = dict(batch)
    with torch.no_grad():
        logits = model(**inputs, token_selection="prumerge").logits
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"inputs": inputs, "logits": logits, "gen_inputs": inputs, "generated": generated}, ckpt / "ref.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(ckpt), str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK transformers_modules" in result.stdout


def test_from_parts_with_slide_encoder_and_wsiclip_style_checkpoints(processor, model, tmp_path):
    from transformers import LlamaForCausalLM

    tower = model.vision_tower
    tower.save_pretrained(tmp_path / "tower")
    lm = LlamaForCausalLM(model.config.text_config)
    lm.save_pretrained(tmp_path / "lm")
    built = WSILlavaForConditionalGeneration.from_parts(
        tmp_path / "tower", tmp_path / "lm", slide_token_id=processor.slide_token_id
    )
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(built.vision_tower.state_dict()[key], value)
    torch.testing.assert_close(built.lm_head.weight, lm.lm_head.weight)
    gamma = built.multi_modal_projector.gamma.item()
    assert gamma > 0 and gamma != 1.0
    # a WSI-CLIP checkpoint: its slide tower is taken (a tiny BERT text tower beside it)
    from transformers import BertConfig, BertModel

    from wsi_clip import WSIClipModel

    clip_dir = tmp_path / "clip"
    text = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        add_pooling_layer=False,
    )
    WSIClipModel.from_towers(slide_encoder=tower, text_model=text, projection_dim=8).save_pretrained(clip_dir)
    built2 = WSILlavaForConditionalGeneration.from_parts(clip_dir, lm, slide_token_id=processor.slide_token_id)
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(built2.vision_tower.state_dict()[key], value)
    batch = build_generation_inputs(processor, random_slides([7]), ["grade ?"])
    assert torch.isfinite(built2(**batch).logits).all()


@torch.no_grad()
def test_prepended_slide_embedding_is_the_first_visual_token(processor):
    model = tiny_model(processor, prepend_slide_embedding=True)
    convs = [
        [{"role": "user", "content": "what is the diagnosis ?"}, {"role": "assistant", "content": "B"}],
        [{"role": "user", "content": "grade ?"}, {"role": "assistant", "content": "high grade"}],
    ]
    batch = _training_batch(processor, [12, 30], convs)
    plain = tiny_model(processor)
    for selection, kwargs in (("none", None), ("prumerge_plus", {"max_tokens": 4})):
        feats = model.get_slide_features(
            batch["tile_features"],
            batch["tile_coords"],
            batch["tile_mask"],
            token_selection=selection,
            token_selection_kwargs=kwargs,
        )
        without = plain.get_slide_features(
            batch["tile_features"],
            batch["tile_coords"],
            batch["tile_mask"],
            token_selection=selection,
            token_selection_kwargs=kwargs,
        )
        assert feats.visual_token_counts.tolist() == [c + 1 for c in without.visual_token_counts.tolist()]
        assert feats.selection_indices[:, 0].tolist() == [-1, -1]
        assert feats.selection_indices[:, 1:].tolist() == without.selection_indices.tolist()
        tower = model.model.vision_tower(batch["tile_features"], batch["tile_coords"], batch["tile_mask"])
        torch.testing.assert_close(feats.visual_embeds[:, 0], model.multi_modal_projector(tower.pooler_output))
    # a ragged batch still gives every slide what it gets alone
    out = model(**batch, token_selection="prumerge_plus", token_selection_kwargs={"max_tokens": 4})
    for b in range(2):
        n, t = int(batch["tile_mask"][b].sum()), int(batch["attention_mask"][b].sum())
        single = {k: v[b : b + 1] for k, v in batch.items()}
        single.update(
            tile_features=single["tile_features"][:, :n],
            tile_coords=single["tile_coords"][:, :n],
            tile_mask=single["tile_mask"][:, :n],
            input_ids=single["input_ids"][:, :t],
            attention_mask=single["attention_mask"][:, :t],
            labels=single["labels"][:, :t],
            question_mask=single["question_mask"][:, :t],
        )
        alone = model(**single, token_selection="prumerge_plus", token_selection_kwargs={"max_tokens": 4})
        length = alone.logits.shape[1]
        torch.testing.assert_close(out.logits[b, :length], alone.logits[0], atol=1e-4, rtol=1e-4)
