"""The standard benchmark metrics, computed the way the field computes them (pure Python, no torch).

    normalize_vqa_answer("Two dogs!")                 # "2 dogs": EvalAI's answer processing
    vqa_accuracy("2", ["2"] * 3 + ["two"] * 2 + ["3"] * 5)   # 1.0: min(#humans / 3, 1), 10 leave-one-out subsets
    gqa_match("Left.", "left")                        # True: LLaVA's GQA conversion, then exact match
    option_letter("The answer is B.", ["cat", "dog"])  # "B"
    pope_yes("No, there is not.")                     # False: LLaVA's eval_pope.py reading
    pope_metrics([True, False], ["yes", "yes"])       # accuracy, precision, recall, f1, yes_ratio
    mme_label("Yes, it is.")                          # "yes": MME's calculation.py reading
    mme_scores(records)                               # per subtask acc / acc+ / score, perception, cognition
    circular_accuracy({"q1": [True, True], "q2": [True, False]})   # 0.5
    anls("1/8/93", ["1/8/93", "jan 8"])               # 1.0; below 0.5 similarity counts 0
    relaxed_correctness("10.4", "10")                 # True: 5% for numbers, exact otherwise

Sources followed (ported, not imported): the VQA answer processing of EvalAI / the VQA challenge as LLaVA's
``m4c_evaluator.EvalAIAnswerProcessor`` and lmms-eval carry it (contractions map, number words, articles,
punctuation with the period-strip and comma-strip rules); the leave-one-out VQA accuracy as LLaVA's TextVQA
evaluator computes it (both the prediction and the ten human answers processed); LLaVA's ``eval_pope.py`` and
``convert_gqa_for_eval.py``; MME's ``calculation.py``; ScienceQA's answer reading in LLaVA's
``eval_science_qa.py``; ANLS (DocVQA / ST-VQA) and ChartQA's relaxed accuracy (pix2struct) as lmms-eval has them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["CONTRACTIONS", "NUMBER_WORDS", "ARTICLES", "PUNCTUATION", "normalize_vqa_answer", "vqa_accuracy",
           "gqa_answer", "gqa_match", "LETTERS", "option_letter", "pope_yes", "pope_metrics", "mme_label", "mme_scores",
           "MME_PERCEPTION", "MME_COGNITION", "circular_accuracy", "levenshtein", "anls", "relaxed_correctness"]

# ------------------------------------------------------------------------------------------- VQA answers
# The VQA challenge's table: spellings without apostrophes (and half-apostrophed ones) -> the apostrophed form.
# Keys are matched against lower-cased words, so the capitalised keys ("Im", "Ive", ...) never match: kept as the
# reference has them, so that this table and the reference agree entry for entry.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
"""The VQA challenge's contractions table (the ``contractions`` map of the official evaluation)."""

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
"""The official ``manualMap``: number words up to ten (and "none") to digits."""

ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
"""The punctuation marks EvalAI's processing removes (the apostrophe and the period are not among them)."""

# the official periodStrip: a period not followed by a digit ("(?!<=\d)" is, as in the original, a lookahead that
# never fails, not a lookbehind); commaStrip: a comma between digits (EvalAI's form of "(\d)(\,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    """The official ``processPunctuation``: a mark next to a space (or anywhere, once the text holds a comma between
    digits) is removed, otherwise replaced by a space; then periods not followed by a digit go ("3.5" stays)."""
    out = text
    glued = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or glued:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, articles dropped, contractions
    completed ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processing (LLaVA's ``EvalAIAnswerProcessor``, lmms-eval's): lower case; commas and question
    marks removed and "'s" split off; newlines and tabs to spaces; `_punctuation`; `_digits_articles`.

    ``"Two"`` -> ``"2"``, ``"a dog"`` -> ``"dog"``, ``"dont"`` -> ``"don't"``, ``"1,000"`` -> ``"1000"``,
    ``"3.5"`` -> ``"3.5"``, ``"yes."`` -> ``"yes"``."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2 and TextVQA): for each of the
    leave-one-out subsets (one human answer left out), ``min(#humans in the subset who gave the prediction / 3, 1)``,
    averaged; prediction and answers pass through `normalize_vqa_answer` first. 0.0 without answers.

    Three or more matching humans of ten give 1.0, two give 0.6, one gives 0.3."""
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in answers]
    hits = sum(h == pred for h in humans)
    # leaving out a matching answer leaves hits - 1 matches, leaving out another one leaves hits
    total = sum(min(1.0, (hits - (h == pred)) / 3) for h in humans)
    return total / len(humans)


# ------------------------------------------------------------------------------------------- GQA
def gqa_answer(text: str) -> str:
    """A prediction as LLaVA's ``convert_gqa_for_eval.py`` hands it to GQA's evaluation: surrounding whitespace and
    trailing periods removed, lower case."""
    return str(text).strip().rstrip(".").lower()


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA's accuracy for one question: `gqa_answer` of the prediction equals the answer (lower-cased, stripped)."""
    return gqa_answer(prediction) == str(answer).strip().lower()


# ------------------------------------------------------------------------------------------- multiple choice
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER_IS = re.compile(r"\b(?:the )?(?:correct )?(?:answer|option|choice) is:? \(?([A-Z])\)?(?![A-Za-z])",
                        re.IGNORECASE)
_LEADING = re.compile(r"^\(?([A-Z])(?:\)|\.|:)\s")


