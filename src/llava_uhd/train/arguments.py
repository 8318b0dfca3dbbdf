"""Command-line / config-file arguments of `llava-uhd train` (parsed with `HfArgumentParser`).

``--help`` shows this project's options (model, data, training) and the aliases; ``--help-all`` adds every
transformers `TrainingArguments` option. A mistake in the options (an unknown option, a missing ``--config`` file)
is a `UsageError`: `llava_uhd.train.run.main` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

__all__ = ["ModelArguments", "DataArguments", "LlavaUHDTrainingArguments", "UsageError", "parse_train_args",
           "short_help", "full_help"]

PROG = "llava-uhd train"
USAGE = f"{PROG} [--config FILE] (--model DIR | --vision X --llm Y) --data FILE --output DIR [options]"

# short spellings of common Trainer options
ALIASES = {"--output": "--output_dir", "--lr": "--learning_rate", "--epochs": "--num_train_epochs",
           "--batch-size": "--per_device_train_batch_size", "--grad-accum": "--gradient_accumulation_steps",
           "--max-steps": "--max_steps"}


class UsageError(ValueError):
    """A mistake in the command's options, said in one line."""


@dataclass
class ModelArguments:
    model: str | None = field(default=None, metadata={
        "help": "a LLaVA-UHD model folder (e.g. a stage-1 output) to start from; or use --vision and --llm"})
    vision: str | None = field(default=None, metadata={"help": "vision tower (path or hub id) to compose a new model"})
    llm: str | None = field(default=None, metadata={"help": "causal LM (path or hub id) to compose a new model"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --llm"})
    max_slices: int | None = field(default=None, metadata={"help": "slice cap (new models: 6)"})
    slice_size: int | None = field(default=None, metadata={"help": "native slice side (new models: the tower's)"})
    num_queries: int | None = field(default=None, metadata={"help": "resampler queries (new models: 64)"})
    image_strategy: str | None = field(default=None, metadata={"help": "uhd | pad | fixed_grid (new models)"})
    projector: str | None = field(default=None, metadata={"help": "resampler | mlp (new models)"})
    spatial_schema: bool | None = field(default=None, metadata={"help": "spatial schema separators (new models)"})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "keep the ViT frozen (the paper: both stages)"})


@dataclass
class DataArguments:
    data: str | None = field(default=None, metadata={"help": "LLaVA JSON / JSONL file or a saved datasets folder"})
    images: str | None = field(default=None, metadata={"help": "folder the records' image paths are relative to"})
    template: str | None = field(default=None, metadata={
        "help": "plain | vicuna_v1 | chat_template (default: plain for stage 1, vicuna_v1 for stage 2)"})
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens (longer: cut after an image "
                                                              "block or skipped, and counted)"})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "skip (and count) samples whose image is missing or unreadable instead of stopping with an error"})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "skip (and count) malformed records (an empty answer, a last turn from human, turns out of order, "
                "...) instead of stopping with an error"})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "batches of image-only or text-only samples of similar length (LLaVA)"})
    group_by_length: bool = field(default=False, metadata={"help": "batches of samples of similar length"})


