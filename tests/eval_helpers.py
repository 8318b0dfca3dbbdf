"""Helpers of the evaluation tests (`test_eval_tasks`, `test_eval_run`): tiny benchmark folders in each task's real
file layout (a few questions, pictures drawn with PIL), and an oracle that answers their prompts correctly.

    data, oracle = build_benchmark("pope", tmp_path)      # the folder `llava-uhd eval --data` reads
    oracle(prompt)                                          # a right answer to any prompt asked about it
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from serve_helpers import picture

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _save(path: Path, seed: int, size=(60, 40)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(*size, seed=seed).save(path)
    return path.name


def _jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def _letter_of(answer_text: str) -> Callable[[str], str]:
    """A right answer to a multiple-choice prompt: the letter of the line ``"X. answer_text"``."""
    def pick(prompt: str) -> str:
        found = re.findall(rf"^([A-Z])\. {re.escape(answer_text)}$", prompt, re.MULTILINE)
        assert len(found) == 1, (answer_text, prompt)
        return found[0]
    return pick


def _oracle(table: dict[str, object]) -> Callable[[str], str]:
    def answer(prompt: str) -> str:
        hits = [a for q, a in table.items() if q in prompt]
        assert len(hits) == 1, (prompt, hits)
        return hits[0](prompt) if callable(hits[0]) else hits[0]
    return answer


def _vqav2(root: Path):
    qs = [(101, "How many dogs are in picture one?", ["2"] * 4 + ["two"] * 2 + ["3"] * 4),
          (102, "What colour is the car in picture two?", ["red"] * 6 + ["dark red"] * 4),
          (103, "Is it raining in picture three?", ["no"] * 9 + ["yes"])]
    lines, annotations = [], []
    for k, (qid, q, answers) in enumerate(qs):
        image = f"COCO_test2015_{qid:012d}.jpg"
        _save(root / "test2015" / image, k)
        lines.append({"question_id": qid, "image": image, "text": f"{q}\n{SHORT}", "category": "default"})
        annotations.append({"question_id": qid, "image_id": qid, "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]})
    _jsonl(root / "llava_vqav2_mscoco_test-dev2015.jsonl", lines)
    _jsonl(root / "llava_vqav2_mscoco_test2015.jsonl", lines + [
        {"question_id": 999, "image": "COCO_test2015_000000000999.jpg", "text": f"Unasked?\n{SHORT}"}])
    _json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    return _oracle({q: answers[0] for _, q, answers in qs})


def _textvqa(root: Path):
    qs = [("img0001", "what brand is the camera?", "dakota, digital", ["dakota"] * 10),
          ("img0001", "what number is on the lens?", "55, mm", ["55"] * 7 + ["55mm"] * 3),
          ("img0002", "what is the price?", "$3.50", ["3.50"] * 5 + ["$3.50"] * 5)]
    lines, data = [], []
    for k, (image_id, q, ocr, answers) in enumerate(qs):
        _save(root / "train_images" / f"{image_id}.jpg", k)
        lines.append({"question_id": image_id, "image": f"{image_id}.jpg",
                      "text": f"{q}\nReference OCR token: {ocr}\n{SHORT}"})
        data.append({"question": q, "image_id": image_id, "question_id": 34000 + k, "answers": answers,
                     "image_classes": ["Camera"], "set_name": "val"})
    _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", lines)
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_type": "val", "data": data})
    return _oracle({q: answers[0] for _, q, _, answers in qs})


def _gqa(root: Path):
    qs = [("20968150", "Is the bowl to the right or left of the spoon?", "left", "n179334.jpg"),
          ("20968151", "What color is the shirt?", "blue", "n179335.jpg"),
          ("20968152", "Are there both cups and plates?", "yes", "n179334.jpg")]
    for k, (_, _, _, image) in enumerate(qs):
        _save(root / "images" / image, k)
    _jsonl(root / "llava_gqa_testdev_balanced.jsonl", [{"question_id": qid, "image": image, "text": f"{q}\n{SHORT}"}
                                                       for qid, q, _, image in qs])
    _json(root / "testdev_balanced_questions.json", {qid: {"question": q, "answer": a, "imageId": image[:-4]}
                                                     for qid, q, a, image in qs})
    return _oracle({q: a for _, q, a, _ in qs})


def _pope(root: Path):
    objects = {"adversarial": [("dog", "yes"), ("cat", "no")], "popular": [("car", "yes"), ("bus", "no")],
               "random": [("cup", "no"), ("tree", "yes"), ("kite", "no")]}
    lines, table, qid = [], {}, 0
    for s, (split, pairs) in enumerate(objects.items()):
        labels = []
        for k, (obj, label) in enumerate(pairs):
            qid += 1
            image = f"COCO_val2014_{qid:012d}.jpg"
            _save(root / "val2014" / image, 10 * s + k)
            q = f"Is there a {obj} in the image?"
            lines.append({"question_id": qid, "image": image, "text": f"{q}\n{SHORT}", "category": split})
            labels.append({"question_id": k + 1, "image": image, "text": q, "label": label})
            table[q] = label.capitalize() + "."
        _jsonl(root / "coco" / f"coco_pope_{split}.json", labels)
    _jsonl(root / "llava_pope_test.jsonl", lines)
    return _oracle(table)


def _mme(root: Path):
    base = root / "MME_Benchmark_release_version"
    tasks = {"existence": False, "artwork": True, "code_reasoning": False}
    lines, table = [], {}
    for t, (task, nested) in enumerate(tasks.items()):
        for n in range(2):
            name = f"{t}{n:03d}"
            if nested:
                _save(base / task / "images" / f"{name}.jpg", 10 * t + n)
                txt, image = base / task / "questions_answers_YN" / f"{name}.txt", f"{task}/images/{name}.jpg"
            else:
                _save(base / task / f"{name}.png", 10 * t + n)
                txt, image = base / task / f"{name}.txt", f"{task}/{name}.png"
            pairs = [(f"Is there thing {name} here? Please answer yes or no.", "Yes"),
                     (f"Is there no thing {name} here? Please answer yes or no.", "No")]
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("".join(f"{q}\t{a}\n" for q, a in pairs), encoding="utf-8")
            for q, a in pairs:
                lines.append({"question_id": image, "image": image, "text": f"{q}\n{SHORT}", "category": task})
                table[q] = a
    _jsonl(root / "llava_mme.jsonl", lines)
    return _oracle(table)


def _scienceqa(root: Path):
    problems = {"5": ("Which animal can fly?", ["dog", "bird", "fish"], 1, True),
                "7": ("Which is a liquid?", ["water", "rock"], 0, True),
                "9": ("Which word is a noun?", ["run", "table"], 1, False),   # no image: not in SQA-IMG
                "11": ("Which is hot?", ["ice", "fire"], 1, True)}           # not in the test split
    questions, table = [], {}
    for pid, (q, choices, answer, has_image) in problems.items():
        text = f"Context: Look at the picture.\n{q}\n" + "\n".join(f"{'ABC'[k]}. {c}" for k, c in enumerate(choices))
        record = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if has_image else "") + text},
                                               {"from": "gpt", "value": "ABC"[answer]}]}
        if has_image:
            _save(root / "images" / "test" / pid / "image.png", int(pid))
            record["image"] = f"{pid}/image.png"
        questions.append(record)
        table[q] = _letter_of(choices[answer])
    _json(root / "llava_test_CQM-A.json", questions)
    _json(root / "problems.json", {pid: {"question": q, "choices": c, "answer": a, "hint": "", "split": "test",
                                         "image": "image.png" if i else None}
                                   for pid, (q, c, a, i) in problems.items()})
    _json(root / "pid_splits.json", {"train": ["11"], "val": [], "test": ["5", "7", "9"]})
    return _oracle(table)


def _ai2d(root: Path):
    images = {"0.png": {"Which part absorbs light?": (["root", "leaf", "stem", "flower"], 1)},
              "1.png": {"What eats the grass?": (["rabbit", "hawk", "sun", "soil"], 0),
                        "What does the hawk eat?": (["grass", "sun", "rabbit", "soil"], 2)},
              "2.png": {"Not in the test split?": (["a", "b", "c", "d"], 3)}}
    table = {}
    for k, (image, questions) in enumerate(images.items()):
        _save(root / "images" / image, k)
        _json(root / "questions" / f"{image}.json", {"imageName": image, "questions": {
            q: {"abcLabel": False, "answerTexts": opts, "correctAnswer": right, "questionId": f"{image}-{j}"}
            for j, (q, (opts, right)) in enumerate(questions.items())}})
        table.update({q: _letter_of(opts[right]) for q, (opts, right) in questions.items()})
    (root / "ai2d_test_ids.csv").write_text("0\n1\n", encoding="utf-8")
    return _oracle(table)


def _mmbench(root: Path):
    rows = [  # one question with its circular copies in the file (index + k * 1e6), two rotated here
        (0, "What is shown?", "", ["a cat", "a dog", "a car", "a tree"], "B", "attribute"),
        (1_000_000, "What is shown?", "", ["a dog", "a car", "a tree", "a cat"], "A", "attribute"),
        (1, "Which colour dominates?", "Look closely.", ["red", "green", "blue"], "C", "colour"),
        (2, "How many objects?", "", ["one", "two"], "A", "count")]
    table = {}
    buf = io.BytesIO()
    picture(50, 40, seed=3).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    with open(root / "mmbench_dev_20230712.tsv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                         "l2-category", "comment", "split"])
        for index, q, hint, opts, answer, cat in rows:
            writer.writerow([index, q, hint, *(opts + [""] * (4 - len(opts))), answer, cat, image, "src", cat, "",
                             "dev"])
            table[q] = _letter_of(opts["ABCD".index(answer)])
    return _oracle(table)


def _docvqa(root: Path):
    qs = [(337, "what is the date mentioned in this letter?", ["1/8/93", "January 8, 1993"]),
          (338, "what is the name of the company?", ["ITC Limited"])]
    data = []
    for k, (qid, q, answers) in enumerate(qs):
        _save(root / "documents" / f"doc{k}.png", k, size=(40, 90))
        data.append({"questionId": qid, "question": q, "image": f"documents/doc{k}.png", "docId": k,
                     "answers": answers, "data_split": "val"})
    _json(root / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": data})
    return _oracle({q: answers[0] for _, q, answers in qs})


def _chartqa(root: Path):
    splits = {"human": [("What is the highest value in the chart?", "87"), ("Which year had the least sales?", "2009")],
              "augmented": [("What is the sum of the two bars?", "12.5")]}
    table = {}
    for s, (split, qs) in enumerate(splits.items()):
        records = []
        for k, (q, label) in enumerate(qs):
            name = f"{split}{k}.png"
            _save(root / "test" / "png" / name, 10 * s + k, size=(90, 50))
            records.append({"imgname": name, "query": q, "label": label})
            table[q] = label
        _json(root / "test" / f"test_{split}.json", records)
    return _oracle(table)


BUILDERS = {"vqav2": _vqav2, "textvqa": _textvqa, "textvqa-noocr": _textvqa, "gqa": _gqa, "pope": _pope,
            "mme": _mme, "scienceqa": _scienceqa, "ai2d": _ai2d, "mmbench": _mmbench, "docvqa": _docvqa,
            "chartqa": _chartqa}


def build_benchmark(task: str, root: Path) -> tuple[Path, Callable[[str], str]]:
    """A tiny ``task`` benchmark folder under ``root`` and its oracle (a right answer to each of its prompts)."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    return folder, BUILDERS[task](folder)
