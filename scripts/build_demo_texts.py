#!/usr/bin/env python
"""Regenerate ``scripts/demo_data/texts/`` — the small, attributed subset of real pathology texts used by the
synthetic demo data set (``scripts/demo_data/``).

Sources (both Apache-2.0 repositories; see the generated ``NOTICE.md``):

* SlideBench (SlideChat, CVPR 2025): ``SlideBench-Caption-TCGA.csv`` (report-style captions) and
  ``SlideBench-VQA-TCGA.csv`` (multiple-choice questions) — joined on the slide id;
* WSI-Bench (WSI-LLaVA, ICCV 2025): ``per_task_test/1_Report_test.json`` (reports) and the
  ``Diagnosis_choice`` / ``Morphology_choice`` test files (multiple-choice questions) — joined on the slide.

Only slides that have a caption/report *and* at least one question are kept, so every demo case carries both.
The selection is deterministic (sorted ids, a fixed-seed permutation), so re-running gives identical files::

    .venv/bin/python scripts/build_demo_texts.py                 # reads ../shared/data
    .venv/bin/python scripts/build_demo_texts.py --data_root /path/to/data --slidebench_per_class 20
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUTPUT = REPO_ROOT / "scripts" / "demo_data" / "texts"

# Origins as recorded in the data folders' READMEs (shared/data/{slidebench,wsi-bench}/README.md).
SLIDEBENCH_ORIGIN = (
    "github.com/HadiyyaMattummathodi/slidechatplusplus (a fork of github.com/uni-medical/SlideChat "
    "holding the files of the Hugging Face dataset General-Medical-AI/SlideChat), commit "
    "ecf7a916286a16358048a39fc4e9016047b1c333, folder dataset/SlideBench/"
)
WSIBENCH_ORIGIN = (
    "github.com/XinhengLyu/WSI-LLaVA (official repository), commit "
    "4935038d9f1cfb0bd1dfe98c4816cca2163ba200, folder dataset/ (*_test.json)"
)
WSIBENCH_CHOICE_FILES = ("Diagnosis_choice_test.json", "Morphology_choice_test.json")
LETTERS = ("A", "B", "C", "D")
_OPTION_SPLIT = re.compile(r"\s*\b([A-D])\)\s")  # WSI-Bench inlines options as "... A) x B) y C) z D) w"
_SLIDE_ID = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}[A-Z]-\d{2}-[A-Z]{2}\d+$")


@dataclass
class BuildDemoTextsArguments:
    """Options of ``scripts/build_demo_texts.py``."""

    data_root: str = field(
        default=str(DEFAULT_DATA_ROOT), metadata={"help": "Folder holding slidebench/ and wsi-bench/ (shared/data)."}
    )
    output_dir: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "Where the JSONL files are written."})
    classes: list[str] = field(
        default_factory=lambda: ["BRCA", "LUAD", "COAD", "LGG"],
        metadata={"help": "TCGA project codes to keep (well represented in both sources)."},
    )
    slidebench_per_class: int = field(default=20, metadata={"help": "SlideBench slides kept per class."})
    max_questions_per_slide: int = field(default=4, metadata={"help": "Cap on multiple-choice questions per slide."})
    seed: int = field(default=0, metadata={"help": "Seed of the (deterministic) slide selection."})


def _case_id(slide_id: str) -> str:
    """The 12-character TCGA patient barcode (TCGA-XX-XXXX) of a slide barcode."""
    return slide_id[:12]


def _check_slide_id(slide_id: str, origin: str) -> str:
    if not _SLIDE_ID.match(slide_id):
        raise ValueError(f"{origin}: '{slide_id}' is not a TCGA slide barcode (TCGA-XX-XXXX-01Z-00-DX1).")
    return slide_id


def _dump_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")


def _pick(keys: list[str], n: int, seed: int) -> list[str]:
    """``n`` of the sorted ``keys`` chosen by a fixed-seed permutation, returned sorted (stable diffs)."""
    keys = sorted(keys)
    order = np.random.default_rng(seed).permutation(len(keys))[:n]
    return sorted(keys[i] for i in order)


def _slidebench(root: Path, args: BuildDemoTextsArguments) -> tuple[list[dict], list[dict]]:
    """Captions and MCQs of ``slidebench_per_class`` SlideBench slides per class (slides with both)."""
    with (root / "SlideBench-Caption-TCGA.csv").open(newline="", encoding="utf-8") as fh:
        captions = {row["Slide"]: row for row in csv.DictReader(fh) if row["Tumor"] in args.classes}
    questions: dict[str, list[dict]] = defaultdict(list)
    with (root / "SlideBench-VQA-TCGA.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["Slide"] in captions and row["Answer"] in LETTERS:
                questions[row["Slide"]].append(row)
    caption_out, vqa_out = [], []
    for k, label in enumerate(args.classes):
        slides = [s for s, row in captions.items() if row["Tumor"] == label and questions.get(s)]
        if len(slides) < args.slidebench_per_class:
            raise ValueError(
                f"SlideBench has only {len(slides)} {label} slides with caption and VQA; "
                f"lower --slidebench_per_class (asked {args.slidebench_per_class})."
            )
        for slide in _pick(slides, args.slidebench_per_class, args.seed + k):
            row = captions[slide]
            _check_slide_id(slide, "SlideBench-Caption-TCGA.csv")
            caption_out.append(
                {
                    "source": "SlideBench-Caption-TCGA",
                    "id": f"SlideBench-Caption-TCGA:{row['ID']}",
                    "slide_id": slide,
                    "case_id": _case_id(slide),
                    "label": label,
                    "question": row["Question"].strip(),
                    "caption": row["Caption"].strip(),
                }
            )
            for q in sorted(questions[slide], key=lambda r: int(r["ID"]))[: args.max_questions_per_slide]:
                vqa_out.append(
                    {
                        "source": "SlideBench-VQA-TCGA",
                        "id": f"SlideBench-VQA-TCGA:{q['ID']}",
                        "slide_id": slide,
                        "case_id": _case_id(slide),
                        "label": label,
                        "category": f"{q['Broad Category']}/{q['Narrow Category']}",
                        "question": q["Question"].strip(),
                        "options": {letter: q[letter].strip() for letter in LETTERS},
                        "answer": q["Answer"],
                    }
                )
    return caption_out, vqa_out


def _parse_wsibench_choice(text: str) -> tuple[str, dict[str, str]] | None:
    """Split a WSI-Bench human turn ``"<image>\\nstem A) .. B) .. C) .. D) .."`` into stem and options."""
    parts = _OPTION_SPLIT.split(text.replace("<image>", "").strip())
    if parts[1::2] != list(LETTERS):
        return None
    return parts[0].strip(), {letter: value.strip() for letter, value in zip(LETTERS, parts[2::2])}


def _wsibench(root: Path, args: BuildDemoTextsArguments, exclude_cases: set[str]) -> tuple[list[dict], list[dict]]:
    """Reports and MCQs of every WSI-Bench test slide of the chosen classes that has both.

    Patients in ``exclude_cases`` (already taken from SlideBench) are skipped: one patient, one demo case.
    """
    task_dir = root / "per_task_test"
    questions: dict[str, list[dict]] = defaultdict(list)
    for name in WSIBENCH_CHOICE_FILES:
        for item in json.loads((task_dir / name).read_text(encoding="utf-8")):
            human, gpt = item["conversations"][0]["value"], item["conversations"][1]["value"].strip()
            parsed = _parse_wsibench_choice(human)
            if parsed is None or gpt not in LETTERS:
                continue  # malformed upstream item (e.g. answer 'B "'): skip rather than repair
            questions[item["image"]].append(
                {
                    "task": name.removesuffix("_test.json"),
                    "id": item["id"],
                    "stem": parsed[0],
                    "options": parsed[1],
                    "answer": gpt,
                }
            )
    report_out, vqa_out = [], []
    for item in sorted(
        json.loads((task_dir / "1_Report_test.json").read_text(encoding="utf-8")), key=lambda r: r["image"]
    ):
        project, filename = item["image"].split("/", 1)
        label = project.removeprefix("TCGA-")
        slide = _check_slide_id(filename.split(".", 1)[0], "WSI-Bench 1_Report_test.json")
        if label not in args.classes or not questions.get(item["image"]) or _case_id(slide) in exclude_cases:
            continue
        report_out.append(
            {
                "source": "WSI-Bench-Report",
                "id": f"WSI-Bench:1_Report_test:{item['id']}",
                "slide_id": slide,
                "case_id": _case_id(slide),
                "label": label,
                "question": item["conversations"][0]["value"].replace("<image>", "").strip(),
                "report": item["conversations"][1]["value"].strip(),
            }
        )
        for q in questions[item["image"]][: args.max_questions_per_slide]:
            vqa_out.append(
                {
                    "source": "WSI-Bench-" + q["task"],
                    "id": f"WSI-Bench:{q['task']}_test:{q['id']}",
                    "slide_id": slide,
                    "case_id": _case_id(slide),
                    "label": label,
                    "category": q["task"],
                    "question": q["stem"],
                    "options": q["options"],
                    "answer": q["answer"],
                }
            )
    return report_out, vqa_out


def _notice(args: BuildDemoTextsArguments, counts: dict[str, dict[str, int]]) -> str:
    table = "\n".join(
        f"| {label} | {counts['captions'].get(label, 0)} | {counts['reports'].get(label, 0)} | "
        f"{counts['vqa'].get(label, 0)} |"
        for label in args.classes
    )
    return f"""# Demo texts: origin, licence and citation

