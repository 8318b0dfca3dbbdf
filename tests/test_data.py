"""Training data: LLaVA records, templates and label masking, truncation, bad images, collation, sampling."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import build_tiny, build_tiny_tokenizer, random_image, tiny_processor

from llava_uhd.data.llava_data import DataCollatorForLlavaUHD, DataError, LazySupervisedDataset
from llava_uhd.data.sampler import (LengthGroupedSampler, get_length_grouped_indices,
                                    get_modality_length_grouped_indices)
from llava_uhd.data.templates import tokenize_conversation
from llava_uhd.processing import IGNORE_INDEX

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def proc():
    return tiny_processor()


@pytest.fixture(scope="module")
def chatml_proc():
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = CHATML
    return tiny_processor(tok)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """a.png 56x84 (2 cols x 3 rows + overview: 7 crops, 34 tokens), b.jpg 30x20 (one crop, 4 tokens)."""
    d = tmp_path_factory.mktemp("images")
    random_image(56, 84, seed=1).save(d / "a.png")
    random_image(30, 20, seed=2).save(d / "b.jpg", quality=90)
    (d / "sub").mkdir()
    random_image(24, 24, seed=3).save(d / "sub" / "c.png")
    # truncated files: valid headers, data cut short
    (d / "cut.png").write_bytes((d / "a.png").read_bytes()[:200])
    big = d / "big.jpg"
    random_image(300, 200, seed=4).save(big, quality=95)
    (d / "cut.jpg").write_bytes(big.read_bytes()[:1500])
    return d


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def labelled_runs(tokenizer, labels):
    """Decode each contiguous run of trained labels."""
    runs, current = [], []
    for label in list(labels) + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(int(label))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def image_token_spans(ids, image_token_id):
    return [i for i, t in enumerate(ids) if t == image_token_id]


# ------------------------------------------------------------------------------------------ templates
MULTI_TURN = [human("<image>\nWhat colour is the shape?"), gpt("red"), human("How many circles?"), gpt("three")]


def test_vicuna_v1_labels_cover_exactly_the_answers(proc, images):
    ds = LazySupervisedDataset([{"id": "v", "image": "a.png", "conversations": MULTI_TURN}], proc,
                               image_folder=images)
    sample = ds[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    tok = proc.tokenizer
    assert labelled_runs(tok, labels) == [" red</s>", " three</s>"]
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert trained.count(tok.eos_token_id) == 2
    assert all(lab == t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX)
    # the whole image block (image tokens and its "," / "\n" separators) is ignored
    layout = proc.image_layouts({k: sample[k] for k in ("patch_grid_hw", "crop_image_ids", "image_layout")})[0]
    start = ids.index(proc.image_token_id)
    assert ids[start:start + len(layout)] == layout and len(layout) == 34
    assert all(lab == IGNORE_INDEX for lab in labels[:start + len(layout)])
    text = tok.decode([t for t in ids if t != proc.image_token_id])
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert " USER: " in text and "ASSISTANT: red</s> USER: How many circles? ASSISTANT: three</s>" in text


def test_plain_drops_the_human_text_and_trains_caption_plus_eos(proc, images):
    ds = LazySupervisedDataset([{"id": "p", "image": "a.png", "conversations": [human("<image>\nDescribe it."),
                                                                                gpt("a red shape")]}],
                               proc, template="plain", image_folder=images)
    ids, labels = ds[0]["input_ids"].tolist(), ds[0]["labels"].tolist()
    tok = proc.tokenizer
    assert labelled_runs(tok, labels) == ["a red shape</s>"]
    assert ids[-1] == tok.eos_token_id
    first_text = max(image_token_spans(ids, proc.image_token_id)) + 1
    assert all(lab == IGNORE_INDEX for lab in labels[:first_text])
    assert "Describe" not in tok.decode(ids)
    assert tok.decode(ids[first_text:]) == "a red shape</s>"
    with pytest.raises(ValueError, match="one human and one gpt turn"):
        tokenize_conversation([{"role": r, "content": c} for r, c in
                               [("user", "<image>a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]],
                              tok, "plain")


def test_chat_template_labels(chatml_proc):
    tok = chatml_proc.tokenizer
    turns = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in MULTI_TURN]
    ids, labels = tokenize_conversation(turns, tok, "chat_template")
    assert labelled_runs(tok, labels) == ["red<|im_end|>", "three<|im_end|>"]
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(turns, tokenize=False)  # the template's own rendering, tokenized once
    # prompts, role markers, the image placeholder and the "\n" after <|im_end|> are not trained
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    never = {tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<|im_start|>")}
    for k, (t, lab) in enumerate(zip(ids, labels)):
        if t in never or (k > 0 and ids[k - 1] == im_end):
            assert lab == IGNORE_INDEX
    # a template that rewrites earlier turns cannot be used
    tok2 = build_tiny_tokenizer()
    tok2.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_conversation(turns, tok2, "chat_template")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        tokenize_conversation(turns, build_tiny_tokenizer(), "chat_template")


def test_vicuna_v1_closes_answers_with_the_tokenizers_eos(chatml_proc):
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]}, replace_extra_special_tokens=False)
    tok.eos_token = "<|end|>"
    ids, labels = tokenize_conversation([{"role": "user", "content": "What?"}, {"role": "assistant", "content": "red"}],
                                        tok, "vicuna_v1")
    assert labelled_runs(tok, labels) == [" red<|end|>"]
    assert ids[-1] == tok.eos_token_id


def test_chat_template_dataset_expands_images(chatml_proc, images):
    ds = LazySupervisedDataset([{"id": "c", "image": ["a.png", "b.jpg"],
                                 "conversations": [human("<image> and <image>\nWhich is red?"), gpt("the first")]}],
                               chatml_proc, template="chat_template", image_folder=images)
    s = ds[0]
    assert int((s["input_ids"] == chatml_proc.image_token_id).sum()) == 7 * 4 + 4
    assert labelled_runs(chatml_proc.tokenizer, s["labels"].tolist()) == ["the first<|im_end|>"]


# ------------------------------------------------------------------------------------------ formats
RECORDS = [
    {"id": "cap", "image": "a.png", "conversations": [human("<image>\n"), gpt("a red shape")]},
    {"id": "text", "conversations": [human("How many circles?"), gpt("three")]},
    {"id": "multi", "image": ["b.jpg", "sub/c.png"],
     "conversations": [human("<image>\n<image>\nCompare."), gpt("red"), human("And?"), gpt("green")]},
]


def test_json_jsonl_and_list_give_the_same_samples(proc, images, tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    datasets = [LazySupervisedDataset(src, proc, image_folder=images)
                for src in (RECORDS, tmp_path / "data.json", str(tmp_path / "data.jsonl"))]
    for ds in datasets:
        assert len(ds) == 3
        text_only = ds[1]
        assert set(text_only) == {"input_ids", "labels", "sample_id"}
        assert text_only["sample_id"] == "text"
        multi = ds[2]
        assert multi["image_layout"].tolist() == [[1, 1], [1, 1]]
        assert multi["crop_image_ids"].tolist() == [0, 1]
        assert labelled_runs(proc.tokenizer, multi["labels"].tolist()) == [" red</s>", " green</s>"]
        for k in range(3):
            assert torch.equal(ds[k]["input_ids"], datasets[0][k]["input_ids"])
    ds = datasets[0]
    # lengths: words + exact image token count from the header; text-only negative in modality_lengths
    assert ds.lengths[0] == 3 + 34  # "a red shape" + the 2x3 layout
    assert ds.modality_lengths[0] == 37 and ds.modality_lengths[1] == -4 and ds.modality_lengths[2] > 0
    assert ds.lengths[2] == 1 + 1 + 1 + 1 + 4 + 4  # Compare. red And? green + two one-crop images
    assert ds.lengths[2] == sum(1 for lab in ds[2]["input_ids"] if lab == proc.image_token_id) + 4


def test_hf_datasets(proc, images, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{**r, "image": r.get("image")} for r in RECORDS[:2]]  # one image column: str or None
    hf = datasets.Dataset.from_list(rows)
    ds = LazySupervisedDataset(hf, proc, image_folder=images)
    assert len(ds) == 2 and ds.modality_lengths[1] < 0
    reference = LazySupervisedDataset(RECORDS[:2], proc, image_folder=images)
    assert torch.equal(ds[0]["input_ids"], reference[0]["input_ids"])
    assert torch.equal(ds[0]["pixel_values"], reference[0]["pixel_values"])
    hf.save_to_disk(str(tmp_path / "hf"))
    from_disk = LazySupervisedDataset(tmp_path / "hf", proc, image_folder=images)
    assert torch.equal(from_disk[1]["labels"], reference[1]["labels"])


@pytest.mark.parametrize("record, match", [
    ({"conversations": []}, "empty conversations"),
    ({"conversations": [human("hi"), {"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
    ({"image": "a.png", "conversations": [human("no placeholder"), gpt("x")]}, r"0 <image> placeholder\(s\).*1 image"),
    ({"conversations": [human("<image> <image>"), gpt("x")]}, r"2 <image> placeholder\(s\).*0 image"),
    ({"conversations": [human("hi")]}, "no gpt turn"),
    ({"conversations": [gpt("x"), human("hi")]}, "turn 0 is from gpt but human was expected"),
    ({"image": "a.png", "conversations": [human("hi"), gpt("<image>")]}, "<image> in a gpt answer"),
    ({"conversations": [human("hi"), {"from": "gpt"}]}, "turn 1 has no text value"),
    ({"image": 3, "conversations": [human("<image>"), gpt("x")]}, "'image' must be a path"),
    ({"conversation": []}, "no 'conversations'"),
])
def test_malformed_records_name_the_record(proc, record, match):
    records = [RECORDS[1], {"id": "bad", **record}]
    with pytest.raises(ValueError, match=r"record 1 \(id 'bad'\): (turn \d+:? (has )?)?" + match):
        LazySupervisedDataset(records, proc)


def test_bad_paths_and_formats(proc, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LazySupervisedDataset(tmp_path / "nope.json", proc)
    (tmp_path / "x.jsonl").write_text(json.dumps(RECORDS[1]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2"):
        LazySupervisedDataset(tmp_path / "x.jsonl", proc)
    with pytest.raises(ValueError, match="unknown template"):
        LazySupervisedDataset(RECORDS, proc, template="llama_2")


# ------------------------------------------------------------------------------------------ max_length
TWO_IMAGES = {"id": "two", "image": ["b.jpg", "a.png"],
              "conversations": [human("<image>\nWhat colour?"), gpt("red"), human("<image>\nHow many?"), gpt("three")]}


def test_truncation_cuts_before_an_image_block_never_inside(proc, images):
    full = LazySupervisedDataset([TWO_IMAGES], proc, image_folder=images, max_length=None)[0]
    ids = full["input_ids"].tolist()
    positions = image_token_spans(ids, proc.image_token_id)
    first_block_end = positions[3] + 1  # image 0: one crop of 4 tokens
    second_start = positions[4]
    assert ids[first_block_end:second_start].count(proc.image_token_id) == 0
    max_length = second_start + 10  # inside image 1's block (34 tokens)
    ds = LazySupervisedDataset([TWO_IMAGES], proc, image_folder=images, max_length=max_length)
    s = ds[0]
    assert len(s["input_ids"]) == second_start  # moved back to the start of the cut image's block
    assert s["input_ids"].tolist() == ids[:second_start]
    assert int((s["input_ids"] == proc.image_token_id).sum()) == 4
    # the packed fields hold exactly the surviving image
    assert s["image_layout"].tolist() == [[1, 1]] and s["crop_image_ids"].tolist() == [0]
    assert s["pixel_values"].shape[0] == int(s["patch_grid_hw"].prod(-1).sum())
    assert sum(proc.tokens_per_crop(g) for g in s["patch_grid_hw"]) == 4
    assert labelled_runs(proc.tokenizer, s["labels"].tolist()) == [" red</s>"]
    assert ds.stats == {"truncated": 1, "skipped_too_long": 0, "skipped_bad_image": 0, "skipped_bad_record": 0}
    ds[0]
    assert ds.stats["truncated"] == 1  # counted once per record

    # a cut in text after both blocks keeps both images and cuts there
    ds = LazySupervisedDataset([TWO_IMAGES], proc, image_folder=images, max_length=len(ids) - 2)
    s = ds[0]
    assert len(s["input_ids"]) == len(ids) - 2 and s["image_layout"].shape[0] == 2
    assert int((s["input_ids"] == proc.image_token_id).sum()) == 4 + 7 * 4


def test_too_long_without_a_surviving_answer_is_skipped_and_counted(proc, images):
    record = {"id": "long", "image": "a.png", "conversations": [human("<image>\nWhat colour?"), gpt("red")]}
    ids = LazySupervisedDataset([record], proc, image_folder=images, max_length=None)[0]["input_ids"].tolist()
    max_length = ids.index(proc.image_token_id) + 10  # inside the only image block, before the answer
    ds = LazySupervisedDataset([record], proc, image_folder=images, max_length=max_length)
    assert ds[0] is None
    assert ds.stats == {"truncated": 0, "skipped_too_long": 1, "skipped_bad_image": 0, "skipped_bad_record": 0}
    assert ds.skipped[0]["id"] == "long" and ds.skipped[0]["kind"] == "too_long"
    assert "skipped (too long) 1" in ds.summary()
    collator = DataCollatorForLlavaUHD(proc)
    batch = collator([ds[0], LazySupervisedDataset([RECORDS[1]], proc)[0]])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 1 and "pixel_values" not in batch


# ------------------------------------------------------------------------------------------ bad images
@pytest.mark.parametrize("name, error, match", [
    ("missing.png", FileNotFoundError, "image 0 not found: '.*missing.png'"),
    ("cut.png", ValueError, "cut.png"),
    ("cut.jpg", ValueError, "cut.jpg"),
])
def test_bad_image_is_an_error_naming_file_and_record(proc, images, name, error, match):
    record = {"id": "img7", "image": name, "conversations": [human("<image>\nWhat?"), gpt("red")]}
    ds = LazySupervisedDataset([RECORDS[1], record], proc, image_folder=images)
    with pytest.raises(error, match=r"record 1 \(id 'img7'\).*" + match):
        ds[1]


def test_skip_bad_images_counts_and_reports(proc, images):
    records = [RECORDS[0], {"id": "gone", "image": "missing.png", "conversations": [human("<image>"), gpt("x")]},
               {"id": "cut", "image": "cut.jpg", "conversations": [human("<image>"), gpt("x")]}, RECORDS[1]]
    ds = LazySupervisedDataset(records, proc, image_folder=images, skip_bad_images=True)
    assert len(ds.lengths) == 4  # unreadable headers do not break the estimate
    collator = DataCollatorForLlavaUHD(proc)
    batch = collator([ds[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 2 and collator.skipped == 2
    assert batch["crop_image_ids"].unique().tolist() == [0]  # only the good caption's image
    assert ds.stats["skipped_bad_image"] == 2
    report = ds.summary()
    assert "missing.png" in report and "cut.jpg" in report and "'gone'" in report
    with pytest.raises(ValueError, match="all 2 samples of this batch were skipped"):
        collator([ds[1], ds[2]])

    # pre-scan: bad records removed up front (or listed in an error without the flag)
    with pytest.raises(ValueError, match=r"(?s)2 record\(s\) with bad images.*'gone'.*missing.png.*cut.jpg"):
        LazySupervisedDataset(records, proc, image_folder=images).scan_images()
    ds = LazySupervisedDataset(records, proc, image_folder=images, skip_bad_images=True)
    found = ds.scan_images()
    assert [d["id"] for d in found] == ["gone", "cut"]
    assert len(ds) == 2 and len(ds.lengths) == 2 and ds.stats["skipped_bad_image"] == 2
    assert all(ds[i] is not None for i in range(len(ds)))


@pytest.mark.parametrize("turns, match", [
    ([human("What?"), gpt("")], "turn 1: empty gpt answer"),
    ([human("What?"), gpt(" \n ")], "turn 1: empty gpt answer"),
    ([human("What?"), gpt("red"), human("And?")], "turn 2: the conversation ends on a human turn"),
])
def test_empty_answer_or_trailing_question_is_an_error_or_a_counted_skip(proc, turns, match):
    records = [RECORDS[1], {"id": "bad", "conversations": turns}, RECORDS[1]]
    with pytest.raises(DataError, match=r"^record 1 \(id 'bad'\): " + match):
        LazySupervisedDataset(records, proc)
    ds = LazySupervisedDataset(records, proc, skip_bad_records=True)
    assert len(ds) == 2 and all(ds[i] is not None for i in range(2))
    assert ds.stats["skipped_bad_record"] == 1
    assert [(d["index"], d["id"], d["kind"]) for d in ds.skipped] == [(1, "bad", "bad_record")]
    assert match.split(": ")[-1] in ds.skipped[0]["reason"] and "record 1" not in ds.skipped[0]["reason"]
    assert "skipped (bad record) 1" in ds.summary()


def test_errors_name_the_data_file_and_the_record_once(proc, images, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORDS[1], {"id": "bad", "conversations": [human("What?"), gpt("")]}]))
    with pytest.raises(DataError) as error:
        LazySupervisedDataset(path, proc)
    assert str(error.value) == f"{path}, record 1 (id 'bad'): turn 1: empty gpt answer"
    missing = {"id": "gone", "image": "missing.png", "conversations": [human("<image>"), gpt("x")]}
    path.write_text(json.dumps([RECORDS[1], missing]))
    ds = LazySupervisedDataset(path, proc, image_folder=images)
    with pytest.raises(FileNotFoundError) as error:  # a DataError too
        ds.prepare()  # fail fast: found before training, not when the batch comes
    assert isinstance(error.value, DataError) and "\n" not in str(error.value)
    assert str(error.value).count("record 1") == 1 and "missing.png" in str(error.value)
    (tmp_path / "hello.png").write_bytes(b"hello")
    path.write_text(json.dumps([{"id": "hello", "image": "hello.png", "conversations": [human("<image>"), gpt("x")]}]))
    with pytest.raises(DataError) as error:
        LazySupervisedDataset(path, proc, image_folder=tmp_path).prepare()
    message = str(error.value)
    assert message.startswith(f"{path}, record 0 (id 'hello'): image 0 (") and "not an image" in message
    assert message.count("hello.png") == 1 and message.count("record") == 1


def test_prepare_decides_every_skip_up_front(proc, images):
    """Too-long samples leave the index (never a None sample, so never an empty batch); truncations are counted
    before any sample is read; the lengths are the exact token counts of the samples."""
    long_question = {"id": "long_q", "image": "a.png", "conversations": [human("<image>\n" + "What colour? " * 60),
                                                                         gpt("red")]}
    long_answer = {"id": "long_a", "conversations": [human("What?"), gpt("red green blue " * 60)]}
    bad = {"id": "cut", "image": "cut.jpg", "conversations": [human("<image>"), gpt("x")]}
    records = [RECORDS[0], long_question, RECORDS[1], bad, long_answer, RECORDS[2]]
    full = [len(s["input_ids"]) for s in (LazySupervisedDataset(RECORDS, proc, image_folder=images)[i]
                                         for i in range(3))]
    max_length = max(full) + 5
    ds = LazySupervisedDataset(records, proc, image_folder=images, max_length=max_length, skip_bad_images=True)
    skipped = ds.prepare()
    assert [(d["id"], d["kind"]) for d in skipped] == [("long_q", "too_long"), ("cut", "bad_image")]
    assert ds.stats == {"truncated": 1, "skipped_too_long": 1, "skipped_bad_image": 1, "skipped_bad_record": 0}
    samples = [ds[i] for i in range(len(ds))]
    assert len(ds) == 4 and all(s is not None for s in samples)
    assert [s["sample_id"] for s in samples] == ["cap", "text", "long_a", "multi"]
    assert ds.lengths == [len(s["input_ids"]) for s in samples]
    assert ds.lengths[2] == max_length
    assert [v > 0 for v in ds.modality_lengths] == [True, False, False, True]
    assert ds.stats["truncated"] == 1  # reading the samples counts nothing twice
    # a batch of only the too-long sample cannot happen any more
    batch = DataCollatorForLlavaUHD(proc)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 4


# ------------------------------------------------------------------------------------------ collator
def test_collator_offsets_and_padding(proc, images):
    ds = LazySupervisedDataset(RECORDS, proc, image_folder=images)
    samples = [ds[2], ds[1], ds[0]]  # 2 images, none, 1 image
    for side in ("right", "left"):
        batch = DataCollatorForLlavaUHD(proc, padding_side=side)(samples)
        n = [len(s["input_ids"]) for s in samples]
        assert batch["input_ids"].shape == (3, max(n))
        for row, s in enumerate(samples):
            real = batch["attention_mask"][row].bool()
            assert int(real.sum()) == n[row]
            assert torch.equal(batch["input_ids"][row][real], s["input_ids"])
            assert torch.equal(batch["labels"][row][real], s["labels"])
            assert (batch["labels"][row][~real] == IGNORE_INDEX).all()
            assert (batch["input_ids"][row][~real] == proc.tokenizer.pad_token_id).all()
            if n[row] < max(n):
                assert bool(real[0]) == (side == "right") and bool(real[-1]) == (side == "left")
        # images in batch reading order: sample 0's two images, then sample 2's
        assert batch["crop_image_ids"].tolist() == [0, 1] + [2] * 7
        assert batch["image_layout"].tolist() == [[1, 1], [1, 1], [3, 2]]
        assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
        assert batch["crop_is_overview"].tolist() == [False] * 8 + [True]
        assert batch["image_sizes"].tolist() == [[20, 30], [24, 24], [84, 56]]
        # every image token of the batch has a feature: per-crop token counts match the layout
        assert sum(proc.tokens_per_crop(g) for g in batch["patch_grid_hw"]) == \
            int((batch["input_ids"] == proc.image_token_id).sum())
    text_only = DataCollatorForLlavaUHD(proc)([ds[1], ds[1]])
    assert set(text_only) == {"input_ids", "labels", "attention_mask", "sample_ids"}
    assert text_only["sample_ids"] == ["text", "text"]


def test_batch_trains_the_tiny_model(images):
    model, processor = build_tiny()
    ds = LazySupervisedDataset(RECORDS, processor, image_folder=images)
    batch = DataCollatorForLlavaUHD(processor)([ds[0], ds[1], ds[2]])
    out = model(**batch)
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------ sampler
def _batches(indices, size):
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def test_length_grouped_sampler_is_a_deterministic_permutation():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (103,), generator=g).tolist()
    for world_size in (1, 4):
        sampler = LengthGroupedSampler(lengths, batch_size=4, world_size=world_size,
                                       generator=torch.Generator().manual_seed(7))
        order = list(sampler)
        assert sorted(order) == list(range(103)) and len(sampler) == 103
        again = list(LengthGroupedSampler(lengths, batch_size=4, world_size=world_size,
                                          generator=torch.Generator().manual_seed(7)))
        assert order == again
        assert order != list(LengthGroupedSampler(lengths, 4, world_size, torch.Generator().manual_seed(8)))
    # within each megabatch the longest sample comes first, and batches are sorted across a megabatch
    order = get_length_grouped_indices(lengths, 4, 1, torch.Generator().manual_seed(1))
    for batch in _batches(order, 4):
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    # with several devices, a full megabatch's per-device batches are balanced and of equal size
    order = get_length_grouped_indices(lengths, 4, 4, torch.Generator().manual_seed(1))
    mega = order[:16]
    totals = [sum(lengths[i] for i in b) for b in _batches(mega, 4)]
    assert max(totals) - min(totals) <= max(lengths[i] for i in mega)


def test_modality_grouped_batches_are_pure():
    g = torch.Generator().manual_seed(0)
    lengths = [int(v) * (1 if k % 3 else -1) for k, v in enumerate(torch.randint(1, 300, (97,), generator=g))]
    for world_size in (1, 2):
        order = list(LengthGroupedSampler(lengths, batch_size=4, world_size=world_size, group_by_modality=True,
                                          generator=torch.Generator().manual_seed(3)))
        assert sorted(order) == list(range(97))
        kinds = [{lengths[i] > 0 for i in batch} for batch in _batches(order, 4)]
        assert sum(len(kind) > 1 for kind in kinds) <= 1  # at most one mixed batch, among the leftovers
        size = 4 * world_size
        n_mm = sum(v > 0 for v in lengths)
        n_full = (n_mm // size + (len(lengths) - n_mm) // size) * size
        assert all(len(kind) == 1 for kind in kinds[:n_full // 4])
        # the leftovers come last: images first, then text
        tail = [lengths[i] > 0 for i in order[n_full:]]
        assert tail == sorted(tail, reverse=True)
    a = get_modality_length_grouped_indices(lengths, 4, 1, torch.Generator().manual_seed(5))
    b = get_modality_length_grouped_indices(lengths, 4, 1, torch.Generator().manual_seed(5))
    assert a == b
    # one modality only: plain length grouping
    assert sorted(get_modality_length_grouped_indices([5, 3, 9], 2, 1, torch.Generator())) == [0, 1, 2]
    with pytest.raises(ValueError, match="non-zero"):
        get_modality_length_grouped_indices([1, 0, -2], 2)


def test_dataset_modality_lengths_drive_the_sampler(proc, images):
    ds = LazySupervisedDataset(RECORDS * 4, proc, image_folder=images)
    order = list(LengthGroupedSampler(ds.modality_lengths, batch_size=2, group_by_modality=True,
                                      generator=torch.Generator().manual_seed(0)))
    assert sorted(order) == list(range(12))
    assert Counter(ds.modality_lengths[i] > 0 for i in order) == Counter({True: 8, False: 4})
