"""``llava-uhd eval --model DIR --task TASK --data DIR``: answer a standard benchmark and score it.

    llava-uhd eval --model out/stage2 --task textvqa --data eval/textvqa --device cuda --dtype bfloat16
    llava-uhd eval --model out/stage2 --task mmbench --data eval/mmbench --limit 50 --out results/mmb
    llava-uhd eval --task pope --data eval/pope --resize-long-side 1024       # as the authors' release evaluated

The task's files are read from ``--data`` in the layout `llava_uhd.eval.tasks` documents (LLaVA's evaluation
files where LLaVA has them; nothing is downloaded). Questions are answered greedily (unless the decoding options
say otherwise) in batches formed by prompt tokens exactly as ``llava-uhd infer`` forms them (`plan_batches`,
`llava_uhd.serve.generation.generate`), each asked as ``llava-uhd ask`` asks it. Written to ``--out`` (default
``eval_results/<task>``): ``<task>_answers.jsonl`` (LLaVA's answer lines), ``<task>_metrics.json`` and, for a
benchmark scored on a server, its submission file; one summary line goes to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from ..commandline import positive_int
from ..serve.options import (CommandError, add_generation_arguments, add_model_arguments, command_main,
                             generation_settings, load_from_args, prepare_runtime, run_command)
from .tasks import TASKS, TaskDataError

__all__ = ["add_eval_arguments", "run_eval", "resized_size", "answer_items", "main"]

PROG = "llava-uhd eval"
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA's evaluation scripts' default


def resized_size(width: int, height: int, long_side: int | None) -> tuple[int, int]:
    """The size an image is resized to with ``--resize-long-side``: the long side set to ``long_side`` (up or down)
    and the other scaled and truncated, as the authors' release (``resize_image_keep_ratio``) does; at least 1
    pixel. None keeps the size."""
    if long_side is None:
        return width, height
    if width > height:
        return long_side, max(1, int(long_side / width * height))
    return max(1, int(long_side / height * width)), long_side


def _header_size(image) -> tuple[int, int]:
    """``(width, height)`` after the EXIF orientation of a path or encoded bytes, from the header alone."""
    from ..serve.infer import image_size

    if not isinstance(image, bytes):
        return image_size(image)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"an embedded image cannot be read: {e}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _load(image, long_side: int | None):
    """The image in RGB, resized per ``--resize-long-side`` (bicubic, as the release)."""
    import numpy as np
    from PIL import Image

    from ..serve.ask import load_images

    rgb = load_images([image])[0]
    if long_side is None:
        return rgb
    if not isinstance(rgb, Image.Image):
        rgb = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    return rgb.resize(resized_size(*rgb.size, long_side), Image.Resampling.BICUBIC)


def answer_items(model, processor, items, settings, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 max_slices: int | None = None, long_side: int | None = None, progress: bool = True
                 ) -> dict[str, str]:
    """Answers to ``items`` (`llava_uhd.eval.tasks.Item`) by key. Every prompt is measured first (image sizes from
    the headers, ``--resize-long-side`` applied) and checked against the model's context; then batches of at most
    ``batch_tokens`` prompt tokens, longest first, go through `generate`. A `CommandError` names the question whose
    image or prompt does not work."""
    import torch
    from tqdm import tqdm

    from ..modeling.context import check_context, context_limit
    from ..serve import generation
    from ..serve.infer import plan_batches

    limit = context_limit(model.config)
    prompts, lengths = [], []
    for item in items:
        try:
            sizes = [resized_size(*_header_size(image), long_side) for image in item.images]
            prompt = processor.question_prompt(item.prompt, len(sizes))
            lengths.append(processor.count_prompt_tokens(prompt, sizes, max_slices))
            check_context([lengths[-1]], settings.max_new_tokens, limit)
        except ValueError as e:
            raise CommandError(f"question {item.question_id!r}: {str(e).splitlines()[0]}") from None
        prompts.append(prompt)
    answers: dict[str, str] = {}
    with tqdm(total=len(items), unit="q", desc="eval", file=sys.stderr, dynamic_ncols=True,
              disable=not progress) as bar:
        for batch in plan_batches(lengths, batch_tokens):
            try:
                images = [[_load(image, long_side) for image in items[k].images] for k in batch]
                done = generation.generate(model, processor, [prompts[k] for k in batch], images, settings,
                                           max_slices=max_slices)
            except ValueError as e:
                names = ", ".join(repr(items[k].question_id) for k in batch[:3])
                raise CommandError(f"question(s) {names}: {str(e).splitlines()[0]}") from None
            except torch.OutOfMemoryError:
                raise CommandError(f"out of memory on a batch of {len(batch)} questions: lower --batch-tokens (now "
                                   f"{batch_tokens})") from None
            for k, result in zip(batch, done.results):
                answers[items[k].key] = result.text
            bar.update(len(batch))
    return answers


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd eval``."""
    parser.add_argument("--task", required=True, choices=sorted(TASKS), metavar="TASK",
                        help="the benchmark: " + ", ".join(f"{n} ({t.title})" for n, t in TASKS.items()))
    parser.add_argument("--data", required=True, help="the benchmark's folder, in the task's layout (see README)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N questions (MMBench: N questions with all their rotations)")
    parser.add_argument("--out", default=None, help="where the answers, metrics and submission go (default "
                                                    "eval_results/TASK)")
    parser.add_argument("--resize-long-side", type=positive_int, default=None, metavar="PIXELS",
                        help="resize every image so its long side is PIXELS before slicing (the authors' release "
                             "evaluated with 1024); off by default")
    parser.add_argument("--batch-tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                        help=f"most prompt tokens per batch, as in llava-uhd infer (default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--model-id", default=None, help="the model_id written with each answer (default: the "
                                                         "model folder's name)")
    add_model_arguments(parser)
    add_generation_arguments(parser, DEFAULT_MAX_NEW_TOKENS)
    return parser


def _summary(task, metrics: dict, n: int, files: dict[str, str]) -> str:
    if metrics.get("score") is None:
        head = f"{task.name}: {n} answers; scored on the server"
    else:
        head = f"{task.name}: {metrics['metric']} {metrics['score']:.2f} on {n} questions"
        if task.name == "mme":
            head += f" (cognition {metrics['cognition']:.2f})"
    where = ", ".join(f"{name} {path}" for name, path in files.items())
    return f"{head}; {where}"


def _eval(args) -> int:
    from ..serve.questions import short_uuid

    settings = generation_settings(args)
    task = TASKS[args.task]
    data = Path(args.data)
    if not data.is_dir():
        raise CommandError(f"no such data folder: '{data}'")
    out = Path(args.out) if args.out else Path("eval_results") / task.name
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out '{out}' is a file; give a folder")
    try:
        items = task.read(data, args.limit)
    except TaskDataError as e:
        raise CommandError(f"{task.name}: {e}") from None
    except OSError as e:
        raise CommandError(f"{task.name}: {e.filename or data}: {e.strerror or e}") from None
    if not items:
        raise CommandError(f"{task.name}: no questions in '{data}'")
    prepare_runtime(args)
    model, processor, info = load_from_args(args, PROG)
    model_id = args.model_id or info["name"]
    t0 = time.perf_counter()
    answers = answer_items(model, processor, items, settings, batch_tokens=args.batch_tokens,
                           max_slices=args.max_slices, long_side=args.resize_long_side)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    files = {"answers": str(out / f"{task.name}_answers.jsonl")}
    with open(files["answers"], "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"question_id": item.question_id, "prompt": item.prompt, "text": answers[item.key],
                                "answer_id": short_uuid(), "model_id": model_id,
                                "metadata": {"key": item.key, **item.extra}}) + "\n")
    metrics = task.score(items, answers)
    submission = task.write_submission(items, answers, out, data)
    if submission is not None:
        files["submission"] = str(submission)
    files["metrics"] = str(out / f"{task.name}_metrics.json")
    record = {"task": task.name, "title": task.title, "model_id": model_id, "answers": len(items), **metrics,
              "settings": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                           "top_p": settings.top_p, "num_beams": settings.num_beams, "max_slices": args.max_slices,
                           "resize_long_side": args.resize_long_side, "dtype": info["dtype"], "limit": args.limit},
              "seconds": round(seconds, 2), "files": files}
    Path(files["metrics"]).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(_summary(task, metrics, len(items), files))
    return 0


def run_eval(args) -> int:
    """``llava-uhd eval``: 0 when the benchmark was answered and scored, 2 on a user error (one line on stderr)."""
    return run_command(PROG, _eval, args)


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, __doc__, add_eval_arguments, run_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
