"""Checking a model's answer to a synthetic question exactly, whatever its wording.

    is_correct("There are three.", "3", "count")  # True

Case, punctuation, articles, "gray"/"grey" and number words do not matter (`normalize_answer`).
"""

from __future__ import annotations

import re

from .vocabulary import COLOURS, KINDS, PLURALS, SHAPES

__all__ = ["NUMBER_WORDS", "is_correct", "normalize_answer"]

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
"""Number words from "zero" to "twenty" and their digits, as `normalize_answer` reads them."""
_SYNONYMS = {"gray": "grey", "violet": "purple", "plus": "cross"}
_ARTICLES = {"a", "an", "the"}
_COLOUR_WORDS = set(COLOURS) | {"white", "black", "brown", "cyan", "magenta", "beige", "tan", "silver", "gold",
                                "teal", "navy", "olive", "maroon", "turquoise", "lime", "indigo"}
_SHAPE_WORDS = set(SHAPES) | {"rectangle", "oval", "ellipse", "diamond", "pentagon", "hexagon", "octagon", "dot",
                              "heart", "arrow", "line"}
_SINGULAR = {plural: s for s, plural in PLURALS.items()} | {
    "rectangles": "rectangle", "ovals": "oval", "ellipses": "ellipse", "diamonds": "diamond", "dots": "dot"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, number words to digits (zero-twenty), "gray" ->
    "grey", "violet" -> "purple", "plus" -> "cross", whitespace collapsed: ``"The answer is Three."`` ->
    ``"answer is 3"``."""
    tokens = re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split()
    tokens = [_SYNONYMS.get(NUMBER_WORDS.get(t, t), NUMBER_WORDS.get(t, t)) for t in tokens]
    return " ".join(t for t in tokens if t not in _ARTICLES)


# a negation word right before a word (an article may sit between, a hyphen may join them): "not red", "isn't a
# circle", "no-red"; "No. It is red." and "No, it is red" negate nothing
_NEGATED = re.compile(r"\b(?:not|no|never|nor|isn't|isnt|aren't|arent|wasn't|wasnt|ain't)(?:\s+|-)(?:(?:a|an|the)\s+)?"
                      r"([0-9a-z]+)")


def _negated(prediction: str) -> set[str]:
    """The words of ``prediction`` (normalized as `normalize_answer` does, plurals made singular) that a negation
    word directly before them denies."""
    text = str(prediction).lower().replace("\u2019", "'")
    words = {normalize_answer(w) for w in _NEGATED.findall(text)}
    return words | {_SINGULAR.get(w, w) for w in words}


def _code_key(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(text).lower())


def is_correct(prediction: str, answer: str, kind: str | None = None) -> bool:
    """Whether a model's ``prediction`` gives ``answer``, ignoring case, punctuation and articles.

    * number kinds (``count``): the prediction names exactly one number, the answer (digits or words: "3",
      "three", "There are 3."; "none" counts as 0);
    * colour kinds: exactly one colour word, the answer ("Red.", "It is red"; not "red or blue"; "gray" = "grey");
    * ``shape_at``: exactly one shape word, the answer (plurals and "plus" for "cross" accepted);
    * ``read_text``: the code, case-insensitive, with or without spaces between characters ("a7k9", "A 7 K 9",
      "The code is A7K9");
    * unknown kinds: equal after `normalize_answer`.

    An answer word denied by a negation word right before it ("not red", "it isn't a circle", "not 3", "no-red";
    an article may sit between) makes the prediction wrong; a "no" ending its own sentence or clause does not
    ("No. It is red." and "No, it is red" are right).
    """
    info = KINDS.get(kind) if kind is not None else None
    answer_type = info.answer_type if info is not None else None
    if answer_type == "code":
        target = _code_key(answer)
        if not target:
            return False
        tokens = re.findall(r"[0-9a-z]+", str(prediction).lower())
        for i in range(len(tokens)):  # a run of tokens that spells the code ("A7K9", "A 7 K 9", "A7 K9")
            joined = ""
            for tok in tokens[i:]:
                joined += tok
                if joined == target:
                    return True
                if not target.startswith(joined):
                    break
        return False
    pred, ans = normalize_answer(prediction), normalize_answer(answer)
    if pred == ans:
        return bool(ans)
    if ans in _negated(prediction) or _SINGULAR.get(ans, ans) in _negated(prediction):
        return False  # "not red", "it isn't a circle", "not 3"
    tokens = pred.split()
    if answer_type == "number":
        if not ans.isdigit():
            return False
        numbers = {str(int(t)) for t in tokens if t.isdigit()} | ({"0"} if "none" in tokens else set())
        return numbers == {str(int(ans))}
    if answer_type == "colour":
        return {t for t in tokens if t in _COLOUR_WORDS} == {ans}
    if answer_type == "shape":
        found = {_SINGULAR.get(t, t) for t in tokens}
        return found & _SHAPE_WORDS == {_SINGULAR.get(ans, ans)}
    return False
