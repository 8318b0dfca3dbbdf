"""``llava-uhd infer`` (`llava_uhd.serve.infer`, `llava_uhd.serve.questions`): batched answers equal to `answer`
one question at a time, token-count batches, resuming, bad lines, LLaVA's chunks."""

from __future__ import annotations

import io
import json
import math

import pytest
from serve_helpers import picture, save_tiny

from llava_uhd.cli import main
from llava_uhd.serve.ask import answer
from llava_uhd.serve.generation import GenerationSettings
from llava_uhd.serve.infer import image_size, plan_batches
from llava_uhd.serve.questions import chunk, read_answers, read_questions

NEW = 4
SIZES = [(90, 50), (40, 120), (200, 60), (60, 60), (120, 80), (30, 200)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny saved model, pictures of different sizes and a question file using them (one with two images, one
    with an absolute path, one without an image)."""
    root = tmp_path_factory.mktemp("infer")
    model, processor = save_tiny(root / "model")
    (root / "images" / "sub").mkdir(parents=True)
    names = [f"p{k}.png" if k != 1 else "sub/p1.png" for k in range(len(SIZES))]
    for k, (name, (w, h)) in enumerate(zip(names, SIZES)):
        picture(w, h, seed=k).save(root / "images" / name)
    questions = [
        {"question_id": 1, "image": names[0], "text": "What colour?"},
        {"question_id": "q2", "image": names[1], "text": "How many circles?", "category": "count"},
        {"question_id": 3, "image": [str(root / "images" / names[2]), names[3]], "text": "What shape?"},
        {"question_id": 4, "image": names[4], "text": "What colour is the shape?"},
        {"question_id": 5, "text": "What colour?"},
        {"question_id": 6, "image": names[5], "text": "How many circles are there?"},
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    images = {q["question_id"]: [str(root / "images" / p) for p in
                                 ([q["image"]] if isinstance(q.get("image"), str) else q.get("image", []))]
              for q in questions}
    want = {q["question_id"]: answer(model, processor, images[q["question_id"]], q["text"],
                                     settings=GenerationSettings(max_new_tokens=NEW))[0] for q in questions}
    lengths = {q["question_id"]: processor(images=images[q["question_id"]] or None,
                                           text=[processor.question_prompt(q["text"], len(images[q["question_id"]]))]
                                           )["input_ids"].shape[1] for q in questions}
    return root, model, processor, questions, want, lengths


def _infer(root, output, *options):
    return main(["infer", "--model", str(root / "model"), "--input", str(root / "questions.jsonl"), "--output",
                 str(output), "--image-folder", str(root / "images"), "--max-new-tokens", str(NEW), *options])


def _spy(monkeypatch):
    """Record the number of prompts of every batch `infer` generates."""
    import llava_uhd.serve.generation as generation

    sizes, real = [], generation.generate
    monkeypatch.setattr(generation, "generate", lambda model, processor, prompts, *a, **k: (
        sizes.append(len(prompts)), real(model, processor, prompts, *a, **k))[1])
    return sizes


def test_infer_answers_as_ask_does(bench, tmp_path, capsys, monkeypatch):
    root, model, processor, questions, want, lengths = bench
    budget = sorted(lengths.values())[-1] + sorted(lengths.values())[-2]  # batches of two or more
    sizes = _spy(monkeypatch)
    assert _infer(root, tmp_path / "out" / "answers.jsonl", "--batch-tokens", str(budget)) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [q["question_id"] for q in questions]  # question order
    assert {r["question_id"]: r["text"] for r in lines} == want
    for record, question in zip(lines, questions):
        assert set(record) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert record["prompt"] == question["text"] and record["model_id"] == "model" and len(record["answer_id"]) == 22
    assert len({r["answer_id"] for r in lines}) == len(lines)
    assert sum(sizes) == len(questions) and max(sizes) >= 2 and len(sizes) < len(questions)
    err = capsys.readouterr().err
    assert "wrote 6 answers" in err and "sorted in question order" in err
    # every answer was already there: nothing to do, the file as it was
    before = (tmp_path / "out" / "answers.jsonl").read_text()
    assert _infer(root, tmp_path / "out" / "answers.jsonl", "--model-id", "other") == 0
    assert (tmp_path / "out" / "answers.jsonl").read_text() == before and sum(sizes) == len(questions)
    assert "6 were already there" in capsys.readouterr().err


def test_batches_and_prompt_lengths(bench, tmp_path):
    root, model, processor, questions, want, lengths = bench
    parsed = read_questions(root / "questions.jsonl", root / "images")
    for q in parsed:
        sizes = [image_size(p) for p in q.images]
        prompt = processor.question_prompt(q.text, len(sizes))
        assert processor.count_prompt_tokens(prompt, sizes) == lengths[q.question_id]
    # the header's size follows the EXIF orientation, as the pixels do
    rotated = picture(90, 50)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    from llava_uhd.image_processing import load_rgb
    assert image_size(tmp_path / "rotated.jpg") == load_rgb(str(tmp_path / "rotated.jpg")).size == (50, 90)
    # batches: every index once, longest first, within the budget unless alone
    lengths = [5, 9, 3, 9, 1, 7, 20, 2]
    batches = plan_batches(lengths, 12)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    assert [k for b in batches for k in b] == sorted(range(len(lengths)), key=lambda k: -lengths[k])
    assert all(sum(lengths[k] for k in b) <= 12 or len(b) == 1 for b in batches)
    assert batches == [[6], [1], [3], [5, 0], [2, 7, 4]]


def test_infer_resumes(bench, tmp_path, capsys, monkeypatch):
    """A run killed while writing: the complete answers stay as they are, the half-written line goes, the rest is
    answered (and only the rest)."""
    root, model, processor, questions, want, lengths = bench
    out = tmp_path / "answers.jsonl"
    kept = [{"question_id": 4, "prompt": "x", "text": want[4], "answer_id": "keep4", "model_id": "m", "metadata": {}},
            {"question_id": 1, "prompt": "x", "text": want[1], "answer_id": "keep1", "model_id": "m", "metadata": {}}]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"question_id": 6, "prompt": "How ma')
    sizes = _spy(monkeypatch)
    assert _infer(root, out) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions]
    assert {r["question_id"]: r["text"] for r in records} == want
    assert {r["answer_id"] for r in records if r["question_id"] in (1, 4)} == {"keep1", "keep4"}
    assert sum(sizes) == len(questions) - 2
    err = capsys.readouterr().err
    assert "cut off a half-written last line" in err and "2 were already there" in err
    # a file that is not an answers file is refused, untouched
    other = tmp_path / "notes.jsonl"
    other.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n')
    assert _infer(root, other) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2 is not an answer line" in err
    assert other.read_text() == '{"question_id": 1}\nnot json\n{"question_id": 2}\n'


def test_bad_lines(bench, tmp_path, capsys):
    root, model, processor, questions, want, lengths = bench
    (root / "images" / "text.png").write_text("not a picture")
    encoded = io.BytesIO()
    picture(200, 120).save(encoded, "JPEG")
    data = encoded.getvalue()
    (root / "images" / "truncated.jpg").write_bytes(data[:len(data) // 2])  # its header reads, its pixels do not
    lines = [json.dumps(questions[0]), "{not json", json.dumps({"question_id": 7, "image": "missing.png", "text": "a"}),
             json.dumps({"question_id": 8, "image": "text.png", "text": "b"}), json.dumps(questions[0]),
             json.dumps({"question_id": 9, "text": "word " * 600}), "", json.dumps({"question_id": 10, "text": ""}),
             json.dumps({"question_id": 11, "image": "truncated.jpg", "text": "c"}), json.dumps(questions[3])]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    args = ["infer", "--model", str(root / "model"), "--input", str(tmp_path / "q.jsonl"), "--image-folder",
            str(root / "images"), "--max-new-tokens", str(NEW), "--output"]
    assert main([*args, str(tmp_path / "strict.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "q.jsonl line 2: not JSON" in err and "--skip-bad" in err
    assert not (tmp_path / "strict.jsonl").exists()  # every line is checked before the first answer
    assert main([*args, str(tmp_path / "skip.jsonl"), "--skip-bad"]) == 0
    records = [json.loads(line) for line in (tmp_path / "skip.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["text"]) for r in records] == [(1, want[1]), (4, want[4])]
    err = capsys.readouterr().err
    assert "skipped 7 bad line(s)" in err
    for reason in ("line 2: not JSON", "line 3: no such image file", "line 4: '", "not an image",
                   "line 5: question_id 1 repeats line 1", "line 6: too long", "line 8: no question",
                   "line 9:", "cannot be decoded"):
        assert reason in err, reason
    # without --skip-bad, an image that fails only when decoded stops the run; the answers so far are kept
    (tmp_path / "late.jsonl").write_text("\n".join([lines[0], lines[8], lines[9]]) + "\n")
    assert main([*args[:4], str(tmp_path / "late.jsonl"), *args[5:], str(tmp_path / "late-out.jsonl"),
                 "--batch-tokens", "1"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress bar
    assert last.startswith("llava-uhd infer: ") and "late.jsonl line 2:" in last and "run the same command" in last
    answered = [json.loads(line)["question_id"] for line in (tmp_path / "late-out.jsonl").read_text().splitlines()]
    assert answered == [4, 1]  # longest prompt first: the bad image's (its question is one letter) comes last


def test_chunks_split_as_llava_does(tmp_path):
    def llava_get_chunk(lst, n, k):  # LLaVA's llava/eval/model_vqa.py
        chunk_size = math.ceil(len(lst) / n)
        return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)][k]

    for count in (1, 7, 10, 12):
        (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "text": "q"}) + "\n"
                                                  for i in range(count)))
        questions = read_questions(tmp_path / "q.jsonl")
        for n in (1, 3, 4):
            for k in range(n):
                try:
                    expected = llava_get_chunk(list(range(count)), n, k)
                except IndexError:  # LLaVA has fewer chunks than asked here; this gives the missing ones empty
                    expected = []
                assert [q.question_id for q in chunk(questions, n, k)] == expected


def test_read_answers_cuts_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    assert read_answers(path) == (set(), False)
    path.write_text('{"question_id": 1}\n{"question_id": "b"}')  # complete, only its newline is missing
    assert read_answers(path) == ({1, "b"}, False) and path.read_text().endswith('"b"}\n')
    path.write_text('{"question_id": 1}\n{"question_id": 2, "te')
    assert read_answers(path) == ({1}, True) and path.read_text() == '{"question_id": 1}\n'
