"""Scale-out, exercised: FSDP2 and DeepSpeed ZeRO-2/3 in two CPU processes (gloo) against one process on the same
global batch, sharded checkpoints and a resume after SIGKILL, a two-node c10d rendezvous on 127.0.0.1, accelerate's
FSDP config, and the DeepSpeed configs' "auto" values resolved from the arguments.

Every multi-process run trains stage 2 of a tiny model for 6 steps on 24 samples, global batch 4 (2 processes x 2,
or 1 x 4), saving every 2 steps, with ``--sharding_report`` (what each rank holds) and ``--trace_samples``."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, free_port, random_image, rel_err, tiny_training_workspace

from llava_uhd import LlavaUHDForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
LOSS_TOL = 1e-5  # relative, per logged step: the same sums in another order
WEIGHT_TOL = 1e-3  # relative to each tensor's change in training (Adam's first steps are ~lr each way)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "TORCH_EXTENSIONS_DIR": "/nonexistent"}  # nothing is compiled: a DeepSpeed op that wanted to would fail

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny saved model and 24 LLaVA samples (images of four sizes), like test_train's."""
    return tiny_training_workspace(tmp_path_factory.mktemp("dist"))


def train_args(ws: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    return ["--model", str(ws / "tiny"), "--data", str(ws / "data.json"), "--images", str(ws / "imgs"),
            "--output", str(out), "--stage", "2", "--max_steps", str(STEPS), "--per_device_train_batch_size",
            str(per_device), "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--trace_samples", str(out) + ".trace.jsonl",
            "--sharding_report", str(out) + ".report.jsonl", *extra]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
CLI = ["-m", "llava_uhd.cli", "train"]
FSDP = ["--use_cpu", "true", "--fsdp", "full_shard", "--fsdp_config", str(ROOT / "configs" / "fsdp2.json")]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cmd[:8])} ... exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def report(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in Path(str(out) + ".report.jsonl").read_text().splitlines()]
    return sorted(lines, key=lambda line: line["rank"])


def trace(out: Path) -> dict[tuple[int, int], list[str]]:
    """(step, rank) -> sample ids; a step run again after a resume replaces the first try."""
    steps = {}
    for line in Path(str(out) + ".trace.jsonl").read_text().splitlines():
        entry = json.loads(line)
        steps[entry["step"], entry["rank"]] = entry["ids"]
    return steps


def split_between_two_ranks(single_trace: dict) -> dict:
    """One process's batches of 4 as two ranks see them: the first two samples on rank 0, the others on rank 1."""
    return {(step, rank): ids[2 * rank: 2 * rank + 2] for (step, _), ids in single_trace.items() for rank in (0, 1)}


def losses(out: Path) -> list[float]:
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"),
                              key=lambda p: int(p.parent.name.split("-")[1]))[-1].read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def assert_same_training(out: Path, reference: Path, ws: Path) -> None:
    """Same loss at every step and the same trained weights as ``reference`` (within the tolerances)."""
    a, b = losses(out), losses(reference)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)
    start, got, want = weights(ws / "tiny"), weights(out), weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        change = (want[name] - start[name]).norm()
        if change > 0:
            assert float((got[name] - want[name]).norm() / change) < WEIGHT_TOL, name
        else:
            assert torch.equal(got[name], want[name]), name  # frozen: untouched


@functools.cache
def _single(ws: Path) -> Path:
    out = ws / "single"
    run([sys.executable, *CLI, *train_args(ws, out, 4, "--use_cpu", "true")])
    return out


@pytest.fixture(scope="module")
def single(ws):
    """The reference: one process, batch 4."""
    return _single(ws)


@pytest.fixture(scope="module")
def fsdp(ws):
    """Two processes, FSDP2 through the Trainer's own options (the README's command), batch 2 each."""
    out = ws / "fsdp"
    run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *CLI, *train_args(ws, out, 2, *FSDP)])
    return out


# ------------------------------------------------------------------------------------------ FSDP2
@slow
def test_fsdp2_shards_every_parameter_and_trains_like_one_process(ws, single, fsdp):
    ranks = report(fsdp)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["engine"] for r in ranks} == {"fsdp2"}
    for r in ranks:
        assert r["dtensor_params"] == r["params"] > 0  # every parameter is a DTensor
        assert 0.45 < r["param_bytes"] / r["full_param_bytes"] < 0.55  # each rank stores about half
        assert r["optimizer_bytes"] < 0.55 * report(single)[0]["optimizer_bytes"]
    assert sum(r["param_bytes"] for r in ranks) >= ranks[0]["full_param_bytes"]
    units = ranks[0]["units"]
    for unit in units:
        assert len(unit["trainable"]) == 1, unit  # never frozen and trainable parameters in one unit
    classes = [u["class"] for u in units]
    assert classes.count("LlamaDecoderLayer") == 2 and classes.count("CLIPEncoderLayer") == 2
    assert {"PerceiverResampler", "AdaptiveVisionEncoder", "Embedding", "Linear"} <= set(classes)
    frozen = {u["module"] for u in units if u["trainable"] == [False]}
    assert frozen == {"vision_tower", "vision_tower.vision_model.encoder.layers.0",
                      "vision_tower.vision_model.encoder.layers.1"}
    checkpoint = fsdp / "checkpoint-2"  # sharded: torch.distributed.checkpoint folders, one file per rank
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").exists()
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert (checkpoint / "optimizer_0" / ".metadata").exists()
    assert trace(fsdp) == split_between_two_ranks(trace(single))  # the same global batches
    assert_same_training(fsdp, single, ws)


