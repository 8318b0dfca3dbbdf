import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, random_image

from llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.train.arguments import parse_train_args
from llava_uhd.train.run import last_complete_checkpoint, train

COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved model and 24 LLaVA-format samples (images of several sizes)."""
    root = tmp_path_factory.mktemp("train")
    model, processor = build_tiny("clip", num_queries=4)
    model.save_pretrained(root / "tiny")
    processor.save_pretrained(root / "tiny")
    (root / "imgs").mkdir()
    records = []
    for i in range(24):
        w, h = [(90, 50), (40, 100), (60, 60), (120, 30)][i % 4]
        random_image(w, h, seed=i).save(root / "imgs" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": COLOURS[i % 3]}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def common_args(ws, out, *extra):
    return ["--model", str(ws / "tiny"), "--data", str(ws / "data.json"), "--images", str(ws / "imgs"),
            "--output", str(out), "--use_cpu", "true", "--report_to", "none", "--logging_steps", "1",
            "--dataloader_num_workers", "0", *extra]


def cli(*args):
    return [sys.executable, "-m", "llava_uhd.cli", "train", *args]


def losses(out: Path) -> list[float]:
    state = json.loads((last_checkpoint_state(out)).read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def last_checkpoint_state(out: Path) -> Path:
    return Path(last_complete_checkpoint(str(out))) / "trainer_state.json"


def test_stage1_trains_only_the_resampler_and_stage2_lora_merges(workspace, tmp_path):
    before = LlavaUHDForConditionalGeneration.from_pretrained(workspace / "tiny")
    summary = train(*parse_train_args(common_args(workspace, tmp_path / "s1", "--stage", "1", "--max_steps", "3",
                                                  "--per_device_train_batch_size", "4", "--learning_rate", "1e-2")))
    assert summary["steps"] == 3 and summary["template"] == "plain"
    s1 = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path / "s1")
    assert not torch.equal(s1.projector.query, before.projector.query)
    for a, b in ((s1.language_model, before.language_model), (s1.vision_tower, before.vision_tower)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (tmp_path / "s1" / "loss.png").stat().st_size > 1000

    args = common_args(workspace, tmp_path / "s2", "--stage", "2", "--max_steps", "3",
                       "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lora", "true",
                       "--lora_r", "4", "--projector_lr", "1e-3")
    args[1] = str(tmp_path / "s1")  # stage 2 starts from the stage-1 output
    assert train(*parse_train_args(args))["template"] == "vicuna_v1"
    s2 = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path / "s2")
    assert not torch.equal(s2.projector.query, s1.projector.query)
    assert (tmp_path / "s2" / "adapter" / "adapter_config.json").exists()
    assert "lora" not in " ".join(n for n, _ in s2.named_parameters())  # merged, plain weights
    changed = [not torch.equal(p, q) for p, q in zip(s2.language_model.parameters(),
                                                       before.language_model.parameters())]
    assert any(changed)
    assert all(torch.equal(p, q) for p, q in zip(s2.vision_tower.parameters(), before.vision_tower.parameters()))


def test_loss_goes_down_on_a_tiny_fixed_set(workspace, tmp_path):
    """Overfit check: 8 samples, stage 2, full tuning."""
    records = json.loads((workspace / "data.json").read_text())[:8]
    (tmp_path / "small.json").write_text(json.dumps(records))
    args = common_args(workspace, tmp_path / "fit", "--stage", "2", "--max_steps", "40",
                       "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "0",
                       "--lr_scheduler_type", "constant", "--save_strategy", "no")
    args[args.index("--data") + 1] = str(tmp_path / "small.json")
    train(*parse_train_args(args))
    model = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path / "fit")
    from llava_uhd import LlavaUHDProcessor
    from llava_uhd.data.llava_data import DataCollatorForLlavaUHD, LazySupervisedDataset

    processor = LlavaUHDProcessor.from_pretrained(tmp_path / "fit")
    dataset = LazySupervisedDataset(records, processor, template="vicuna_v1", image_folder=workspace / "imgs")
    batch = DataCollatorForLlavaUHD(processor)([dataset[i] for i in range(8)])
    batch.pop("sample_ids")
    start = LlavaUHDForConditionalGeneration.from_pretrained(workspace / "tiny")
    with torch.no_grad():
        first, last = start(**batch).loss.item(), model(**batch).loss.item()
    assert last < 0.2 * first, (first, last)


def test_two_process_stage1_then_stage2(workspace, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): stage 1, then stage 2 from its output."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "llava_uhd.cli", "train"]
    ddp = ["--ddp_backend", "gloo", "--per_device_train_batch_size", "2", "--max_steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run1 = subprocess.run(torchrun + common_args(workspace, tmp_path / "s1", "--stage", "1", *ddp),
                          capture_output=True, text=True, env=env, timeout=300)
    assert run1.returncode == 0, run1.stderr[-3000:]
    assert "stage 1 done: 3 steps" in run1.stdout
    args2 = common_args(workspace, tmp_path / "s2", "--stage", "2", *ddp)
    args2[1] = str(tmp_path / "s1")
    run2 = subprocess.run(torchrun + args2, capture_output=True, text=True, env=env, timeout=300)
    assert run2.returncode == 0, run2.stderr[-3000:]
    for out in (tmp_path / "s1", tmp_path / "s2"):
        values = losses(out)
        assert len(values) == 3 and all(map(lambda v: v == v and abs(v) < 1e4, values))
    model = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path / "s2")
    assert model.config.model_type == "llava_uhd"


def read_trace(path: Path) -> dict[int, list[str]]:
    """step -> sample ids; a step run again after a resume overwrites the first try."""
    steps = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        steps[entry["step"]] = entry["ids"]
    return steps


def test_resume_after_sigkill_keeps_the_data_order(workspace, tmp_path):
    extra = ["--stage", "1", "--max_steps", "30", "--per_device_train_batch_size", "2", "--save_steps", "5",
             "--group_by_modality_length", "true"]
    plain = common_args(workspace, tmp_path / "plain", *extra, "--trace_samples", str(tmp_path / "plain.jsonl"))
    assert subprocess.run(cli(*plain), capture_output=True, timeout=300).returncode == 0

    out = tmp_path / "killed"
    killed = common_args(workspace, out, *extra, "--trace_samples", str(tmp_path / "killed.jsonl"))
    proc = subprocess.Popen(cli(*killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last_complete_checkpoint(str(out)) is not None
    assert not (out / "model.safetensors").exists()  # it really died before the end

    again = subprocess.run(cli(*killed), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    reference, resumed = read_trace(tmp_path / "plain.jsonl"), read_trace(tmp_path / "killed.jsonl")
    assert sorted(reference) == sorted(resumed) == list(range(30))
    assert resumed == reference  # every step saw exactly the samples of the uninterrupted run
    assert json.loads(last_checkpoint_state(out).read_text())["global_step"] == 30


def test_incomplete_checkpoint_is_skipped(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed while saving
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")


def test_config_file_and_errors(workspace, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stage: 1\nlearning_rate: 1.0e-3\nwarmup_steps: 0.03\nlr_scheduler_type: cosine\n")
    model_args, data_args, args = parse_train_args(["--config", str(config), "--output", str(tmp_path / "o"),
                                                    "--learning_rate", "5e-4"])
    assert (args.stage, args.learning_rate, args.warmup_steps) == (1, 5e-4, 0.03)  # the command line wins
    with pytest.raises(ValueError, match="--data is required"):
        train(model_args, data_args, args)
    bad = common_args(workspace, tmp_path / "o")
    bad[1] = str(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        train(*parse_train_args(bad))


# ------------------------------------------------------------------------------------------ skipped samples
def write_data(ws, path: Path, *extra_records) -> Path:
    """4 good records of the workspace plus ``extra_records``, as a JSON file."""
    records = json.loads((ws / "data.json").read_text())[:4] + list(extra_records)
    path.write_text(json.dumps(records))
    return path


def run_summary(ws, out, data, *extra):
    args = common_args(ws, out, "--stage", "2", "--num_train_epochs", "1", "--save_strategy", "no", *extra)
    args[args.index("--data") + 1] = str(data)
    return train(*parse_train_args(args))


BAD_IMAGE = {"id": "gone", "image": "missing.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}


def too_long(rid: str) -> dict:
    """A question so long that no answer token fits in 256 tokens."""
    return {"id": rid, "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "What colour is the shape? " * 30}, {"from": "gpt", "value": "red"}]}


def test_a_batch_of_one_bad_image_is_skipped_not_fatal(workspace, tmp_path):
    data = write_data(workspace, tmp_path / "d.json", BAD_IMAGE)
    summary = run_summary(workspace, tmp_path / "o", data, "--per_device_train_batch_size", "1",
                          "--skip_bad_images", "true")
    assert summary["steps"] == 4  # the bad record left the data before batching
    assert "skipped bad image: 1" in summary["skipped"]
    assert "'gone'" in summary["data"] and "missing.png" in summary["data"]
    listed = [json.loads(line) for line in Path(summary["skipped_file"]).read_text().splitlines()]
    assert [(d["index"], d["id"], d["kind"]) for d in listed] == [(4, "gone", "bad_image")]


def test_two_too_long_samples_grouped_by_length_are_skipped_not_fatal(workspace, tmp_path):
    data = write_data(workspace, tmp_path / "d.json", too_long("long1"), too_long("long2"))
    summary = run_summary(workspace, tmp_path / "o", data, "--per_device_train_batch_size", "2",
                          "--group_by_length", "true", "--max_length", "256")
    assert summary["steps"] == 2
    assert "skipped too long: 2" in summary["skipped"]


def test_summary_counts_what_dataloader_workers_read(workspace, tmp_path):
    long_answer = {"id": "long_a", "conversations": [{"from": "human", "value": "What?"},
                                                     {"from": "gpt", "value": "red green blue " * 60}]}
    data = write_data(workspace, tmp_path / "d.json", BAD_IMAGE, too_long("long1"), long_answer)
    summary = run_summary(workspace, tmp_path / "o", data, "--per_device_train_batch_size", "1",
                          "--skip_bad_images", "true", "--max_length", "256", "--dataloader_num_workers", "1")
    assert summary["steps"] == 5
    assert summary["skipped"] == "truncated: 1; skipped too long: 1; skipped bad image: 1"


# ------------------------------------------------------------------------------------------ the command
def test_bad_data_is_one_line_exit_2_before_the_model_loads(workspace, tmp_path, monkeypatch, capsys):
    from llava_uhd.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(LlavaUHDForConditionalGeneration, "from_pretrained", no_model)
    empty = {"id": "bad", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": " "}]}
    data = write_data(workspace, tmp_path / "d.json", empty)
    args = common_args(workspace, tmp_path / "o")
    args[args.index("--data") + 1] = str(data)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llava-uhd train: {data}, record 4 (id 'bad'): turn 1: empty gpt answer"]
    # with the flag it is a counted skip instead (and then the model loads: here, the patched loader fails)
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["train", *args, "--skip_bad_records", "true"])


def test_an_image_that_fails_while_training_is_one_line_too(workspace, tmp_path, capsys):
    """A file whose header reads but whose data is cut passes the up-front checks; without --skip_bad_images it
    stops the run when a dataloader worker reads it: the last line says so, no traceback."""
    from llava_uhd.cli import main

    (tmp_path / "cut.png").write_bytes((workspace / "imgs" / "0.png").read_bytes()[:200])
    cut = {"id": "cut", "image": str(tmp_path / "cut.png"),
           "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    data = write_data(workspace, tmp_path / "d.json", cut)
    args = common_args(workspace, tmp_path / "o", "--dataloader_num_workers", "1", "--save_strategy", "no")
    args[args.index("--data") + 1] = str(data)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err  # after the model loading and progress lines
    assert "Traceback" not in err and "DataLoader worker" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"llava-uhd train: {data}, record 4 (id 'cut'): image 0 (") and last.count("cut.png") == 1


def test_missing_data_file_and_bad_options_are_one_line_errors(workspace, tmp_path, capsys):
    from llava_uhd.cli import main

    args = common_args(workspace, tmp_path / "o")
    args[args.index("--data") + 1] = str(tmp_path / "nope.json")
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"llava-uhd train: {tmp_path / 'nope.json'}: no such data file or directory"]
    assert main(["train", "--output", str(tmp_path / "o"), "--use_cpu", "true"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "llava-uhd train: --data is required (LLaVA JSON / JSONL or a saved datasets folder)"]
    for argv, what in ((["--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
                       (["--max_length", "abc"], "--max_length"), (["--nope", "1"], "unknown option(s): --nope 1")):
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llava-uhd train: ") and what in err[0], err
    # backbones that cannot be read: one line, before the data is tokenized or a model loads
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    args = common_args(workspace, tmp_path / "o")
    args[args.index("--model") + 1] = str(broken)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-uhd train: cannot load the processor: "), err


def test_help_is_short_and_help_all_lists_every_trainer_option():
    def helped(flag):
        run = subprocess.run(cli(flag), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    short = helped("--help")
    assert short.startswith("usage: llava-uhd train")
    assert len(short.splitlines()) < 120
    for option in ("--config", "--output", "--model", "--vision", "--data", "--skip_bad_images", "--skip_bad_records",
                   "--stage", "--lora", "--help-all"):
        assert option in short, option
    assert "--adam_beta1" not in short
    full = helped("--help-all")
    assert full.startswith("usage: llava-uhd train")
    assert "--learning_rate" in full and "--adam_beta1" in full and "--skip_bad_records" in full
