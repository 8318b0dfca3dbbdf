"""`llava_uhd.eval.tasks`: each benchmark's layout read into the questions, prompts and truths it should give, and
malformed folders refused with the file named."""

from __future__ import annotations

import json

import pytest
from eval_helpers import LETTER, SHORT, build_benchmark

from llava_uhd.eval.tasks import TASKS, TaskDataError
from llava_uhd.eval.tasks.vqa import textvqa_question


def test_vqav2_and_gqa(tmp_path):
    data, _ = build_benchmark("vqav2", tmp_path)
    items = TASKS["vqav2"].read(data, None)
    assert [i.question_id for i in items] == [101, 102, 103]
    assert items[0].prompt == f"How many dogs are in picture one?\n{SHORT}"
    assert items[0].images == [str(data / "test2015" / "COCO_test2015_000000000101.jpg")]
    assert items[1].truth == ["red"] * 6 + ["dark red"] * 4
    (data / "v2_mscoco_val2014_annotations.json").unlink()    # test-dev without annotations: server-scored
    items = TASKS["vqav2"].read(data, 2)
    assert len(items) == 2 and all(i.truth is None for i in items)
    scored = TASKS["vqav2"].score(items, {i.key: "2" for i in items})
    assert scored["score"] is None and "EvalAI" in scored["note"]
    data, _ = build_benchmark("gqa", tmp_path)
    assert [i.truth for i in TASKS["gqa"].read(data, None)] == ["left", "blue", "yes"]


def test_textvqa_with_and_without_ocr(tmp_path):
    data, _ = build_benchmark("textvqa", tmp_path)
    with_ocr, without = TASKS["textvqa"].read(data, None), TASKS["textvqa-noocr"].read(data, None)
    assert with_ocr[0].prompt == f"what brand is the camera?\nReference OCR token: dakota, digital\n{SHORT}"
    assert without[0].prompt == f"what brand is the camera?\n{SHORT}"
    assert [i.truth for i in with_ocr] == [i.truth for i in without] and with_ocr[1].truth[0] == "55"
    assert textvqa_question("Reference OCR token: a, b\nWhat Is It?\nAnswer.") == "what is it?"
    lines = (data / "llava_textvqa_val_v051_ocr.jsonl").read_text().replace("what is the price?", "what else?")
    (data / "llava_textvqa_val_v051_ocr.jsonl").write_text(lines)
    with pytest.raises(TaskDataError, match="line 3: no annotation for image 'img0002' and question 'what else"):
        TASKS["textvqa"].read(data, None)


def test_pope_pairs_questions_with_labels_by_split(tmp_path):
    data, _ = build_benchmark("pope", tmp_path)
    items = TASKS["pope"].read(data, None)
    assert [(i.extra["category"], i.truth) for i in items] == [
        ("adversarial", "yes"), ("adversarial", "no"), ("popular", "yes"), ("popular", "no"), ("random", "no"),
        ("random", "yes"), ("random", "no")]
    labels = data / "coco" / "coco_pope_popular.json"
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    records[0]["image"] = "COCO_val2014_other.jpg"
    labels.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(TaskDataError, match="line 3: its image is not the one of coco/coco_pope_popular.json line 1"):
        TASKS["pope"].read(data, None)


def test_mme_ground_truth(tmp_path):
    data, _ = build_benchmark("mme", tmp_path)
    items = TASKS["mme"].read(data, None)
    assert len(items) == 12 and items[0].question_id == "existence/0000.png"
    assert items[0].truth == ("existence", "0000.txt", "Yes") and items[1].truth == ("existence", "0000.txt", "No")
    assert items[4].truth == ("artwork", "1000.txt", "Yes")   # images/ + questions_answers_YN/
    # a question file without "Please answer yes or no." finds its truth as LLaVA's conversion does
    lines = (data / "llava_mme.jsonl").read_text().replace(" Please answer yes or no.", "")
    (data / "llava_mme.jsonl").write_text(lines)
    assert [i.truth for i in TASKS["mme"].read(data, None)] == [i.truth for i in items]
    (data / "MME_Benchmark_release_version" / "existence" / "0000.txt").write_text("no tab here\n")
    with pytest.raises(TaskDataError, match="0000.txt line 1: expected 'question<TAB>answer'"):
        TASKS["mme"].read(data, None)


def test_multiple_choice_layouts(tmp_path):
    data, _ = build_benchmark("scienceqa", tmp_path)
    items = TASKS["scienceqa"].read(data, None)
    assert [i.question_id for i in items] == ["5", "7"]    # "9" has no image, "11" is not in the test split
    assert items[0].prompt == ("Context: Look at the picture.\nWhich animal can fly?\nA. dog\nB. bird\nC. fish\n"
                               + LETTER)
    assert items[0].truth == (1, ["dog", "bird", "fish"])
    assert items[0].images == [str(data / "images" / "test" / "5" / "image.png")]
    data, _ = build_benchmark("ai2d", tmp_path)
    items = TASKS["ai2d"].read(data, None)
    assert [i.question_id for i in items] == ["0.png-0", "1.png-0", "1.png-1"]   # 2.png is not a test image
    assert items[0].prompt == f"Which part absorbs light?\nA. root\nB. leaf\nC. stem\nD. flower\n{LETTER}"


def test_mmbench_rotations(tmp_path):
    data, _ = build_benchmark("mmbench", tmp_path)
    items = TASKS["mmbench"].read(data, None)
    assert [i.key for i in items] == ["0/0", "1000000/0", "1/0", "1/1", "1/2", "2/0", "2/1"]
    colour = [i for i in items if i.question_id == 1]
    assert colour[0].prompt == f"Look closely.\nWhich colour dominates?\nA. red\nB. green\nC. blue\n{LETTER}"
    assert colour[1].prompt == f"Look closely.\nWhich colour dominates?\nA. green\nB. blue\nC. red\n{LETTER}"
    assert [i.truth[0] for i in colour] == [2, 1, 0]          # "blue" wherever it lands
    assert isinstance(items[0].images[0], bytes) and items[0].images[0][:4] == b"\x89PNG"
    assert len(TASKS["mmbench"].read(data, 2)) == 2 + 3       # two questions, all their rotations
    answers = {i.key: "ABC"[i.truth[0]] for i in items}
    answers["1/1"] = "A"                                       # one rotation wrong: the question is wrong
    scored = TASKS["mmbench"].score(items, answers)
    assert scored["score"] == pytest.approx(200 / 3) and scored["first_round_accuracy"] == 100.0


def test_documents(tmp_path):
    data, _ = build_benchmark("docvqa", tmp_path)
    items = TASKS["docvqa"].read(data, None)
    assert items[0].question_id == 337 and items[0].truth == ["1/8/93", "January 8, 1993"]
    assert TASKS["docvqa"].score(items, {"0": "january 8, 1993", "1": "ITC Limite"})["score"] == pytest.approx(
        100 * (1 + 10 / 11) / 2)   # one edit in 11 characters
    data, _ = build_benchmark("chartqa", tmp_path)
    items = TASKS["chartqa"].read(data, None)
    assert [i.key for i in items] == ["human/0", "human/1", "augmented/0"]
    scored = TASKS["chartqa"].score(items, {"human/0": "80", "human/1": "2009", "augmented/0": "12.5"})
    # 80 is 8% off 87: wrong
    assert scored["splits"] == {"human": 50.0, "augmented": 100.0} and scored["score"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_missing_layout_names_its_file(task, tmp_path):
    with pytest.raises(TaskDataError, match=r"no .*at '|no DocVQA questions"):
        TASKS[task].read(tmp_path, None)
