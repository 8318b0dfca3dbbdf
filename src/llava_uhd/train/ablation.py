"""`llava-uhd ablate`: the paper's ablation (Table 2 / Sec. 4.3) in miniature, trained from scratch on a CPU.

Four variants of one tiny LMM (`VARIANTS`: ``pad``, LLaVA-1.5's pad-to-square but with the resampler; ``uhd``;
``uhd-no-schema``; ``uhd-mlp``, LLaVA-1.5's MLP projector) are trained with the same data, seed and steps on the
synthetic fine-detail questions (`llava_uhd.data.probes`) and scored on a held-out set with greedy generation and
`is_correct`, beside their visual tokens and FLOPs.

    results = run_ablation(AblationSettings.quick(), "ablation/")      # results.json, accuracy.png, RESULTS.md
    print(format_table(results))

The design (a random CLIP tower and Llama trained from scratch, a BPE tokenizer trained here, `CHAT_TEMPLATE`,
one training stage with everything trainable, the FLOPs convention) and why: README, "The ablation in miniature".
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..commandline import non_negative_int, positive_float, positive_int
from ..data.probes import ALL_KINDS, FINE_KINDS, SyntheticDataSettings, make_samples
from ..eval.reporting import accuracy_table, markdown_table, pct, text_table
from ..runinfo import machine

__all__ = [
    "VARIANTS",
    "CHAT_TEMPLATE",
    "AblationSettings",
    "corpus",
    "build_tokenizer",
    "build_processor",
    "build_model",
    "vision_spec_of",
    "llm_spec_of",
    "sample_cost",
    "run_ablation",
    "format_table",
    "plot_accuracy",
    "add_ablate_arguments",
    "run_ablate",
]

logger = logging.getLogger("llava_uhd.ablate")

#: The variants: LlavaUHDConfig / LlavaUHDProcessor settings and a one-line description.
VARIANTS: dict[str, dict[str, Any]] = {
    "pad": {"image_strategy": "pad", "projector": "resampler", "spatial_schema": True,
            "description": "LLaVA-1.5 style: pad to square, one native view; resampler"},
    "uhd": {"image_strategy": "uhd", "projector": "resampler", "spatial_schema": True,
            "description": "LLaVA-UHD: slices + overview, resampler, spatial schema"},
    "uhd-no-schema": {"image_strategy": "uhd", "projector": "resampler", "spatial_schema": False,
                      "description": "LLaVA-UHD without the spatial schema"},
    "uhd-mlp": {"image_strategy": "uhd", "projector": "mlp", "spatial_schema": True,
                "description": "LLaVA-UHD with the 2-layer MLP projector"},
}

#: A short conversation format (no system prompt), prefix-stable as `llava_uhd.data.templates` requires.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ASSISTANT: ' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


@dataclass
class AblationSettings(SyntheticDataSettings):
    """Everything that defines a run (saved in ``results.json``); the data fields come from
    `SyntheticDataSettings`."""

    steps: int = 1200
    batch_size: int = 8
    learning_rate: float = 1e-3
    projector_lr: float | None = None  # None: learning_rate
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    # vision tower (CLIP, random, trained)
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_intermediate: int = 384
    vision_layers: int = 3
    vision_heads: int = 4
    vision_feature_layer: int = -1
    # LLM (Llama, random)
    llm_hidden: int = 192
    llm_intermediate: int = 512
    llm_layers: int = 3
    llm_heads: int = 6
    llm_kv_heads: int = 2
    vocab_size: int = 512  # BPE target (the trained vocabulary may be smaller)
    # LLaVA-UHD
    max_slices: int = 6
    num_queries: int = 8
    resampler_heads: int = 4
    resampler_type: str = "perceiver"
    # evaluation
    eval_batch_size: int = 50
    max_new_tokens: int = 4
    threads: int = 2
    device: str = "cpu"  # where to train and evaluate ("cpu", or e.g. "cuda" for quick design sweeps)
    logging_steps: int = 25

    @classmethod
    def quick(cls, **overrides) -> "AblationSettings":
        """A 1-2 minute smoke run: a few dozen samples, a handful of steps, smaller images."""
        base = dict(train_samples=48, eval_samples=24, steps=4, batch_size=8, max_side=192, vocab_size=320,
                    logging_steps=1, eval_batch_size=24)
        return cls(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------ data
def _records(samples) -> list[dict]:
    """LLaVA records (PIL images in the ``image`` field) without the short-answer prompt suffix."""
    return [{"id": f"s{i}", "image": s.image, "conversations": s.conversations(answer_prompt=None)}
            for i, s in enumerate(samples)]


def build_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (no downloads) with ``<pad>``, ``<s>``, ``</s>``, the
    ``<image>`` token, left padding and `CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..processing import LlavaUHDProcessor

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaUHDProcessor.add_image_token(tokenizer)


def corpus(samples) -> list[str]:
    """The training conversations as plain text, for `build_tokenizer`."""
    out = []
    for s in samples:
        turns = s.conversations(answer_prompt=None)
        out.append(f"USER: {turns[0]['value'].replace('<image>', '')} ASSISTANT: {turns[1]['value']}")
    return out


def build_processor(tokenizer, settings: AblationSettings, variant: str):
    """The `LlavaUHDProcessor` of a variant (image strategy, projector, spatial schema)."""
    from ..image_processing import LlavaUHDImageProcessor
    from ..processing import LlavaUHDProcessor

    v = VARIANTS[variant]
    image_processor = LlavaUHDImageProcessor(
        size={"height": settings.image_size, "width": settings.image_size}, patch_size=settings.patch_size,
        max_slices=settings.max_slices, image_strategy=v["image_strategy"])
    return LlavaUHDProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE,
                             num_queries=settings.num_queries, projector=v["projector"],
                             spatial_schema=v["spatial_schema"])


def build_model(settings: AblationSettings, variant: str, processor, seed: int):
    """A random tiny LLaVA-UHD for ``variant`` (seeded), every part trainable."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from ..modeling import LlavaUHDConfig, LlavaUHDForConditionalGeneration

    v = VARIANTS[variant]
    tok = processor.tokenizer
    vision = CLIPVisionConfig(image_size=settings.image_size, patch_size=settings.patch_size,
                              hidden_size=settings.vision_hidden, intermediate_size=settings.vision_intermediate,
                              num_hidden_layers=settings.vision_layers, num_attention_heads=settings.vision_heads)
    text = LlamaConfig(hidden_size=settings.llm_hidden, intermediate_size=settings.llm_intermediate,
                       num_hidden_layers=settings.llm_layers, num_attention_heads=settings.llm_heads,
                       num_key_value_heads=settings.llm_kv_heads, vocab_size=len(tok),
                       max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaUHDConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), slice_size=settings.image_size,
                            max_slices=settings.max_slices, num_queries=settings.num_queries,
                            resampler_heads=settings.resampler_heads,
                            **({} if settings.resampler_type == "perceiver" else
                               {"resampler_type": settings.resampler_type}),
                            vision_feature_layer=settings.vision_feature_layer, image_strategy=v["image_strategy"],
                            projector=v["projector"], spatial_schema=v["spatial_schema"],
                            image_token_id=processor.image_token_id, freeze_vision_tower=False)
    torch.manual_seed(seed)
    model = LlavaUHDForConditionalGeneration(config)
    model.freeze_vision_tower(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


# ------------------------------------------------------------------------------------------------ cost
def vision_spec_of(settings: AblationSettings):
    """The tiny tower as a `llava_uhd.flops.VisionSpec`."""
    from ..flops import VisionSpec

    return VisionSpec("tiny-clip", settings.image_size, settings.patch_size, settings.vision_hidden,
                      settings.vision_intermediate, settings.vision_layers, True)


def llm_spec_of(model):
    """The tiny LLM as a `llava_uhd.flops.LLMSpec`: N = its parameters except the input embedding table."""
    from ..flops import LLMSpec

    lm = model.language_model
    embed = lm.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in lm.parameters()) - embed
    cfg = lm.config
    return LLMSpec(params, cfg.hidden_size, cfg.num_hidden_layers)


