"""The language model's context window: how long a prompt plus its answer may be, checked before any work.

    limit = context_limit(model.config)                      # max_position_embeddings of the LLM, or None
    check_context([prompt_tokens], max_new_tokens=64, limit=limit)   # ValueError with the numbers when it does not fit

`LlavaUHDForConditionalGeneration.generate` runs the check on every call, before the vision tower, so a prompt
past the context is refused at once rather than answered from positions the model never learned; the serving
commands run it before decoding images.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["context_limit", "check_context"]


def context_limit(config) -> int | None:
    """The longest sequence (prompt + answer) the language model takes: its ``max_position_embeddings`` (from a
    `LlavaUHDConfig`'s ``text_config`` or an LLM config); None when the config does not say."""
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_context(lengths: Sequence[int], max_new_tokens: int | None, limit: int | None,
                  max_length: int | None = None) -> None:
    """A `ValueError` naming the prompt, its tokens, the answer's budget and the limit unless every prompt of
    ``lengths`` (image tokens included) plus ``max_new_tokens`` fits in ``limit`` tokens. Without
    ``max_new_tokens`` the budget is what ``max_length`` (a total length) leaves, at least one token."""
    if limit is None:
        return
    for k, length in enumerate(lengths):
        new = max_new_tokens if max_new_tokens is not None else max(1, (max_length or 0) - length)
        if length + new > limit:
            which = f"prompt {k}" if len(lengths) > 1 else "the prompt"
            raise ValueError(f"too long: {which} is {length} tokens (image tokens included) and up to {new} new "
                             f"tokens would follow, past the model's context of {limit} tokens; shorten the text, "
                             "use fewer images or --max-slices, or ask for fewer new tokens")
