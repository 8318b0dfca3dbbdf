"""``llava-uhd chat`` (`llava_uhd.serve.chat`): the conversation against ``model.generate`` over the same messages,
the commands of a session, and a real session in a pseudo-terminal."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time

import pytest
from serve_helpers import picture, save_tiny

from llava_uhd.serve.chat import ANSWER_PROMPT, USER_PROMPT, Conversation, chat_session
from llava_uhd.serve.generation import GenerationSettings

NEW = 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chat")
    model, processor = save_tiny(folder)
    picture(90, 50, seed=0).save(folder / "a.png")
    picture(40, 120, seed=2).save(folder / "b.png")
    return folder, model, processor


def _user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _reference(model, processor, messages, images):
    """The greedy answer to ``messages`` straight through the chat template and ``model.generate``, and the
    prompt's length."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=[prompt])
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    length = inputs["input_ids"].shape[1]
    return processor.tokenizer.decode(out[0, length:], skip_special_tokens=True).strip(), length


def test_conversation_keeps_the_history(tiny_dir):
    folder, model, processor = tiny_dir
    a, b = picture(90, 50, seed=0), picture(40, 120, seed=2)
    settings = GenerationSettings(max_new_tokens=NEW)
    chat = Conversation(processor, [folder / "a.png"])
    first = chat.reply(model, "What colour?", settings)
    want1, length1 = _reference(model, processor, [_user("What colour?", 1)], [a])
    assert (first.text, first.prompt_tokens) == (want1, length1)
    second = chat.reply(model, "How many circles?", settings)
    history = [_user("What colour?", 1), _assistant(want1), _user("How many circles?")]
    want2, length2 = _reference(model, processor, history, [a])
    assert (second.text, second.prompt_tokens) == (want2, length2) and length2 > length1 + 3
    # /image: into the next turn only
    chat.add_image(folder / "b.png")
    third = chat.reply(model, "What shape?", settings)
    history += [_assistant(want2), _user("What shape?", 1)]
    assert third.text == _reference(model, processor, history, [a, b])[0] and chat.turns == 3
    # /reset: the turns go, every image of the session goes into the next turn
    chat.reset()
    assert chat.turns == 0 and chat.pending_images == 2
    fresh = chat.reply(model, "What colour?", settings)
    assert fresh.text == _reference(model, processor, [_user("What colour?", 2)], [a, b])[0]
    # too long for the context: an error, and nothing is kept
    limit = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="too long"):
        chat.reply(model, "And now?", GenerationSettings(max_new_tokens=limit))
    assert chat.turns == 1 and chat.messages[-1] == _assistant(fresh.text)
    with pytest.raises(ValueError, match="no such image file"):
        chat.add_image(folder / "missing.png")
    with pytest.raises(ValueError, match="reserved for images"):
        chat.reply(model, "<image> here?", settings)
    assert chat.pending_images == 0


def test_session_commands(tiny_dir):
    """A scripted session: every line is a turn or a command; mistakes are one line each and the chat goes on."""
    folder, model, processor = tiny_dir
    lines = iter(["What colour?", "/image missing.png", "/image", f"/image {folder / 'b.png'}", "", "/wat",
                  "What shape?", "/reset", "/help", "What colour?", "/quit", "never read"])
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return next(lines)

    out, err = io.StringIO(), io.StringIO()
    chat = Conversation(processor, [folder / "a.png"])
    assert chat_session(chat, model, GenerationSettings(max_new_tokens=NEW), read=read, out=out, err=err,
                        verbose=True) == 0
    assert next(lines) == "never read" and set(prompts) == {USER_PROMPT}
    a, b = picture(90, 50, seed=0), picture(40, 120, seed=2)
    want1, length1 = _reference(model, processor, [_user("What colour?", 1)], [a])
    history = [_user("What colour?", 1), _assistant(want1), _user("What shape?", 1)]
    want2, length2 = _reference(model, processor, history, [a, b])
    want3, length3 = _reference(model, processor, [_user("What colour?", 2)], [a, b])
    assert out.getvalue() == "".join(f"{ANSWER_PROMPT}{w}\n" for w in (want1, want2, want3))
    notes = err.getvalue().splitlines()
    assert notes[0] == f"[turn 1: prompt {length1} tokens, {notes[0].split(', ')[1]}, {notes[0].split(', ')[2]}"
    assert notes[1] == "error: no such image file: 'missing.png'" and notes[2] == "usage: /image PATH"
    assert notes[3].startswith(f"added {folder / 'b.png'} (40x120)") and notes[4].startswith("error: unknown command")
    assert f"prompt {length2} tokens" in notes[5] and notes[6].startswith("history cleared; 2 image(s)")
    assert notes[7].startswith("commands:") and f"prompt {length3} tokens" in notes[8] and len(notes) == 9
    # end of input ends the chat too
    assert chat_session(chat, model, GenerationSettings(max_new_tokens=NEW), read=lambda p: (_ for _ in ()).throw(
        EOFError), out=out, err=err) == 0


def _read_until(fd, pattern: str, seen: bytearray, timeout: float = 240.0) -> str:
    """Read the terminal's output into ``seen`` until ``pattern`` matches its text (after the part already
    matched); returns the text from where the previous match ended."""
    deadline = time.monotonic() + timeout
    while True:
        text = seen.decode("utf-8", "replace")
        if re.search(pattern, text):
            return text
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {pattern!r}; the terminal showed:\n{text[-3000:]}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the chat ended before {pattern!r}; the terminal showed:\n{text[-3000:]}")
        seen += chunk


@pytest.mark.slow
def test_chat_in_a_terminal(tiny_dir):
    """``python -m llava_uhd.cli chat`` in a pseudo-terminal: two turns, both answers as ``model.generate`` gives
    them for the conversation so far (the second prompt holds the first exchange), then /quit."""
    import termios

    folder, model, processor = tiny_dir
    a = picture(90, 50, seed=0)
    want1, length1 = _reference(model, processor, [_user("What colour?", 1)], [a])
    want2, length2 = _reference(model, processor, [_user("What colour?", 1), _assistant(want1),
                                                   _user("How many circles?")], [a])
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # output as written: no "\n" -> "\r\n", so the answers compare byte for byte
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "TERM": "dumb"}
    child = subprocess.Popen([sys.executable, "-m", "llava_uhd.cli", "chat", "--model", str(folder), "--image",
                              str(folder / "a.png"), "--max-new-tokens", str(NEW), "--verbose"],
                             stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, re.escape(USER_PROMPT), seen)
        os.write(master, b"What colour?\n")
        _read_until(master, r"\[turn 1: .*\]", seen)
        os.write(master, b"How many circles?\n")
        text = _read_until(master, r"\[turn 2: .*\]", seen)
        os.write(master, b"/quit\n")
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(master)
    assert f"{ANSWER_PROMPT}{want1}\n" in text and f"{ANSWER_PROMPT}{want2}\n" in text
    assert f"[turn 1: prompt {length1} tokens" in text and f"[turn 2: prompt {length2} tokens" in text
    assert "Traceback" not in text
