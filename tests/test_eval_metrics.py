"""`llava_uhd.eval.metrics`: every metric on hand-worked cases (normalization corner cases included), and against
lmms-eval's implementations when lmms-eval is installed (skipped otherwise, saying so)."""

from __future__ import annotations

import importlib.util

import pytest

from llava_uhd.eval.metrics import (CONTRACTIONS, anls, circular_accuracy, gqa_answer, gqa_match, levenshtein,
                                    mme_label, mme_scores, normalize_vqa_answer, option_letter, pope_metrics,
                                    pope_yes, relaxed_correctness, vqa_accuracy)


@pytest.mark.parametrize("raw,normalized", [
    ("two", "2"), ("Two", "2"), ("ten", "10"), ("eleven", "eleven"), ("none", "0"),   # number words up to ten
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"), ("a", ""),             # articles
    ("dont", "don't"), ("don't", "don't"), ("isnt", "isn't"), ("whats", "what's"),       # contractions
    ("1,000", "1000"), ("3.5", "3.5"), ("3.5.", "3.5"), ("yes.", "yes"), ("Yes!", "yes"),  # numbers, periods
    ("u.s.", "us"), ("t-shirt", "t shirt"), ("left - right", "left right"),            # marks: glued vs spaced
    ("black/white", "black white"), ("(red)", "red"), ("what?", "what"),
    ("dog's", "dog 's"), ("  Red \n car\t", "red car"), ("12:30", "12:30"),          # ':' is not removed
])
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_commas_go_before_the_punctuation_rules():
    # EvalAI's processing drops every comma first, so its comma-between-digits rule (which would remove the other
    # marks instead of spacing them) never fires: the hyphen is still spaced
    assert normalize_vqa_answer("1,000 t-shirts") == "1000 t shirts"


def test_contractions_table():
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["oclock"] == "o'clock"
    assert normalize_vqa_answer("Im") == "im"  # capitalised keys never match lower-cased words, as in the reference


@pytest.mark.parametrize("prediction,answers,accuracy", [
    ("2", ["2"] * 10, 1.0),
    ("2", ["2"] * 3 + ["3"] * 7, 0.9),        # 3 matches: 7 subsets keep 3 (1.0), 3 keep 2 (2/3) -> 0.9
    ("2", ["2"] * 2 + ["3"] * 8, 0.6),        # 8 subsets keep 2 (2/3), 2 keep 1 (1/3)
    ("2", ["2"] + ["3"] * 9, 0.3),            # 9 subsets keep 1 (1/3), 1 keeps 0
    ("2", ["3"] * 10, 0.0),
    ("2", ["2"] * 4 + ["3"] * 6, 1.0),
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),      # number words
    ("A dog.", ["dog"] * 10, 1.0),            # article and period
    ("dont know", ["don't know"] * 10, 1.0),  # contraction
    ("1,000", ["1000"] * 10, 1.0),
    ("3.5", ["3.5"] * 10, 1.0), ("35", ["3.5"] * 10, 0.0),
    ("red", [], 0.0),
])
def test_vqa_accuracy(prediction, answers, accuracy):
    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy)


def test_gqa():
    assert gqa_answer(" Left. ") == "left" and gqa_answer("No..") == "no"
    assert gqa_match("Yes.", "yes") and not gqa_match("a dog", "dog") and not gqa_match("yes it is", "yes")


@pytest.mark.parametrize("prediction,letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B. dog", "B"), ("B) dog", "B"), ("B: dog", "B"),
    ("The answer is B.", "B"), ("the correct answer is (C)", "C"), ("dog", "B"), ("Dog.", "B"),
    ("E", None), ("A or B", None), ("B dog", None), ("I think B", None), ("", None),
    ("The answer is A or the answer is B", None),
    ("A cat", None),  # an article, not the option A
])
def test_option_letter(prediction, letter):
    assert option_letter(prediction, ["cat", "dog", "car"]) == letter


