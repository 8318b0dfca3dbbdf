"""``llava-uhd eval`` (`llava_uhd.eval.run`): every task end to end on a tiny random model over a tiny benchmark
folder in its real layout; the files written, metrics equal to the task's scoring of the answers file, 100% for a
model that answers right, the resize option and the one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
from eval_helpers import build_benchmark
from serve_helpers import save_tiny

from llava_uhd.cli import main
from llava_uhd.eval.run import resized_size
from llava_uhd.eval.tasks import TASKS

ALL = sorted(TASKS)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny(root / "model")
    built = {task: build_benchmark(task, root / "data") for task in ALL}
    return root, built


def _eval(root, task, data, out, *options):
    return main(["eval", "--model", str(root / "model"), "--task", task, "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "3", *options])


def _answers(out, task):
    return [json.loads(line) for line in (out / f"{task}_answers.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ALL)
def test_every_task_runs_end_to_end(bench, task, tmp_path, capsys):
    root, built = bench
    data, _ = built[task]
    assert _eval(root, task, data, tmp_path / "out") == 0
    out = tmp_path / "out"
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"{task}: ")
    metrics = json.loads((out / f"{task}_metrics.json").read_text())
    lines = _answers(out, task)
    items = TASKS[task].read(data, None)
    assert [r["metadata"]["key"] for r in lines] == [i.key for i in items]
    for record, item in zip(lines, items):
        assert set(record) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert record["question_id"] == item.question_id and record["prompt"] == item.prompt
        assert record["model_id"] == "model"
    rescored = TASKS[task].score(items, {r["metadata"]["key"]: r["text"] for r in lines})
    assert {k: metrics[k] for k in rescored} == json.loads(json.dumps(rescored))
    assert metrics["answers"] == len(items) and metrics["settings"]["max_new_tokens"] == 3
    assert set(metrics["files"]) >= {"answers", "metrics"}


def _fake_generate(oracle, seen=None):
    from llava_uhd.serve.generation import Generation, GenerationBatch

    def generate(model, processor, prompts, images, settings, **kwargs):
        if seen is not None:
            seen.extend(image.size for group in images for image in group)
        return GenerationBatch([Generation(oracle(p), [], 0) for p in prompts], {}, 0.0, 0.0)
    return generate


FULL = {"mme": None, "pope": 100.0}


@pytest.mark.parametrize("task", ALL)
def test_right_answers_score_full_marks(bench, task, tmp_path, monkeypatch, capsys):
    import llava_uhd.serve.generation as generation

    root, built = bench
    data, oracle = built[task]
    monkeypatch.setattr(generation, "generate", _fake_generate(oracle))
    assert _eval(root, task, data, tmp_path) == 0
    metrics = json.loads((tmp_path / f"{task}_metrics.json").read_text())
    if task == "mme":  # two subtasks of perception, one of cognition, each at most 200
        assert metrics["perception"] == 400.0 and metrics["cognition"] == 200.0 and metrics["score"] == 400.0
        assert all(s["acc"] == s["acc_plus"] == 1.0 for s in metrics["subtasks"].values())
    else:
        assert metrics["score"] == pytest.approx(100.0), metrics
    if task == "pope":
        assert all(s["accuracy"] == s["precision"] == s["recall"] == 1.0 for s in metrics["splits"].values())
    if task == "mmbench":
        assert metrics["questions"] == 3 and metrics["variants"] == 2 + 3 + 2
    assert f"{task}: " in capsys.readouterr().out


def test_submissions(bench, tmp_path, monkeypatch):
    import llava_uhd.serve.generation as generation

    root, built = bench
    data, oracle = built["vqav2"]
    monkeypatch.setattr(generation, "generate", _fake_generate(oracle))
    assert _eval(root, "vqav2", data, tmp_path / "v") == 0
    submission = json.loads((tmp_path / "v" / "vqav2_test-dev_submission.json").read_text())
    # every question of the full test file, in its order; the one not asked gets ""
    assert submission == [{"question_id": 101, "answer": "2"}, {"question_id": 102, "answer": "red"},
                          {"question_id": 103, "answer": "no"}, {"question_id": 999, "answer": ""}]
    data, oracle = built["mmbench"]
    monkeypatch.setattr(generation, "generate", _fake_generate(oracle))
    assert _eval(root, "mmbench", data, tmp_path / "m") == 0
    with open(tmp_path / "m" / "mmbench_submission.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["index"] for r in rows] == ["0", "1000000", "1", "2"]
    assert [r["prediction"] for r in rows] == ["B", "A", "C", "A"]
    assert "image" not in rows[0] and "hint" not in rows[0] and rows[0]["question"] == "What is shown?"
    data, oracle = built["gqa"]
    monkeypatch.setattr(generation, "generate", _fake_generate(lambda p: oracle(p).capitalize() + "."))
    assert _eval(root, "gqa", data, tmp_path / "g") == 0
    predictions = json.loads((tmp_path / "g" / "testdev_balanced_predictions.json").read_text())
    assert predictions[0] == {"questionId": "20968150", "prediction": "left"}


def test_resize_long_side(bench, tmp_path, monkeypatch):
    import llava_uhd.serve.generation as generation

    assert resized_size(2000, 1000, 1024) == (1024, 512)
    assert resized_size(100, 300, 1024) == (341, 1024)    # small images are scaled up, as the release does
    assert resized_size(500, 500, 1024) == (1024, 1024)
    assert resized_size(10000, 3, 1024) == (1024, 1)
    assert resized_size(640, 480, None) == (640, 480)
    root, built = bench
    data, oracle = built["docvqa"]
    seen = []
    monkeypatch.setattr(generation, "generate", _fake_generate(oracle, seen))
    assert _eval(root, "docvqa", data, tmp_path / "a", "--resize-long-side", "64") == 0
    assert seen == [(28, 64), (28, 64)]                      # 40 x 90 pictures
    metrics = json.loads((tmp_path / "a" / "docvqa_metrics.json").read_text())
    assert metrics["settings"]["resize_long_side"] == 64
    seen.clear()
    assert _eval(root, "docvqa", data, tmp_path / "b") == 0
    assert seen == [(40, 90), (40, 90)]                       # off by default


def test_limit(bench, tmp_path):
    root, built = bench
    data, _ = built["pope"]
    assert _eval(root, "pope", data, tmp_path, "--limit", "3") == 0
    assert len(_answers(tmp_path, "pope")) == 3


def test_user_mistakes_are_one_line(bench, tmp_path, capsys):
    root, built = bench
    assert _eval(root, "gqa", tmp_path / "missing", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such data folder" in err and "Traceback" not in err
    assert _eval(root, "gqa", built["pope"][0], tmp_path / "o") == 2           # another task's folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llava_gqa_testdev_balanced.jsonl" in err
    with pytest.raises(SystemExit) as exit_:
        _eval(root, "nope", built["gqa"][0], tmp_path / "o")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nope'" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "llava_pope_test.jsonl").write_text('{"question_id": 1, "text": "Is there"\n')
    assert _eval(root, "pope", broken, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llava_pope_test.jsonl line 1: not JSON" in err
    (broken / "llava_pope_test.jsonl").write_text('{"question_id": 1, "text": "Is?", "image": "x.jpg", '
                                                  '"category": "random"}\n')
    (broken / "coco").mkdir()
    (broken / "coco" / "coco_pope_random.json").write_text('{"image": "x.jpg", "label": "yes"}\n')
    assert _eval(root, "pope", broken, tmp_path / "o") == 2                    # the image is missing
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such image file" in err and "question 1" in err


def test_the_command_line_stays_light():
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from llava_uhd.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['eval', '--help'])\n"
            "import llava_uhd.eval.run, llava_uhd.eval.tasks, llava_uhd.eval.metrics\n"
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[]"
