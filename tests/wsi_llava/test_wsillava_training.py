"""Stage 2 / stage 3 steps change only the intended parameters; adapters save / load; merge; script parsing; metrics."""

from __future__ import annotations

import json

import pytest
import torch

from wsi_llava import WSILlavaForConditionalGeneration, build_generation_inputs
from wsi_llava.arguments import DEFAULT_LORA_TARGETS, LlavaTrainingArguments
from wsi_llava.assembly import check_lora_targets, prepare_stage
from wsi_llava.evaluation import closed_metrics, evaluation_items, open_metrics, parse_letter, question_kind
from wsi_llava.trainer import WSILlavaTrainer, projector_gamma

from wsillava_utils import random_slides, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from processing import load_annotations

    from demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("llava_demo")
    make_demo_dataset(root, num_cases=8, feature_dim=16, min_tiles=20, max_tiles=40, seed=0)
    return root, load_annotations(root / "llava_instruct_train.json", "llava")


def _trainer(model, processor, dataset, out, stage, **kwargs):
    from processing import InstructionCollator

    args = LlavaTrainingArguments(
        output_dir=str(out),
        stage=stage,
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        **kwargs,
    )
    wrapped = prepare_stage(model, args)
    collator = InstructionCollator(processor, max_length=400)
    return WSILlavaTrainer(
        model=wrapped,
        args=args,
        train_dataset=dataset.select(range(2)),
        data_collator=collator,
        projector_lr=args.projector_lr,
    ), wrapped


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _tokenizer_for(dataset):
    texts = [t["content"] for row in dataset for t in row["conversations"]]
    from wsi_llava.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(texts, extra_tokens=["<slide>"])


def _demo_model(dataset):
    from processing import WSIProcessor

    from wsillava_utils import tiny_config

    processor = WSIProcessor(tokenizer=_tokenizer_for(dataset), max_tiles=None, feature_dim=16)
    torch.manual_seed(0)
    return WSILlavaForConditionalGeneration(tiny_config(processor, token_selection="prumerge")), processor


def test_stage2_step_trains_only_the_projector(data, tmp_path):
    _, dataset = data
    model, processor = _demo_model(dataset)
    before = _snapshot(model)
    trainer, _ = _trainer(model, processor, dataset, tmp_path, stage=2)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.multi_modal_projector.") for n in changed)
    assert "model.multi_modal_projector.gamma" in changed
    logged = [h for h in trainer.state.log_history if "projector_gamma" in h]
    assert logged and "visual_tokens_per_slide" in logged[0]


def test_stage3_lora_step_adapters_and_merge(data, tmp_path):
    from peft import PeftModel

    _, dataset = data
    model, processor = _demo_model(dataset)
    base_state = _snapshot(model)
    trainer, peft_model = _trainer(
        model,
        processor,
        dataset,
        tmp_path / "run",
        stage=3,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        projector_lr=1e-3,
    )
    lrs = sorted(g["lr"] for g in trainer.create_optimizer().param_groups)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-2)
    trainer.train()
    changed = {
        n
        for n, p in peft_model.named_parameters()
        if n in {k for k, _ in peft_model.named_parameters()}
        and "lora_" not in n
        and "modules_to_save" not in n
        and not torch.equal(
            p, base_state[n.replace("base_model.model.", "").replace(".base_layer", "").replace("original_module.", "")]
        )
    }
    assert not changed  # the base model (tower, LM, original projector) is untouched
    lora = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and ".language_model." in n or "modules_to_save" in n for n in lora)
    assert any("multi_modal_projector.modules_to_save" in n and n.endswith("gamma") for n in lora)
    assert not any("vision_tower" in n for n in lora)
    # adapters save / load with PeftModel and reproduce the outputs
    peft_model.eval()
    batch = build_generation_inputs(processor, random_slides([12, 7]), ["what ?", "which grade ?"])
    with torch.no_grad():
        ref = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base_dir = tmp_path / "base"
    fresh, _ = _demo_model(dataset)
    fresh.save_pretrained(base_dir)
    reloaded = PeftModel.from_pretrained(
        WSILlavaForConditionalGeneration.from_pretrained(base_dir), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ref)
    assert projector_gamma(reloaded) == pytest.approx(projector_gamma(peft_model))
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = WSILlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ref, atol=1e-5, rtol=1e-4)


def test_lora_targets_limited_to_language_model():
    model = tiny_model(tiny_processor())
    names = check_lora_targets(model, DEFAULT_LORA_TARGETS)
    assert names and all(n.startswith("model.language_model.") for n in names)
    with pytest.raises(ValueError, match="all-linear"):
        check_lora_targets(model, "all-linear")
    with pytest.raises(ValueError, match="outside the language model"):
        check_lora_targets(model, r".*(q_proj|fc1)")
    with pytest.raises(ValueError, match="matches no linear"):
        check_lora_targets(model, r"model\.language_model\..*\.c_attn")