def sample_cost(processor, width: int, height: int, text_tokens: int, vision, llm, settings: AblationSettings
                ) -> dict[str, int]:
    """Tokens and FLOPs of one sample (one ``width x height`` image, ``text_tokens`` prompt tokens) for the variant
    the processor is set up for, with `llava_uhd.flops`' functions and counting convention (the resampler is
    counted as the perceiver resampler)."""
    from ..flops import llm_prefill_flops, mlp_projector_flops, resampler_flops, vit_crop_flops, vit_layers_used

    plan = processor.image_processor.plan(width, height)
    patches = [c.num_patches for c in plan.crops]
    layers = vit_layers_used(vision, settings.vision_feature_layer)
    vit = sum(vit_crop_flops(n, vision, layers) for n in patches)
    if processor.projector == "resampler":
        proj = sum(resampler_flops(n, vision.hidden, llm.hidden, processor.num_queries) for n in patches)
    else:
        proj = mlp_projector_flops(sum(patches), vision.hidden, llm.hidden)
    visual = processor.num_image_tokens(width, height)
    llm_f = llm_prefill_flops(visual + text_tokens, llm)
    return {"crops": len(patches), "vit_patches": sum(patches), "visual_tokens": visual,
            "llm_tokens": visual + text_tokens, "vit_flops": vit, "projector_flops": proj, "llm_flops": llm_f,
            "total_flops": vit + proj + llm_f}


