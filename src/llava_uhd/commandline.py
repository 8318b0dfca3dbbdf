"""What every ``llava-uhd`` command checks before it starts work, and how it ends when its reader goes away.

    parser = CommandParser(prog="llava-uhd x")               # a usage error: one line on stderr, exit status 2
    parser.add_argument("--threads", type=positive_int)      # "-1": "... argument --threads: must be >= 1, got -1"
    parser.add_argument("--out", type=output_file)           # the folder it goes in must exist
    check_device("cuda")                                     # ValueError naming the device, before a model loads
    require_extra("train")                                   # ValueError naming the extra and the pip command
    return exit_quietly_on_closed_pipe(lambda: run(args))    # `llava-uhd slice x.png | head` ends without a trace
    quiet_import_noise()                                     # optional kernels' "Failed to load ..." unsaid
    torch.set_num_threads(min(torch.get_num_threads(), free_cores()))   # no more threads than idle cores

Light to import (the standard library only): `check_device` imports torch when it is called.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["quiet_import_noise", "CommandParser", "positive_int", "non_negative_int", "positive_float", "output_file",
           "check_device", "EXTRAS", "require_extra", "exit_quietly_on_closed_pipe", "free_cores"]


# optional kernels that torchao / bitsandbytes / torch announce they could not load when they are imported (through
# peft or transformers): warnings about code paths the commands do not take, which would bury their output
_IMPORT_NOISE = ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """Keep the import-time warnings of `_IMPORT_NOISE`'s loggers off the terminal (errors still show)."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line on stderr (the problem and where the usage
    is), exit status 2; its subparsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (counts, sizes, threads)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0 (indices, optional step counts where 0 means none)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (rates, budgets in seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def output_file(text: str) -> str:
    """An argparse ``type``: a file to write, checked before any work: its folder exists and it is not a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder '{folder}' is not writable")
    return text


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else a `ValueError` saying why (checked before a model is loaded)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here (use --device cpu)")
    return device


# the modules each optional extra of pyproject.toml installs (import names; tests/test_commandline.py checks that
# this agrees with pyproject.toml)
EXTRAS = {
    "torch": ("torch",),
    "nano": ("torch", "onnx", "gguf", "accelerate", "peft"),
    "train": ("torch", "accelerate", "peft", "datasets", "matplotlib", "yaml", "gguf"),
    "serve": ("fastapi", "uvicorn"),
    "deepspeed": ("deepspeed",),
    "mutation": ("mutmut",),
}


def require_extra(extra: str) -> None:
    """A `ValueError` naming the missing modules and the pip command unless ``extra``'s modules are installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"needs the '{extra}' extra (not installed: {', '.join(missing)}): "
                         f"pip install 'llava-uhd[{extra}]'")


def exit_quietly_on_closed_pipe(run: Callable[[], int]) -> int:
    """``run()``'s status; when stdout's reader has gone (``| head``), status 141 (128 + SIGPIPE, what a killed
    pipeline member reports) and no `BrokenPipeError` traceback, now or when Python flushes stdout at exit."""
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """The CPU cores other processes leave idle: the cores this process may run on less the 1-minute load average
    (rounded), at least 1. A torch thread per core is right on an idle machine, but on a busy one its threads wait
    on each other at every parallel region (two threads on a 2-core machine with one other busy process were 3-6x
    slower than one), so the commands start with no more threads than this unless ``--threads`` says otherwise."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform
            load = 0.0
    return max(1, min(cores, cores - int(load + 0.5)))
