#!/usr/bin/env python
"""Train WSI-LLaVA: stage 2 (projector only) or stage 3 (LoRA on the LM + projector).

    python scripts/train_llava.py --stage 2 scripts/configs/llava_stage2_demo.yaml
    accelerate launch scripts/train_llava.py --stage 3 scripts/configs/llava_stage3_demo.yaml --merge true
    python scripts/train_llava.py --stage 2 --vision_tower ckpt/wsi_clip --language_model Qwen/Qwen2.5-7B-Instruct \
        --train_file data/captions.json --output_dir out/stage2 ...

A YAML / JSON config file (first positional argument) gives defaults; command-line options override it. Every
option of ``ModelArguments``, ``DataArguments`` and ``LlavaTrainingArguments`` (``wsi_llava/training.py``, which
extends ``transformers.TrainingArguments``) is accepted; ``--help`` lists them.

Outputs in ``output_dir``: stage 2 → a full WSI-LLaVA checkpoint (``from_pretrained``-loadable, with the processor);
stage 3 → LoRA adapters + the projector copy (``PeftModel.from_pretrained(base, output_dir)``), and with
``--merge true`` a merged full checkpoint in ``output_dir/merged``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, set_seed

from processing import InstructionCollator, load_annotations, preflight_dataset, slide_contract
from wsi_clip.cli import parse_args_with_config
from wsi_clip.hub import require_checkpoint_files
from wsi_llava.training import (DataArguments, LlavaTrainingArguments, ModelArguments, WSILlavaTrainer,
                                build_model_and_processor, calibrate_gamma, count_parameters, prepare_stage,
                                projector_gamma)


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    # `--stage N` may come before the config file (`train_llava.py --stage 2 cfg.yaml`): lift it out first so the
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
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments))
    model_args, data_args, train_args = parse_args_with_config(parser, rest, "train_llava.py")
    if data_args.train_file is None:
        raise SystemExit("--train_file is required (in the config file or on the command line).")
    return model_args, data_args, train_args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, args = parse(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    set_seed(args.seed)
    on_error = "skip" if data_args.skip_bad_samples else "raise"
    train = load_annotations(data_args.train_file, "llava", h5_root=data_args.h5_root, split=data_args.train_split,
                             on_error=on_error)
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = None
    if data_args.eval_file:
        evaluation = load_annotations(data_args.eval_file, "llava", h5_root=data_args.h5_root,
                                      split=data_args.eval_split, on_error=on_error)
    for local in (model_args.model_name_or_path, model_args.vision_tower, model_args.projector_path):
        require_checkpoint_files(local)
    texts = [t["content"] for row in train for t in row["conversations"]]
    model, processor, fresh = build_model_and_processor(model_args, data_args, texts)
    collator = InstructionCollator(processor, max_tiles=data_args.max_tiles, tile_sampling=data_args.tile_sampling,
                                   max_length=data_args.max_length, seed=args.data_seed if args.data_seed is not None
                                   else args.seed, text_only=data_args.text_only)
    # pre-flight: every slide against the tower's input contract and every prompt, before any training step
    checks = dict(slide_contract(model.config.vision_config), check_values=data_args.check_feature_values,
                  skip_bad_samples=data_args.skip_bad_samples, row_check=collator.example)
    train = preflight_dataset(train, source=data_args.train_file, **checks)
    if evaluation is not None:
        evaluation = preflight_dataset(evaluation, source=data_args.eval_file, **checks)
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance") and \
            args.length_column_name not in train.column_names:
        # batches of similar length: a batch holding one long report costs as much as eight reports (padding)
        train = train.add_column(args.length_column_name, [sum(len(t["content"]) for t in row["conversations"])
                                                           for row in train])
    if data_args.text_only:
        print("[train_llava] text only: prompts without the slide placeholder, no slide tokens (baseline run)")
    elif fresh and model_args.calibrate_gamma:
        gamma = calibrate_gamma(model, collator([train[i] for i in range(min(len(train), 4))]))
        print(f"[train_llava] gamma calibrated on the selected tokens of a real batch: {gamma:.4g}")
    if args.activation_checkpointing or args.gradient_checkpointing:
        args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    trainable_model = prepare_stage(model, args)
    trainable, total = count_parameters(trainable_model)
    print(f"[train_llava] stage {args.stage}: {trainable:,} trainable of {total:,} parameters; token selection "
          f"{model.config.token_selection!r} {model.config.token_selection_kwargs}; gamma {projector_gamma(model):.4g}")
    trainer = WSILlavaTrainer(model=trainable_model, args=args, train_dataset=train, eval_dataset=evaluation,
                              data_collator=collator, processing_class=processor,
                              projector_lr=args.projector_lr if args.stage == 3 else None)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the loss / gamma history (training curves)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
    metrics = dict(result.metrics)
    metrics["projector_gamma"] = projector_gamma(trainable_model)
    if args.stage == 3 and args.merge and trainer.is_world_process_zero():
        merged_dir = str(Path(args.output_dir) / "merged")
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        processor.save_pretrained(merged_dir)
        metrics["merged_dir"] = merged_dir
        print(f"[train_llava] merged model written to {merged_dir}")
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    return metrics


if __name__ == "__main__":
    main()