# ------------------------------------------------------------------------------------------------ one variant
def _train_variant(name, settings, tokenizer, train_samples, out_dir, progress):
    import torch

    from ..data.llava_data import DataCollatorForLlavaUHD, LazySupervisedDataset
    from .arguments import LlavaUHDTrainingArguments
    from .run import prepare_stage
    from .trainer import LlavaUHDTrainer

    processor = build_processor(tokenizer, settings, name)
    model = build_model(settings, name, processor, settings.seed)
    t0 = time.perf_counter()
    dataset = LazySupervisedDataset(_records(train_samples), processor, template="chat_template", max_length=None)
    items = [dataset[i] for i in range(len(dataset))]  # processed once, kept in memory
    prep_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix=f"llava-uhd-ablate-{name}-") as tmp:
        args = LlavaUHDTrainingArguments(
            output_dir=tmp, stage=2, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=max(0, round(settings.warmup_fraction * settings.steps)),
            weight_decay=settings.weight_decay, max_grad_norm=1.0, logging_steps=settings.logging_steps,
            save_strategy="no", report_to="none", use_cpu=settings.device == "cpu", dataloader_num_workers=0,
            seed=settings.seed, data_seed=settings.seed, projector_lr=settings.projector_lr,
            remove_unused_columns=False, disable_tqdm=not progress, resume="never", log_level="error")
        model = prepare_stage(model, args)
        trainer = LlavaUHDTrainer(model=model, args=args, train_dataset=items,
                                  data_collator=DataCollatorForLlavaUHD(processor))
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # no loss dicts printed
        t0 = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - t0
        history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    del items, dataset, trainer
    n_params = sum(p.numel() for p in model.parameters())
    info = {"train_time_s": train_s, "prep_time_s": prep_s, "train_loss": result.training_loss,
            "loss_curve": history, "steps": settings.steps, "parameters": n_params,
            "threads": torch.get_num_threads()}
    return model, processor, info


def _evaluate_variant(name, model, processor, settings, eval_samples, progress):
    from ..eval.synthetic_eval import evaluate_samples

    t0 = time.perf_counter()
    scores = evaluate_samples(model, processor, eval_samples, batch_size=settings.eval_batch_size,
                              max_new_tokens=settings.max_new_tokens, progress=progress,
                              fine_detail_kinds=FINE_KINDS)
    eval_s = time.perf_counter() - t0
    vision, llm = vision_spec_of(settings), llm_spec_of(model)
    costs = []
    for s in eval_samples:
        prompt = processor.question_prompt(s.question)
        # the prompt's tokens other than the <image> placeholder, which becomes the visual tokens
        text_tokens = len(processor.tokenizer(prompt)["input_ids"]) - 1
        costs.append(sample_cost(processor, *s.image.size, text_tokens, vision, llm, settings))
    mean = {k: sum(c[k] for c in costs) / len(costs) for k in costs[0]} if costs else {}
    return scores, mean, eval_s, {"vision": asdict(vision), "llm": asdict(llm)}