These files are a small subset of **real** pathology texts used by the synthetic demo data set
(`scripts/demo_data/`). They are regenerated deterministically by `scripts/build_demo_texts.py`.

**The slide features of the demo are synthetic.** The slide ids below name real TCGA slides whose texts these
are, but no image or feature of those slides is shipped or used: the demo pairs these texts with randomly
generated tile-feature bags that carry a planted, class-specific signal.

| class | captions (SlideBench) | reports (WSI-Bench) | multiple-choice questions (both) |
|---|---|---|---|
{table}

## Files

- `captions.jsonl` — SlideBench report-style captions: `source, id, slide_id, case_id, label, question, caption`.
- `reports.jsonl` — WSI-Bench report-generation items: `source, id, slide_id, case_id, label, question, report`.
- `vqa.jsonl` — multiple-choice questions on the same slides: `source, id, slide_id, case_id, label, category,
  question, options {{A, B, C, D}}, answer` (a letter). WSI-Bench options were split out of the question text.

`slide_id` is the TCGA slide barcode (without the UUID), `case_id` the 12-character patient barcode, `label` the
TCGA project code. Texts are unmodified apart from stripping surrounding whitespace and the `<image>` marker.

## Origin

- **SlideBench** (`SlideBench-Caption-TCGA.csv`, `SlideBench-VQA-TCGA.csv`): {SLIDEBENCH_ORIGIN}.
  Licence: the SlideChat repository is licensed under the **Apache License 2.0**; the Hugging Face dataset card
  states no licence. The texts were derived from TCGA pathology reports (GDC open access) with GPT-4.