def option_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option a multiple-choice answer picks (``"A"``, ``"B"``, ...), or None when it picks none or is unclear.

    Read in this order: the whole answer is a letter (``"B"``, ``"b"``, ``"(B)"``, ``"B."``); the answer starts with
    a capital letter followed by ``". "``, ``") "`` or ``": "`` (``"B. dog"``, LLaVA's ScienceQA rule; ``"A cat"``
    is not option A);
    ``"The answer is B"``; the answer is one option's text (case and a final period aside). Only letters of the
    given ``options`` count."""
    valid = LETTERS[:len(options)]
    text = str(prediction).strip()
    bare = text.strip("().:").strip()
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    m = _LEADING.match(text)
    if m and m.group(1) in valid and len(text) > 1:
        return m.group(1)
    found = {g.upper() for g in _ANSWER_IS.findall(text)}
    if len(found) == 1 and next(iter(found)) in valid:
        return next(iter(found))
    key = text.rstrip(".").strip().lower()
    same = [valid[k] for k, option in enumerate(options) if str(option).strip().rstrip(".").lower() == key]
    return same[0] if len(same) == 1 else None


# ------------------------------------------------------------------------------------------- POPE
def pope_yes(text: str) -> bool:
    """LLaVA's ``eval_pope.py`` reading of an answer: only the first sentence (up to the first period), commas
    removed, split on spaces; "No", "no" or "not" among the words means no, anything else yes."""
    first = str(text).split(".")[0].replace(",", "")
    words = first.split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(predictions: Sequence[bool], labels: Sequence[str]) -> dict:
    """POPE's numbers for yes/no ``predictions`` (True: yes) against ``labels`` ("yes"/"no"): accuracy, precision,
    recall and F1 of "yes" as the positive class, the share of yes answers, and the counts (TP, FP, TN, FN, n).
    A ratio whose denominator is 0 is 0.0."""
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels")
    gold = [str(label).strip().lower() == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(predictions, gold))
    fp = sum(p and not g for p, g in zip(predictions, gold))
    tn = sum(not p and not g for p, g in zip(predictions, gold))
    fn = sum(not p and g for p, g in zip(predictions, gold))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(tp + tn, len(gold)), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": _ratio(tp + fp, len(gold)),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(gold)}


# ------------------------------------------------------------------------------------------- MME
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(text: str) -> str:
    """MME's ``calculation.py`` reading of an answer: lower-cased, "yes" or "no" as it is, else "yes" or "no" found
    in its first four characters (yes first), else "other" (always wrong)."""
    text = str(text).lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Iterable[tuple[str, str, str, str]]) -> dict:
    """MME's scores from ``(subtask, image, truth, prediction)`` records (truth "Yes"/"No").

    Per subtask: ``acc`` (questions right), ``acc_plus`` (images with every question right; MME asks two per image),
    ``score = 100 * (acc + acc_plus)`` (at most 200), counts and ``other`` (answers neither yes nor no).
    ``perception`` sums the scores of the perception subtasks present (all ten: at most 2000), ``cognition`` of the
    cognition ones (all four: at most 800); ``total`` both. Subtasks outside both lists are scored but in no sum."""
    by_task: dict[str, dict[str, list[bool]]] = {}
    others: dict[str, int] = {}
    for task, image, truth, prediction in records:
        label = mme_label(prediction)
        by_task.setdefault(task, {}).setdefault(image, []).append(label == str(truth).strip().lower())
        others[task] = others.get(task, 0) + (label == "other")
    subtasks = {}
    order = [t for t in (*MME_PERCEPTION, *MME_COGNITION) if t in by_task] + sorted(
        set(by_task) - set(MME_PERCEPTION) - set(MME_COGNITION))
    for task in order:
        images = by_task[task]
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
                          "questions": len(answers), "images": len(images), "other": others[task]}
    perception = sum(s["score"] for t, s in subtasks.items() if t in MME_PERCEPTION)
    cognition = sum(s["score"] for t, s in subtasks.items() if t in MME_COGNITION)
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition, "total": perception + cognition}


# ------------------------------------------------------------------------------------------- MMBench
def circular_accuracy(groups: Mapping[object, Sequence[bool]]) -> float:
    """MMBench's circular evaluation: a question counts as right only if every one of its circular-shifted variants
    (the options rotated) is answered right. ``groups``: question -> correctness of each variant."""
    if not groups:
        return 0.0
    return sum(bool(v) and all(v) for v in groups.values()) / len(groups)


# ------------------------------------------------------------------------------------------- DocVQA, ChartQA
def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one answer (DocVQA): ``1 - NL`` for the closest ground truth, NL being the edit distance over the
    longer string's length (both lower-cased, whitespace collapsed), and 0 when that similarity is below
    ``threshold``. A similarity of exactly 0.5 counts, as in the DocVQA / ST-VQA evaluation code and lmms-eval (the
    paper's formula, ``NL < 0.5``, would give it 0). 0.0 without answers."""
    if not answers:
        return 0.0
    pred = " ".join(str(prediction).strip().lower().split())
    best = 0.0
    for answer in answers:
        truth = " ".join(str(answer).strip().lower().split())
        longest = max(len(truth), len(pred))
        best = max(best, 1.0 - levenshtein(truth, pred) / longest if longest else 1.0)
    return best if best >= threshold else 0.0


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy for one answer (pix2struct's definition, as lmms-eval has it): when both parse as
    numbers (``"12%"`` is 0.12) and the target is not 0, right within ``max_relative_change`` of the target;
    otherwise an exact, case-insensitive string match. Nothing else is normalized: ``"1,000"`` is not a number."""
    prediction, target = str(prediction), str(target)
    p, t = _number(prediction), _number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()
