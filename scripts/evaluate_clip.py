#!/usr/bin/env python
"""Evaluate a WSI-CLIP checkpoint: zero-shot classification and slide↔text retrieval.

    python scripts/evaluate_clip.py --model demo_output/clip --data demo_output/data/annotations.csv \\
        --split test --classes demo_output/data/class_prompts.json
    python scripts/evaluate_clip.py --help

* zero-shot (with ``--classes`` and a ``label`` column): class names × prompt templates, embeddings averaged per
  class (TITAN / CONCH style); balanced accuracy, weighted F1, macro one-vs-rest AUROC (and plain accuracy);
* retrieval: slide→text and text→slide Recall@1/5/10 and mAP; the slides of one case share their report, so every
  one of them is a correct answer, and identical texts are ranked once.

Prints a table and writes the metrics as JSON (``--output``; default ``<model>/eval_<data stem>[_<split>].json``).

Several processes split the slides between them (each rank embeds every world-size-th row, no padding) and give
exactly the single-process metrics::

    torchrun --nproc_per_node 8 scripts/evaluate_clip.py --model ... --data ...
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a checkout

from transformers import HfArgumentParser  # noqa: E402


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "WSI-CLIP checkpoint folder (save_pretrained / train_clip.py output)."})
    data: str = field(metadata={"help": "Annotation file (CSV/JSON/JSONL with h5_path, caption[, case_id, label])."})
    classes: str | None = field(default=None, metadata={
        "help": "Zero-shot prompts, JSON or YAML: {'classnames': {label: [names]}, 'templates': ['a slide of {}.']}."})
    split: str | None = field(default=None, metadata={"help": "Keep only rows whose 'split' equals this."})
    h5_root: str | None = field(default=None, metadata={"help": "Folder that relative h5_path values resolve against."})
    max_tiles: int | None = field(default=None, metadata={
        "help": "Tiles per slide (uniform sampling); default: the saved processor's setting; 0: all tiles."})
    batch_size: int = field(default=8, metadata={"help": "Slides per forward pass."})
    text_max_length: int | None = field(default=None, metadata={"help": "Token limit for texts (default: processor's)."})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu / ... (default: cuda when available)."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the metrics."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label of each slide."})


def load_model_and_processor(path: str, device: str):
    """The checkpoint's model (``AutoModel`` after ``import wsi_clip``) and its processor (or tokenizer)."""
    import wsi_clip  # noqa: F401  (registers WSI-CLIP with the Auto classes)
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from processing import WSIProcessor

    model = AutoModel.from_pretrained(path).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError):  # a checkpoint saved without its processor: build one from the tokenizer
        processor = WSIProcessor(AutoTokenizer.from_pretrained(path), tile_sampling="uniform")
    if not hasattr(processor, "pad_slides"):
        processor = WSIProcessor(getattr(processor, "tokenizer", processor), tile_sampling="uniform")
    return model, processor


def init_distributed(device: str | None) -> tuple[str, bool]:
    """Join the process group when launched by torchrun / accelerate (``WORLD_SIZE`` > 1); returns the device of
    this rank and whether it is the main process."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device or ("cuda" if torch.cuda.is_available() else "cpu"), True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return (f"cuda:{local_rank}" if use_cuda else "cpu"), dist.get_rank() == 0


def evaluate(args: EvaluationArguments) -> dict[str, float]:
    import torch

    from processing import load_annotations
    from wsi_clip.data import WSIClipCollator
    from wsi_clip.evaluation import (build_zero_shot_classifier, classification_metrics, contrastive_loss_full,
                                     encode_dataset, format_table, load_class_prompts, retrieval_metrics,
                                     zero_shot_scores)

    from wsi_clip.hub import require_checkpoint_files

    device, is_main = init_distributed(args.device)
    require_checkpoint_files(args.model)
    model, processor = load_model_and_processor(args.model, device)
    dataset = load_annotations(args.data, "clip", h5_root=args.h5_root, split=args.split)
    prompts = load_class_prompts(args.classes) if args.classes else None
    max_tiles = processor.max_tiles if args.max_tiles is None else (args.max_tiles or None)
    collator = WSIClipCollator(processor, max_tiles=max_tiles, tile_sampling="uniform",
                               text_max_length=args.text_max_length, class_names=prompts.labels if prompts else None,
                               label_column=args.label_column)
    encoded = encode_dataset(model, dataset, collator, batch_size=args.batch_size)

    metrics: dict[str, float] = {"num_slides": float(len(dataset)), "num_cases": float(len(set(dataset["case_id"])))}
    metrics.update(retrieval_metrics(encoded["slide_embeds"], encoded["text_embeds"], encoded["case_ids"],
                                     encoded["text_ids"]))
    metrics["contrastive_loss"] = contrastive_loss_full(encoded["slide_embeds"], encoded["text_embeds"],
                                                        encoded["logit_scale"], encoded["case_ids"], encoded["text_ids"])
    if prompts is not None:
        if args.label_column not in dataset.column_names:
            raise ValueError(f"{args.data}: no '{args.label_column}' column, so zero-shot accuracy cannot be measured; "
                             "add the column or pass --label_column.")
        classifier = build_zero_shot_classifier(model, processor, prompts, max_length=args.text_max_length)
        scores = zero_shot_scores(encoded["slide_embeds"].to(classifier.device), classifier)
        metrics.update(classification_metrics(encoded["class_labels"], scores))
        unknown = int((encoded["class_labels"] < 0).sum())
        if unknown:
            metrics["zero_shot_unlabelled_slides"] = float(unknown)

    if not is_main:
        return metrics
    title = f"WSI-CLIP {args.model} on {args.data}" + (f" [{args.split}]" if args.split else "")
    print(format_table(metrics, title))
    stem = Path(args.data).stem + (f"_{args.split}" if args.split else "")
    output = Path(args.output) if args.output else Path(args.model) / f"eval_{stem}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"model": args.model, "data": args.data, "split": args.split,
                                  "classes": args.classes, "metrics": metrics}, indent=1) + "\n", encoding="utf-8")
    print(f"metrics written to {output}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    try:
        return evaluate(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
