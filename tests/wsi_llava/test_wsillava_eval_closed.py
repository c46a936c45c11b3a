"""Closed-question evaluation of WSI-LLaVA must be honest: the blind majority baseline is taken per question kind,
English words are never read as option letters, and the usual option / answer layouts are recognised."""

from __future__ import annotations

import pytest

from wsi_llava.evaluation import (
    closed_metrics,
    gold_answers,
    parse_letter,
    parse_yes_no,
    question_kind,
    question_option_texts,
    question_options,
    summarize,
)

GRADES = "what is the grade ?\nA) G1\nB) G2\nC) G3\nD) G4"
TYPES = (
    "what is the histological type ?\nA) Infiltrating lobular carcinoma\nB) Infiltrating ductal carcinoma\n"
    "C) Mucinous carcinoma"
)


def _choice(answer: str, prediction: str = "") -> dict:
    return {"question": GRADES, "answer": answer, "prediction": prediction, "kind": "choice"}


def _yes_no(answer: str, prediction: str = "") -> dict:
    return {"question": "is the tumour invasive ?", "answer": answer, "prediction": prediction, "kind": "yes_no"}


def _mixed_set() -> list[dict]:
    # 50 multiple choice: 20 A, 12 B, 10 C, 8 D; 50 yes/no: 35 yes, 15 no.
    letters = ["A"] * 20 + ["B"] * 12 + ["C"] * 10 + ["D"] * 8
    return [_choice(a) for a in letters] + [_yes_no(a) for a in ["Yes"] * 35 + ["No"] * 15]


def test_majority_baseline_is_per_question_kind():
    m = closed_metrics(_mixed_set())
    # pooled over the 100 answers "yes" (35) would win: 35 / 100 = 0.35. Per kind: A for choice (20 of 50), yes for
    # yes/no (35 of 50): (20 + 35) / 100 = 0.55.
    assert m["n"] == 100
    assert m["majority_baseline"] == pytest.approx(0.55)
    assert m["majority_answer_by_kind"] == {"choice": "A", "yes_no": "yes"}
    assert m["majority_answer"] is None  # mixed kinds: no single majority answer
    assert m["random_baseline"] == pytest.approx((50 * 0.25 + 50 * 0.5) / 100)
    assert m["accuracy"] == 0.0 and m["unparsed"] == 1.0  # empty predictions
    choice, yes_no = m["by_kind"]["choice"], m["by_kind"]["yes_no"]
    assert choice == {
        "n": 50,
        "accuracy": 0.0,
        "unparsed": 1.0,
        "majority_answer": "A",
        "majority_baseline": pytest.approx(20 / 50),
        "random_baseline": pytest.approx(0.25),
        "majority_from": "evaluated",
    }
    assert yes_no["n"] == 50 and yes_no["majority_answer"] == "yes"
    assert yes_no["majority_baseline"] == pytest.approx(35 / 50) and yes_no["random_baseline"] == pytest.approx(0.5)


def test_majority_from_a_training_set_per_kind():
    evaluated = _mixed_set()
    # training set: B is the majority letter (3 of 4), "no" the majority yes/no answer (2 of 3)
    train = [_choice("B"), _choice("B"), _choice("B) G2"), _choice("C"), _yes_no("No"), _yes_no("no"), _yes_no("Yes")]
    assert gold_answers(train) == [
        ("choice", "B"),
        ("choice", "B"),
        ("choice", "B"),
        ("choice", "C"),
        ("yes_no", "no"),
        ("yes_no", "no"),
        ("yes_no", "yes"),
    ]
    # B is gold for 12 of the 50 choice items, "no" for 15 of the 50 yes/no items: (12 + 15) / 100
    for source in (train, gold_answers(train)):  # items or (kind, answer) pairs
        m = closed_metrics(evaluated, source)
        assert m["majority_answer_by_kind"] == {"choice": "B", "yes_no": "no"}
        assert m["majority_baseline"] == pytest.approx(0.27)
        assert m["by_kind"]["choice"]["majority_baseline"] == pytest.approx(12 / 50)
        assert m["by_kind"]["yes_no"]["majority_baseline"] == pytest.approx(15 / 50)
        assert {k: v["majority_from"] for k, v in m["by_kind"].items()} == {"choice": "source", "yes_no": "source"}
    # a kind the source lacks falls back to the evaluated set's own majority (yes: 35 of 50)
    m = closed_metrics(evaluated, [("choice", "B")])
    assert m["majority_answer_by_kind"] == {"choice": "B", "yes_no": "yes"}
    assert m["majority_baseline"] == pytest.approx((12 + 35) / 100)
    assert m["by_kind"]["yes_no"]["majority_from"] == "evaluated"
    assert summarize(evaluated, train)["closed"]["majority_baseline"] == pytest.approx(0.27)
    with pytest.raises(TypeError):  # the old flat list of answers no longer says which kind each is
        closed_metrics(evaluated, ["B", "B", "no"])


