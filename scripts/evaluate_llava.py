#!/usr/bin/env python
"""Evaluate WSI-LLaVA: closed questions → accuracy beside blind baselines; open answers / reports → BLEU, ROUGE-L.

    python scripts/evaluate_llava.py --model demo_output/llava_stage2 --adapter demo_output/llava_stage3 \
        --annotations demo_output/data/llava_instruct_test.json --output demo_output/llava_eval.json
    python scripts/evaluate_llava.py --model ckpt/merged --annotations SlideBench-VQA-TCGA.csv --h5_root feats/ \
        --token_selection prumerge_plus --batch_size 16

Annotation layouts: LLaVA conversation JSON (WSI-Bench per-task files, SlideChat, the demo), WSI-Bench JSONL
(``question`` / ``T-answer``), the seed CSV, and SlideBench VQA CSVs (``Slide, Question, A..D, Answer``: slides are
looked up as ``<h5_root>/<Slide><slide_suffix>``). Multi-turn conversations give one item per answer, with the gold
earlier turns as history. Writes every prediction and the metrics to ``--output`` (JSON) and prints the summary.

Baselines a report generator must beat: ``--text_only true`` (the same recipe trained without the slide:
``train_llava.py --text_only true``) and ``--mode retrieval`` (the nearest training report in WSI-CLIP space).
``--mode loss`` gives the teacher-forced loss of the gold answers, with or without the slide.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

import wsi_llava  # noqa: F401  (registers the model classes)
from processing import load_annotations
from wsi_clip.hub import require_checkpoint_files
from wsi_llava import WSILlavaForConditionalGeneration, generate_answers
from wsi_llava.evaluation import evaluation_items, summarize


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "WSI-LLaVA checkpoint (full or merged; holds the processor too), or with "
                                         "--mode retrieval a WSI-CLIP checkpoint."})
    annotations: str = field(metadata={"help": "Questions: LLaVA JSON, WSI-Bench JSONL, seed CSV or SlideBench CSV."})
    adapter: str | None = field(default=None, metadata={"help": "Stage-3 LoRA adapter folder (PeftModel)."})
    processor: str | None = field(default=None, metadata={"help": "Processor folder (default: --model)."})
    output: str | None = field(default=None, metadata={"help": "Write predictions + metrics JSON here."})
    h5_root: str | None = field(default=None, metadata={"help": "Folder the slide paths are relative to."})
    slide_suffix: str = field(default=".h5", metadata={"help": "SlideBench CSV: file suffix after the Slide id."})
    split: str | None = field(default=None, metadata={"help": "Keep only rows with this split value."})
    majority_from: str | None = field(default=None, metadata={
        "help": "Annotations (e.g. the training set) to take the majority-answer baseline from; default: the "
                "evaluated set itself."})
    max_items: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    token_selection: str | None = field(default=None, metadata={"help": "Override the model's token selector."})
    token_selection_kwargs: str | None = field(default=None, metadata={"help": "JSON options of the selector."})
    max_tiles: int | None = field(default=None, metadata={"help": "Tile cap per slide (default: the processor's)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per generate() call."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer / report."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1 or auto."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype (bfloat16 on GPUs)."})
    mode: str = field(default="generate", metadata={
        "help": "generate: answer and score; loss: teacher-forced loss of the gold answers (nats/token); retrieval: "
                "the retrieval baseline (--model is a WSI-CLIP checkpoint, answers come from --retrieval_pool)."})
    retrieval_pool: str | None = field(default=None, metadata={
        "help": "--mode retrieval: annotations (e.g. the training reports) whose answers are retrieved."})
    loss_text_only_too: bool = field(default=False, metadata={
        "help": "--mode loss: also the loss of the same model without the slide (for a stage-2 checkpoint: the LM "
                "alone), in the same run."})
    max_length: int | None = field(default=None, metadata={
        "help": "--mode loss: text token limit per example (default: the processor's)."})
    text_only: bool = field(default=False, metadata={
        "help": "Answer without the slide (prompts without the placeholder): for a model trained with "
                "train_llava.py --text_only true, the text-only baseline."})


def slidebench_to_records(path: Path) -> list[dict[str, Any]] | None:
    """SlideBench VQA CSV rows → seed records (question with its options, letter answer); None if not SlideBench."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        if not {"Slide", "Question", "A", "B", "Answer"} <= columns:
            return None
        rows = list(reader)
    letters = [c for c in "ABCDEFGH" if c in columns]
    records = []
    for row in rows:
        options = "".join(f"\n{c}) {row[c]}" for c in letters if str(row.get(c) or "").strip())
        records.append({"slide_id": row["Slide"], "question": row["Question"].strip() + options,
                        "answer": row["Answer"].strip(), "category": row.get("Narrow Category") or row.get("Task", ""),
                        "dataset": "SlideBench"})
    return records


