"""Pure-bf16 WSI-LLaVA (no DeepSpeed): the projector keeps fp32 master weights, so small updates are not lost.

bf16 has 8 significant bits: bf16(0.03) + 2e-5 == bf16(0.03), so a stage-3 step at projector_lr 2e-5 would leave a
bf16 ``gamma`` unchanged. The projector must be float32 after ``from_parts`` with a bf16 LM, after
``from_pretrained(dtype=torch.bfloat16)``, and still train (forward + backward + one optimizer step).
"""

from __future__ import annotations

import pytest
import torch

from wsi_llava import WSILlavaForConditionalGeneration, build_generation_inputs

from wsillava_utils import random_slides, tiny_config, tiny_model, tiny_processor

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _projector_dtypes(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.multi_modal_projector.named_parameters()}


def _assert_fp32_projector_bf16_lm(model) -> None:
    dtypes = _projector_dtypes(model)
    assert set(dtypes) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias", "gamma"}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    lm = {p.dtype for p in model.language_model.parameters()} | {model.lm_head.weight.dtype}
    assert lm == {BF16}, lm


def _bf16_from_parts(processor):
    from transformers import LlamaForCausalLM

    from wsi_clip import SlideEncoderModel

    config = tiny_config(processor)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config.text_config).to(BF16)
    tower = SlideEncoderModel(config.vision_config)
    return WSILlavaForConditionalGeneration.from_parts(tower, lm, slide_token_id=processor.slide_token_id)


def _training_batch(processor):
    batch = build_generation_inputs(processor, random_slides([9, 5]), ["grade ?", "what is the diagnosis ?"])
    batch = dict(batch)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def test_from_parts_with_a_bf16_lm_builds_an_fp32_projector(processor):
    model = _bf16_from_parts(processor)
    _assert_fp32_projector_bf16_lm(model)
    assert model.multi_modal_projector.gamma.item() > 0


def test_bf16_default_dtype_construction_keeps_the_projector_fp32(processor):
    model = WSILlavaForConditionalGeneration._from_config(tiny_config(processor), dtype=BF16)
    _assert_fp32_projector_bf16_lm(model)


def test_from_pretrained_bf16_loads_the_projector_in_fp32(processor, tmp_path):
    # a bf16 run's checkpoint (fp32 projector inside) and an fp32 checkpoint, both loaded with dtype=bfloat16
    bf16_run = _bf16_from_parts(processor)
    bf16_run.save_pretrained(tmp_path / "bf16_run")
    fp32_model = tiny_model(processor)
    fp32_model.save_pretrained(tmp_path / "fp32")
    for source, ref in ((tmp_path / "bf16_run", bf16_run), (tmp_path / "fp32", fp32_model)):
        loaded = WSILlavaForConditionalGeneration.from_pretrained(source, dtype=BF16)
        _assert_fp32_projector_bf16_lm(loaded)
        for name, value in ref.multi_modal_projector.state_dict().items():  # exact: no bf16 round trip
            assert torch.equal(loaded.multi_modal_projector.state_dict()[name], value.float()), name


def test_bf16_forward_backward_and_small_projector_step(processor, tmp_path):
    _bf16_from_parts(processor).save_pretrained(tmp_path)
    model = WSILlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=BF16)
    _assert_fp32_projector_bf16_lm(model)
    model.train()
    projector = model.multi_modal_projector
    with torch.no_grad():
        projector.gamma.fill_(0.03)  # bf16(0.03) + 2e-5 == bf16(0.03)
    assert torch.tensor(0.03, dtype=BF16) + 2e-5 == torch.tensor(0.03, dtype=BF16)
    model.requires_grad_(False)
    projector.requires_grad_(True)  # stage 2
    out = model(**_training_batch(processor))
    assert out.logits.dtype == BF16 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in projector.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert projector.gamma.grad.abs().item() > 0
    before = projector.gamma.item()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=2e-5, weight_decay=0.0)
    optimizer.step()
    after = projector.gamma.item()
    assert after != before
    assert abs(after - before) == pytest.approx(2e-5, rel=1e-3)  # AdamW's first step: lr · sign(grad)
    assert projector.gamma.dtype == torch.float32


def test_stage3_lora_copy_of_the_projector_stays_fp32(processor):
    from types import SimpleNamespace

    from wsi_llava.arguments import DEFAULT_LORA_TARGETS
    from wsi_llava.assembly import prepare_stage

    model = _bf16_from_parts(processor)
    peft_model = prepare_stage(
        model,
        SimpleNamespace(stage=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=DEFAULT_LORA_TARGETS),
    )
    trained = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad and "multi_modal_projector" in n}
    assert trained and set(trained.values()) == {torch.float32}, trained