def test_single_kind_keeps_majority_answer_and_demo_report_keys():
    m = closed_metrics([_choice("B", "B"), _choice("B", "A"), _choice("A", "(A) G1")])
    assert m["majority_answer"] == "B" and m["accuracy"] == pytest.approx(2 / 3)
    assert m["majority_baseline"] == pytest.approx(2 / 3) and m["random_baseline"] == pytest.approx(0.25)
    assert list(m["by_kind"]) == ["choice"]


@pytest.mark.parametrize(
    "text",
    [
        "A tumor is present",
        "the answer is a carcinoma",
        "A carcinoma.",
        "The answer is A carcinoma",
        "b",
        "(b) G2",
        "B-cell lymphoma",
        "a tumor",
    ],
)
def test_english_words_are_not_options(text):
    assert parse_letter(text) is None
    assert parse_letter(text, "ABCD", question_option_texts(GRADES)) is None


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("B)", "B"),
        ("B.", "B"),
        ("B:", "B"),
        ("(B)", "B"),
        ("(B) Grade II", "B"),
        ("B) Grade II", "B"),
        ("B. Grade II", "B"),
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("option D", "D"),
        ("I choose (C)", "C"),
        ("  B  ", "B"),
        ("The correct answer is option B", "B"),
    ],
)
def test_letter_answers_parse(text, letter):
    assert parse_letter(text) == letter
    assert parse_letter(text, "ABCD") == letter


def test_only_listed_letters_count():
    assert parse_letter("E", "ABCD") is None and parse_letter("(E) G5", question_options(GRADES)) is None
    assert parse_letter("E", "ABCDE") == "E"


def test_option_text_without_letter_counts_as_that_option():
    options = question_option_texts(TYPES)
    assert options == {
        "A": "Infiltrating lobular carcinoma",
        "B": "Infiltrating ductal carcinoma",
        "C": "Mucinous carcinoma",
    }
    letters = list(options)
    assert parse_letter("Infiltrating lobular carcinoma", letters, options) == "A"
    assert parse_letter("infiltrating DUCTAL carcinoma.", letters, options) == "B"
    assert parse_letter("The answer is mucinous carcinoma", letters, options) == "C"
    assert parse_letter("Infiltrating lobular carcinoma", letters) is None  # no option texts given
    assert parse_letter("carcinoma", letters, options) is None  # not one option's text
    assert parse_letter("not infiltrating lobular carcinoma", letters, options) is None
    assert parse_letter("Mucinous carcinoma", ["A", "B"], options) is None  # C is not a listed letter
    # the closed metrics use the texts: prediction "Infiltrating lobular carcinoma" on a gold A is right
    item = {"question": TYPES, "answer": "A", "prediction": "Infiltrating lobular carcinoma", "kind": "choice"}
    assert closed_metrics([item])["accuracy"] == 1.0


@pytest.mark.parametrize(
    "question",
    [
        "what grade ?\nA) G1\nB) G2\nC) G3",
        "what grade ?\nA. G1\nB. G2\nC. G3",
        "what grade ?\n(A) G1\n(B) G2\n(C) G3",
        "what grade ?\nA: G1\nB: G2\nC: G3",
        "what grade ? A) G1 B) G2 C) G3",
        "what grade ? A. G1 B. G2 C. G3",
    ],
)
def test_option_layouts(question):
    assert question_options(question) == ["A", "B", "C"]
    assert question_option_texts(question) == {"A": "G1", "B": "G2", "C": "G3"}
    for answer in ("B", "B) G2", "B. G2", "(B) G2", "B)", "(B)"):
        assert question_kind(question, answer) == "choice", answer
    assert question_kind(question, "B) G3") == "open"  # letter with another option's text
    assert question_kind(question, "A tumor is present") == "open"


def test_stray_markers_are_not_options():
    q = "Vitamin A. Which deficiency ? A) vitamin D) lack B) iron C) zinc"
    assert question_option_texts(q) == {"A": "vitamin D) lack", "B": "iron", "C": "zinc"}
    assert (
        question_options("is it grade A. or not ?") == ["A"] and question_kind("is it grade A. or not ?", "A") == "open"
    )


def test_yes_no():
    assert parse_yes_no("Yes.") == "yes" and parse_yes_no("no, it is benign") == "no"
    assert parse_yes_no("NO") == "no" and parse_yes_no("Yesterday it was unclear") is None
    assert question_kind("is it invasive ?", "Yes.") == "yes_no" and question_kind("is it invasive ?", "no") == "yes_no"
    m = closed_metrics([_yes_no("Yes", "Yes."), _yes_no("No", "no, it is benign"), _yes_no("No", "Yes")])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["majority_answer"] == "no"
