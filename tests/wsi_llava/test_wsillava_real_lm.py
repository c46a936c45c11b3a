"""WSI-LLaVA on a real pretrained LM (SmolLM2-135M-Instruct, converted offline from the PyPI wheel's GGUF): the
slide tokens start harmless, a few training steps of both stages run, batched generation equals one-by-one, and the
gamma rule holds on the tokens the projector really sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from processing import InstructionCollator, write_slide
from wsi_llava import generate_answers
from wsi_llava.arguments import DataArguments, LlavaTrainingArguments, ModelArguments
from wsi_llava.assembly import build_model_and_processor, calibrate_gamma, prepare_stage
from wsi_llava.trainer import WSILlavaTrainer, projector_gamma

TILE_DIM = 16
TOWER = dict(
    input_dim=TILE_DIM,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    dropout=0.0,
    drop_path_rate=0.0,
)
REPORT = (
    "Sections show an invasive ductal carcinoma of the breast, Nottingham grade II, with focal necrosis. "
    "Lymphovascular invasion is not identified and the margins are free of tumour."
)
QUESTIONS = (
    "Describe the slide and give a diagnosis.",
    "What is the histological grade of the tumour?",
    "Is lymphovascular invasion present? Answer yes or no.",
)


@pytest.fixture(scope="module")
def slide_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate((40, 23, 57, 31)):
        cols = 7
        coords = np.stack([(np.arange(n) % cols) * 256, (np.arange(n) // cols) * 256], axis=1)
        path = write_slide(
            root / f"s{i}.h5",
            rng.standard_normal((n, TILE_DIM)).astype("float32"),
            coords,
            layout="trident",
            dtype="float32",
        )
        rows.append(
            {
                "h5_path": str(path),
                "row": i,
                "conversations": [
                    {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                    {"role": "assistant", "content": REPORT},
                ],
            }
        )
    return rows


@pytest.fixture(scope="module")
def built(smollm2_dir):
    torch.manual_seed(0)
    model_args = ModelArguments(
        slide_config=TOWER,
        language_model=str(smollm2_dir),
        token_selection="prumerge_plus",
        token_selection_kwargs={"max_tokens": 8},
    )
    model, processor, fresh = build_model_and_processor(model_args, DataArguments(max_tiles=64, max_length=96))
    assert fresh
    return model, processor


@pytest.mark.slow
def test_slide_tokens_start_harmless(built, slide_rows):
    """The LM's loss on the answer with freshly projected slide tokens ≈ its loss without any slide."""
    model, processor = built
    with_slide = InstructionCollator(processor, max_tiles=64, tile_sampling="uniform", max_length=96)
    text_only = InstructionCollator(processor, max_tiles=64, tile_sampling="uniform", max_length=96, text_only=True)
    calibrate_gamma(model, with_slide(slide_rows))
    model.eval()
    with torch.no_grad():
        slide_loss = float(model(**with_slide(slide_rows)).loss)
        text_loss = float(model(**text_only(slide_rows)).loss)
    assert text_loss < 5.0  # a pretrained LM on a plain English report (a broken vocabulary resize gives > 9)
    assert abs(slide_loss - text_loss) < 0.25, (slide_loss, text_loss)


@pytest.mark.slow
def test_gamma_is_calibrated_on_the_selected_tokens(built, slide_rows):
    model, processor = built
    batch = InstructionCollator(processor, max_tiles=64, tile_sampling="uniform", max_length=96)(slide_rows)
    calibrate_gamma(model, batch)
    with torch.no_grad():
        feats = model.get_slide_features(batch["tile_features"], batch["tile_coords"], batch["tile_mask"])
        visual = feats.visual_embeds[feats.visual_mask].float()  # [M, E] what the LM receives
        embedding = model.get_input_embeddings().weight.float()
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    assert rms(visual) == pytest.approx(rms(embedding), rel=1e-3)


@pytest.mark.slow
def test_two_stages_train_and_batched_generation_equals_one_by_one(built, slide_rows, tmp_path):
    model, processor = built
    collator = InstructionCollator(processor, max_tiles=64, tile_sampling="random", max_length=96, seed=0)
    for stage in (2, 3):
        args = LlavaTrainingArguments(
            output_dir=str(tmp_path / f"stage{stage}"),
            stage=stage,
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            lora_r=4,
            lora_alpha=8,
        )
        trainable = prepare_stage(model, args)
        gamma0 = projector_gamma(trainable)
        trainer = WSILlavaTrainer(
            model=trainable, args=args, train_dataset=slide_rows, data_collator=collator, processing_class=processor
        )
        result = trainer.train()
        assert np.isfinite(result.training_loss)
        assert projector_gamma(trainable) != gamma0  # the projector (and gamma) trained in both stages
        if stage == 3:
            model = trainable.merge_and_unload()
    model.eval()
    slides = [r["h5_path"] for r in slide_rows[:3]]
    questions = list(QUESTIONS)
    batched = generate_answers(model, processor, slides, questions, batch_size=3, max_new_tokens=12)
    single = [
        generate_answers(model, processor, [s], [q], batch_size=1, max_new_tokens=12)[0]
        for s, q in zip(slides, questions)
    ]
    assert batched == single
    assert all(isinstance(a, str) and a for a in batched)


def test_gguf_sources_fail_clearly(tmp_path):
    from wsi_llava.language_models import LanguageModelSourceError, gguf_to_folder, resolve_language_model

    with pytest.raises(LanguageModelSourceError, match="GGUF file not found"):
        gguf_to_folder(tmp_path / "missing.gguf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something.txt").write_text("user data")
    with pytest.raises(LanguageModelSourceError, match="not a complete conversion"):
        resolve_language_model(fake, output_dir=taken)  # never overwrites a folder it did not write
    assert (taken / "something.txt").read_text() == "user data"
    assert resolve_language_model("org/some-model") == "org/some-model"  # folders / Hub ids pass through
