"""``wsi-train-clip``: train WSI-CLIP (slide tower + text encoder, multi-positive contrastive loss) with the Hugging
Face Trainer.

One config file (YAML or JSON; its keys are the fields of :class:`~wsi_clip.arguments.ModelArguments`,
:class:`~wsi_clip.arguments.DataArguments` and ``TrainingArguments``), optionally followed by flags that override it,
or flags only (a checkout's ``scripts/configs/`` holds the recipes; ``scripts/train_clip.py`` is this command)::

    wsi-train-clip config.yaml --num_train_epochs 2 --output_dir out/clip
    accelerate launch --config_file accelerate.yaml -m wsi_clip.commands.train config.yaml    # DDP / FSDP
    torchrun --nproc_per_node 2 -m wsi_clip.commands.train config.yaml                        # 2 CPU processes

The output folder is a ``save_pretrained`` checkpoint (safetensors + config with ``auto_map`` + the modeling files +
the processor) that loads with ``AutoModel.from_pretrained(dir)`` after ``import wsi_clip``, or with
``trust_remote_code=True`` without the package. Evaluate it with ``wsi-evaluate-clip``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..arguments import DataArguments, ModelArguments
from ..cli import exit_status, parse_args_with_config, parse_mapping, setup_logging

logger = logging.getLogger(__name__)

COMMAND = "wsi-train-clip"
OUTPUT_OPTIONS = ("pooling", "embedding_layer")  # slide_config keys that may change a pretrained slide encoder
ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """``[config.yaml|json] [--flag value ...]``: the file's keys become defaults, flags override them."""
    import sys

    parser = HfArgumentParser(ARGUMENT_CLASSES, prog=COMMAND)
    model_args, data_args, training_args = parse_args_with_config(
        parser, sys.argv[1:] if argv is None else argv, COMMAND
    )
    if not data_args.train_file:
        parser.error("train_file is required (in the config file or as --train_file).")
    if not (model_args.model_name_or_path or model_args.text_model_name_or_path):
        parser.error("text_model_name_or_path is required for a new model (or give model_name_or_path).")
    return model_args, data_args, training_args


def resolve_pretrained_path(name: str | None) -> str | None:
    """A folder, the ``model/`` folder shipped inside an installed Python package, or the name unchanged (Hub id)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if re.fullmatch(r"[A-Za-z_]\w*", name):
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(location) / "model"
            if (candidate / "config.json").is_file():
                return str(candidate)
    return name


def _no_cap(value: int | None) -> int | None:
    return None if value is None or value <= 0 else value


def build_model(model_args: ModelArguments, feature_dim: int):
    """A new WSI-CLIP from towers (a new slide tower takes ``feature_dim`` inputs), or a checkpoint to continue from;
    then the requested towers frozen. Slides that do not fit the tower are reported by the pre-flight check."""
    from wsi_clip import WSIClipModel

    if model_args.model_name_or_path:
        model = WSIClipModel.from_pretrained(resolve_pretrained_path(model_args.model_name_or_path))
    else:
        slide_path = resolve_pretrained_path(model_args.slide_encoder_name_or_path)
        slide_config = parse_mapping(model_args.slide_config, "slide_config")
        new_tower_keys = sorted(set(slide_config) - set(OUTPUT_OPTIONS))
        if slide_path and new_tower_keys:
            raise ValueError(
                f"slide_config {new_tower_keys} configures a new slide tower; with slide_encoder_name_or_path="
                f"{slide_path!r} only the output can be chosen ({', '.join(OUTPUT_OPTIONS)}). Remove the other keys "
                "or the path."
            )
        if not slide_path:
            slide_config.setdefault("input_dim", feature_dim)
            slide_config.setdefault("normalize_tile_features", model_args.normalize_tile_features)
        model = WSIClipModel.from_towers(
            slide_encoder=slide_path,
            text_model=resolve_pretrained_path(model_args.text_model_name_or_path),
            slide_config=None if slide_path else slide_config,
            slide_tower=model_args.slide_tower,
            projection_dim=model_args.projection_dim,
            text_pooling=model_args.text_pooling,
            logit_scale_init_value=model_args.logit_scale_init_value,
            logit_scale_max=model_args.logit_scale_max if model_args.logit_scale_max > 0 else None,
            text_to_slide_loss=model_args.text_to_slide_loss,
            text_model_kwargs={"attn_implementation": model_args.text_attn_implementation}
            if model_args.text_attn_implementation
            else None,
        )
        if slide_path:
            choose_slide_output(model, slide_config)
    model.freeze(slide_model=model_args.freeze_slide_encoder, text_model=model_args.freeze_text_model)
    freeze_layers_above_output(model)
    return model


def choose_slide_output(model, options: dict) -> None:
    """Set the pretrained slide encoder's output (``pooling``, ``embedding_layer``), validated like its config."""
    if not options:
        return
    config = model.config.slide_config
    if config.model_type != "wsi_slide_encoder":
        raise ValueError(
            f"slide_config {sorted(options)} chooses the output of a LongNet slide encoder; the pretrained tower is "
            f"{config.model_type!r}. Remove slide_config."
        )
    for key, value in options.items():
        setattr(config, key, str(value) if key == "embedding_layer" else value)
    config._check()
    model.slide_model.config = config
    logger.info("slide encoder output: pooling=%s, embedding_layer=%s", config.pooling, config.embedding_layer)


