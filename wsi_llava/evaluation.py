"""VQA and report metrics for WSI-LLaVA: closed questions → accuracy beside blind baselines; open answers →
BLEU-1..4 and ROUGE-L.

Closed questions are multiple choice (options written ``A) …`` / ``A. …`` / ``A: …`` one per line, answer a letter)
or yes/no. Blind baselines are what a model that never looks at the slide scores: always the majority answer
(e.g. 41.4 % on SlideBench-VQA TCGA, 42.6 % on BCNB) and uniform random guessing (1 / number of options).

BLEU uses NLTK's ``sentence_bleu`` with smoothing method 4 and ROUGE-L Google's ``rouge-score`` F-measure, averaged
per sample — the WSI-LLaVA ``NLP_Metric.py`` protocol; empty predictions count as zeros. Both work offline
(``pip install wsi-mm[metrics]``); never ``evaluate.load``, which downloads metric code at run time.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

_OPTION = re.compile(r"(?:^|\n)\s*\(?([A-H])[\).:]\s+\S"  # one option per line: "A) x", "A. x", "(A) x"
                     r"|(?:^|\s)\(?([A-H])\)\s+\S")  # inline (WSI-Bench): "... A) x B) y"
_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-H])(?:[\).:,]|\s|$)"),  # "B", "B)", "(B) ...", "B. text"
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-H])\b", re.IGNORECASE),
    re.compile(r"\b([A-H])\)"),
)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"\w+|[^\w\s]")


def question_options(question: str) -> list[str]:
    """Option letters written in the question (``A) …`` lines), in order, without duplicates."""
    found = [a or b for a, b in _OPTION.findall(question)]
    letters = list(dict.fromkeys(found))
    # keep the run A, B, C, ... (drops stray matches such as a lone "D)" inside an option text)
    run = [chr(ord("A") + i) for i in range(len(letters)) if chr(ord("A") + i) in letters]
    return run[: next((i for i, l in enumerate(run) if l != chr(ord("A") + i)), len(run))]


def question_kind(question: str, answer: str) -> str:
    """``"choice"`` (options in the question, letter answer), ``"yes_no"`` or ``"open"``."""
    letters = question_options(question)
    if len(letters) >= 2 and parse_letter(answer, letters) is not None and len(answer.strip()) <= 3:
        return "choice"
    if answer.strip().lower().rstrip(".") in ("yes", "no"):
        return "yes_no"
    return "open"


def parse_letter(text: str, letters: Sequence[str] = "ABCDEFGH") -> str | None:
    """The option letter a free-text answer picks ("B", "B) text", "The answer is B."), or None."""
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(text.strip())
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    return None


def parse_yes_no(text: str) -> str | None:
    match = _YES_NO.search(text)
    return match.group(1).lower() if match else None


def closed_metrics(items: Sequence[dict[str, Any]], majority_source: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy of closed items (``{"question", "answer", "prediction", "kind"}``) with blind baselines.

    ``majority_source``: gold answers to take the majority answer from (e.g. the training set); default: the
    evaluated items themselves (the usual, slightly optimistic, SlideBench convention).
    """
    if not items:
        return {}
    gold, pred, chance = [], [], []
    for item in items:
        if item["kind"] == "choice":
            letters = question_options(item["question"])
            gold.append(parse_letter(item["answer"], letters))
            pred.append(parse_letter(item["prediction"], letters))
            chance.append(1.0 / len(letters))
        else:
            gold.append(parse_yes_no(item["answer"]))
            pred.append(parse_yes_no(item["prediction"]))
            chance.append(0.5)
    correct = [g is not None and g == p for g, p in zip(gold, pred)]
    reference = [a for a in (majority_source if majority_source is not None else gold) if a is not None]
    majority, _ = Counter(reference).most_common(1)[0] if reference else (None, 0)
    return {"n": len(items), "accuracy": sum(correct) / len(items),
            "unparsed": sum(p is None for p in pred) / len(items),
            "majority_answer": majority,
            "majority_baseline": sum(g == majority for g in gold) / len(items),
            "random_baseline": sum(chance) / len(items)}


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def open_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-sample BLEU-1..4 (NLTK, smoothing method 4) and ROUGE-L F (rouge-score, stemmed)."""
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("open-answer metrics need nltk and rouge-score: pip install 'wsi-mm[metrics]' "
                          "(both work offline; no download at run time).") from err
    if not predictions:
        return {}
    smooth = SmoothingFunction().method4
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    weights = {1: (1, 0, 0, 0), 2: (0.5, 0.5, 0, 0), 3: (1 / 3, 1 / 3, 1 / 3, 0), 4: (0.25, 0.25, 0.25, 0.25)}
    sums = {f"bleu_{n}": 0.0 for n in weights} | {"rouge_l": 0.0}
    for pred, ref in zip(predictions, references):
        hyp, gold = _tokens(pred), _tokens(ref)
        if hyp and gold:
            for n, w in weights.items():
                sums[f"bleu_{n}"] += sentence_bleu([gold], hyp, weights=w, smoothing_function=smooth)
        if pred.strip() and ref.strip():
            sums["rouge_l"] += scorer.score(ref, pred)["rougeL"].fmeasure
    return {k: v / len(predictions) for k, v in sums.items()} | {"n": len(predictions)}


def evaluation_items(dataset: Any) -> list[dict[str, Any]]:
    """One item per assistant turn of every conversation: the history up to that question (gold earlier answers,
    as in teacher-forced multi-turn evaluation), the gold answer and its kind."""
    items = []
    for row in dataset:
        turns = list(row["conversations"])
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant" or k == 0 or turns[k - 1]["role"] != "user":
                continue
            question = turns[k - 1]["content"]
            items.append({"h5_path": row["h5_path"], "slide_id": row.get("slide_id", ""),
                          "id": f"{row.get('id') or row.get('slide_id', '')}#{k // 2}",
                          "history": turns[:k], "question": question, "answer": turn["content"],
                          "kind": question_kind(question, turn["content"]),
                          "category": row.get("category") or row.get("Narrow Category") or ""})
    return items


def summarize(items: Sequence[dict[str, Any]], majority_source: Sequence[str] | None = None) -> dict[str, Any]:
    """Closed-question accuracy (+ baselines) and open-answer BLEU / ROUGE-L over items with predictions."""
    closed = [i for i in items if i["kind"] in ("choice", "yes_no")]
    opened = [i for i in items if i["kind"] == "open"]
    report: dict[str, Any] = {}
    if closed:
        report["closed"] = closed_metrics(closed, majority_source)
    if opened:
        report["open"] = open_metrics([i["prediction"] for i in opened], [i["answer"] for i in opened])
    return report


__all__ = ["question_kind", "question_options", "parse_letter", "parse_yes_no", "closed_metrics", "open_metrics",
           "evaluation_items", "summarize"]