@slow
def test_fsdp2_saved_model_loads_and_gives_the_logits_of_one_process(ws, single, fsdp):
    from llava_uhd import LlavaUHDProcessor

    processor = LlavaUHDProcessor.from_pretrained(fsdp)
    batch = processor(text=["<image>\nWhat colour is the shape?"], images=[random_image(70, 40, seed=3)],
                      return_tensors="pt")
    logits = {}
    for name, out in (("fsdp", fsdp), ("single", single)):
        model = LlavaUHDForConditionalGeneration.from_pretrained(out).eval()
        with torch.no_grad():
            logits[name] = model(**batch).logits
    assert rel_err(logits["fsdp"], logits["single"]) < 1e-5


@slow
def test_fsdp2_resumes_after_one_process_is_killed(ws, fsdp):
    """SIGKILL to rank 1 once checkpoint-2 is complete; torchrun ends rank 0; the same command again continues from
    the newest complete sharded checkpoint with the data order and the weights of the uninterrupted run."""
    import psutil

    out = ws / "killed"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *CLI, *train_args(ws, out, 2, *FSDP)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                                cwd=ROOT)
    deadline = time.time() + 240
    try:
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert launcher.poll() is None, f"it ended before it could be killed:\n{launcher.stderr.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.01)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not (out / "model.safetensors").exists()  # it really died before the end
    again = run(cmd)
    assert "resuming from" in again.stderr
    assert sorted(trace(out)) == sorted(trace(fsdp))
    assert trace(out) == trace(fsdp)  # every step saw exactly the samples of the uninterrupted run, on each rank
    assert_same_training(out, fsdp, ws)


# ------------------------------------------------------------------------------------------ two nodes
@slow
def test_two_node_c10d_rendezvous_runs_stage2_to_the_end(ws, fsdp):
    """The README's multi-node command, as two launches of one process each on 127.0.0.1."""
    out = ws / "two_nodes"
    port = free_port()
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           f"127.0.0.1:{port}", "--rdzv_id", "llava-uhd-test", *CLI, *train_args(ws, out, 2, *FSDP)]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
             for _ in range(2)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-4000:]
    assert sum(f"stage 2 done: {STEPS} steps" in stdout for stdout, _ in results) == 1  # printed by rank 0 only
    assert {r["world_size"] for r in report(out)} == {2}
    assert_same_training(out, fsdp, ws)  # two nodes of one process = one node of two


# ------------------------------------------------------------------------------------------ accelerate's config
@slow
def test_accelerate_fsdp_config_shards_in_bf16_with_float32_gradient_reduction(ws, single):
    """``accelerate launch --config_file configs/fsdp.yaml`` (8 processes and bf16 there; 2 here)."""
    out = ws / "accelerate"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "fsdp.yaml"),
         "--num_processes", "2", "--main_process_port", str(free_port()), *CLI,
         *train_args(ws, out, 2, "--use_cpu", "true")])
    ranks = report(out)
    assert len(ranks) == 2 and all(r["dtensor_params"] == r["params"] for r in ranks)
    for unit in ranks[0]["units"]:
        assert (unit["param_dtype"], unit["reduce_dtype"]) == ("torch.bfloat16", "torch.float32"), unit
        assert len(unit["trainable"]) == 1
    a, b = losses(out), losses(single)
    assert max(abs(x - y) / y for x, y in zip(a, b)) < 0.01, (a, b)  # bf16 compute: close, not equal
    assert weights(out).keys() == weights(single).keys()


# ------------------------------------------------------------------------------------------ DeepSpeed
@slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process(ws, single, stage):
    pytest.importorskip("deepspeed", reason="pip install 'llava-uhd[deepspeed]'")
    out = ws / f"zero{stage}"
    run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *CLI,
         *train_args(ws, out, 2, "--deepspeed", str(ROOT / "configs" / f"zero{stage}.json"))])
    ranks = report(out)
    assert [r["zero_stage"] for r in ranks] == [stage, stage] and {r["world_size"] for r in ranks} == {2}
    for r in ranks:
        held = r["param_bytes"] / r["full_param_bytes"]
        assert (0.45 < held < 0.55) if stage == 3 else held == 1.0  # ZeRO-3 partitions the parameters too
        # a float32 master copy and Adam's two moments of half the parameters: 3/4 of one process's two moments
        assert r["optimizer_bytes"] < 0.8 * report(single)[0]["optimizer_bytes"]
    assert (out / "checkpoint-2" / "global_step2").is_dir()
    assert trace(out) == split_between_two_ranks(trace(single))
    assert_same_training(out, single, ws)


