"""`llava_uhd.serve.generation`: batched generation against one prompt at a time through ``model.generate``,
streaming, beam search against a reference beam search, sampling settings, the context check."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from serve_helpers import picture

from llava_uhd.modeling.context import context_limit
from llava_uhd.serve.generation import GenerationSettings, generate

QUESTIONS = ["What colour is the shape?", "How many circles are there?", "What colour?"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("clip")


def _prompt(processor, question, n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _reference(model, processor, prompt, images, max_new_tokens):
    """Greedy new tokens of one prompt, straight through ``model.generate``."""
    inputs = processor(images=images, text=[prompt])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_batch_equals_one_prompt_at_a_time_and_streams(tiny):
    model, processor = tiny
    eos = processor.tokenizer.eos_token_id
    groups = [[picture(90, 50, 1)], [picture(40, 120, 2), picture(60, 60, 3)], [picture(200, 60, 4)]]
    prompts = [_prompt(processor, q, len(g)) for q, g in zip(QUESTIONS, groups)]
    settings = GenerationSettings(max_new_tokens=6)
    batch = generate(model, processor, prompts, groups, settings)
    texts = []
    for prompt, group, result in zip(prompts, groups, batch.results):
        want = _reference(model, processor, prompt, group, 6)
        want = want[:want.index(eos) + 1] if eos in want else want
        assert result.token_ids == want
        assert result.text == processor.tokenizer.decode(want, skip_special_tokens=True).strip()
        assert result.prompt_tokens == processor(images=group, text=[prompt])["input_ids"].shape[1]
        pieces = []
        alone = generate(model, processor, [prompt], [group], settings, on_text=pieces.append).results[0]
        assert alone.token_ids == want and "".join(pieces) == alone.text
        texts.append(alone.text)
    assert len(set(texts)) > 1  # the pictures matter to this model: the comparison above is not vacuous


def _reference_beams(model, processor, prompt, images, num_beams, steps):
    """Beam search by hand: full forwards (no cache) over every beam, keep the ``num_beams`` best sums of
    log-probabilities. Valid while no end-of-sequence token ranks among the kept candidates (asserted)."""
    inputs = processor(images=images, text=[prompt])
    eos = processor.tokenizer.eos_token_id
    beams = [(0.0, [])]
    for _ in range(steps):
        candidates = []
        for score, tokens in beams:
            ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], dim=1)
            with torch.no_grad():
                logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0, -1]
            logprobs = torch.log_softmax(logits.float(), -1)
            top = logprobs.topk(2 * num_beams)
            candidates += [(score + v, tokens + [t]) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda c: -c[0])
        beams = candidates[:num_beams]
        assert all(eos not in tokens for _, tokens in beams), "pick another picture: EOS among the beams"
    return beams[0][1]


def test_beam_search_matches_a_reference(tiny):
    """Each beam must see its own sample's images: the packed image tensors cannot simply be repeated per beam."""
    model, processor = tiny
    group = [picture(90, 50, 5), picture(40, 120, 6)]
    prompt = _prompt(processor, QUESTIONS[0], 2)
    want = _reference_beams(model, processor, prompt, group, num_beams=3, steps=4)
    got = generate(model, processor, [prompt], [group], GenerationSettings(max_new_tokens=4, num_beams=3))
    assert got.results[0].token_ids == want
    # batched beam search: each sample its own images, the same as alone
    other = [picture(70, 70, 7)]
    both = generate(model, processor, [prompt, _prompt(processor, QUESTIONS[1])], [group, other],
                    GenerationSettings(max_new_tokens=4, num_beams=3))
    assert both.results[0].token_ids == want
    assert both.results[1].token_ids == _reference_beams(model, processor, _prompt(processor, QUESTIONS[1]), other,
                                                         num_beams=3, steps=4)


def test_sampling_settings(tiny):
    model, processor = tiny
    group = [picture(90, 50, 1)]
    prompt = _prompt(processor, QUESTIONS[0])
    greedy = generate(model, processor, [prompt], [group], GenerationSettings(max_new_tokens=6)).results[0]

    def sample(**settings):
        return generate(model, processor, [prompt], [group],
                        GenerationSettings(max_new_tokens=6, **settings)).results[0].token_ids

    # a nucleus this small keeps only the most likely token: sampling becomes greedy decoding
    assert sample(temperature=1.0, top_p=1e-6, seed=3) == greedy.token_ids
    # the seed makes sampling reproducible; at a high temperature two seeds (almost surely) differ
    assert sample(temperature=5.0, seed=1) == sample(temperature=5.0, seed=1)
    assert sample(temperature=5.0, seed=1) != sample(temperature=5.0, seed=2)


def test_settings_are_checked():
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"num_beams": 0},
                {"temperature": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationSettings(**bad)
    assert not GenerationSettings().do_sample and GenerationSettings(temperature=0.1).do_sample


def test_a_prompt_past_the_context_is_refused(tiny, monkeypatch):
    model, processor = tiny
    assert context_limit(model.config) == model.config.text_config.max_position_embeddings
    prompt = _prompt(processor, QUESTIONS[0])
    length = processor(images=[picture(90, 50)], text=[prompt])["input_ids"].shape[1]
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", length + 3)  # a short context
    generate(model, processor, [prompt], [[picture(90, 50)]], GenerationSettings(max_new_tokens=3))  # fills it
    with pytest.raises(ValueError, match=f"too long: the prompt is {length} tokens.*context of {length + 3}"):
        generate(model, processor, [prompt], [[picture(90, 50)]], GenerationSettings(max_new_tokens=4))


def test_model_generate_refuses_a_prompt_past_the_context_before_any_work(tiny, monkeypatch):
    """The Python path: ``model.generate(**processor(...))`` checks prompt + image tokens + the answer's budget
    against the LLM's context before the vision tower runs."""
    model, processor = tiny
    images = [picture(90, 50), picture(40, 120)]
    inputs = processor(images=images, text=[_prompt(processor, QUESTIONS[0]), _prompt(processor, "Which one?")],
                       padding_side="left")
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert lengths[0] != lengths[1]  # the check counts each row's own tokens, not the padding
    limit = max(lengths) + 2
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", limit)
    with torch.inference_mode():
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2
    monkeypatch.setattr(type(model), "get_image_features", lambda *a, **k: pytest.fail("the vision tower ran"))
    k = lengths.index(max(lengths))
    with pytest.raises(ValueError, match=rf"too long: prompt {k} is {max(lengths)} tokens \(image tokens included\) "
                                         rf"and up to 3 new tokens would follow, past the model's context of {limit}"):
        model.generate(**inputs, max_new_tokens=3)
    with pytest.raises(ValueError, match=f"context of {limit} tokens"):
        model.generate(**inputs, max_length=limit + 5)  # a total length past the context, without max_new_tokens
