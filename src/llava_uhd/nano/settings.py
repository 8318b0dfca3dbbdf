"""What defines a nano run: `NanoSettings` (backbones, data, the two stages, evaluation, the machine) and the two
variants trained side by side (`VARIANTS`: LLaVA-UHD and the LLaVA-1.5-style ``pad`` baseline).

    settings = NanoSettings(steps1=400, steps2=1000)        # or NanoSettings.quick() for a smoke run
    settings.check()
    model_settings(settings, "uhd")     # the LlavaUHDConfig / processor settings of a variant
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.probes import SyntheticDataSettings

__all__ = ["VISION_ROUNDING", "VARIANTS", "NanoSettings", "model_settings"]

VISION_ROUNDING = "int8-rowwise"
"""How the DINOv2 tower's Linear weights are rounded, in training and at inference alike (`rounding`)."""

VARIANTS: dict[str, dict[str, str]] = {
    "uhd": {"image_strategy": "uhd", "description": "LLaVA-UHD: up to max_slices aspect-keeping slices + overview, "
                                                    "spatial schema"},
    "pad": {"image_strategy": "pad", "description": "LLaVA-1.5 style: pad to a square, one native view"},
}


@dataclass
class NanoSettings(SyntheticDataSettings):
    """Everything that defines a nano run (saved in ``results.json`` and ``nano_config.json``). The data fields
    come from `SyntheticDataSettings`, with larger images than the ablation's."""

    # data (the defaults differ from the ablation's)
    min_side: int = 320
    max_side: int = 1200
    max_aspect: float = 4.0
    train_samples: int = 8000
    eval_samples: int = 600
    # model
    vision: str = "dinov2-s14"
    llm: str = "smollm2-135m-instruct"
    slice_size: int = 224
    max_slices: int = 6
    num_queries: int = 64
    vision_rounding: str = VISION_ROUNDING  # or "none"
    # training
    steps1: int = 300
    steps2: int = 600
    batch_size: int = 32
    lr1: float = 1e-3
    lr2: float = 3e-4  # the LoRA adapters
    projector_lr2: float = 5e-4  # the resampler in stage 2
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    template1: str = "plain"
    template2: str = "vicuna_v1"
    answer_prompt: str | None = None  # appended to questions (None: the bare question, as `ask` sends it)
    # evaluation
    max_new_tokens: int = 6
    eval_batch_size: int = 64
    # machine
    device: str = "cpu"
    bf16: bool | None = None  # None: on CUDA
    workers: int | None = None  # data workers; None: min(16, CPUs - 1) on CUDA, 0 on the CPU
    threads: int | None = None  # torch CPU threads (None: leave as is)
    time_budget_s: float | None = None  # scale the steps down (same for both variants) to fit this wall time
    fill_budget: bool = False  # with time_budget_s: scale them up too, to use the time the budget leaves
    checkpoint_steps: int = 0  # save a resumable checkpoint every this many optimizer steps (0: only stage ends)
    stop_after_s: float | None = None  # pause (checkpoint, exit) at the first step after this; rerun to continue
    logging_steps: int = 10
    verify_export: bool = True

    @classmethod
    def quick(cls, **overrides) -> "NanoSettings":
        """A CPU smoke run of a minute: a few small images, one step per stage, 8 queries, at most 2 slices."""
        base = dict(train_samples=6, eval_samples=4, steps1=1, steps2=1, batch_size=2, num_queries=8, max_slices=2,
                    min_side=224, max_side=448, max_new_tokens=3, eval_batch_size=4, logging_steps=1,
                    verify_export=False, lora_r=8, lora_alpha=16)
        return cls(**{**base, **overrides})

    @property
    def use_bf16(self) -> bool:
        """bfloat16 autocast: as asked, else on CUDA only."""
        return bool(self.bf16) if self.bf16 is not None else self.device.startswith("cuda")

    def check(self) -> None:
        super().check()
        for name in ("steps1", "steps2", "batch_size", "num_queries", "max_slices", "eval_batch_size",
                     "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.checkpoint_steps < 0:
            raise ValueError(f"checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        if self.vision_rounding not in (VISION_ROUNDING, "none"):
            raise ValueError(f"vision_rounding must be {VISION_ROUNDING!r} or 'none', got {self.vision_rounding!r}")


def model_settings(settings: NanoSettings, variant: str) -> dict:
    """The `LlavaUHDConfig` / `LlavaUHDProcessor.from_backbones` settings of ``variant``."""
    return {"slice_size": settings.slice_size, "max_slices": settings.max_slices, "num_queries": settings.num_queries,
            "image_strategy": VARIANTS[variant]["image_strategy"], "projector": "resampler", "spatial_schema": True}
