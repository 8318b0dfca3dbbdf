"""One training stage of the nano recipe with the project's `LlavaUHDTrainer`, resumable.

    model, info = train_stage(model, processor, items, settings, stage=1, steps=400, variant="uhd",
                              stage_dir=out / "state" / "uhd-stage1")

``stage_dir`` holds the stage's state: Trainer checkpoints every ``settings.checkpoint_steps`` steps and at a pause,
which a rerun resumes from (same data order, optimizer, schedule and random state); once the stage has finished,
its trainable weights (``trained.safetensors``) and info (``stage.json``), from which a rerun restores it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from ..train.arguments import LlavaUHDTrainingArguments
from ..train.run import last_complete_checkpoint, prepare_stage
from ..train.trainer import LlavaUHDTrainer
from .features import CachedFeatureCollator
from .settings import NanoSettings

__all__ = ["STAGE_FILE", "TRAINED_FILE", "ELAPSED_FILE", "train_stage", "training_arguments",
           "round_trainable_to_fp16_"]

STAGE_FILE, TRAINED_FILE, ELAPSED_FILE = "stage.json", "trained.safetensors", "nano_elapsed.json"


class _Stop(TrainerCallback):
    """Stops training at ``deadline`` (the time budget's backstop: the stage counts as done) or pauses it at
    ``pause_at`` (a checkpoint is saved at that step, to resume from)."""

    def __init__(self, deadline: float | None, pause_at: float | None):
        self.deadline, self.pause_at = deadline, pause_at
        self.hit = self.paused = False

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.pause_at is not None and now > self.pause_at and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.paused = True
        elif self.deadline is not None and now > self.deadline:
            control.should_training_stop = True
            self.hit = True


class _Elapsed(TrainerCallback):
    """Keeps the stage's training seconds, summed over resumed runs, in every checkpoint (`ELAPSED_FILE`)."""

    def __init__(self, already: float):
        self.already = already

    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.t0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / ELAPSED_FILE).write_text(json.dumps({"seconds": self.seconds()}) + "\n")


class _Progress(TrainerCallback):
    """Prints the Trainer's logs (every ``logging_steps``): step, loss, learning rate, seconds per step."""

    def __init__(self, say: Callable[[str], None] | None, variant: str, stage: int):
        self.say, self.variant, self.stage = say, variant, stage

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.first = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.say is None or not logs or "loss" not in logs:
            return
        per_step = (time.perf_counter() - self.t0) / max(1, state.global_step - self.first)
        self.say(f"    {self.variant} stage {self.stage} step {state.global_step}/{state.max_steps}: loss "
                 f"{logs['loss']:.4f}, lr {logs.get('learning_rate', 0):.2e}, {per_step:.1f} s/step")


@contextlib.contextmanager
def _quiet_checkpoints():
    """No "Writing model shards" bar per checkpoint: with ``--checkpoint-steps`` they buried the progress lines."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def training_arguments(settings: NanoSettings, stage: int, steps: int, output_dir: str, keep: bool
                       ) -> LlavaUHDTrainingArguments:
    """The stage's Trainer arguments: stage 1 trains the resampler (``lr1``), stage 2 the resampler
    (``projector_lr2``) and LoRA adapters (``lr2``); cosine schedule; checkpoints only when ``keep``."""
    device = settings.device
    save_steps = settings.checkpoint_steps if keep and settings.checkpoint_steps else None
    return LlavaUHDTrainingArguments(
        output_dir=output_dir, stage=stage, lora=stage == 2, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout, lora_target_modules=",".join(settings.lora_targets),
        merge_lora=False, max_steps=steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr1 if stage == 1 else settings.lr2,
        projector_lr=None if stage == 1 else settings.projector_lr2, lr_scheduler_type="cosine",
        warmup_steps=max(0, round(settings.warmup_fraction * steps)), weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm, logging_steps=max(1, min(settings.logging_steps, steps)),
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=1,
        report_to="none", use_cpu=not device.startswith("cuda"), bf16=settings.use_bf16,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=settings.seed, data_seed=settings.seed,
        remove_unused_columns=False, disable_tqdm=True, resume="never", log_level="error")


def _log_rows(log_history: list[dict], variant: str, stage: int) -> list[dict]:
    return [{"variant": variant, "stage": stage, "step": h.get("step"), "loss": h["loss"],
             "learning_rate": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
            for h in log_history if "loss" in h]


def _restore(model, folder: Path) -> dict:
    """Load a finished stage's trained weights into ``model``; returns its ``stage.json``."""
    info = json.loads((folder / STAGE_FILE).read_text())
    trained = load_file(str(folder / TRAINED_FILE))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trained) != names:
        raise ValueError(f"{folder}: the saved weights do not match this stage's trainable parameters "
                         f"({len(trained)} saved, {len(names)} trainable)")
    model.load_state_dict(trained, strict=False)
    return info


