"""``wsi-train-llava``: train WSI-LLaVA — stage 2 (projector only) or stage 3 (LoRA on the LM + projector).

    wsi-train-llava --stage 2 stage2.yaml --slide_encoder_name_or_path runs/demo/clip
    accelerate launch --num_processes 8 -m wsi_llava.commands.train --stage 3 stage3.yaml --merge true
    wsi-train-llava --stage 2 --slide_encoder_name_or_path ckpt/wsi_clip --language_model Qwen/Qwen2.5-7B-Instruct \\
        --train_file data/captions.json --output_dir out/stage2 ...

A YAML / JSON config file (first positional argument; a checkout's ``scripts/configs/`` holds the recipes and
``scripts/train_llava.py`` is this command) gives defaults; flags override it. Every option of
:class:`~wsi_llava.arguments.ModelArguments`, :class:`~wsi_llava.arguments.DataArguments` and
:class:`~wsi_llava.arguments.LlavaTrainingArguments` (which extends ``transformers.TrainingArguments``) is accepted;
``--help`` lists them.

Outputs in ``output_dir``: stage 2 → a full WSI-LLaVA checkpoint (``from_pretrained``-loadable, with the processor);
stage 3 → LoRA adapters + the projector copy (``PeftModel.from_pretrained(base, output_dir)``), and with
``--merge true`` a merged full checkpoint in ``output_dir/merged``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from wsi_clip.cli import exit_status, parse_args_with_config, setup_logging

from ..arguments import DataArguments, LlavaTrainingArguments, ModelArguments

logger = logging.getLogger(__name__)

COMMAND = "wsi-train-llava"


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """``[--stage N] [config.yaml|json] [--flag value ...]``: the file's keys become defaults, flags override them."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    # `--stage N` may come before the config file (`wsi-train-llava --stage 2 cfg.yaml`): lift it out first so the
    # file is the first positional argument, then hand it back after it.
    rest, stage = [], None
    tokens = iter(argv)
    for token in tokens:
        if token == "--stage":
            stage = next(tokens, None)
        elif token.startswith("--stage="):
            stage = token.split("=", 1)[1]
        else:
            rest.append(token)
    if stage is not None:
        rest += ["--stage", str(stage)]
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments), prog=COMMAND)
    model_args, data_args, train_args = parse_args_with_config(parser, rest, COMMAND)
    if data_args.train_file is None:
        parser.error("train_file is required (in the config file or as --train_file).")
    return model_args, data_args, train_args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the stage, save it (and with ``--merge`` the merged model) to ``output_dir``; returns the metrics."""
    model_args, data_args, args = parse_arguments(argv)
    setup_logging(args)

    from transformers import set_seed

    from processing import InstructionCollator, load_annotations, preflight_dataset, slide_contract
    from wsi_clip.hub import require_checkpoint_files

    from ..assembly import build_model_and_processor, calibrate_gamma, count_parameters, prepare_stage, save_merged
    from ..trainer import WSILlavaTrainer, projector_gamma
    from ..word_tokenizer import conversation_texts

    set_seed(args.seed)
    on_error = "skip" if data_args.skip_bad_samples else "raise"
    train = load_annotations(
        data_args.train_file, "llava", h5_root=data_args.h5_root, split=data_args.train_split, on_error=on_error
    )
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = None
    validation_file = data_args.validation_file or data_args.train_file
    if data_args.validation_file or data_args.validation_split:
        evaluation = load_annotations(
            validation_file, "llava", h5_root=data_args.h5_root, split=data_args.validation_split, on_error=on_error
        )
    for local in (model_args.model_name_or_path, model_args.slide_encoder_name_or_path, model_args.projector_path):
        require_checkpoint_files(local)
    model, processor, fresh = build_model_and_processor(model_args, data_args, conversation_texts(train))
    collator = InstructionCollator(
        processor,
        max_tiles=data_args.max_tiles,
        tile_sampling=data_args.tile_sampling,
        max_length=data_args.max_length,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        text_only=data_args.text_only,
        patch_size_level0=data_args.patch_size_level0,
    )
    # pre-flight: every slide against the tower's input contract and every prompt, before any training step
    checks = dict(
        slide_contract(model.config.vision_config),
        check_values=data_args.check_feature_values,
        skip_bad_samples=data_args.skip_bad_samples,
        row_check=collator.example,
        patch_size_level0=data_args.patch_size_level0,
    )
    train = preflight_dataset(train, source=data_args.train_file, **checks)
    if evaluation is not None:
        evaluation = preflight_dataset(evaluation, source=validation_file, **checks)
    if (
        args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
        and args.length_column_name not in train.column_names
    ):
        # batches of similar length: a batch holding one long report costs as much as eight reports (padding)
        train = train.add_column(
            args.length_column_name, [sum(len(t["content"]) for t in row["conversations"]) for row in train]
        )
    if data_args.text_only:
        logger.info("text only: prompts without the slide placeholder, no slide tokens (baseline run)")
    elif fresh and model_args.calibrate_gamma:
        gamma = calibrate_gamma(model, collator([train[i] for i in range(min(len(train), 4))]))
        logger.info("gamma calibrated on the selected tokens of a real batch: %.4g", gamma)
    if args.activation_checkpointing:  # gradient_checkpointing (its deprecated alias) is mirrored into it
        # the Trainer reads activation_checkpointing_kwargs; keep the old name mirroring it
        args.activation_checkpointing_kwargs = args.activation_checkpointing_kwargs or {"use_reentrant": False}
        args.gradient_checkpointing_kwargs = args.activation_checkpointing_kwargs
    trainable_model = prepare_stage(model, args)
    trainable, total = count_parameters(trainable_model)
    logger.info(
        "stage %d: %s trainable of %s parameters; token selection %r %s; gamma %.4g",
        args.stage,
        f"{trainable:,}",
        f"{total:,}",
        model.config.token_selection,
        model.config.token_selection_kwargs,
        projector_gamma(model),
    )
    trainer = WSILlavaTrainer(
        model=trainable_model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        processing_class=processor,
        projector_lr=args.projector_lr if args.stage == 3 else None,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss / gamma history (training curves)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
    metrics = dict(result.metrics)
    metrics["projector_gamma"] = projector_gamma(trainable_model)
    if args.stage == 3 and args.merge and trainer.is_world_process_zero():
        metrics["merged_dir"] = save_merged(trainer.model, str(Path(args.output_dir) / "merged"), processor)
        logger.info("merged model written to %s", metrics["merged_dir"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    return metrics


def cli() -> int:
    """The ``wsi-train-llava`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
