"""`llava-uhd train`: check the data, build the model, set up the stage, run the `Trainer`, save a loadable model.

Stage 1 (the paper): the resampler alone learns; the ViT and the LLM are frozen; template ``plain``.
Stage 2: the resampler and the LLM learn (fully, or LoRA adapters with ``--lora``); the ViT stays frozen; template
``vicuna_v1``. Stage 2 starts from a stage-1 output folder (``--model``).

Order: the options, then the processor (tokenizer and image settings, no weights), then the data: every record is
read, checked and tokenized and every skip decided (`LazySupervisedDataset.prepare`), and only then the model
loads. A data mistake therefore costs seconds, not a model load. `main` prints a user's mistake (`UsageError`,
`DataError`: the file, the record, the image and the problem) as one line on stderr and returns 2, no traceback.
At the end, the counts of truncated and skipped records are printed, and every skipped record is listed in
``OUTPUT/skipped.jsonl`` (``{"index", "id", "kind", "reason"}``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from ..data.records import DataError
from .arguments import DataArguments, LlavaUHDTrainingArguments, ModelArguments, UsageError, parse_train_args
from .trainer import LlavaUHDTrainer, plot_loss

__all__ = ["train", "main", "build_processor", "build_model", "build_model_and_processor", "build_dataset",
           "prepare_stage"]

logger = logging.getLogger("llava_uhd.train")

_NEW_MODEL_SETTINGS = ("max_slices", "slice_size", "num_queries", "image_strategy", "projector", "spatial_schema")


def build_processor(model_args: ModelArguments):
    """The processor of ``--model DIR`` or of the model ``--vision`` and ``--llm`` compose (no weights loaded)."""
    from ..processing import LlavaUHDProcessor

    if model_args.model:
        if model_args.vision or model_args.llm:
            raise UsageError("give either --model or --vision/--llm, not both")
        path = Path(model_args.model)
        if not (path / "config.json").exists():
            raise UsageError(f"--model {path}: no config.json there (expected a LLaVA-UHD model folder)")
        return LlavaUHDProcessor.from_pretrained(path)
    if model_args.vision and model_args.llm:
        settings = {k: getattr(model_args, k) for k in _NEW_MODEL_SETTINGS if getattr(model_args, k) is not None}
        return LlavaUHDProcessor.from_backbones(model_args.vision, model_args.llm, gguf_file=model_args.gguf_file,
                                                **settings)
    raise UsageError("give --model DIR (e.g. a stage-1 output) or both --vision and --llm")


def build_model(model_args: ModelArguments, processor):
    """The model of ``--model DIR`` or composed from ``--vision`` and ``--llm`` (with ``processor``)."""
    from ..modeling import LlavaUHDForConditionalGeneration

    if model_args.model:
        path = Path(model_args.model)
        model = LlavaUHDForConditionalGeneration.from_pretrained(path)
        ignored = [k for k in _NEW_MODEL_SETTINGS if getattr(model_args, k) is not None]
        if ignored:
            logger.warning("ignoring %s: they are fixed by the model in %s", ", ".join(ignored), path)
    else:
        settings = {k: getattr(model_args, k) for k in _NEW_MODEL_SETTINGS if getattr(model_args, k) is not None}
        model = LlavaUHDForConditionalGeneration.from_backbones(model_args.vision, model_args.llm, processor=processor,
                                                                gguf_file=model_args.gguf_file, **settings)
    model.freeze_vision_tower(model_args.freeze_vision_tower)
    return model


def build_model_and_processor(model_args: ModelArguments):
    """A model and its processor from ``--model DIR`` or composed from ``--vision`` and ``--llm``."""
    processor = build_processor(model_args)
    return build_model(model_args, processor), processor


def build_dataset(data_args: DataArguments, processor, template: str):
    """The training data, read and checked, every skip decided (`LazySupervisedDataset.prepare`); a `DataError`
    for the first problem no skip flag covers, or when no sample is left."""
    from ..data.llava_data import LazySupervisedDataset

    if not data_args.data:
        raise UsageError("--data is required (LLaVA JSON / JSONL or a saved datasets folder)")
    if data_args.images is not None and not os.path.isdir(data_args.images):
        raise UsageError(f"--images {data_args.images}: no such folder")
    dataset = LazySupervisedDataset(data_args.data, processor, template=template, image_folder=data_args.images,
                                    max_length=data_args.max_length, skip_bad_images=data_args.skip_bad_images,
                                    skip_bad_records=data_args.skip_bad_records)
    dataset.prepare()
    if len(dataset) == 0:
        skipped = len(dataset.skipped)
        raise DataError(f"{data_args.data}: no sample to train on" +
                        (f" (all {skipped} records were skipped; see the warnings above)" if skipped else ""))
    return dataset


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
    def numel(p):  # DeepSpeed ZeRO-3 builds the model partitioned: ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
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


def unsharded_copy(model, state: dict, args: LlavaUHDTrainingArguments):
    """A plain (unsharded) model holding ``state``, the full state dict gathered from a sharded ``model`` (FSDP2,
    DeepSpeed ZeRO): built on the meta device with the same stage set-up (LoRA wrapping included, so the keys
    match), then given the gathered tensors; nothing is allocated twice."""
    from ..modeling import LlavaUHDForConditionalGeneration

    from .distributed import without_zero3_init

    with torch.device("meta"), without_zero3_init():
        copy = prepare_stage(LlavaUHDForConditionalGeneration(model.config), args)
    copy.load_state_dict(state, strict=True, assign=True)
    sources = dict(model.named_buffers())
    for name, buffer in list(copy.named_buffers()):  # non-persistent buffers (rotary tables): from the model
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, sources[name].detach().to("cpu"), persistent=False)
    return copy


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
    from ..data.llava_data import DataCollatorForLlavaUHD

    if not data_args.data:
        raise UsageError("--data is required (LLaVA JSON / JSONL or a saved datasets folder)")
    if args.stage not in (1, 2):
        raise UsageError(f"--stage must be 1 or 2, got {args.stage}")
    if args.deepspeed and args.use_cpu:  # accelerate would silently train without DeepSpeed (plain DDP)
        raise UsageError("--deepspeed with --use_cpu: accelerate ignores DeepSpeed for --use_cpu; leave --use_cpu "
                         "out (without a GPU DeepSpeed runs on its CPU accelerator)")
    if args.deepspeed and not model_args.freeze_vision_tower:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # see distributed.prepare_zero3
            raise UsageError("DeepSpeed ZeRO-3 trains LLaVA-UHD with a frozen vision tower only (the paper's setting): "
                             "use ZeRO-2 or FSDP with --freeze_vision_tower false")
    if not Path(data_args.data).exists():  # before anything loads
        raise UsageError(f"{data_args.data}: no such data file or directory")
    template = data_args.template or ("plain" if args.stage == 1 else "vicuna_v1")
    processor = _loading("the processor", build_processor, model_args)
    dataset = build_dataset(data_args, processor, template)  # before the model: a data mistake fails fast
    model = prepare_stage(_loading("the model", build_model, model_args, processor), args)
    if args.activation_checkpointing and args.activation_checkpointing_kwargs is None:
        # non-reentrant: works when the checkpointed LLM's own weights are frozen (stage 1, LoRA)
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    # our collator builds exactly the model's inputs (plus sample_ids, which LlavaUHDTrainer pops)
    args.remove_unused_columns = False
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
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except DataError:  # a sample that broke after the checks: end the progress bar's line before the message
        print(file=sys.stderr)
        raise
    summary = {"stage": args.stage, "template": template, "steps": trainer.state.global_step,
               "train_loss": result.training_loss, "output_dir": args.output_dir, "data": dataset.summary()}
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:  # gathered from the shards, on every rank
        from .distributed import gathered_state_dict

        state = gathered_state_dict(trainer)
        if trainer.is_world_process_zero():
            model = unsharded_copy(model, state, args)
    if trainer.is_world_process_zero():
        save_final(model, processor, args.output_dir, args)
        curve = plot_loss(trainer.state.log_history, os.path.join(args.output_dir, "loss.png"))
        summary["loss_curve"] = str(curve) if curve else None
        report = collator_report(dataset, collator)
        if report:
            logger.warning(report)
        summary["skipped"] = report
        if dataset.skipped:
            summary["skipped_file"] = os.path.join(args.output_dir, "skipped.jsonl")
            with open(summary["skipped_file"], "w") as f:
                f.writelines(json.dumps(d, default=str) + "\n" for d in dataset.skipped)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def _loading(what: str, build, *args):
    """``build(*args)``, a failure to read the model's files (a missing or damaged folder, a hub id offline) as a
    one-line `UsageError`."""
    try:
        return build(*args)
    except (OSError, ValueError) as e:
        if isinstance(e, (UsageError, DataError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load {what}: {first}") from e


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


def _one_line(error: Exception) -> str:
    """The error's message; for one re-raised from a DataLoader worker ("Caught DataError in DataLoader worker
    process 0." and the worker's traceback), the original message, the traceback's last line."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return str(error)


def main(argv: list[str]) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        from .distributed import enable_cpu_sharding

        enable_cpu_sharding()  # before the arguments set up the processes
        model_args, data_args, args = parse_train_args(argv)
        summary = train(model_args, data_args, args)
    except (UsageError, DataError) as e:
        print(f"llava-uhd train: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.process_index == 0:
        print(f"stage {summary['stage']} done: {summary['steps']} steps, mean training loss "
              f"{summary['train_loss']:.4f}; model saved to {summary['output_dir']}"
              + (f"; loss curve {summary['loss_curve']}" if summary.get("loss_curve") else "")
              + (f"; {summary['skipped']}" if summary.get("skipped") else "")
              + (f" (listed in {summary['skipped_file']})" if summary.get("skipped_file") else ""))
    return 0


if __name__ == "__main__":  # python -m llava_uhd.train.run ...: `llava-uhd train` without the extras check
    sys.exit(main(sys.argv[1:]))