def _save_finished(model, folder: Path, info: dict, rows: list[dict]) -> None:
    """Keep what a rerun restores (trainable weights, info, log); drop the checkpoints (the whole model each)."""
    trained = {n: p.detach().to("cpu", torch.float32).contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(folder / TRAINED_FILE))
    (folder / STAGE_FILE).write_text(json.dumps({**info, "log": rows}, indent=1) + "\n")
    for old in folder.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)


def train_stage(model, processor, items, settings: NanoSettings, stage: int, steps: int, variant: str,
                log_rows: list[dict], deadline: float | None = None, say: Callable[[str], None] | None = None,
                stage_dir: Path | None = None, pause_at: float | None = None):
    """Train one stage (`prepare_stage` sets what is trainable); ``say`` gets a progress line every
    ``settings.logging_steps``; the logged losses are appended to ``log_rows`` once the stage is done.

    Returns ``(model, info)``: steps, losses, seconds, trainable parameters; ``info["paused"]`` when it stopped at
    ``pause_at``, ``info["restored"]`` when an earlier run had finished it (``stage_dir``; None: a temporary
    folder, nothing kept)."""
    keep = stage_dir is not None
    if keep:
        stage_dir.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(stage_dir)) if keep
          else tempfile.TemporaryDirectory(prefix=f"llava-uhd-nano-{variant}-{stage}-")) as tmp:
        folder = Path(tmp)
        args = training_arguments(settings, stage, steps, tmp, keep)
        model = prepare_stage(model, args)
        if keep and (folder / STAGE_FILE).is_file():  # finished by an earlier run: restore it
            info = _restore(model, folder)
            log_rows.extend(info.pop("log"))
            if say is not None:
                say(f"    {variant} stage {stage}: restored ({info['steps']} step(s) done by an earlier run)")
            return model, {**info, "restored": True}
        resume = last_complete_checkpoint(tmp) if keep else None
        already = 0.0
        if resume:
            elapsed = Path(resume) / ELAPSED_FILE
            already = json.loads(elapsed.read_text())["seconds"] if elapsed.is_file() else 0.0
            if say is not None:
                say(f"    {variant} stage {stage}: resuming from {Path(resume).name}")
        stop, clock = _Stop(deadline, pause_at), _Elapsed(already)
        trainer = LlavaUHDTrainer(model=model, args=args,
                                  train_dataset=items, data_collator=CachedFeatureCollator(processor),
                                  callbacks=[stop, clock, _Progress(say, variant, stage)])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        with _quiet_checkpoints():
            result = trainer.train(resume_from_checkpoint=resume)
        rows = _log_rows(trainer.state.log_history, variant, stage)
        info = {"steps_planned": steps, "steps": trainer.state.global_step, "train_loss": result.training_loss,
                "seconds": clock.seconds(), "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                         if p.requires_grad),
                "stopped_by_deadline": stop.hit, "template": settings.template1 if stage == 1 else settings.template2,
                "final_loss": next((r["loss"] for r in reversed(rows)), None),
                "resumed_from_step": int(Path(resume).name.split("-")[1]) if resume else None}
        if stop.paused:
            return model, {**info, "paused": True}
        log_rows.extend(rows)
        if keep:
            _save_finished(model, folder, info, rows)
    return model, info


def round_trainable_to_fp16_(model) -> None:
    """Round what was trained (resampler, LoRA) to float16 values in place: the evaluated model is then exactly
    the exported one."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.to(torch.float16).to(p.dtype))

