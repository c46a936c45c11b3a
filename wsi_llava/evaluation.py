"""VQA and report metrics for WSI-LLaVA: closed questions → accuracy beside blind baselines; open answers →
BLEU-1..4 and ROUGE-L.

Closed questions are multiple choice (options written ``A) …`` / ``A. …`` / ``(A) …`` / ``A: …``, one per line or
inline; answer a letter, alone or with its option text) or yes/no. Blind baselines are what a model that never
looks at the slide scores: always the majority answer of the question's kind (a letter for multiple choice, yes / no
otherwise; e.g. 41.4 % on SlideBench-VQA TCGA, 42.6 % on BCNB) and uniform random guessing (1 / number of options).

BLEU uses NLTK's ``sentence_bleu`` with smoothing method 4 and ROUGE-L Google's ``rouge-score`` F-measure, averaged
per sample — the WSI-LLaVA ``NLP_Metric.py`` protocol; empty predictions count as zeros. Both work offline
(``pip install wsi-mm[metrics]``); never ``evaluate.load``, which downloads metric code at run time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# One option marker: "A) x", "A. x", "A: x", "(A) x", on its own line or inline (WSI-Bench: "... A) x B) y").
_OPTION = re.compile(r"(?:^|(?<=\s))(?:\(([A-H])\)|([A-H])[\).:])[ \t]+(?=\S)")
# Letter answers. Only uppercase letters count, and a bare letter must be set off ("B", "B)", "B.", "(B)") so
# that the English article in "A tumor is present" or "the answer is a carcinoma" is never read as option A.
_SET_OFF = r"(?:\)|(?=[.:,;!?]|[ \t]+[-\u2013\u2014]|\s*$))"
_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-H])(?:[\).:,;]|\s*$|[ \t]*\n)"),  # "B", "B)", "B.", "B:", "(B) ...", "B. text"
    re.compile(
        r"\b(?i:answers?|choose|chose|select|pick)\s*(?:(?i:is|would\s+be|should\s+be)\s*)?:?\s*"
        r"\(?([A-H])" + _SET_OFF
    ),  # "The answer is B.", "Answer: C", "I choose C"
    re.compile(r"\b(?i:option|choice)\s*:?\s*\(?([A-H])\b(?![-'\u2019])"),  # "option D", "choice (B)"
    re.compile(r"\(([A-H])\)"),  # "I choose (C)"
    re.compile(r"\b([A-H])\)"),  # "... C) G3"
)
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?answer\s*(?:is)?\s*:?\s*", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"\w+|[^\w\s]")


def question_option_texts(question: str) -> dict[str, str]:
    """Options written in the question, letter → text, in order (``A) …`` / ``A. …`` / ``(A) …`` / ``A: …``, one
    per line or inline).

    Options are the longest run A, B, C, ... of markers in reading order (the last such run on ties), so a stray
    "D)" inside an option text or an "A." in the question's preamble is not taken for an option.
    """
    runs: list[list[re.Match[str]]] = []
    for match in _OPTION.finditer(question):
        letter = match.group(1) or match.group(2)
        if letter == "A":
            runs.append([match])
        elif runs and ord(letter) == ord(runs[-1][-1].group(1) or runs[-1][-1].group(2)) + 1:
            runs[-1].append(match)
    if not runs:
        return {}
    best = max(reversed(runs), key=len)  # max keeps the first maximum: reversed → the last longest run
    texts = {}
    for k, match in enumerate(best):
        end = best[k + 1].start() if k + 1 < len(best) else len(question)
        texts[match.group(1) or match.group(2)] = question[match.end() : end].strip().split("\n")[0].strip()
    return texts


def question_options(question: str) -> list[str]:
    """Option letters written in the question, in order (see :func:`question_option_texts`)."""
    return list(question_option_texts(question))


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" \t\n.,;:!?\"'()[]*")


def _is_letter_answer(answer: str, options: dict[str, str]) -> bool:
    """A gold answer that names an option: its bare letter ("B", "B)", "(B)") or letter + that option's text
    ("B) G2", "B. G2", "(B) G2")."""
    match = re.match(r"^\s*(?:\(([A-H])\)|([A-H])(?:[\).:]|(?=\s|$)))\s*(.*?)\s*$", answer, re.DOTALL)
    if not match or (match.group(1) or match.group(2)) not in options:
        return False
    rest = _norm(match.group(3))
    return not rest or rest == _norm(options[match.group(1) or match.group(2)])


def question_kind(question: str, answer: str) -> str:
    """``"choice"`` (options in the question, answer a letter or letter + option text), ``"yes_no"`` or
    ``"open"``."""
    options = question_option_texts(question)
    if len(options) >= 2 and _is_letter_answer(answer, options):
        return "choice"
    if answer.strip().lower().rstrip(".") in ("yes", "no"):
        return "yes_no"
    return "open"


def parse_letter(
    text: str, letters: Sequence[str] = "ABCDEFGH", options: Mapping[str, str] | None = None
) -> str | None:
    """The option letter a free-text answer picks ("B", "(B) text", "The answer is B.", "option D"), or None.

    Only uppercase letters in ``letters`` count. Without a letter, an answer that states exactly one option's text
    (``options``: letter → text, case-insensitive, e.g. "Infiltrating lobular carcinoma.") picks that option; an
    answer that merely contains an option text does not (it may negate it).
    """
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(text.strip())
        if match and match.group(1) in letters:
            return match.group(1)
    if options:
        said = _norm(_ANSWER_PREFIX.sub("", _norm(text)))
        hits = [letter for letter, option in options.items() if letter in letters and said and _norm(option) == said]
        if len(hits) == 1:
            return hits[0]
    return None


def parse_yes_no(text: str) -> str | None:
    match = _YES_NO.search(text)
    return match.group(1).lower() if match else None


# items (dicts with "kind", "question", "answer") or (kind, gold answer) pairs
MajoritySource = Iterable[Mapping[str, Any] | tuple[str, str | None]]


def _gold_and_prediction(item: Mapping[str, Any]) -> tuple[str | None, str | None, float]:
    """(gold answer, predicted answer, chance of a uniform guess) of one closed item, answers as letters / yes|no."""
    if item["kind"] == "choice":
        options = question_option_texts(item["question"])
        letters = list(options)
        return (
            parse_letter(item["answer"], letters, options),
            parse_letter(item.get("prediction") or "", letters, options),
            1.0 / max(len(letters), 1),
        )
    return parse_yes_no(item["answer"]), parse_yes_no(item.get("prediction") or ""), 0.5


def gold_answers(items: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(kind, gold answer)`` of the closed items whose gold answer parses — e.g. of the training set, to take the
    per-kind majority baseline from (a letter prior says nothing about yes/no questions and vice versa)."""
    out = []
    for item in items:
        if item["kind"] in ("choice", "yes_no"):
            gold = _gold_and_prediction(item)[0]
            if gold is not None:
                out.append((item["kind"], gold))
    return out


