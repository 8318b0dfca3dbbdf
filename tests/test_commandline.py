"""What every command checks before it starts work (`llava_uhd.commandline`), through the real commands."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

from llava_uhd.cli import main
from llava_uhd.commandline import (EXTRAS, CommandParser, check_device, non_negative_int, output_file,
                                   positive_float, positive_int, require_extra)


def _status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_argument_types_name_the_problem(tmp_path):
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and positive_float("0.5") == 0.5
    for kind, text, message in [(positive_int, "0", "must be >= 1, got 0"), (positive_int, "-5", "must be >= 1"),
                                (positive_int, "1.5", "expected an integer, got '1.5'"),
                                (non_negative_int, "-1", "must be >= 0, got -1"),
                                (positive_float, "0", "must be a finite number > 0"),
                                (positive_float, "inf", "must be a finite number > 0"),
                                (positive_float, "nan", "must be a finite number > 0"),
                                (positive_float, "x", "expected a number, got 'x'"),
                                (output_file, str(tmp_path), "is a folder; give a file name"),
                                (output_file, str(tmp_path / "a" / "b.png"), f"the folder '{tmp_path / 'a'}' does "
                                                                             "not exist")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            kind(text)
    assert output_file(str(tmp_path / "b.png")) == str(tmp_path / "b.png")


def test_a_usage_error_is_one_line(capsys):
    parser = CommandParser(prog="llava-uhd x")
    parser.add_argument("--threads", type=positive_int)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--threads", "-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("llava-uhd x: error: argument --threads: must be >= 1, got -1 "
                                       "(see llava-uhd x --help)\n")


def test_devices_are_checked_before_a_model_loads():
    import torch

    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'nowhere' is not a device"):
        check_device("nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
            check_device("cuda")


def test_the_extras_table_is_pyproject_toml():
    """`EXTRAS` lists, as import names, exactly what each extra of pyproject.toml installs."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    import_name = {"pyyaml": "yaml"}
    for extra, modules in EXTRAS.items():
        declared = {re.split(r"[<>=!~\[; ]", r)[0].lower() for r in project["optional-dependencies"][extra]}
        assert {import_name.get(d, d) for d in declared} == set(modules), extra


@pytest.mark.parametrize("command", [["ablate", "--quick"], ["train", "--config", "x.yaml"]])
def test_a_command_says_which_extra_to_install_before_any_work(command, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setattr("llava_uhd.train.ablation.run_ablate", lambda args: pytest.fail("the ablation ran"))
    monkeypatch.setitem(sys.modules, "llava_uhd.train.run", None)  # importing the training run fails loudly
    assert _status(command) == 2
    err = capsys.readouterr().err
    assert err == (f"llava-uhd {command[0]}: needs the 'train' extra (not installed: matplotlib): "
                   "pip install 'llava-uhd[train]'\n")
    with pytest.raises(ValueError, match=r"needs the 'nano' extra \(not installed: onnx\)"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else object())
        require_extra("nano")


def test_training_commands_check_their_numbers_and_device_first(capsys, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "llava_uhd.nano.train", None)  # nothing of the run may start
    for argv, message in [(["train-nano", "--threads", "-1"], "argument --threads: must be >= 1, got -1"),
                          (["train-nano", "--steps1", "0"], "argument --steps1: must be >= 1, got 0"),
                          (["ablate", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
                          (["synth", "--out", "x", "--workers", "-1"], "argument --workers: must be >= 1, got -1")]:
        assert _status(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, argv
    if not torch.cuda.is_available():
        assert _status(["train-nano", "--device", "cuda", "--out", "never"]) == 2
        assert capsys.readouterr().err == ("llava-uhd train-nano: --device cuda: CUDA is not available here "
                                           "(use --device cpu)\n")
        assert not Path("never").exists()


def test_free_cores_leaves_the_busy_cores_alone(monkeypatch):
    from llava_uhd.commandline import free_cores

    assert free_cores(cores=2, load=0.2) == 2  # idle: every core
    assert free_cores(cores=2, load=1.0) == 1  # one other busy process: one thread
    assert free_cores(cores=2, load=4.8) == 1  # never fewer than one
    assert free_cores(cores=16, load=3.4) == 13
    assert free_cores(cores=16, load=3.5) == 12  # rounded half up
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert free_cores() == len(__import__("os").sched_getaffinity(0))


def test_commands_start_with_no_more_threads_than_free_cores(monkeypatch):
    import argparse

    import torch

    from llava_uhd.serve import options

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(options, "free_cores", lambda: 1)
        options.prepare_runtime(argparse.Namespace(threads=None))
        assert torch.get_num_threads() == 1
        options.prepare_runtime(argparse.Namespace(threads=2))  # --threads wins
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # so does the user's environment
        options.prepare_runtime(argparse.Namespace(threads=None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
