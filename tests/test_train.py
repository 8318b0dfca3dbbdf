import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_training_workspace

from llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.train.arguments import parse_train_args
from llava_uhd.train.run import last_complete_checkpoint, train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved model and 24 LLaVA-format samples (images of several sizes)."""
    return tiny_training_workspace(tmp_path_factory.mktemp("train"))


def common_args(ws, out, *extra):
    return ["--model", str(ws / "tiny"), "--data", str(ws / "data.json"), "--images", str(ws / "imgs"),
            "--output", str(out), "--use_cpu", "true", "--report_to", "none", "--logging_steps", "1",
            "--dataloader_num_workers", "0", *extra]


def cli(*args):
    return [sys.executable, "-m", "llava_uhd.cli", "train", *args]


def losses(out: Path) -> list[float]:
    state = json.loads((last_checkpoint_state(out)).read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def newest_complete_checkpoint(out: Path) -> Path:
    """The test's own answer to "which checkpoint does a resume continue from", without `last_complete_checkpoint`:
    of the ``checkpoint-<digits>`` folders holding a ``trainer_state.json``, the one with the largest number (as a
    number: ``checkpoint-10`` after ``checkpoint-9``)."""
    steps = [int(p.name[len("checkpoint-"):]) for p in out.iterdir()
             if p.is_dir() and p.name.startswith("checkpoint-") and p.name[len("checkpoint-"):].isdigit()
             and (p / "trainer_state.json").is_file()]
    assert steps, f"no complete checkpoint in {out}"
    return out / f"checkpoint-{max(steps)}"


def last_checkpoint_state(out: Path) -> Path:
    return newest_complete_checkpoint(out) / "trainer_state.json"


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_process_stage1_then_stage2(workspace, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): stage 1, then stage 2 from its output."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "llava_uhd.cli", "train"]
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


@pytest.mark.slow
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
    assert not (out / "model.safetensors").exists()  # it really died before the end
    # where the resume must continue: checkpoint-10 or a later complete one (5 and 10 exist: a string sort would
    # take checkpoint-5)
    expected = newest_complete_checkpoint(out)
    step = int(expected.name.split("-")[1])
    assert step >= 10 and step % 5 == 0
    assert json.loads((expected / "trainer_state.json").read_text())["global_step"] == step
    traced_before = len((tmp_path / "killed.jsonl").read_text().splitlines())

    again = subprocess.run(cli(*killed), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {expected}\n" in again.stderr
    after = [json.loads(line) for line in (tmp_path / "killed.jsonl").read_text().splitlines()[traced_before:]]
    assert [e["step"] for e in after] == list(range(step, 30))  # it continued at the checkpoint's step
    reference, resumed = read_trace(tmp_path / "plain.jsonl"), read_trace(tmp_path / "killed.jsonl")
    assert sorted(reference) == sorted(resumed) == list(range(30))
    assert resumed == reference  # every step saw exactly the samples of the uninterrupted run
    assert json.loads(last_checkpoint_state(out).read_text())["global_step"] == 30


def complete_checkpoint(folder: Path, step: int) -> Path:
    """A ``checkpoint-<step>`` folder whose save finished (its trainer_state.json written)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_incomplete_checkpoint_is_skipped(tmp_path):
    complete_checkpoint(tmp_path, 5)
    (tmp_path / "checkpoint-10").mkdir()  # killed while saving
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")


