"""``wsi-evaluate-llava``: WSI-LLaVA on held-out questions — closed questions → accuracy beside blind baselines; open
answers / reports → BLEU, ROUGE-L.

    wsi-evaluate-llava --model_name_or_path runs/demo/llava_stage2 --adapter runs/demo/llava_stage3 \\
        --test_file runs/demo/data/llava_instruct_test.json --output runs/demo/llava_eval.json
    wsi-evaluate-llava --model_name_or_path ckpt/merged --test_file SlideBench-VQA-TCGA.csv --h5_root feats/ \\
        --token_selection prumerge_plus --batch_size 16

Annotation layouts: LLaVA conversation JSON (WSI-Bench per-task files, SlideChat, the demo), WSI-Bench JSONL
(``question`` / ``T-answer``), the seed CSV, and SlideBench VQA CSVs (``Slide, Question, A..D, Answer``: slides are
looked up as ``<h5_root>/<Slide><slide_suffix>``). Multi-turn conversations give one item per answer, with the gold
earlier turns as history. Writes every prediction and the metrics to ``--output`` (JSON) and prints the summary.

Baselines a report generator must beat: ``--text_only true`` (the same recipe trained without the slide:
``wsi-train-llava --text_only true``) and ``--mode retrieval`` (the nearest training report in WSI-CLIP space).
``--mode loss`` gives the teacher-forced loss of the gold answers, with or without the slide.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from processing import load_annotations
from wsi_clip.cli import exit_status, parse_command_line, parse_mapping, setup_logging
from wsi_clip.hub import require_checkpoint_files

from ..arguments import EvaluationArguments
from ..assembly import parse_dtype
from ..evaluation import evaluation_items, summarize
from ..inference import generate_answers
from ..modeling_wsillava import WSILlavaForConditionalGeneration

logger = logging.getLogger(__name__)

COMMAND = "wsi-evaluate-llava"


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
        records.append(
            {
                "slide_id": row["Slide"],
                "question": row["Question"].strip() + options,
                "answer": row["Answer"].strip(),
                "category": row.get("Narrow Category") or row.get("Task", ""),
                "dataset": "SlideBench",
            }
        )
    return records


def load_items(args: EvaluationArguments, path: str) -> list[dict[str, Any]]:
    """The evaluation items (one per answer) of an annotation file, SlideBench VQA CSVs included."""
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
    dataset = load_annotations(path, "llava", h5_root=args.h5_root, split=args.test_split)
    return evaluation_items(dataset)


def load_model_and_processor(args: EvaluationArguments, device: str) -> tuple[Any, Any]:
    """The WSI-LLaVA checkpoint (with ``--adapter`` its LoRA on top) on ``device``, and its processor."""
    from processing import WSIProcessor

    require_checkpoint_files(args.model_name_or_path)
    model = WSILlavaForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=parse_dtype(args.dtype))
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(device).eval()
    source = args.processor or args.adapter or args.model_name_or_path
    processor = WSIProcessor.from_pretrained(
        source if Path(source, "processor_config.json").is_file() else args.model_name_or_path
    )
    return model, processor


def answer_loss(
    args: EvaluationArguments, model: Any, processor: Any, path: str, device: str, text_only: bool
) -> dict[str, float]:
    """Teacher-forced loss (nats per answer token, token-weighted over the whole file) of the gold answers: how well
    the model predicts the reference, with the slide or (``text_only``) without it."""
    import torch
    from tqdm.auto import tqdm

    from processing import InstructionCollator

    rows = load_annotations(path, "llava", h5_root=args.h5_root, split=args.test_split)
    if args.max_items:
        rows = rows.select(range(min(args.max_items, len(rows))))
    collator = InstructionCollator(
        processor,
        max_tiles=args.max_tiles or processor.max_tiles,
        tile_sampling="uniform",
        max_length=args.max_length,
        text_only=text_only,
        patch_size_level0=args.patch_size_level0,
    )
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


def retrieval_predictions(args: EvaluationArguments, items: list[dict[str, Any]], device: str) -> list[str]:
    """The retrieval baseline: for every item, the answer of the ``--retrieval_pool`` item (e.g. the training
    reports) whose WSI-CLIP text embedding is nearest to the item's slide embedding (``--model_name_or_path``: a
    WSI-CLIP checkpoint)."""
    from transformers import AutoModel

    import wsi_clip  # noqa: F401  (registers WSI-CLIP)
    from processing import WSIProcessor
    from wsi_clip.evaluation import nearest_texts

    if not args.retrieval_pool:
        raise SystemExit("--mode retrieval needs --retrieval_pool (annotations whose answers are retrieved).")
    require_checkpoint_files(args.model_name_or_path)
    clip = AutoModel.from_pretrained(args.model_name_or_path).to(device).eval()
    processor = WSIProcessor.from_pretrained(args.model_name_or_path)
    pool = sorted({i["answer"] for i in load_items(args, args.retrieval_pool) if i["kind"] == "open"})
    if not pool:
        raise SystemExit(f"{args.retrieval_pool}: no open answers (reports) to retrieve from.")
    best = nearest_texts(clip, processor, [i["h5_path"] for i in items], pool, max_tiles=args.max_tiles)
    return [pool[j] for j in best]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = parse_command_line(EvaluationArguments, argv, COMMAND)
    setup_logging()
    import torch

    if args.mode not in ("generate", "loss", "retrieval"):
        raise SystemExit(f"--mode {args.mode!r}: use generate, loss or retrieval.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.mode == "loss":
        model, processor = load_model_and_processor(args, device)
        report = {"loss": answer_loss(args, model, processor, args.test_file, device, args.text_only)}
        if args.loss_text_only_too and not args.text_only:
            report["loss_text_only"] = answer_loss(args, model, processor, args.test_file, device, True)
        for key, label in (
            ("loss", "text only" if args.text_only else "with the slide"),
            ("loss_text_only", "text only"),
        ):
            if key in report:
                print(
                    f"answer loss ({label}): {report[key]['answer_loss']:.4f} nats/token over "
                    f"{report[key]['answer_tokens']} tokens (n={report[key]['n']})"
                )
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"metrics": report}, indent=1), encoding="utf-8")
        return report

    items = load_items(args, args.test_file)
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
            gen_kwargs["token_selection_kwargs"] = parse_mapping(args.token_selection_kwargs, "token_selection_kwargs")
        slides = None if args.text_only else [i["h5_path"] for i in items]
        predictions = generate_answers(
            model,
            processor,
            slides,
            [i["history"] for i in items],
            batch_size=args.batch_size,
            max_tiles=args.max_tiles,
            patch_size_level0=args.patch_size_level0,
            progress=True,
            **gen_kwargs,
        )
    for item, prediction in zip(items, predictions):
        item["prediction"] = prediction
    # the training items themselves: the majority answer is taken per question kind (choice / yes_no)
    majority = load_items(args, args.majority_from) if args.majority_from else None
    report = summarize(items, majority)
    closed = report.get("closed")
    if closed:
        print(
            f"closed questions (n={closed['n']}): accuracy {closed['accuracy']:.3f} | blind baselines: majority "
            f"answer per kind {closed['majority_baseline']:.3f}, random {closed['random_baseline']:.3f} | "
            f"unparsed answers {closed['unparsed']:.3f}"
        )
        for kind, m in closed["by_kind"].items():
            print(
                f"  {kind} (n={m['n']}): accuracy {m['accuracy']:.3f} | majority answer '{m['majority_answer']}' "
                f"({'from --majority_from' if m['majority_from'] == 'source' else 'of the evaluated set'}) "
                f"{m['majority_baseline']:.3f}, random {m['random_baseline']:.3f}"
            )
    opened = report.get("open")
    if opened:
        print(
            f"open answers (n={opened['n']}): "
            + ", ".join(f"{k.upper().replace('_', '-')} {v:.3f}" for k, v in opened.items() if k != "n")
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        for item in items:
            item.pop("history", None)
        Path(args.output).write_text(
            json.dumps({"metrics": report, "items": items}, indent=1, ensure_ascii=False), encoding="utf-8"
        )
        logger.info("predictions and metrics written to %s", args.output)
    return report


def cli() -> int:
    """The ``wsi-evaluate-llava`` console script."""
    return exit_status(main())


if __name__ == "__main__":
    main()