@dataclass
class LlavaUHDTrainingArguments(TrainingArguments):
    stage: int = field(default=2, metadata={"help": "1: train the resampler only; 2: resampler + LLM"})
    projector_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the resampler / projector (default: --learning_rate)"})
    lora: bool = field(default=False, metadata={"help": "stage 2: LoRA adapters on the LLM instead of full tuning"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={
        "help": "comma-separated names of the LLM's linear layers to adapt"})
    merge_lora: bool = field(default=True, metadata={
        "help": "merge the LoRA weights into the LLM when saving the final model (the adapter is saved too)"})
    trace_samples: str | None = field(default=None, metadata={
        "help": "append the sample ids of every optimizer step to this JSONL file (to check data order on resume)"})
    sharding_report: str | None = field(default=None, metadata={
        "help": "append one JSON line per rank to this file at the end: the bytes of parameters, gradients and "
                "optimizer state the rank holds, its peak memory, its FSDP units"})
    resume: str = field(default="auto", metadata={
        "help": "auto: continue from the last checkpoint in --output_dir if there is one; never; or a checkpoint path"})


def _config_to_argv(path: str) -> list[str]:
    """A YAML/JSON config file as command-line arguments (placed before the real ones, which then win)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--config {path}: cannot be read ({e.strerror or e})") from e
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:  # its message spans lines
            raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from e
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {path}: not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        flag = f"--{key}"
        if isinstance(value, (dict,)):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse's own mistakes (a bad value) are one line too, not usage + error
        raise UsageError(f"{message} (see {PROG} --help)")


def _parser() -> HfArgumentParser:
    return _Parser((ModelArguments, DataArguments, LlavaUHDTrainingArguments), prog=PROG, usage=USAGE)


def _add_own_options(group) -> None:
    """``--config``, the aliases and the help options (those the Trainer's parser already has are left to it)."""
    options = [(("--config",), "FILE", "YAML or JSON file of option defaults (configs/stage1.yaml, ...); options on "
                                       "the command line win"),
               (("--output",), "DIR", "where checkpoints, the final model and loss.png go (--output_dir)")]
    options += [((alias,), "LR" if alias == "--lr" else "N", f"same as {ALIASES[alias]}")
                for alias in ("--lr", "--epochs", "--batch-size", "--grad-accum", "--max-steps")]
    for flags, metavar, help_text in options:
        try:
            group.add_argument(*flags, metavar=metavar, help=help_text, default=argparse.SUPPRESS)
        except argparse.ArgumentError:  # HfArgumentParser spells --max_steps as --max-steps too
            pass
    try:
        group.add_argument("-h", "--help", action="store_true", help="this help", default=argparse.SUPPRESS)
    except argparse.ArgumentError:
        pass
    group.add_argument("--help-all", action="store_true", help="also every transformers TrainingArguments option",
                       default=argparse.SUPPRESS)


_METAVARS = {"model": "DIR", "vision": "X", "llm": "Y", "gguf_file": "FILE", "data": "FILE", "images": "DIR",
             "template": "NAME", "image_strategy": "NAME", "projector": "NAME", "lora_target_modules": "NAMES",
             "trace_samples": "FILE", "sharding_report": "FILE", "resume": "auto|never|DIR"}


def _metavar(f) -> str:
    kind = str(f.type)  # annotations are strings here ("int | None")
    if f.name in _METAVARS:
        return _METAVARS[f.name]
    return "true|false" if "bool" in kind else "N" if "int" in kind else "X" if "float" in kind else f.name.upper()


def short_help() -> str:
    """This project's options, grouped (model, data, training), and where the Trainer's are."""
    parser = argparse.ArgumentParser(
        prog=PROG, usage=USAGE, add_help=False,
        description="Train one stage of LLaVA-UHD (stage 1: the resampler; stage 2: resampler + LLM) with the "
                    "transformers Trainer.",
        epilog="Every transformers TrainingArguments option works too (--bf16, --deepspeed, --save_steps, "
               "--gradient_checkpointing, ...): `llava-uhd train --help-all` lists them all.")
    base = {f.name for f in fields(TrainingArguments)}
    own_training = [f for f in fields(LlavaUHDTrainingArguments) if f.name not in base]
    for title, options in (("model", fields(ModelArguments)), ("data", fields(DataArguments)),
                           ("training", own_training)):
        group = parser.add_argument_group(title)
        for f in options:
            default = f.default if f.default is not MISSING else None
            default = "true" if default is True else default
            shown = "" if default in (None, False) else f" (default: {default})"
            group.add_argument(f"--{f.name}", metavar=_metavar(f), help=f.metadata.get("help", "") + shown)
        if title == "training":
            _add_own_options(group)
    return parser.format_help()


def full_help() -> str:
    """`short_help`'s options and every `TrainingArguments` option."""
    parser = _parser()
    _add_own_options(parser.add_argument_group(f"{PROG}'s own"))
    return parser.format_help()


def parse_train_args(argv: list[str]):
    """``(model_args, data_args, training_args)`` from ``argv``; ``--config FILE`` supplies defaults, and aliases
    ``--output``/``--lr``/``--epochs``/``--batch-size`` are accepted for the common options. ``-h`` / ``--help``
    and ``--help-all`` print the help and raise ``SystemExit(0)``; a mistake raises `UsageError`."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        print(full_help() if "--help-all" in argv else short_help(), end="")
        raise SystemExit(0)
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UsageError("--config needs a file (YAML or JSON)")
        config_path = argv[i + 1]
        argv = _config_to_argv(config_path) + argv[:i] + argv[i + 2:]
    argv = [ALIASES.get(a, a) for a in argv]
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:  # transformers would stop with a traceback
            raise UsageError("--deepspeed needs DeepSpeed: pip install 'llava-uhd[deepspeed]'")
    *parsed, unknown = _parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unknown option(s): {' '.join(unknown)} (llava-uhd train --help-all lists them all)")
    return tuple(parsed)
