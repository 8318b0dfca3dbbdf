"""Conversation templates for training: a conversation in, token ids and labels out.

A conversation is a list of turns ``{"role": "system" | "user" | "assistant", "content": str}`` (an optional system
turn first, then user and assistant turns alternating, starting with the user). Image placeholders (``<image>``)
stay in the text: they are single special tokens here and are expanded into each image's LLaVA-UHD token layout
later (`llava_uhd.data.llava_data`).

Templates (`TEMPLATES`):

- ``"plain"`` (stage 1, LLaVA's ``preprocess_plain``): the human turn is replaced by the image placeholder(s) alone
  (its text is dropped), followed directly by the caption and the tokenizer's EOS token. Only the caption and EOS
  are trained. Exactly one human and one assistant turn, with at least one image.
- ``"vicuna_v1"`` (stage 2, the paper's): the library's `llava_uhd.processing.VICUNA_V1_TEMPLATE`, i.e.
  ``"{system} USER: {q} ASSISTANT: {a}</s> USER: ..."`` with LLaVA's default system prompt. The literal ``</s>``
  closing each answer is rendered as the tokenizer's own EOS token (identical for Llama/Vicuna tokenizers, whose EOS
  is ``</s>``; for others it keeps "end of answer" a single EOS token instead of four characters).
- ``"chat_template"``: the tokenizer's own chat template (e.g. SmolLM2's ChatML).

Which tokens are trained: every assistant answer and the end-of-turn / EOS marker that closes it (as LLaVA does);
system prompt, user turns, role markers and image placeholders are ``-100``. Every assistant turn of a multi-turn
conversation is trained.

How answer spans are found (``vicuna_v1`` and ``chat_template``): the conversation is rendered incrementally. For
assistant turn ``i``, ``prefix = render(turns[:i], add_generation_prompt=True)`` is the text up to where the model
starts generating and ``upto = render(turns[:i+1])`` includes the answer; the answer span is
``upto[len(prefix):]`` with trailing whitespace after the end-of-turn marker removed (ChatML's ``"\\n"`` after
``<|im_end|>`` is not trained). The template must be prefix-stable (each partial rendering a prefix of the next and
of the whole conversation); templates that rewrite earlier turns (e.g. dropping earlier reasoning) are refused with
a `ValueError`. This works for any template, with or without ``{% generation %}`` markers, so
``return_assistant_tokens_mask`` is not needed.

Character spans become token labels through the fast tokenizer's offset mapping on the whole rendered text (so the
tokens are exactly those of tokenizing the conversation at once, as at inference): a token is trained if its
characters overlap an answer span (the token ``" red"`` after ``"ASSISTANT:"`` carries the answer's first word and is
trained). Tokenizers without offsets fall back to tokenizing the prompt and answer pieces separately.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..processing import IGNORE_INDEX, VICUNA_V1_TEMPLATE

__all__ = ["TEMPLATES", "IGNORE_INDEX", "render_conversation", "tokenize_conversation", "vicuna_v1_template"]

TEMPLATES = ("plain", "vicuna_v1", "chat_template")

_EOS_LITERAL = "{{ '</s>' }}"


def vicuna_v1_template() -> str:
    """`VICUNA_V1_TEMPLATE` with its literal ``</s>`` replaced by the tokenizer's ``eos_token``."""
    if _EOS_LITERAL not in VICUNA_V1_TEMPLATE:  # the library's template changed: fail loudly, never train on text
        raise RuntimeError("llava_uhd.processing.VICUNA_V1_TEMPLATE no longer closes answers with {{ '</s>' }}")
    return VICUNA_V1_TEMPLATE.replace(_EOS_LITERAL, "{{ eos_token }}")


