"""``wsi-evaluate-clip``: a WSI-CLIP checkpoint on held-out slides — zero-shot classification and slide↔text
retrieval.

    wsi-evaluate-clip --model_name_or_path runs/demo/clip --test_file runs/demo/data/annotations.csv \\
        --test_split test --class_prompts runs/demo/data/class_prompts.json

* zero-shot (with ``--class_prompts`` and a ``label`` column): class names × prompt templates, embeddings averaged per
  class (TITAN / CONCH style); balanced accuracy, weighted F1, macro one-vs-rest AUROC (and plain accuracy);
* retrieval: slide→text and text→slide Recall@1/5/10 and mAP; the slides of one case share their report, so every
  one of them is a correct answer, and identical texts are ranked once;
* with ``--probes true``: linear probe, k-NN and few-shot (1 / 4 / 16 cases per class) on the slide embeddings, folds
  split by case, mean and 95 % CI over folds, beside the same probes on the mean of the tile features (the reference
  a slide model must beat; :mod:`wsi_clip.probes`).

Prints a table and writes the metrics as JSON (``--output``; default
``<model_name_or_path>/eval_<test_file stem>[_<test_split>].json``).

Several processes split the slides between them (each rank embeds every world-size-th row, no padding) and give
exactly the single-process metrics::

    torchrun --nproc_per_node 8 -m wsi_clip.commands.evaluate --model_name_or_path ... --test_file ...
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..arguments import EvaluationArguments, ProbeOptions
from ..cli import exit_status, init_distributed, parse_command_line, setup_logging

logger = logging.getLogger(__name__)

COMMAND = "wsi-evaluate-clip"


def load_model_and_processor(path: str, device: str):
    """The checkpoint's model (``AutoModel`` after ``import wsi_clip``) and its processor (or tokenizer)."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    import wsi_clip  # noqa: F401  (registers WSI-CLIP with the Auto classes)
    from processing import WSIProcessor

    model = AutoModel.from_pretrained(path).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError):  # a checkpoint saved without its processor: build one from the tokenizer
        processor = WSIProcessor(AutoTokenizer.from_pretrained(path), tile_sampling="uniform")
    if not hasattr(processor, "pad_slides"):
        processor = WSIProcessor(getattr(processor, "tokenizer", processor), tile_sampling="uniform")
    return model, processor


def evaluate(args: EvaluationArguments, options: ProbeOptions | None = None) -> dict[str, float]:
    """The metrics of ``args.model_name_or_path`` on ``args.test_file``; the main process prints the table and
    writes the JSON."""
    from processing import load_annotations
    from wsi_clip.data import WSIClipCollator
    from wsi_clip.evaluation import (
        build_zero_shot_classifier,
        classification_metrics,
        contrastive_loss_full,
        encode_dataset,
        format_table,
        load_class_prompts,
        retrieval_metrics,
        zero_shot_scores,
    )
    from wsi_clip.hub import require_checkpoint_files

    device, is_main = init_distributed(args.device)
    require_checkpoint_files(args.model_name_or_path)
    model, processor = load_model_and_processor(args.model_name_or_path, device)
    dataset = load_annotations(args.test_file, "clip", h5_root=args.h5_root, split=args.test_split)
    prompts = load_class_prompts(args.class_prompts) if args.class_prompts else None
    max_tiles = processor.max_tiles if args.max_tiles is None else (args.max_tiles or None)
    collator = WSIClipCollator(
        processor,
        max_tiles=max_tiles,
        tile_sampling="uniform",
        text_max_length=args.max_length,
        class_names=prompts.labels if prompts else None,
        label_column=args.label_column,
        patch_size_level0=args.patch_size_level0,
    )
    encoded = encode_dataset(model, dataset, collator, batch_size=args.batch_size)

    metrics: dict[str, float] = {"num_slides": float(len(dataset)), "num_cases": float(len(set(dataset["case_id"])))}
    metrics.update(
        retrieval_metrics(encoded["slide_embeds"], encoded["text_embeds"], encoded["case_ids"], encoded["text_ids"])
    )
    metrics["contrastive_loss"] = contrastive_loss_full(
        encoded["slide_embeds"],
        encoded["text_embeds"],
        encoded["logit_scale"],
        encoded["case_ids"],
        encoded["text_ids"],
    )
    if prompts is not None:
        if args.label_column not in dataset.column_names:
            raise ValueError(
                f"{args.test_file}: no '{args.label_column}' column, so zero-shot accuracy cannot be "
                "measured; add the column or pass --label_column."
            )
        classifier = build_zero_shot_classifier(model, processor, prompts, max_length=args.max_length)
        scores = zero_shot_scores(encoded["slide_embeds"].to(classifier.device), classifier)
        metrics.update(classification_metrics(encoded["class_labels"], scores))
        unknown = int((encoded["class_labels"] < 0).sum())
        if unknown:
            metrics["zero_shot_unlabelled_slides"] = float(unknown)
    probe_tables = {}
    if options is not None and options.probes and is_main:
        probe_tables = run_slide_probes(args, options, dataset, encoded["slide_embeds"])
        metrics.update(
            {
                f"probe_{k}": v
                for k, v in probe_tables[args.model_name_or_path].items()
                if not k.endswith(("_ci_low", "_ci_high")) and not k.startswith("num_")
            }
        )

    if not is_main:
        return metrics
    title = f"WSI-CLIP {args.model_name_or_path} on {args.test_file}" + (
        f" [{args.test_split}]" if args.test_split else ""
    )
    print(format_table(metrics, title))
    if probe_tables:
        from wsi_clip.probes import format_probe_table

        print(format_probe_table(probe_tables, options.few_shot))
    stem = Path(args.test_file).stem + (f"_{args.test_split}" if args.test_split else "")
    output = Path(args.output) if args.output else Path(args.model_name_or_path) / f"eval_{stem}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    # the file's keys are the ones it had before the flags were renamed (its readers stay valid)
    output.write_text(
        json.dumps(
            {
                "model": args.model_name_or_path,
                "data": args.test_file,
                "split": args.test_split,
                "classes": args.class_prompts,
                "metrics": metrics,
                **({"probes": probe_tables} if probe_tables else {}),
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    logger.info("metrics written to %s", output)
    return metrics


def run_slide_probes(args: EvaluationArguments, options: ProbeOptions, dataset, slide_embeds) -> dict:
    """Linear probe, k-NN and few-shot on the checkpoint's slide embeddings and on the mean of the tile features."""
    from wsi_clip.commands.probe import encode_labels, probe_settings
    from wsi_clip.probes import mean_tile_features, run_probes

    if args.label_column not in dataset.column_names:
        raise ValueError(f"{args.test_file}: --probes needs a '{args.label_column}' column (or pass --label_column).")
    labels, _ = encode_labels(list(dataset[args.label_column]), args.test_file, args.label_column)
    cases = [str(c) for c in dataset["case_id"]]
    settings = probe_settings(options)
    tables = {args.model_name_or_path: run_probes(slide_embeds, labels, cases, settings)}
    if options.reference:
        reference = mean_tile_features(list(dataset["h5_path"]))
        tables["mean of tile features (reference)"] = run_probes(reference, labels, cases, settings)
    return tables


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, options = parse_command_line((EvaluationArguments, ProbeOptions), argv, COMMAND)
    setup_logging()
    try:
        return evaluate(args, options)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def cli() -> int:
    """The ``wsi-evaluate-clip`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