def test_the_newest_checkpoint_is_the_largest_step_as_a_number(tmp_path):
    """checkpoint-5, -9, -10 and -100: by number the newest is 100 (by string "checkpoint-9" would be)."""
    assert last_complete_checkpoint(str(tmp_path / "nothing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    for step in (5, 9, 10, 100):
        complete_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-250").mkdir()  # incomplete: skipped
    (tmp_path / "checkpoint-final").mkdir()  # not a step
    (tmp_path / "checkpoint-final" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-300").write_text("a file, not a checkpoint")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
    (tmp_path / "checkpoint-100" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-9")


@pytest.mark.slow  # trains, stops and resumes
def test_resume_continues_from_checkpoint_10_not_9(workspace, tmp_path, caplog):
    """A real run saves checkpoint-5 and checkpoint-10; checkpoint-9 is a copy of checkpoint-5 (its state says step
    5) and checkpoint-100 never finished saving. Run again with more steps: it continues from checkpoint-10 (by
    number; by string, "checkpoint-9" would come first and the run would restart at step 5), so its first step is
    step 10 (step numbers start at 0) and it ends at 12."""
    import shutil

    out = tmp_path / "out"
    extra = ["--stage", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]
    first = train(*parse_train_args(common_args(workspace, out, "--max_steps", "10", "--save_steps", "5", *extra)))
    assert first["steps"] == 10
    shutil.copytree(out / "checkpoint-5", out / "checkpoint-9")
    (out / "checkpoint-100").mkdir()  # a save that never finished
    assert newest_complete_checkpoint(out) == out / "checkpoint-10"
    with caplog.at_level("WARNING", logger="llava_uhd.train"):
        second = train(*parse_train_args(common_args(workspace, out, "--max_steps", "12", "--save_steps", "5", *extra,
                                                     "--trace_samples", str(tmp_path / "second.jsonl"))))
    assert [json.loads(line)["step"] for line in (tmp_path / "second.jsonl").read_text().splitlines()] == [10, 11]
    assert second["steps"] == 12
    assert f"resuming from {out / 'checkpoint-10'}" in caplog.text


def test_each_epoch_is_a_new_order_of_all_samples(workspace, tmp_path):
    """Two epochs of 8 samples in batches of 2 through the Trainer: each epoch sees every sample once, in a new
    order (the Trainer sets the sampler's epoch)."""
    records = json.loads((workspace / "data.json").read_text())[:8]
    (tmp_path / "eight.json").write_text(json.dumps(records))
    args = common_args(workspace, tmp_path / "o", "--stage", "1", "--num_train_epochs", "2",
                       "--per_device_train_batch_size", "2", "--save_strategy", "no",
                       "--trace_samples", str(tmp_path / "trace.jsonl"))
    args[args.index("--data") + 1] = str(tmp_path / "eight.json")
    assert train(*parse_train_args(args))["steps"] == 8
    steps = read_trace(tmp_path / "trace.jsonl")
    assert sorted(steps) == list(range(8))
    epochs = [[i for s in range(e * 4, e * 4 + 4) for i in steps[s]] for e in (0, 1)]
    ids = sorted(r["id"] for r in records)
    assert sorted(epochs[0]) == sorted(epochs[1]) == ids
    assert epochs[0] != epochs[1]


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


@pytest.mark.slow
def test_a_batch_of_one_bad_image_is_skipped_not_fatal(workspace, tmp_path):
    data = write_data(workspace, tmp_path / "d.json", BAD_IMAGE)
    summary = run_summary(workspace, tmp_path / "o", data, "--per_device_train_batch_size", "1",
                          "--skip_bad_images", "true")
    assert summary["steps"] == 4  # the bad record left the data before batching
    assert "skipped bad image: 1" in summary["skipped"]
    assert "'gone'" in summary["data"] and "missing.png" in summary["data"]
    listed = [json.loads(line) for line in Path(summary["skipped_file"]).read_text().splitlines()]
    assert [(d["index"], d["id"], d["kind"]) for d in listed] == [(4, "gone", "bad_image")]


@pytest.mark.slow
def test_two_too_long_samples_grouped_by_length_are_skipped_not_fatal(workspace, tmp_path):
    data = write_data(workspace, tmp_path / "d.json", too_long("long1"), too_long("long2"))
    summary = run_summary(workspace, tmp_path / "o", data, "--per_device_train_batch_size", "2",
                          "--group_by_length", "true", "--max_length", "256")
    assert summary["steps"] == 2
    assert "skipped too long: 2" in summary["skipped"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