# ------------------------------------------------------------------------------------------------ the run
def run_ablation(settings: AblationSettings, out_dir: str | Path, variants=None, progress: bool = True,
                 command: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train and evaluate every variant; write ``results.json``, ``accuracy.png`` and ``RESULTS.md`` to
    ``out_dir``; return the results dict. ``progress``: progress bars; ``verbose``: a line per stage."""
    import torch

    from ..eval.synthetic_eval import prior_answers, score_prior

    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()

    t0 = time.perf_counter()
    train_samples = make_samples(settings.train_samples, settings.seed, settings)
    eval_samples = make_samples(settings.eval_samples, settings.held_out_seed, settings)
    data_s = time.perf_counter() - t0
    tokenizer = build_tokenizer(corpus(train_samples), settings.vocab_size)
    _say(verbose, f"data: {len(train_samples)} training samples (seed {settings.seed}), {len(eval_samples)} "
                   f"held-out (seed {settings.held_out_seed}) in {data_s:.1f} s; vocabulary {len(tokenizer)}")

    results: dict[str, Any] = {
        "settings": {**asdict(settings), "held_out_seed": settings.held_out_seed},
        "variants": {},
        "prior": score_prior(prior_answers((s.kind, s.answer) for s in train_samples), eval_samples, FINE_KINDS),
        "kinds": list(settings.kinds),
        "fine_detail_kinds": [k for k in settings.kinds if k in FINE_KINDS],
        "eval_kind_counts": dict(Counter(s.kind for s in eval_samples)),
        "data_time_s": data_s,
    }
    for k, name in enumerate(variants):
        _say(verbose, f"[{k + 1}/{len(variants)}] {name}: {VARIANTS[name]['description']}; training "
                       f"{settings.steps} steps of {settings.batch_size}")
        model, processor, info = _train_variant(name, settings, tokenizer, train_samples, out_dir, progress)
        scores, cost, eval_s, specs = _evaluate_variant(name, model, processor, settings, eval_samples, progress)
        predictions = scores.pop("predictions")
        scores.pop("correct")
        results["variants"][name] = {
            "description": VARIANTS[name]["description"],
            "settings": {k2: v for k2, v in VARIANTS[name].items() if k2 != "description"},
            **scores, "cost": cost, **info, "eval_time_s": eval_s, **specs,
            "predictions": [{"kind": s.kind, "answer": s.answer, "prediction": p, "size": list(s.image.size)}
                            for s, p in zip(eval_samples, predictions)],
        }
        fd = scores["fine_detail"]["accuracy"]
        _say(verbose, f"    {name}: fine-detail accuracy {pct(fd)}, {cost['visual_tokens']:.1f} visual tokens "
                       f"per image, {cost['total_flops'] / 1e9:.2f} GFLOPs per sample, trained in "
                       f"{info['train_time_s']:.0f} s (loss {info['train_loss']:.3f})")
        del model
    results["wall_time_s"] = time.perf_counter() - start
    results["machine"] = machine()
    results["command"] = command
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_accuracy(results, out_dir / "accuracy.png")
    (out_dir / "RESULTS.md").write_text(format_markdown(results))
    return results


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


# ------------------------------------------------------------------------------------------------ reporting
_COST_COLUMNS = (
    ("visual tokens / image", lambda r: f"{r['cost']['visual_tokens']:.1f}"),
    ("GFLOPs / sample", lambda r: f"{r['cost']['total_flops'] / 1e9:.3f}"),
    ("train time (s)", lambda r: f"{r['train_time_s']:.0f}"),
)


def format_table(results: dict) -> str:
    """The results as a plain-text table (accuracies in %)."""
    return text_table(*accuracy_table(results, _COST_COLUMNS))


def format_markdown(results: dict) -> str:
    """``RESULTS.md``: the table, how it was made and the cost breakdown."""
    s = results["settings"]
    header, rows = accuracy_table(results, _COST_COLUMNS, counts=True)
    lines = ["# LLaVA-UHD ablation in miniature (`llava-uhd ablate`)", ""]
    lines += ["Accuracy (%) on the held-out synthetic questions, greedy decoding, scored with `is_correct`; "
              "fine-detail = " + ", ".join(f"`{k}`" for k in results["fine_detail_kinds"]) + " together "
              "(`grey_probe` is a control that does not need fine detail).", ""]
    lines += markdown_table(header, rows)
    lines += ["", "Cost per sample (means over the held-out set; FLOPs with `llava_uhd.flops`' convention, "
                  "1 multiply-add = 2 FLOPs):", ""]
    lines.append("| variant | crops | ViT patches | visual tokens | LLM tokens | ViT GFLOPs | projector GFLOPs | "
                 "LLM GFLOPs | total GFLOPs | parameters | final loss |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["variants"].items():
        c = r["cost"]
        curve = r["loss_curve"]
        final = f"{curve[-1]['loss']:.3f}" if curve else "-"
        lines.append(f"| {name} | {c['crops']:.2f} | {c['vit_patches']:.1f} | {c['visual_tokens']:.1f} | "
                     f"{c['llm_tokens']:.1f} | {c['vit_flops'] / 1e9:.3f} | {c['projector_flops'] / 1e9:.3f} | "
                     f"{c['llm_flops'] / 1e9:.3f} | {c['total_flops'] / 1e9:.3f} | {r['parameters']:,} | {final} |")
    m = results["machine"]
    lines += ["", "## How it was made", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"- seed {s['seed']} (training data, initial weights, data order); held-out set seed {s['held_out_seed']}",
        f"- {s['train_samples']} training samples, {s['eval_samples']} held-out samples; kinds "
        + ", ".join(s["kinds"]) + f"; images {s['min_side']}-{s['max_side']} px per side, aspect ratio up to "
        f"{s['max_aspect']:g}:1",
        f"- {s['steps']} optimizer steps of batch {s['batch_size']} per variant, AdamW lr {s['learning_rate']:g} "
        f"(cosine, {100 * s['warmup_fraction']:g}% warmup), everything trained from scratch",
        f"- vision: CLIP ViT {s['image_size']}x{s['image_size']} px, patch {s['patch_size']}, width "
        f"{s['vision_hidden']}, {s['vision_layers']} layers (trained); LLM: Llama width {s['llm_hidden']}, "
        f"{s['llm_layers']} layers; resampler {s['num_queries']} queries; at most {s['max_slices']} slices",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads; torch {m['torch']}, "
        f"Python {m['python']}",
        f"- total wall time {results['wall_time_s'] / 60:.1f} min (data generation {results['data_time_s']:.1f} s, "
        "training, evaluation, all variants)",
        "",
        "`pad` keeps the resampler (not LLaVA-1.5's MLP), so it differs from `uhd` only in the image strategy. "
        "The \"prior\" row answers each question with its kind's most frequent training answer.",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    return "\n".join(lines)


def plot_accuracy(results: dict, out: str | Path) -> Path:
    """Bar chart: fine-detail accuracy per variant (left) and accuracy per kind and variant (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    kinds = results["kinds"]
    fine = [100 * (results["variants"][n]["fine_detail"]["accuracy"] or 0) for n in names]
    prior = results["prior"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bars = ax1.bar(names, fine, color=colours[:len(names)])
    for b, v in zip(bars, fine):
        ax1.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
    if prior["fine_detail"]["accuracy"] is not None:
        ax1.axhline(100 * prior["fine_detail"]["accuracy"], color="grey", ls="--", lw=1, label="prior (no image)")
        ax1.legend(loc="upper left", fontsize=8)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("fine-detail questions")
    ax1.set_ylim(0, 100)
    ax1.tick_params(axis="x", rotation=20)
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        vals = [100 * (results["variants"][n]["per_kind"].get(k, {}).get("accuracy") or 0) for k in kinds]
        ax2.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(kinds))], vals, width, label=n,
                color=colours[j % len(colours)])
    pv = [100 * (prior["per_kind"].get(k, {}).get("accuracy") or 0) for k in kinds]
    ax2.scatter(range(len(kinds)), pv, marker="_", s=400, color="black", label="prior (no image)", zorder=3)
    ax2.set_xticks(range(len(kinds)), kinds, rotation=15)
    ax2.set_ylim(0, 100)
    ax2.set_title("per question kind")
    ax2.legend(fontsize=8, ncol=2)
    s = results["settings"]
    fig.suptitle(f"tiny LLaVA-UHD ablation from scratch: {s['steps']} steps, {s['train_samples']} samples, "
                 f"seed {s['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


# ------------------------------------------------------------------------------------------------ CLI
def add_ablate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``llava-uhd ablate`` options to ``parser``."""
    d = AblationSettings()
    parser.add_argument("--out", default="ablation", help="output folder (default ./ablation)")
    parser.add_argument("--train-samples", type=positive_int, default=None,
                        help=f"training samples (default {d.train_samples})")
    parser.add_argument("--eval-samples", type=positive_int, default=None,
                        help=f"held-out samples (default {d.eval_samples})")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"optimizer steps per variant (default {d.steps})")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"batch size (default {d.batch_size})")
    parser.add_argument("--lr", type=positive_float, default=None, help=f"learning rate (default {d.learning_rate:g})")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the data, weights and order (default 0)")
    parser.add_argument("--eval-seed", type=non_negative_int, default=None,
                        help="seed of the held-out set (default seed + 1)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, metavar="VARIANT",
                        help=f"variants to run (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--kinds", nargs="+", choices=ALL_KINDS, default=None, metavar="KIND",
                        help=f"question kinds (default: {', '.join(d.kinds)})")
    parser.add_argument("--resampler-type", choices=["perceiver", "spatial"], default=None,
                        help=f"resampler kind (default {d.resampler_type})")
    parser.add_argument("--num-queries", type=positive_int, default=None,
                        help=f"resampler queries (default {d.num_queries})")
    parser.add_argument("--max-side", type=positive_int, default=None,
                        help=f"longest image side (default {d.max_side})")
    parser.add_argument("--threads", type=positive_int, default=None, help=f"torch threads (default {d.threads})")
    parser.add_argument("--quick", action="store_true",
                        help="a 1-2 minute smoke run (a few dozen samples, a handful of steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    return parser


def settings_from_args(args) -> AblationSettings:
    overrides = {k: v for k, v in {
        "train_samples": args.train_samples, "eval_samples": args.eval_samples, "steps": args.steps,
        "batch_size": args.batch_size, "learning_rate": args.lr, "eval_seed": args.eval_seed,
        "max_side": args.max_side, "threads": args.threads,
        "kinds": tuple(args.kinds) if args.kinds else None, "resampler_type": args.resampler_type,
        "num_queries": args.num_queries}.items() if v is not None}
    overrides["seed"] = args.seed
    settings = AblationSettings.quick(**overrides) if args.quick else AblationSettings(**overrides)
    for name in ("train_samples", "eval_samples", "steps", "batch_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return settings


def run_ablate(args) -> int:
    """Run the ablation from parsed `add_ablate_arguments` options; print the table."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"llava-uhd ablate: {e}", file=sys.stderr)
        return 2
    argv = getattr(args, "argv", None)
    if argv is None:  # wired as `llava-uhd ablate`: the process's own arguments, from "ablate" on
        argv = sys.argv[sys.argv.index("ablate") + 1:] if "ablate" in sys.argv else []
    command = " ".join(["llava-uhd", "ablate", *(shlex.quote(a) for a in argv)])
    results = run_ablation(settings, args.out, args.variants, progress=not args.no_progress, command=command)
    print(format_table(results))
    print(f"total wall time {results['wall_time_s'] / 60:.1f} min; wrote {Path(args.out) / 'results.json'}, "
          f"{Path(args.out) / 'accuracy.png'} and {Path(args.out) / 'RESULTS.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_ablate_arguments(argparse.ArgumentParser(prog="llava-uhd ablate", description=__doc__.split("\n")[0]))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run_ablate(args)


if __name__ == "__main__":
    sys.exit(main())
