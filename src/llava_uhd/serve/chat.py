"""``llava-uhd chat --image IMG [--image IMG2] [--model DIR]``: an interactive multi-turn chat about images.

    llava-uhd chat --model out/stage2 --image photo.jpg --temperature 0.7
    conversation = Conversation(processor, ["photo.jpg"])                   # the same, as a library
    conversation.reply(model, "What is in the picture?", GenerationSettings(max_new_tokens=64)).text

The images go into the first user turn; each line typed is a turn, answered with the whole history (the
processor's chat template over the previous turns) and streamed. ``/image PATH`` adds an image to the next turn,
``/reset`` clears the history (the session's images go into the next turn again), ``/help`` lists the commands,
``/quit`` or Ctrl-D ends. A mistake (a bad path, a conversation past the model's context) is one line on stderr
and the session goes on; Ctrl-C stops an answer, which is then not kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from .options import (CommandError, add_generation_arguments, add_model_arguments, generation_settings,
                      load_from_args, prepare_runtime, run_command, command_main)

__all__ = ["Conversation", "chat_session", "add_chat_arguments", "run_chat", "main", "USER_PROMPT",
           "ANSWER_PROMPT"]

PROG = "llava-uhd chat"
DEFAULT_MAX_NEW_TOKENS = 128
USER_PROMPT = "you> "
ANSWER_PROMPT = "llava-uhd> "
HELP = ("commands: /image PATH adds an image to your next message, /reset clears the history (keeps the images), "
        "/help shows this, /quit (or Ctrl-D) ends the chat")


class Conversation:
    """The turns of a chat and its images, rendered with the processor's chat template.

    Images given at the start or added with `add_image` go, in order, into the next user turn as ``<image>``
    placeholders before its text; `reset` forgets the turns and puts every image of the session into the next
    turn again. `reply` answers a new user turn and keeps it (nothing is kept when generation fails).
    """

    def __init__(self, processor, images=()):
        self.processor = processor
        self.messages: list[dict] = []
        self._images: list = []       # every image of the session, in the order added
        self._history_images: list = []  # those the kept turns show, in placeholder order
        self._pending: list = []      # those the next user turn will show
        for image in images:
            self.add_image(image)

    @property
    def turns(self) -> int:
        """The number of exchanges (user turn + answer) kept."""
        return len(self.messages) // 2

    @property
    def pending_images(self) -> int:
        """The number of images waiting for the next user turn."""
        return len(self._pending)

    def add_image(self, image):
        """Read ``image`` (a path or anything `load_rgb` reads) for the next user turn; returns it in RGB.
        Raises `ValueError` naming the image when it is not readable."""
        from .ask import load_images

        loaded = load_images([image])[0]
        self._images.append(loaded)
        self._pending.append(loaded)
        return loaded

    def reset(self) -> None:
        """Forget the turns; every image of the session goes into the next user turn again."""
        self.messages = []
        self._history_images = []
        self._pending = list(self._images)

    def prompt(self, text: str) -> tuple[str, list]:
        """The rendered generation prompt for a new user turn ``text`` after the kept turns, and the images in the
        order of its placeholders."""
        user = {"role": "user", "content": [{"type": "image"}] * len(self._pending) + [{"type": "text", "text": text}]}
        prompt = self.processor.render_chat(self.messages + [user])  # typed special tokens stay text
        return prompt, self._history_images + self._pending

    def reply(self, model, text: str, settings, *, max_slices: int | None = None,
              on_text: Callable[[str], None] | None = None):
        """Answer the user turn ``text`` (streamed to ``on_text``) and keep the exchange. Returns the
        `Generation`; raises `ValueError` (unreadable image, too long for the model's context) keeping nothing."""
        from .generation import generate

        if self.processor.image_token in text:
            raise ValueError(f"{self.processor.image_token} is reserved for images: use /image PATH")
        prompt, images = self.prompt(text)
        result = generate(model, self.processor, [prompt], [images], settings, max_slices=max_slices,
                          on_text=on_text).results[0]
        self.messages += [
            {"role": "user", "content": [{"type": "image"}] * len(self._pending) + [{"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": result.text}]},
        ]
        self._history_images += self._pending
        self._pending = []
        return result


def _image_command(conversation: Conversation, argument: str, err) -> None:
    path = argument.strip().strip("'\"")
    if not path:
        print("usage: /image PATH", file=err)
        return
    try:
        image = conversation.add_image(path)
    except ValueError as e:
        print(f"error: {e}", file=err)
        return
    from ..image_io import rgb_size

    width, height = rgb_size(image)
    print(f"added {path} ({width}x{height}): it goes into your next message", file=err)


def chat_session(conversation: Conversation, model, settings, *, read: Callable[[str], str] = input, out=None,
                 err=None, max_slices: int | None = None, verbose: bool = False) -> int:
    """Run the chat loop until ``/quit`` or end of input: each line from ``read`` is a command or a user turn whose
    answer streams to ``out``; notices and errors go to ``err``. Returns 0."""
    out = out or sys.stdout
    err = err or sys.stderr

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    while True:
        try:
            line = read(USER_PROMPT).strip()
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D ends the chat)", file=err)
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit", "/bye"):
                return 0
            if command == "/reset":
                conversation.reset()
                print(f"history cleared; {conversation.pending_images} image(s) go into your next message", file=err)
            elif command == "/image":
                _image_command(conversation, argument, err)
            elif command == "/help":
                print(HELP, file=err)
            else:
                print(f"error: unknown command {command} ({HELP})", file=err)
            continue
        write(ANSWER_PROMPT)
        t0 = time.perf_counter()
        try:
            result = conversation.reply(model, line, settings, max_slices=max_slices, on_text=write)
        except ValueError as e:
            write("\n")
            print(f"error: {e}" + (" (/reset starts over)" if "too long" in str(e) else ""), file=err)
            continue
        except KeyboardInterrupt:
            write("\n")
            print("(interrupted: this turn is not kept)", file=err)
            continue
        write("\n")
        if verbose:
            print(f"[turn {conversation.turns}: prompt {result.prompt_tokens} tokens, {result.new_tokens} new tokens, "
                  f"{time.perf_counter() - t0:.1f} s]", file=err)


def add_chat_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd chat``."""
    parser.add_argument("--image", action="append", default=[],
                        help="an image for the first message; repeat for several (more with /image PATH later)")
    add_model_arguments(parser)
    add_generation_arguments(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="after each answer, print the prompt's and the answer's token counts and the time")
    return parser


def _chat(args) -> int:
    settings = generation_settings(args)
    prepare_runtime(args)
    from .ask import load_images

    try:
        images = load_images(args.image)  # before the model: a bad path fails in a moment
    except ValueError as e:
        raise CommandError(str(e)) from None
    model, processor, info = load_from_args(args, PROG)
    conversation = Conversation(processor, images)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"{PROG} with {info['name']}: {len(args.image)} image(s) go into your first message. {HELP}.",
          file=sys.stderr)
    return chat_session(conversation, model, settings, max_slices=args.max_slices, verbose=args.verbose)


def run_chat(args) -> int:
    """``llava-uhd chat``: 0 when the chat ends, 2 on a usage / installation / image error at the start."""
    return run_command(PROG, _chat, args)


def main(argv: list[str] | None = None) -> int:
    return command_main(PROG, __doc__, add_chat_arguments, run_chat, argv)


if __name__ == "__main__":
    sys.exit(main())