def freeze_layers_above_output(model) -> None:
    """A LongNet tower pooled from layer ``i < L`` never uses layers ``i+1..L`` or the final norm: freeze them (their
    gradients would be None, which DDP with ``find_unused_parameters=False`` refuses)."""
    config = model.config.slide_config
    if config.model_type != "wsi_slide_encoder" or config.embedding_layer == "final":
        return
    unused = [*model.slide_model.layers[int(config.embedding_layer) :], model.slide_model.layer_norm]
    if any(p.requires_grad for module in unused for p in module.parameters()):
        for module in unused:
            module.requires_grad_(False)
        logger.info(
            "slide encoder pooled from layer %s of %d: layers above it and the final LayerNorm are frozen (unused)",
            config.embedding_layer,
            config.num_hidden_layers,
        )


def standardize_tile_inputs(model, h5_paths: list[str], seed: int) -> None:
    """Set a new slide tower's input standardisation (when its config asks for it) from the training slides."""
    from processing import tile_feature_statistics
    from wsi_clip.slide_towers import find_slide_tower

    normalization = getattr(find_slide_tower(model), "tile_normalization", None)
    if normalization is None:
        return
    mean, std, count = tile_feature_statistics(h5_paths, seed=seed)
    normalization.set_statistics(mean, std)
    logger.info(
        "tile features standardised with the mean / std of %d training tiles (|mean| = %.3g, mean std = %.3g)",
        count,
        float(mean.norm()),
        float(std.mean()),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, save the checkpoint (model + processor) to ``output_dir``; returns the train (and eval) metrics."""
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)

    from transformers import AutoTokenizer, set_seed

    import wsi_clip  # noqa: F401  (registers the model, config and processor with the Auto classes)
    from processing import WSIProcessor, common_feature_dim, load_annotations, preflight_dataset, slide_contract
    from wsi_clip.data import WSIClipCollator
    from wsi_clip.evaluation import load_class_prompts
    from wsi_clip.hub import require_checkpoint_files
    from wsi_clip.trainer import WSIClipTrainer

    on_error = "skip" if data_args.skip_bad_samples else "raise"
    require_case_id = (
        data_args.require_case_id if data_args.require_case_id is not None else data_args.sample_by == "case"
    )
    train_dataset = load_annotations(
        data_args.train_file,
        "clip",
        h5_root=data_args.h5_root,
        split=data_args.train_split,
        on_error=on_error,
        require_case_id=require_case_id,
    )
    eval_dataset = None
    validation_file = data_args.validation_file or data_args.train_file
    if data_args.validation_file or data_args.validation_split:
        eval_dataset = load_annotations(
            validation_file, "clip", h5_root=data_args.h5_root, split=data_args.validation_split, on_error=on_error
        )
    for local in (model_args.model_name_or_path, model_args.slide_encoder_name_or_path):
        require_checkpoint_files(resolve_pretrained_path(local))
    feature_dim = common_feature_dim(train_dataset["h5_path"])  # sizes a new slide tower

    set_seed(training_args.seed)
    model = build_model(model_args, feature_dim)
    # pre-flight: every slide against the tower's input contract (dimension, position grid), before any step
    checks = dict(
        slide_contract(model.config.slide_config),
        check_values=data_args.check_feature_values,
        skip_bad_samples=data_args.skip_bad_samples,
        patch_size_level0=data_args.patch_size_level0,
    )
    train_dataset = preflight_dataset(
        train_dataset, source=data_args.train_file, require_case_id=require_case_id, **checks
    )
    if eval_dataset is not None:
        eval_dataset = preflight_dataset(eval_dataset, source=validation_file, **checks)
    feature_dim = model.config.slide_config.input_dim
    if not (model_args.model_name_or_path or model_args.slide_encoder_name_or_path):
        standardize_tile_inputs(model, list(train_dataset["h5_path"]), training_args.seed)
    logger.info(
        "training on %d slides (%d cases), evaluating on %s; %d-d tile features",
        len(train_dataset),
        len(set(train_dataset["case_id"])),
        len(eval_dataset) if eval_dataset is not None else "none",
        feature_dim,
    )
    tokenizer_source = resolve_pretrained_path(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path or model_args.text_model_name_or_path
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    eval_max_tiles = _no_cap(data_args.eval_max_tiles if data_args.eval_max_tiles is not None else data_args.max_tiles)
    processor = WSIProcessor(
        tokenizer,
        max_tiles=eval_max_tiles,
        tile_sampling="uniform",
        feature_dim=feature_dim,
        max_length=data_args.max_length,
        tile_size=getattr(model.config.slide_config, "tile_size", 256),
    )
    class_prompts = load_class_prompts(data_args.class_prompts) if data_args.class_prompts else None
    class_names = class_prompts.labels if class_prompts is not None else None
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    train_collator = WSIClipCollator(
        processor,
        max_tiles=_no_cap(data_args.max_tiles),
        tile_sampling=data_args.tile_sampling,
        text_max_length=data_args.max_length,
        seed=data_seed,
        patch_size_level0=data_args.patch_size_level0,
    )
    eval_collator = WSIClipCollator(
        processor,
        max_tiles=eval_max_tiles,
        tile_sampling="uniform",
        text_max_length=data_args.max_length,
        class_names=class_names,
        patch_size_level0=data_args.patch_size_level0,
    )

    trainer = WSIClipTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
        sample_by=data_args.sample_by,
        class_prompts=class_prompts,
        layer_lr_decay=model_args.layer_lr_decay,
        freeze_slide_encoder_steps=model_args.freeze_slide_encoder_steps,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # model + processor, safetensors, auto_map and modeling files
    metrics = dict(result.metrics)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if trainer.is_world_process_zero():
        logger.info("saved the WSI-CLIP checkpoint to %s", training_args.output_dir)
    return metrics


def cli() -> int:
    """The ``wsi-train-clip`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