def load_items(args: EvalArguments, path: str) -> list[dict[str, Any]]:
    source = Path(path)
    if source.suffix.lower() == ".csv":
        records = slidebench_to_records(source)
        if records is not None:
            root = Path(args.h5_root or source.parent)
            for r in records:
                r["h5_path"] = f"{r['slide_id']}{args.slide_suffix}"  # resolved against (and confined to) root
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as fh:
                json.dump(records, fh)
            try:
                dataset = load_annotations(fh.name, "llava", h5_root=root)  # Slide ids may not escape h5_root
            finally:
                Path(fh.name).unlink()
            return evaluation_items(dataset)
    dataset = load_annotations(path, "llava", h5_root=args.h5_root, split=args.split)
    return evaluation_items(dataset)


def load_model_and_processor(args: EvalArguments, device: str) -> tuple[Any, Any]:
    import torch

    from processing import WSIProcessor

    dtype = getattr(torch, args.dtype) if args.dtype else None
    require_checkpoint_files(args.model)
    model = WSILlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(device).eval()
    source = args.processor or args.adapter or args.model
    processor = WSIProcessor.from_pretrained(source if Path(source, "processor_config.json").is_file() else args.model)
    return model, processor


def answer_loss(args: EvalArguments, model: Any, processor: Any, path: str, device: str, text_only: bool
                ) -> dict[str, float]:
    """Teacher-forced loss (nats per answer token, token-weighted over the whole file) of the gold answers: how well
    the model predicts the reference, with the slide or (``text_only``) without it."""
    import torch
    from tqdm.auto import tqdm

    from processing import InstructionCollator

    rows = load_annotations(path, "llava", h5_root=args.h5_root, split=args.split)
    if args.max_items:
        rows = rows.select(range(min(args.max_items, len(rows))))
    collator = InstructionCollator(processor, max_tiles=args.max_tiles or processor.max_tiles,
                                   tile_sampling="uniform", max_length=args.max_length, text_only=text_only)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), args.batch_size), desc="answer loss"):
            batch = collator([rows[i] for i in range(start, min(start + args.batch_size, len(rows)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            labels = out.labels if out.labels is not None else batch["labels"]
            count = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * count
            tokens += count
    return {"answer_loss": total / max(tokens, 1), "answer_tokens": tokens, "n": len(rows)}


def retrieval_predictions(args: EvalArguments, items: list[dict[str, Any]], device: str) -> list[str]:
    """The retrieval baseline: for every item, the answer of the ``--retrieval_pool`` item (e.g. the training
    reports) whose WSI-CLIP text embedding is nearest to the item's slide embedding (``--model``: a WSI-CLIP
    checkpoint)."""
    import wsi_clip  # noqa: F401  (registers WSI-CLIP)
    from processing import WSIProcessor
    from transformers import AutoModel
    from wsi_clip.evaluation import nearest_texts

    if not args.retrieval_pool:
        raise SystemExit("--mode retrieval needs --retrieval_pool (annotations whose answers are retrieved).")
    require_checkpoint_files(args.model)
    clip = AutoModel.from_pretrained(args.model).to(device).eval()
    processor = WSIProcessor.from_pretrained(args.model)
    pool = sorted({i["answer"] for i in load_items(args, args.retrieval_pool) if i["kind"] == "open"})
    if not pool:
        raise SystemExit(f"{args.retrieval_pool}: no open answers (reports) to retrieve from.")
    best = nearest_texts(clip, processor, [i["h5_path"] for i in items], pool, max_tiles=args.max_tiles)
    return [pool[j] for j in best]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    import torch

    if args.mode not in ("generate", "loss", "retrieval"):
        raise SystemExit(f"--mode {args.mode!r}: use generate, loss or retrieval.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.mode == "loss":
        model, processor = load_model_and_processor(args, device)
        report = {"loss": answer_loss(args, model, processor, args.annotations, device, args.text_only)}
        if args.loss_text_only_too and not args.text_only:
            report["loss_text_only"] = answer_loss(args, model, processor, args.annotations, device, True)
        for key, label in (("loss", "text only" if args.text_only else "with the slide"),
                           ("loss_text_only", "text only")):
            if key in report:
                print(f"answer loss ({label}): {report[key]['answer_loss']:.4f} nats/token over "
                      f"{report[key]['answer_tokens']} tokens (n={report[key]['n']})")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"metrics": report}, indent=1), encoding="utf-8")
        return report

    items = load_items(args, args.annotations)
    if args.max_items:
        items = items[: args.max_items]
    if args.mode == "retrieval":
        items = [i for i in items if i["kind"] == "open"]
        predictions = retrieval_predictions(args, items, device)
    else:
        model, processor = load_model_and_processor(args, device)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
        if args.do_sample:
            gen_kwargs["temperature"] = args.temperature
        if args.token_selection:
            gen_kwargs["token_selection"] = args.token_selection
            gen_kwargs["token_selection_kwargs"] = json.loads(args.token_selection_kwargs or "{}")
        slides = None if args.text_only else [i["h5_path"] for i in items]
        predictions = generate_answers(model, processor, slides, [i["history"] for i in items],
                                       batch_size=args.batch_size, max_tiles=args.max_tiles, progress=True,
                                       **gen_kwargs)
    for item, prediction in zip(items, predictions):
        item["prediction"] = prediction
    # the training items themselves: the majority answer is taken per question kind (choice / yes_no)
    majority = load_items(args, args.majority_from) if args.majority_from else None
    report = summarize(items, majority)
    closed = report.get("closed")
    if closed:
        print(f"closed questions (n={closed['n']}): accuracy {closed['accuracy']:.3f} | blind baselines: majority "
              f"answer per kind {closed['majority_baseline']:.3f}, random {closed['random_baseline']:.3f} | "
              f"unparsed answers {closed['unparsed']:.3f}")
        for kind, m in closed["by_kind"].items():
            print(f"  {kind} (n={m['n']}): accuracy {m['accuracy']:.3f} | majority answer '{m['majority_answer']}' "
                  f"({'from --majority_from' if m['majority_from'] == 'source' else 'of the evaluated set'}) "
                  f"{m['majority_baseline']:.3f}, random {m['random_baseline']:.3f}")
    opened = report.get("open")
    if opened:
        print(f"open answers (n={opened['n']}): " + ", ".join(
            f"{k.upper().replace('_', '-')} {v:.3f}" for k, v in opened.items() if k != "n"))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        for item in items:
            item.pop("history", None)
        Path(args.output).write_text(json.dumps({"metrics": report, "items": items}, indent=1, ensure_ascii=False),
                                     encoding="utf-8")
        print(f"predictions and metrics written to {args.output}")
    return report


if __name__ == "__main__":
    main()