def _reference_pairs(source: MajoritySource) -> list[tuple[str, str]]:
    pairs = []
    for entry in source:
        if isinstance(entry, Mapping):
            pairs += gold_answers([entry])
        elif isinstance(entry, str):
            raise TypeError(
                "majority_source takes items or (kind, answer) pairs, not bare answers: the majority "
                "answer is taken per question kind (see gold_answers)"
            )
        elif entry[1] is not None:
            pairs.append((entry[0], entry[1]))
    return pairs


def closed_metrics(items: Sequence[dict[str, Any]], majority_source: MajoritySource | None = None) -> dict[str, Any]:
    """Accuracy of closed items (``{"question", "answer", "prediction", "kind"}``) with blind baselines.

    The majority baseline is per question kind ("choice", "yes_no"): a blind model knows the kind of question it is
    asked, so it answers each with that kind's majority answer; pooling the kinds would set the baseline too low.
    ``majority_source``: items (e.g. the training set) or ``(kind, answer)`` pairs (:func:`gold_answers`) to take
    the majority answers from; default, and for a kind the source lacks: the evaluated items themselves (the usual,
    slightly optimistic, SlideBench convention). ``majority_answer`` is kept for single-kind sets (None if mixed).
    """
    if not items:
        return {}
    rows = [(item["kind"], *_gold_and_prediction(item)) for item in items]
    reference = _reference_pairs(majority_source) if majority_source is not None else []
    by_kind: dict[str, dict[str, Any]] = {}
    majority_of: dict[str, str | None] = {}
    for kind in dict.fromkeys(k for k, *_ in rows):
        own = [r for r in rows if r[0] == kind]
        source = [a for k, a in reference if k == kind]
        from_source = bool(source)
        if not from_source:
            source = [g for _, g, _, _ in own if g is not None]
        majority = Counter(source).most_common(1)[0][0] if source else None
        majority_of[kind] = majority
        by_kind[kind] = {
            "n": len(own),
            "accuracy": sum(g is not None and g == p for _, g, p, _ in own) / len(own),
            "unparsed": sum(p is None for _, _, p, _ in own) / len(own),
            "majority_answer": majority,
            "majority_baseline": sum(g is not None and g == majority for _, g, _, _ in own) / len(own),
            "random_baseline": sum(c for *_, c in own) / len(own),
            "majority_from": "source" if from_source else "evaluated",
        }
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(g is not None and g == p for _, g, p, _ in rows) / n,
        "unparsed": sum(p is None for _, _, p, _ in rows) / n,
        "majority_answer": next(iter(majority_of.values())) if len(majority_of) == 1 else None,
        "majority_answer_by_kind": majority_of,
        "majority_baseline": sum(g is not None and g == majority_of[k] for k, g, _, _ in rows) / n,
        "random_baseline": sum(c for *_, c in rows) / n,
        "by_kind": by_kind,
    }


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def open_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-sample BLEU-1..4 (NLTK, smoothing method 4) and ROUGE-L F (rouge-score, stemmed)."""
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "open-answer metrics need nltk and rouge-score: pip install 'wsi-mm[metrics]' "
            "(both work offline; no download at run time)."
        ) from err
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
            items.append(
                {
                    "h5_path": row["h5_path"],
                    "slide_id": row.get("slide_id", ""),
                    "id": f"{row.get('id') or row.get('slide_id', '')}#{k // 2}",
                    "history": turns[:k],
                    "question": question,
                    "answer": turn["content"],
                    "kind": question_kind(question, turn["content"]),
                    "category": row.get("category") or row.get("Narrow Category") or "",
                }
            )
    return items


def summarize(items: Sequence[dict[str, Any]], majority_source: MajoritySource | None = None) -> dict[str, Any]:
    """Closed-question accuracy (+ baselines) and open-answer BLEU / ROUGE-L over items with predictions."""
    closed = [i for i in items if i["kind"] in ("choice", "yes_no")]
    opened = [i for i in items if i["kind"] == "open"]
    report: dict[str, Any] = {}
    if closed:
        report["closed"] = closed_metrics(closed, majority_source)
    if opened:
        report["open"] = open_metrics([i["prediction"] for i in opened], [i["answer"] for i in opened])
    return report


__all__ = [
    "question_kind",
    "question_options",
    "question_option_texts",
    "parse_letter",
    "parse_yes_no",
    "gold_answers",
    "closed_metrics",
    "open_metrics",
    "evaluation_items",
    "summarize",
]