def _check_turns(turns: Sequence[dict]) -> None:
    if not turns:
        raise ValueError("empty conversation")
    roles = [t["role"] for t in turns]
    start = 1 if roles[0] == "system" else 0
    for k, role in enumerate(roles[start:], start):
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {k} is from {role!r} but {expected!r} was expected (turns must alternate "
                             "human/gpt, starting with human, after an optional system turn)")
    if "assistant" not in roles:
        raise ValueError("no assistant (gpt) turn: nothing to train on")


def _render(tokenizer, template: str, turns, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(turns), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _chat_template_of(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError("template='chat_template' needs a tokenizer with a chat_template")
    return template


def render_conversation(turns: Sequence[dict], tokenizer, template: str = "vicuna_v1",
                        image_token: str = "<image>") -> tuple[str, list[tuple[int, int]], bool, bool]:
    """Render ``turns`` as text with the character spans to train.

    Returns ``(text, spans, add_special_tokens, append_eos)``: tokenize ``text`` (with the tokenizer's own special
    tokens, e.g. BOS, when ``add_special_tokens``), train the tokens overlapping ``spans``, and append a trained EOS
    id when ``append_eos`` (``plain``).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES}")
    _check_turns(turns)
    if template == "plain":
        body = [t for t in turns if t["role"] != "system"]
        if len(body) != 2:
            raise ValueError(f"the plain template takes one human and one gpt turn, got {len(body)} turns")
        n_images = body[0]["content"].count(image_token)
        if n_images == 0:
            raise ValueError(f"the plain template needs an image ({image_token} in the human turn)")
        prompt = image_token * n_images  # LLaVA's preprocess_plain: the human text is dropped
        text = prompt + body[1]["content"]
        return text, [(len(prompt), len(text))], True, True
    if template == "vicuna_v1":
        if tokenizer.eos_token is None:
            raise ValueError("the vicuna_v1 template needs a tokenizer with an eos_token")
        jinja, add_special = vicuna_v1_template(), True
    else:
        jinja, add_special = _chat_template_of(tokenizer), False  # the template writes its own BOS, if any
    text = _render(tokenizer, jinja, turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix = _render(tokenizer, jinja, turns[:i], True)
        upto = _render(tokenizer, jinja, turns[:i + 1], False)
        if not upto.startswith(prefix) or not text.startswith(upto):
            raise ValueError(f"the {template} template is not prefix-stable (rendering turn {i} changes earlier "
                             "text), so answer spans cannot be located")
        end = len(upto.rstrip())
        if end <= len(prefix):
            raise ValueError(f"the {template} template renders assistant turn {i} as nothing")
        spans.append((len(prefix), end))
    return text, spans, add_special, False


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool):
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    if offsets is not None:
        ids = list(enc["input_ids"])
        trained = [e > s and any(s < se and e > ss for ss, se in spans) for s, e in offsets]
        return ids, trained
    # No offsets (not a fast tokenizer): tokenize the pieces between span boundaries separately.
    ids, trained, pos = [], [], 0
    cuts = []
    for ss, se in spans:
        cuts += [(pos, ss, False), (ss, se, True)]
        pos = se
    cuts.append((pos, len(text), False))
    first = True
    for a, b, is_answer in cuts:
        if b <= a and not (first and add_special_tokens):
            continue
        piece = tokenizer(text[a:b], add_special_tokens=first and add_special_tokens)["input_ids"]
        ids += piece
        trained += [is_answer] * len(piece)
        first = False
    return ids, trained


def tokenize_conversation(turns: Sequence[dict], tokenizer, template: str = "vicuna_v1",
                          image_token: str = "<image>") -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` except the answers and the EOS / end-of-turn closing each) of a conversation.

    Image placeholders stay single tokens (``tokenizer``'s id for ``image_token``)."""
    text, spans, add_special, append_eos = render_conversation(turns, tokenizer, template, image_token)
    ids, trained = _encode(tokenizer, text, spans, add_special)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the {template} template needs a tokenizer with an eos_token")
        ids.append(tokenizer.eos_token_id)
        trained.append(True)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
    return ids, labels
