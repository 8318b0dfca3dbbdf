"""Greedy answers and exact scoring on the synthetic questions (`llava_uhd.eval.synthetic_eval`)."""

from __future__ import annotations

import pytest
import torch

from llava_uhd.data.probes import make_samples
from llava_uhd.data.synthetic import FINE_DETAIL_KINDS
from llava_uhd.eval.synthetic_eval import (
    evaluate_samples,
    generate_answers,
    prior_answers,
    score_predictions,
    score_prior,
)
from llava_uhd.train.ablation import AblationSettings, build_processor, build_tokenizer, corpus


def test_score_predictions_on_fake_outputs():
    predictions = ["Red.", "blue", "3", "three", "a circle", "red or blue", "grey", "", "Gray"]
    answers = ["red", "green", "3", "3", "circle", "red", "grey", "2", "grey"]
    kinds = ["corner_colour", "corner_colour", "count", "count", "shape_at", "edge_colour", "grey_probe", "count",
             "grey_probe"]
    s = score_predictions(predictions, answers, kinds)
    assert s["correct"] == [True, False, True, True, True, False, True, False, True]
    assert list(s["per_kind"]) == ["count", "corner_colour", "edge_colour", "shape_at", "grey_probe"]  # KINDS order
    assert s["per_kind"]["corner_colour"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["per_kind"]["count"]["accuracy"] == pytest.approx(2 / 3)
    assert s["per_kind"]["edge_colour"]["accuracy"] == 0.0
    assert s["fine_detail"] == {"correct": 4, "total": 7, "accuracy": 4 / 7}  # grey_probe is not fine detail
    assert s["all"] == {"correct": 6, "total": 9, "accuracy": 6 / 9}
    empty = score_predictions([], [], [])
    assert empty["fine_detail"]["accuracy"] is None and empty["per_kind"] == {}
    with pytest.raises(ValueError):
        score_predictions(["a"], [], [])


class FakeModel:
    """Answers every prompt with fixed text: what `generate` returns is the prompt plus those tokens."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, reply: str):
        self.reply = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.calls = []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, pixel_values, patch_grid_hw, max_new_tokens, **kwargs):
        self.calls.append({"batch": input_ids.shape[0], "left_padded": bool((attention_mask[:, -1] == 1).all()),
                           "max_new_tokens": max_new_tokens, "do_sample": kwargs.get("do_sample")})
        new = torch.tensor(self.reply[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_samples_with_a_fake_model():
    settings = AblationSettings.quick()
    samples = make_samples(5, 3, settings)
    tokenizer = build_tokenizer(corpus(samples), 300)
    processor = build_processor(tokenizer, settings, "uhd")
    prompt = processor.question_prompt("What colour is it?")
    assert prompt == "USER: <image>\nWhat colour is it? ASSISTANT:"
    model = FakeModel(tokenizer, " red")
    answers = generate_answers(model, processor, [s.image for s in samples[:3]], [prompt] * 3, batch_size=2,
                               max_new_tokens=4)
    assert answers == ["red"] * 3
    assert [c["batch"] for c in model.calls] == [2, 1]
    assert all(c["left_padded"] and c["do_sample"] is False for c in model.calls)
    result = evaluate_samples(FakeModel(tokenizer, " red"), processor, samples, batch_size=4)
    assert result["predictions"] == ["red"] * 5
    assert result["correct"] == [s.answer == "red" for s in samples]
    with pytest.raises(ValueError):
        generate_answers(model, processor, [samples[0].image], [prompt, prompt])


def test_answers_are_the_same_with_data_workers():
    settings = AblationSettings.quick()
    samples = make_samples(5, 3, settings)
    processor = build_processor(build_tokenizer(corpus(samples), 300), settings, "uhd")
    prompts = [processor.question_prompt(s.question) for s in samples]
    model = FakeModel(processor.tokenizer, " blue")
    answers = generate_answers(model, processor, [s.image for s in samples], prompts, batch_size=2, workers=2)
    assert answers == ["blue"] * 5 and [c["batch"] for c in model.calls] == [2, 2, 1]


def test_the_prior_answers_each_kind_with_its_most_frequent_answer():
    pairs = [("count", "3"), ("count", "2"), ("count", "3"), ("probe_colour", "red"), ("probe_colour", "blue")]
    prior = prior_answers(pairs)
    assert prior == {"count": "3", "probe_colour": "blue"}  # a tie goes to the first alphabetically

    class Q:
        def __init__(self, kind, answer):
            self.kind, self.answer = kind, answer

    row = score_prior(prior, [Q("count", "3"), Q("count", "4"), Q("probe_colour", "red"), Q("grey_probe", "grey")],
                      FINE_DETAIL_KINDS)
    assert row["answers"] == prior and "correct" not in row
    assert row["per_kind"]["count"]["accuracy"] == 0.5 and row["all"] == {"correct": 1, "total": 4, "accuracy": 0.25}
