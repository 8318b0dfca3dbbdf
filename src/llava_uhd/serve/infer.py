"""``llava-uhd infer --input questions.jsonl --output answers.jsonl``: batched answers in LLaVA's evaluation format.

    llava-uhd infer --input q.jsonl --output a.jsonl --model out/stage2 --image-folder data/ --device cuda
    llava-uhd infer --question-file q.jsonl --answers-file a.jsonl --num-chunks 8 --chunk-idx 3   # LLaVA's names

Reads question lines ``{"question_id", "image", "text"}`` and writes answer lines ``{"question_id", "prompt",
"text", "answer_id", "model_id", "metadata"}`` as LLaVA's ``model_vqa`` does (`llava_uhd.serve.questions`); each
question is asked exactly as ``llava-uhd ask`` asks it, so greedy answers are the same. Questions are batched by
tokens: sorted longest first, each batch holds prompts (visual tokens included, counted from the image sizes before
any pixel is decoded) summing to at most ``--batch-tokens`` (a longer prompt goes alone). Answers are appended as
each batch finishes; when all are in, the file is rewritten in question order. Rerunning the same command resumes:
answered question_ids are skipped and a half-written last line is cut off. A malformed line, a missing or
unreadable image or a prompt too long for the model stops the run with an error naming the line (answers so far
are kept), or with ``--skip-bad`` is skipped, counted and reported at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..commandline import non_negative_int, positive_int
from .options import (CommandError, add_generation_arguments, add_model_arguments, generation_settings,
                      load_from_args, prepare_runtime, run_command, command_main)

__all__ = ["add_infer_arguments", "run_infer", "plan_batches", "image_size", "main"]

PROG = "llava-uhd infer"
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_MAX_NEW_TOKENS = 128


def plan_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first (ties in input order), each summing to at most
    ``budget``; a length over the budget makes a batch of its own."""
    batches: list[list[int]] = []
    total = 0
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if batches and batches[-1] and total + lengths[k] <= budget:
            batches[-1].append(k)
            total += lengths[k]
        else:
            batches.append([k])
            total = lengths[k]
    return batches


def image_size(path) -> tuple[int, int]:
    """``(width, height)`` of an image file after its EXIF orientation, from its header alone. Raises
    `ValueError` naming the file when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ValueError(f"no such image file: '{path}'")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except UnidentifiedImageError:
        raise ValueError(f"'{path}': not an image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"'{path}': cannot be read: {e}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@dataclass
class _Job:
    question: object  # a questions.Question
    prompt: str
    tokens: int


class _Run:
    """One ``infer`` run: the questions still to answer, the bad ones met, the answers file."""

    def __init__(self, args, model, processor, settings, model_id: str):
        self.args, self.model, self.processor, self.settings = args, model, processor, settings
        self.model_id = model_id
        self.bad: list[tuple[int, str]] = []
        self.written = 0

    def reject(self, question, reason: str) -> None:
        """A bad line: an error naming it, or with --skip-bad one more skipped line."""
        if not self.args.skip_bad:
            raise CommandError(f"{self.args.input} line {question.line}: {reason} (--skip-bad skips such lines)")
        self.bad.append((question.line, reason))

    def jobs(self, questions) -> list[_Job]:
        """The prompts of ``questions`` and their lengths; bad ones rejected."""
        from ..modeling.context import check_context, context_limit

        limit = context_limit(self.model.config)
        jobs = []
        for q in questions:
            try:
                if q.error:
                    raise ValueError(q.error)
                sizes = [image_size(p) for p in q.images]
                prompt = self.processor.question_prompt(q.text, len(sizes))
                tokens = self.processor.count_prompt_tokens(prompt, sizes, self.args.max_slices)
                check_context([tokens], self.settings.max_new_tokens, limit)  # before its images are decoded
            except ValueError as e:
                self.reject(q, str(e))
                continue
            jobs.append(_Job(q, prompt, tokens))
        return jobs

    def answer(self, jobs: list[_Job]) -> list[tuple[object, str]]:
        """``(question, answer)`` for the jobs of one batch; a job whose images cannot be read is rejected, and a
        batch that fails is answered one job at a time so the error names its line."""
        import torch

        from .ask import load_images
        from .generation import generate

        ready = []
        for job in jobs:
            try:
                ready.append((job, load_images(job.question.images)))
            except ValueError as e:
                self.reject(job.question, str(e))
        if not ready:
            return []
        try:
            batch = generate(self.model, self.processor, [job.prompt for job, _ in ready], [im for _, im in ready],
                             self.settings, max_slices=self.args.max_slices)
        except ValueError as e:
            if len(ready) == 1:
                self.reject(ready[0][0].question, str(e))
                return []
            return [pair for job, _ in ready for pair in self.answer([job])]
        except torch.OutOfMemoryError:
            raise CommandError(f"out of memory on a batch of {len(ready)} questions "
                               f"({sum(job.tokens for job, _ in ready)} prompt tokens): lower --batch-tokens "
                               f"(now {self.args.batch_tokens})") from None
        return [(job.question, r.text) for (job, _), r in zip(ready, batch.results)]

    def run(self, jobs: list[_Job], out) -> None:
        from tqdm import tqdm

        from .questions import answer_record

        batches = plan_batches([job.tokens for job in jobs], self.args.batch_tokens)
        with tqdm(total=len(jobs), unit="q", desc="infer", file=sys.stderr, dynamic_ncols=True) as bar:
            for batch in batches:
                for question, text in self.answer([jobs[k] for k in batch]):
                    out.write(json.dumps(answer_record(question, text, self.model_id)) + "\n")
                    self.written += 1
                out.flush()
                bar.update(len(batch))


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd infer``."""
    parser.add_argument("--input", "--question-file", dest="input", required=True,
                        help='questions, one JSON object a line: {"question_id", "image", "text"}')
    parser.add_argument("--output", "--answers-file", dest="output", required=True,
                        help='answers, one JSON object a line: {"question_id", "prompt", "text", "answer_id", '
                             '"model_id", "metadata"}; an existing file is resumed')
    parser.add_argument("--image-folder", default=None,
                        help="folder the questions' image paths are relative to (default: the input file's folder)")
    parser.add_argument("--batch-tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                        help="most prompt tokens (visual tokens included) per batch; a longer prompt goes alone "
                             f"(default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed lines, unreadable images and too long prompts (counted and reported) "
                             "instead of stopping at the first")
    parser.add_argument("--model-id", default=None,
                        help="the model_id written with each answer (default: the model folder's name)")
    parser.add_argument("--num-chunks", type=positive_int, default=1,
                        help="split the questions into this many consecutive "
                                                                  "parts, as LLaVA's evaluation scripts do")
    parser.add_argument("--chunk-idx", type=non_negative_int, default=0, help="the part this run answers (0-based)")
    add_model_arguments(parser)
    add_generation_arguments(parser, DEFAULT_MAX_NEW_TOKENS)
    return parser


