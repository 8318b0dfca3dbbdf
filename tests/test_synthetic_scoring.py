"""llava_uhd.data.synthetic.scoring: answers checked exactly, whatever their wording."""

import pytest

from llava_uhd.data.synthetic import KINDS, generate_sample, is_correct, normalize_answer
from llava_uhd.data.synthetic.scoring import NUMBER_WORDS


def test_normalize_answer():
    assert normalize_answer("  The answer is Three. ") == "answer is 3"
    assert normalize_answer("Gray!") == "grey"
    assert normalize_answer("A7K9") == "a7k9"
    assert normalize_answer("") == ""


@pytest.mark.parametrize("prediction,answer,kind,ok", [
    ("3", "3", "count", True),
    ("three", "3", "count", True),
    ("Three.", "3", "count", True),
    ("There are 3 red circles.", "3", "count", True),
    ("none", "0", "count", True),
    ("zero", "0", "count", True),
    ("4", "3", "count", False),
    ("2 or 3", "3", "count", False),
    ("", "3", "count", False),
    ("Red", "red", "corner_colour", True),
    ("It is red.", "red", "edge_colour", True),
    ("the shape is dark red", "red", "corner_colour", True),
    ("red or blue", "red", "corner_colour", False),
    ("blue", "red", "corner_colour", False),
    ("gray", "grey", "grey_probe", True),
    ("The leftmost region is GREY.", "grey", "grey_probe", True),
    ("white", "grey", "grey_probe", False),
    ("Violet", "purple", "corner_colour", True),
    ("circle", "circle", "shape_at", True),
    ("A circle.", "circle", "shape_at", True),
    ("circles", "circle", "shape_at", True),
    ("a plus sign", "cross", "shape_at", True),
    ("a square or a circle", "circle", "shape_at", False),
    ("oval", "circle", "shape_at", False),
    ("A7K9", "A7K9", "read_text", True),
    ("a7k9", "A7K9", "read_text", True),
    ("The code is A7K9.", "A7K9", "read_text", True),
    ("A 7 K 9", "A7K9", "read_text", True),
    ("\"A7K9\"", "A7K9", "read_text", True),
    ("A7K8", "A7K9", "read_text", False),
    ("A7K", "A7K9", "read_text", False),
    ("A7K99", "A7K9", "read_text", False),
    ("not red", "red", "corner_colour", False),
    ("It is not red.", "red", "corner_colour", False),
    ("It isn't red, it is blue.", "red", "corner_colour", False),
    ("it isn\u2019t red", "red", "corner_colour", False),
    ("no-red", "red", "corner_colour", False),
    ("No. It is red.", "red", "corner_colour", True),
    ("No, it is red", "red", "corner_colour", True),
    ("It is not a circle.", "circle", "shape_at", False),
    ("not circles", "circle", "shape_at", False),
    ("No, a circle.", "circle", "shape_at", True),
    ("not 3", "3", "count", False),
    ("Not three.", "3", "count", False),
    ("No. There are three.", "3", "count", True),
    ("yes", "yes", "unknown_kind", True),
    ("Yes.", "yes", None, True),
])
def test_is_correct(prediction, answer, kind, ok):
    assert is_correct(prediction, answer, kind) is ok


def test_generated_answers_are_correct_for_themselves():
    for seed in range(30):
        s = generate_sample(seed, max_side=128)
        assert is_correct(s.answer, s.answer, s.kind)
        assert is_correct(s.answer.lower() + ".", s.answer, s.kind)
        if KINDS[s.kind].answer_type == "number":
            words = {v: k for k, v in NUMBER_WORDS.items()}
            assert is_correct(words[s.answer].capitalize(), s.answer, s.kind)
