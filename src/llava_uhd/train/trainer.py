"""`LlavaUHDTrainer`: the transformers `Trainer` plus LLaVA's length-grouped sampling, a separate learning rate for
the resampler, and an optional trace of the samples every step saw."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import Trainer

__all__ = ["LlavaUHDTrainer", "EpochSampler"]


class EpochSampler(Sampler[int]):
    """A deterministic order per epoch: shuffled, length-grouped or modality-length-grouped (LLaVA), seeded with
    ``seed + epoch``. Being a pure function of (seed, epoch), a run resumed from a checkpoint replays exactly the
    order the uninterrupted run would have used (the Trainer then skips the batches already done)."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int, mode: str = "random"):
        if mode not in ("random", "length", "modality"):
            raise ValueError(f"unknown sampling mode {mode!r}")
        self.lengths, self.batch_size, self.world_size = list(lengths), batch_size, world_size
        self.seed, self.mode, self.epoch = seed, mode, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.mode == "random":
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        from ..data.sampler import LengthGroupedSampler

        sampler = LengthGroupedSampler(self.lengths, self.batch_size, world_size=self.world_size,
                                       generator=generator, group_by_modality=self.mode == "modality")
        return iter(list(sampler))


class LlavaUHDTrainer(Trainer):
    """Adds to `Trainer`:

    - ``group_by_modality_length`` / ``group_by_length`` sampling (see `EpochSampler`), set by `run.train`;
    - ``projector_lr``: the resampler / projector gets its own learning rate (useful with LoRA on the LLM);
    - ``trace_samples``: a JSONL line ``{"step", "ids"}`` per micro-batch with the sample ids it held;
    - FSDP2 units and precision for LLaVA-UHD, FSDP on CPU processes too, ``sharding_report`` (see `distributed`).
    """

    def __init__(self, *args, sampling: str = "random", **kwargs):
        super().__init__(*args, **kwargs)
        self.sampling = sampling
        from transformers.integrations import is_deepspeed_zero3_enabled

        if self.is_deepspeed_enabled and is_deepspeed_zero3_enabled():
            from .distributed import prepare_zero3

            prepare_zero3(self.model)
        report = getattr(self.args, "sharding_report", None)
        if report:
            from .distributed import ShardingReport

            self.add_callback(ShardingReport(report, self))

    def create_accelerator_and_postprocess(self):
        from .distributed import configure_fsdp_plugin, enable_cpu_sharding

        enable_cpu_sharding()
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled:
            configure_fsdp_plugin(self.accelerator.state.fsdp_plugin, self.model)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.sampling == "modality":
            lengths = dataset.modality_lengths
        else:
            lengths = dataset.lengths if self.sampling == "length" else [0] * len(dataset)
        return EpochSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                            self.args.world_size, self.args.seed, self.sampling)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        projector_lr = getattr(self.args, "projector_lr", None)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((".projector." in f".{name}", name in decay), []).append(param)
        param_groups = []
        for (is_projector, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_projector and projector_lr is not None:
                group["lr"] = projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if getattr(self.args, "sharding_report", None) and isinstance(inputs.get("attention_mask"), torch.Tensor):
            self.tokens_seen = getattr(self, "tokens_seen", 0) + int(inputs["attention_mask"].sum())  # no padding
        sample_ids = inputs.pop("sample_ids", None)
        trace = getattr(self.args, "trace_samples", None)
        if trace and sample_ids is not None:
            line = {"step": self.state.global_step, "rank": self.args.process_index, "ids": list(sample_ids)}
            with open(trace, "a") as f:
                f.write(json.dumps(line) + "\n")
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def plot_loss(log_history: list[dict], out: str | Path) -> Path | None:
    """Write the training-loss curve (and the learning rate) to ``out`` (PNG). None if nothing was logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:  # a machine without the train extra's matplotlib (python -m llava_uhd.train.run)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, marker="o" if len(steps) < 50 else None, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lrs = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:orange", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    finite = [v for v in losses if math.isfinite(v)]
    ax.set_title(f"loss {finite[0]:.3f} -> {finite[-1]:.3f}" if finite else "loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