# two recipes in the shape of the repository's configs: stage 3 from a stage-2 checkpoint, stage 2 from random parts
STAGE3_RECIPE = """
model_name_or_path: demo_output/llava_stage2
train_file: demo_output/data/llava_instruct_train.json
output_dir: demo_output/llava_stage3
max_tiles: 512
max_length: 256
lora_r: 8
learning_rate: 1.0e-3        # LoRA
projector_lr: 2.0e-4          # projector (modules_to_save)
use_cpu: true
"""
STAGE2_RECIPE = """
train_file: demo_output/data/llava_caption_train.json
slide_config: {input_dim: 64, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128}
language_model_config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                        num_attention_heads: 4, num_key_value_heads: 2}
tokenizer_name_or_path: word
use_cpu: true
"""


def test_train_script_parses_yaml_and_cli_overrides(tmp_path):
    from wsi_llava.commands import train as script

    (tmp_path / "stage3.yaml").write_text(STAGE3_RECIPE)
    (tmp_path / "stage2.yaml").write_text(STAGE2_RECIPE)
    model_args, data_args, args = script.parse_arguments(
        ["--stage", "3", str(tmp_path / "stage3.yaml"), "--learning_rate", "0.5", "--output_dir", str(tmp_path)]
    )
    assert args.stage == 3 and args.learning_rate == 0.5 and args.projector_lr == pytest.approx(2e-4)
    assert args.output_dir == str(tmp_path) and args.remove_unused_columns is False
    assert model_args.model_name_or_path == "demo_output/llava_stage2" and data_args.max_tiles == 512
    _, _, args2 = script.parse_arguments(["--stage", "2", str(tmp_path / "stage2.yaml")])
    model_args2, _, _ = script.parse_arguments(["--stage", "2", str(tmp_path / "stage2.yaml")])
    assert args2.stage == 2 and json.loads(model_args2.slide_config)["input_dim"] == 64


def test_closed_and_open_metrics(data):
    q = "what grade ?\nA) G1\nB) G2\nC) G3\nD) G4"
    assert question_kind(q, "B") == "choice" and question_kind("is it invasive ?", "Yes") == "yes_no"
    assert question_kind("describe the slide", "invasive carcinoma") == "open"
    assert question_kind("type ? A) x B) y C) z", "C") == "choice"  # WSI-Bench inline options
    assert [parse_letter(t) for t in ("B", "B) G2", "The answer is C.", "a tumor")] == ["B", "B", "C", None]
    items = [
        {"question": q, "answer": a, "prediction": p, "kind": "choice"}
        for a, p in (("B", "B"), ("B", "A"), ("A", "A"), ("B", "C) G3"))
    ]
    items.append({"question": "invasive ?", "answer": "Yes", "prediction": "yes, it is", "kind": "yes_no"})
    m = closed_metrics(items)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["majority_answer_by_kind"] == {"choice": "B", "yes_no": "yes"}
    # per kind: B for the 4 choice items (3 right), "yes" for the yes/no item (1 right)
    assert m["majority_baseline"] == pytest.approx(4 / 5) and m["random_baseline"] == pytest.approx(
        (4 * 0.25 + 0.5) / 5
    )
    o = open_metrics(["the tumor is invasive", ""], ["the tumor is invasive", "normal tissue"])
    assert o["bleu_1"] == pytest.approx(0.5) and o["rouge_l"] == pytest.approx(0.5) and o["n"] == 2
    _, dataset = data
    evaluated = evaluation_items(dataset)
    turns = sum(1 for row in dataset for t in row["conversations"] if t["role"] == "assistant")
    assert len(evaluated) == turns and all(i["kind"] == "choice" for i in evaluated)
    assert all(i["history"][-1]["role"] == "user" for i in evaluated)


def test_per_sample_loss_weighs_every_example_once():
    from wsi_llava.trainer import per_sample_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [
            [-100, -100, -100, 3, -100],  # a one-token closed answer
            [-100, 1, 2, 4, 6],
        ]
    )  # a four-token answer
    ce = torch.nn.functional.cross_entropy
    short = ce(logits[0, 2:3], labels[0, 3:4])
    long = ce(logits[1, 0:4], labels[1, 1:5])
    torch.testing.assert_close(per_sample_loss(logits, labels), (short + long) / 2)
    token_mean = ce(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert not torch.isclose(token_mean, (short + long) / 2)  # the token mean gives the short answer 1/5 weight
    empty = torch.full((1, 5), -100)
    with_empty = per_sample_loss(torch.cat([logits, torch.randn(1, 5, 7)]), torch.cat([labels, empty]))
    torch.testing.assert_close(with_empty, (short + long) / 2)  # an example without answer tokens is left out