def trainer_deepspeed_config(config: dict):
    """transformers' `HfTrainerDeepSpeedConfig` of ``config``; without DeepSpeed installed (the class then has no
    base), the same methods on accelerate's `HfDeepSpeedConfig`, the base it has with DeepSpeed."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if hf_deepspeed.is_deepspeed_available():
        return hf_deepspeed.HfTrainerDeepSpeedConfig(config)  # sets transformers' global: unset it after use
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    methods = {k: v for k, v in vars(hf_deepspeed.HfTrainerDeepSpeedConfig).items() if not k.startswith("__")}
    made = type("TrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)(config)
    made._dtype, made.mismatches = None, []
    return made


def test_deepspeed_auto_values_resolve_from_the_training_arguments():
    """Every "auto" in configs/zero2.json and zero3.json gets a value from the arguments and the model, without a
    process group (what the Trainer does before DeepSpeed starts)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from llava_uhd.train.arguments import parse_train_args

    model, _ = build_tiny()
    hidden = model.config.text_config.hidden_size
    for stage in (2, 3):
        _, _, args = parse_train_args(["--output", "unused", "--use_cpu", "true", "--per_device_train_batch_size", "4",
                                       "--gradient_accumulation_steps", "2", "--bf16", "true", "--max_grad_norm",
                                       "0.5"])
        try:
            config = trainer_deepspeed_config(json.loads((ROOT / "configs" / f"zero{stage}.json").read_text()))
            config.trainer_config_process(args)
            config.trainer_config_finalize(args, model, num_training_steps=100)
        finally:
            hf_deepspeed.unset_hf_deepspeed_config()
        c = config.config

        def autos(d):
            return [k for k, v in d.items() if v == "auto"] + [k for v in d.values() if isinstance(v, dict)
                                                                for k in autos(v)]

        assert autos(c) == [], stage
        assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (4, 2)
        assert c["train_batch_size"] == 4 * 2 * args.world_size
        assert c["gradient_clipping"] == 0.5
        assert c["bf16"]["enabled"] is True and c["fp16"]["enabled"] is False
        assert c["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
        if stage == 3:
            z = c["zero_optimization"]
            assert z["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
            assert z["stage3_param_persistence_threshold"] == 10 * hidden


def test_deepspeed_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    """No DeepSpeed installed, or --use_cpu (for which accelerate would drop DeepSpeed and train plain DDP)."""
    from llava_uhd.train.run import main

    zero2 = str(ROOT / "configs" / "zero2.json")
    argv = ["--output", str(tmp_path / "o"), "--data", str(tmp_path / "none.json"), "--deepspeed", zero2]
    if importlib.util.find_spec("deepspeed") is not None:
        assert main([*argv, "--use_cpu", "true"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "llava-uhd train: --deepspeed with --use_cpu: accelerate ignores DeepSpeed for --use_cpu; leave "
            "--use_cpu out (without a GPU DeepSpeed runs on its CPU accelerator)"]
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "llava-uhd train: --deepspeed needs DeepSpeed: pip install 'llava-uhd[deepspeed]'"]


# ------------------------------------------------------------------------------------------ units, without processes
@pytest.mark.parametrize("stage", [1, 2])
def test_every_fsdp_unit_is_all_frozen_or_all_trainable(stage):
    """Each parameter goes to its innermost wrapped module (the bottom-up order accelerate wraps in), the LLM's
    input embedding and lm_head to units of their own, the rest to the root: every unit is uniform."""
    from llava_uhd.train.distributed import fsdp_wrap_classes
    from llava_uhd.train.run import prepare_stage
    from llava_uhd.train.arguments import parse_train_args

    model, _ = build_tiny()
    model.freeze_vision_tower(True)
    _, _, args = parse_train_args(["--output", "unused", "--use_cpu", "true", "--stage", str(stage)])
    prepare_stage(model, args)
    wrapped = set(fsdp_wrap_classes(model))
    units = {name for name, m in model.named_modules() if type(m).__name__ in wrapped}
    units |= {"language_model.model.embed_tokens", "language_model.lm_head"}
    owner: dict[str, set[bool]] = {}
    for name, param in model.named_parameters():
        parents = [u for u in units if name.startswith(u + ".")]
        unit = max(parents, key=len) if parents else "<root>"
        owner.setdefault(unit, set()).add(param.requires_grad)
    assert all(len(flags) == 1 for flags in owner.values()), owner
    assert owner["projector"] == {True}
    assert owner["vision_tower"] == {False}
    assert owner["language_model.model.layers.0"] == {stage == 2}