- **WSI-Bench** (`1_Report_test.json`, `{WSIBENCH_CHOICE_FILES[0]}`, `{WSIBENCH_CHOICE_FILES[1]}`):
  {WSIBENCH_ORIGIN}. Licence: the WSI-LLaVA repository is licensed under the **Apache License 2.0**.
  The texts were derived from TCGA pathology reports.

## Citation

If you use these texts, cite the original works:

- Chen, Y. et al. *SlideChat: A Large Vision-Language Assistant for Whole-Slide Pathology Image
  Understanding.* CVPR 2025.
- Liang, Y. et al. *WSI-LLaVA: A Multimodal Large Language Model for Whole Slide Image.* ICCV 2025.

Selection: classes {", ".join(args.classes)}; {args.slidebench_per_class} SlideBench slides per class (caption and
at least one question); every WSI-Bench test slide of those classes with a report and at least one question;
at most {args.max_questions_per_slide} questions per slide; one slide per patient (WSI-Bench patients already
taken from SlideBench are skipped); seed {args.seed}.
"""


def build_demo_texts(args: BuildDemoTextsArguments) -> dict[str, Path]:
    """Write ``captions.jsonl``, ``reports.jsonl``, ``vqa.jsonl`` and ``NOTICE.md``; return their paths."""
    data_root = Path(args.data_root)
    for sub in ("slidebench", "wsi-bench"):
        if not (data_root / sub).is_dir():
            raise FileNotFoundError(f"{data_root / sub} not found: pass --data_root (the shared/data folder).")
    captions, sb_vqa = _slidebench(data_root / "slidebench", args)
    reports, wb_vqa = _wsibench(data_root / "wsi-bench", args, {r["case_id"] for r in captions})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "captions": out / "captions.jsonl",
        "reports": out / "reports.jsonl",
        "vqa": out / "vqa.jsonl",
        "notice": out / "NOTICE.md",
    }
    records = {"captions": captions, "reports": reports, "vqa": sb_vqa + wb_vqa}
    counts: dict[str, dict[str, int]] = {}
    for name, recs in records.items():
        _dump_jsonl(files[name], recs)
        counts[name] = {label: sum(r["label"] == label for r in recs) for label in args.classes}
    files["notice"].write_text(_notice(args, counts), encoding="utf-8")
    return files


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(BuildDemoTextsArguments).parse_args_into_dataclasses(args=argv)
    files = build_demo_texts(args)
    total = sum(p.stat().st_size for p in files.values())
    for name, path in files.items():
        print(f"{name:>9}: {path} ({path.stat().st_size / 1024:.1f} KiB)")
    print(f"    total: {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
