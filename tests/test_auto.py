"""Registration with transformers' Auto classes and ``pipeline`` (`llava_uhd.auto`), in fresh processes: a saved
LLaVA-UHD loads the way transformers' own models do, whichever of ``import llava_uhd`` and transformers' Auto
modules comes first, and the greedy answers of ``pipeline`` equal ``model.generate`` on the processor's output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny, random_image

pytestmark = pytest.mark.slow  # transformers' Auto classes and pipeline in processes of their own

QUESTION = "What colour is it?"


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny saved model and processor, two images, and the greedy answers of ``model.generate``."""
    model, processor = build_tiny("clip")
    with torch.no_grad():  # a louder projector: the random model's answer then depends on the image
        for p in model.projector.parameters():
            p.mul_(30)
    tok = processor.tokenizer
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    folder = tmp_path_factory.mktemp("tiny-saved")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    paths = []
    for k, (w, h) in enumerate([(90, 40), (30, 70)]):
        paths.append(folder / f"img{k}.png")
        random_image(w, h, k).save(paths[-1])
    prompt = processor.question_prompt(QUESTION)
    inputs = processor(images=[str(p) for p in paths], text=[prompt, prompt], padding_side="left")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answers[0] != answers[1]
    return folder, [str(p) for p in paths], answers


def test_touching_the_config_registers_it():
    got = _run(
        "import json, sys\n"
        "import llava_uhd\n"
        "config = llava_uhd.LlavaUHDConfig\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print(json.dumps({'registered': CONFIG_MAPPING['llava_uhd'] is config}))\n")
    assert got == {"registered": True}


@pytest.mark.parametrize("order", ["llava_uhd first", "transformers first"])
def test_auto_classes_load_a_saved_model_in_either_order(saved, order):
    folder = saved[0]
    imports = ["import llava_uhd", "from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, "
               "AutoModelForMultimodalLM, AutoProcessor"]
    if order == "transformers first":
        imports.reverse()
    got = _run(
        "import json\n" + "\n".join(imports) + "\n"
        f"folder = {str(folder)!r}\n"
        "names = [type(auto.from_pretrained(folder)).__name__ for auto in (AutoConfig, AutoImageProcessor, "
        "AutoProcessor, AutoModelForImageTextToText, AutoModelForMultimodalLM)]\n"
        "print(json.dumps(names))\n")
    assert got == ["LlavaUHDConfig", "LlavaUHDImageProcessor", "LlavaUHDProcessor", "LlavaUHDForConditionalGeneration",
                   "LlavaUHDForConditionalGeneration"]


def test_pipeline_with_chat_messages_and_raw_prompts_batched(saved):
    folder, paths, answers = saved
    got = _run(
        "import json\n"
        "import llava_uhd\n"
        "from transformers import pipeline\n"
        f"folder, paths, question = {str(folder)!r}, {paths!r}, {QUESTION!r}\n"
        "pipe = pipeline('image-text-to-text', model=folder)\n"
        "chats = [[{'role': 'user', 'content': [{'type': 'image', 'url': p}, {'type': 'text', 'text': question}]}]\n"
        "         for p in paths]\n"
        "kw = dict(generate_kwargs={'max_new_tokens': 4, 'do_sample': False}, return_full_text=False, batch_size=2)\n"
        "chat = [o[0]['generated_text'] for o in pipe(text=chats, **kw)]\n"
        "prompt = pipe.processor.question_prompt(question)\n"
        "raw = [o['generated_text'] for o in pipe(images=paths, text=[prompt, prompt], **kw)]\n"
        "print(json.dumps({'chat': chat, 'raw': raw}))\n")
    assert got == {"chat": answers, "raw": answers}
