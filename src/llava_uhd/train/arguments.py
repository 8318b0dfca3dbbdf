"""Command-line / config-file arguments of `llava-uhd train` (parsed with `HfArgumentParser`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

__all__ = ["ModelArguments", "DataArguments", "LlavaUHDTrainingArguments", "parse_train_args"]


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
    resume: str = field(default="auto", metadata={
        "help": "auto: continue from the last checkpoint in --output_dir if there is one; never; or a checkpoint path"})


def _config_to_argv(path: str) -> list[str]:
    """A YAML/JSON config file as command-line arguments (placed before the real ones, which then win)."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
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


def parse_train_args(argv: list[str]):
    """``(model_args, data_args, training_args)`` from ``argv``; ``--config FILE`` supplies defaults, and aliases
    ``--output``/``--lr``/``--epochs``/``--batch-size`` are accepted for the common options."""
    from transformers import HfArgumentParser

    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        config_path = argv[i + 1]
        argv = _config_to_argv(config_path) + argv[:i] + argv[i + 2:]
    aliases = {"--output": "--output_dir", "--lr": "--learning_rate", "--epochs": "--num_train_epochs",
               "--batch-size": "--per_device_train_batch_size", "--grad-accum": "--gradient_accumulation_steps",
               "--max-steps": "--max_steps"}
    argv = [aliases.get(a, a) for a in argv]
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaUHDTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)