def test_pope_reading_and_metrics():
    assert pope_yes("Yes") and pope_yes("yes, there is") and pope_yes("There is a dog.")
    assert not pope_yes("No") and not pope_yes("no.") and not pope_yes("There is not a dog")
    assert not pope_yes("No, there is no dog.") and pope_yes("Yes. No dog is seen.")   # first sentence only
    assert pope_yes("Nope") and pope_yes("NO")  # LLaVA's rule: only the words "No", "no" and "not"
    m = pope_metrics([True, True, False, False, True], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == 0.6 and m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.6
    none = pope_metrics([False, False], ["yes", "no"])
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["accuracy"] == 0.5


def test_mme():
    assert mme_label("Yes") == "yes" and mme_label("No.") == "no" and mme_label("yes, it is") == "yes"
    assert mme_label("Not really") == "no" and mme_label("maybe") == "other" and mme_label("I think yes") == "other"
    records = [("existence", "a", "Yes", "Yes"), ("existence", "a", "No", "No"),     # both right: acc+
               ("existence", "b", "Yes", "Yes"), ("existence", "b", "No", "Yes"),    # one right
               ("code_reasoning", "c", "Yes", "No"), ("code_reasoning", "c", "No", "maybe"),
               ("OCR", "d", "No", "no")]
    s = mme_scores(records)
    ex = s["subtasks"]["existence"]
    assert ex["acc"] == 0.75 and ex["acc_plus"] == 0.5 and ex["score"] == 125.0
    assert s["subtasks"]["code_reasoning"]["score"] == 0.0 and s["subtasks"]["code_reasoning"]["other"] == 1
    assert s["subtasks"]["OCR"]["score"] == 200.0
    assert s["perception"] == 325.0 and s["cognition"] == 0.0 and s["total"] == 325.0
    assert list(s["subtasks"]) == ["existence", "OCR", "code_reasoning"]


def test_circular_accuracy():
    assert circular_accuracy({1: [True, True, True], 2: [True, False], 3: [False], 4: []}) == 0.25
    assert circular_accuracy({}) == 0.0


def test_anls_thresholds():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls("1/8/93", ["1/8/93"]) == 1.0
    assert anls("  ITC   limited ", ["ITC Limited"]) == 1.0            # case and whitespace
    assert anls("abcdefghiX", ["abcdefghij"]) == pytest.approx(0.9)      # one edit in ten
    assert anls("abcdeXXXXX", ["abcdefghij"]) == 0.5                     # similarity exactly 0.5 counts
    assert anls("abcdXXXXXX", ["abcdefghij"]) == 0.0                     # 0.4 < 0.5: nothing
    assert anls("abcd", ["abcdefgh"]) == 0.5                             # length difference counts as edits
    assert anls("abcdefghij", ["zzz", "abcdefghiX"]) == pytest.approx(0.9)   # the best ground truth
    assert anls("x", []) == 0.0 and anls("", [""]) == 1.0
    assert anls("abcdefghiX", ["abcdefghij"], threshold=0.95) == 0.0


@pytest.mark.parametrize("prediction,target,ok", [
    ("10", "10", True), ("10.4", "10", True), ("10.5", "10", True), ("10.6", "10", False), ("9.5", "10", True),
    ("12%", "0.12", True), ("12", "12%", False), ("0", "0", True), ("0.01", "0", False),
    ("Yes", "yes", True), ("1,000", "1000", False), ("1000", "1,000", False), ("3.5", "3.50", True),
    ("2009", "2009", True), ("two", "2", False),
])
def test_relaxed_correctness(prediction, target, ok):
    assert relaxed_correctness(prediction, target) is ok


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                    reason="lmms-eval is not installed: the cross-check against its metrics is skipped")
def test_against_lmms_eval():
    from lmms_eval.api.metrics import anls as lmms_anls
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness as lmms_relaxed

    processor = EvalAIAnswerProcessor()
    for text in ["two", "a dog", "dont", "don't", "1,000", "3.5", "Yes.", "t-shirt", "u.s.", "black/white",
                 "(red)", "dog's", "12:30", "1,000 t-shirts", "None of the above!"]:
        assert normalize_vqa_answer(text) == processor(text), text
    for prediction, answers in [("1/8/93", ["1/8/93"]), ("abcdeXXXXX", ["abcdefghij"]),
                                ("abcdXXXXXX", ["abcdefghij"]), ("ITC  limited", ["ITC Limited", "itc"])]:
        assert anls(prediction, answers) == pytest.approx(lmms_anls(answers, [prediction])["anls"])
    for prediction, target in [("10.4", "10"), ("10.6", "10"), ("12%", "0.12"), ("0", "0"), ("Yes", "yes")]:
        assert relaxed_correctness(prediction, target) == lmms_relaxed(prediction, target)
