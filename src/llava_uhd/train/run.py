"""`llava-uhd train`: build the model and data, set up the stage, run the `Trainer`, save a loadable model.

Stage 1 (the paper): the resampler alone learns; the ViT and the LLM are frozen; template ``plain``.
Stage 2: the resampler and the LLM learn (fully, or LoRA adapters with ``--lora``); the ViT stays frozen; template
``vicuna_v1``. Stage 2 starts from a stage-1 output folder (``--model``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .arguments import DataArguments, LlavaUHDTrainingArguments, ModelArguments, parse_train_args
from .trainer import LlavaUHDTrainer, plot_loss

__all__ = ["train", "main", "build_model_and_processor", "prepare_stage"]

logger = logging.getLogger("llava_uhd.train")

_NEW_MODEL_SETTINGS = ("max_slices", "slice_size", "num_queries", "image_strategy", "projector", "spatial_schema")


def build_model_and_processor(model_args: ModelArguments):
    """A model and its processor from ``--model DIR`` or composed from ``--vision`` and ``--llm``."""
    from ..modeling import LlavaUHDForConditionalGeneration
    from ..processing import LlavaUHDProcessor

    if model_args.model:
        if model_args.vision or model_args.llm:
            raise ValueError("give either --model or --vision/--llm, not both")
        path = Path(model_args.model)
        if not (path / "config.json").exists():
            raise ValueError(f"--model {path}: no config.json there (expected a LLaVA-UHD model folder)")
        model = LlavaUHDForConditionalGeneration.from_pretrained(path)
        processor = LlavaUHDProcessor.from_pretrained(path)
        ignored = [k for k in _NEW_MODEL_SETTINGS if getattr(model_args, k) is not None]
        if ignored:
            logger.warning("ignoring %s: they are fixed by the model in %s", ", ".join(ignored), path)
    elif model_args.vision and model_args.llm:
        settings = {k: getattr(model_args, k) for k in _NEW_MODEL_SETTINGS if getattr(model_args, k) is not None}
        processor = LlavaUHDProcessor.from_backbones(model_args.vision, model_args.llm,
                                                     gguf_file=model_args.gguf_file, **settings)
        model = LlavaUHDForConditionalGeneration.from_backbones(model_args.vision, model_args.llm, processor=processor,
                                                                gguf_file=model_args.gguf_file, **settings)
    else:
        raise ValueError("give --model DIR (e.g. a stage-1 output) or both --vision and --llm")
    model.freeze_vision_tower(model_args.freeze_vision_tower)
    return model, processor


def prepare_stage(model, args: LlavaUHDTrainingArguments):
    """Set what learns in this stage; returns the model to train (a peft wrapper of the LLM with ``--lora``)."""
    if args.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {args.stage}")
    model.projector.requires_grad_(True)
    if args.stage == 1:
        model.language_model.requires_grad_(False)
        return model
    if args.lora:
        from peft import LoraConfig, get_peft_model

        from ..modeling.loading import peft_quietly

        model.language_model.requires_grad_(False)
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, bias="none", task_type="CAUSAL_LM")
        with peft_quietly():
            model.language_model = get_peft_model(model.language_model, config)
    else:
        model.language_model.requires_grad_(True)
    return model


def _count_params(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` whose save finished. The Trainer writes ``trainer_state.json`` last, so a folder
    without it is what a kill in the middle of a save leaves behind: skipped (with a warning), never resumed from."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            steps.append(int(name[len("checkpoint-"):]))
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
        logger.warning("ignoring %s: incomplete (no trainer_state.json; the run stopped while saving it)", path)
    return None


def save_final(model, processor, output_dir: str, args: LlavaUHDTrainingArguments) -> None:
    """Save a `from_pretrained`-loadable model (LoRA merged into the LLM, the adapter kept in ``adapter/``)."""
    from peft import PeftModel

    if isinstance(model.language_model, PeftModel):
        model.language_model.save_pretrained(os.path.join(output_dir, "adapter"))
        if args.merge_lora:
            model.language_model = model.language_model.merge_and_unload()
        else:
            logger.warning("--merge_lora false: the saved model folder holds the base LLM; load the adapter from "
                           "%s/adapter", output_dir)
            model.language_model = model.language_model.unload()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def train(model_args: ModelArguments, data_args: DataArguments, args: LlavaUHDTrainingArguments) -> dict:
    """Run one stage. Returns a summary (final loss, steps, data statistics, where things were written)."""
    from ..data.llava_data import DataCollatorForLlavaUHD, LazySupervisedDataset

    if not data_args.data:
        raise ValueError("--data is required (LLaVA JSON / JSONL or a saved datasets folder)")
    template = data_args.template or ("plain" if args.stage == 1 else "vicuna_v1")
    model, processor = build_model_and_processor(model_args)
    model = prepare_stage(model, args)
    if args.activation_checkpointing and args.activation_checkpointing_kwargs is None:
        # non-reentrant: works when the checkpointed LLM's own weights are frozen (stage 1, LoRA)
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    # our collator builds exactly the model's inputs (plus sample_ids, which LlavaUHDTrainer pops)
    args.remove_unused_columns = False
    dataset = LazySupervisedDataset(data_args.data, processor, template=template, image_folder=data_args.images,
                                    max_length=data_args.max_length, skip_bad_images=data_args.skip_bad_images)
    collator = DataCollatorForLlavaUHD(processor)
    sampling = ("modality" if data_args.group_by_modality_length
                else "length" if data_args.group_by_length else "random")
    if args.process_index == 0:
        logger.warning("stage %d, template %s, %d samples: %s", args.stage, template, len(dataset),
                       _count_params(model))
    trainer = LlavaUHDTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              processing_class=processor, sampling=sampling)
    resume = None
    if args.resume == "auto":
        resume = last_complete_checkpoint(args.output_dir)
    elif args.resume != "never":
        resume = args.resume
    if resume and args.process_index == 0:
        logger.warning("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    summary = {"stage": args.stage, "template": template, "steps": trainer.state.global_step,
               "train_loss": result.training_loss, "output_dir": args.output_dir,
               "data": dataset.summary() if hasattr(dataset, "summary") else {}}
    if trainer.is_world_process_zero():
        save_final(model, processor, args.output_dir, args)
        curve = plot_loss(trainer.state.log_history, os.path.join(args.output_dir, "loss.png"))
        summary["loss_curve"] = str(curve) if curve else None
        report = collator_report(dataset, collator)
        if report:
            logger.warning(report)
        summary["skipped"] = report
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def collator_report(dataset, collator) -> str:
    """What was cut or skipped, in words (empty when nothing was)."""
    parts = []
    stats = getattr(dataset, "stats", None)
    if stats:
        parts += [f"{k.replace('_', ' ')}: {v}" for k, v in dict(stats).items() if v]
    skipped = getattr(collator, "skipped", 0)
    if skipped:
        parts.append(f"dropped by the collator: {skipped}")
    return "; ".join(parts)


def main(argv: list[str]) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    model_args, data_args, args = parse_train_args(argv)
    summary = train(model_args, data_args, args)
    if args.process_index == 0:
        print(f"stage {summary['stage']} done: {summary['steps']} steps, mean training loss "
              f"{summary['train_loss']:.4f}; model saved to {summary['output_dir']}"
              + (f"; loss curve {summary['loss_curve']}" if summary.get("loss_curve") else "")
              + (f"; {summary['skipped']}" if summary.get("skipped") else ""))
    return 0