def _infer(args) -> int:
    from .questions import AnswersFileError, chunk, read_answers, read_questions, sort_answers

    settings = generation_settings(args)
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise CommandError(f"--chunk-idx must lie in 0..{args.num_chunks - 1}, got {args.chunk_idx}")
    if not Path(args.input).is_file():
        raise CommandError(f"no such questions file: '{args.input}'")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        raise CommandError(f"no such image folder: '{args.image_folder}'")
    try:
        questions = chunk(read_questions(args.input, args.image_folder), args.num_chunks, args.chunk_idx)
        done, cut = read_answers(args.output)
    except (ValueError, AnswersFileError) as e:  # UnicodeDecodeError is a ValueError
        raise CommandError(f"{args.input}: {e}" if isinstance(e, UnicodeDecodeError) else str(e)) from None
    except OSError as e:
        raise CommandError(f"{e.filename or args.output}: {e.strerror or e}") from None
    if cut:
        print(f"{PROG}: {args.output}: cut off a half-written last line", file=sys.stderr)
    todo = [q for q in questions if q.error or q.question_id not in done]
    t0 = time.perf_counter()
    if todo:
        prepare_runtime(args)
        model, processor, info = load_from_args(args, PROG)
        run = _Run(args, model, processor, settings, args.model_id or info["name"])
        jobs = run.jobs(todo)  # every line checked before the first answer
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a", encoding="utf-8") as out:
            try:
                run.run(jobs, out)
            except CommandError as e:
                raise CommandError(f"{e} ({run.written} answers of this run are in {args.output}: run the same "
                                   "command again to go on)") from None
        bad, written = run.bad, run.written
    else:
        bad, written = [], 0
    reordered = Path(args.output).is_file() and sort_answers(args.output, questions)
    skipped = sum(1 for q in questions if not q.error and q.question_id in done)
    summary = f"{PROG}: wrote {written} answers to {args.output} in {time.perf_counter() - t0:.1f} s"
    if skipped:
        summary += f"; {skipped} were already there"
    if reordered:
        summary += "; sorted in question order"
    print(summary, file=sys.stderr)
    if bad:
        print(f"{PROG}: skipped {len(bad)} bad line(s):", file=sys.stderr)
        for line, reason in bad[:20]:
            print(f"  line {line}: {reason}", file=sys.stderr)
        if len(bad) > 20:
            print(f"  ... and {len(bad) - 20} more", file=sys.stderr)
    return 0


def run_infer(args) -> int:
    """``llava-uhd infer``: 0 when every question of the chunk is answered (or skipped with --skip-bad), 2 on an
    error."""
    return run_command(PROG, _infer, args)


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, __doc__, add_infer_arguments, run_infer, argv)


if __name__ == "__main__":
    sys.exit(main())
