"""`LlavaUHDProcessor`: tokenizer + image processor + the spatial schema.

Each ``<image>`` placeholder in the text becomes the image's exact token layout (paper Sec. 3.3)::

    slice(0,0) "," slice(0,1) "," ... slice(0,m-1) "\\n"
    slice(1,0) "," ...                              "\\n"
    ...
    overview

where every ``slice(r,c)`` / ``overview`` is a run of image-token ids (``num_queries`` of them with the resampler,
``h_p * w_p`` with the MLP projector) that the model overwrites with the projector's outputs, and "," / "\\n" are
the tokenizer's own tokens for those characters (as in the authors' release). With ``spatial_schema=False`` the
separators are left out; ``overview_position="before"`` puts the overview first. An image that is not sliced is a
single run of image tokens.
"""


import copy
import re
from collections.abc import Sequence

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs
from typing_extensions import Unpack

from .image_processing import LlavaUHDImageProcessor, vision_image_stats

__all__ = ["LlavaUHDProcessor", "LlavaUHDProcessorKwargs", "ChatPrompt", "image_token_layout", "VICUNA_V1_TEMPLATE",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100

# LLaVA's vicuna_v1 conversation format (the paper's stage 2), as a chat template. Images in a message's content
# list are rendered as "<image>\n" before its text, the way LLaVA writes them.
VICUNA_V1_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- set rest = messages[1:] -%}"
    "{%- else -%}{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human\\'s questions.' }}{%- set rest = messages -%}{%- endif -%}"
    "{%- for m in rest -%}"
    "{{ ' USER: ' if m['role'] == 'user' else ' ASSISTANT: ' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


# (no `from __future__ import annotations` in this module: transformers reads these TypedDicts' annotations at run time)
class LlavaUHDImagesKwargs(ImagesKwargs, total=False):
    max_slices: int | None  # a per-call slice cap


class LlavaUHDTextKwargs(TextKwargs, total=False):
    answers: str | list[str] | None  # training targets: labels cover only these


class LlavaUHDProcessorKwargs(ProcessingKwargs, total=False):
    """The keyword arguments `LlavaUHDProcessor.__call__` understands beside transformers' standard ones."""

    text_kwargs: LlavaUHDTextKwargs
    images_kwargs: LlavaUHDImagesKwargs


def image_token_layout(
    rows: int,
    cols: int,
    tokens_per_crop: Sequence[int],
    image_token_id: int,
    comma_id: int,
    newline_id: int,
    spatial_schema: bool = True,
    overview_position: str = "after",
) -> list[int]:
    """The token ids standing for one image.

    Args:
        rows, cols: the slice grid (``1 x 1``: not sliced, one crop, no overview).
        tokens_per_crop: tokens of each crop in the image processor's order: the ``rows*cols`` slices row-major,
            then the overview (if sliced).
    """
    sliced = rows * cols > 1
    expected = rows * cols + (1 if sliced else 0)
    if len(tokens_per_crop) != expected:
        raise ValueError(f"a {cols}x{rows} image has {expected} crops, got {len(tokens_per_crop)} token counts")
    if not sliced:
        return [image_token_id] * tokens_per_crop[0]
    out: list[int] = []
    overview = [image_token_id] * tokens_per_crop[-1]
    if overview_position == "before":
        out += overview
    for r in range(rows):
        for c in range(cols):
            out += [image_token_id] * tokens_per_crop[r * cols + c]
            if spatial_schema and c < cols - 1:
                out.append(comma_id)
        if spatial_schema:
            out.append(newline_id)
    if overview_position == "after":
        out += overview
    return out


class ChatPrompt(str):
    """A rendered chat prompt that remembers where the users' text lies in it: ``user_spans``, ``(start, stop)``
    character pairs. `LlavaUHDProcessor` tokenizes the special tokens typed inside those spans (``<|im_end|>``,
    ``</s>``) as the characters they are, never as control tokens; the image placeholder stays a placeholder.
    It is a `str` in every other way (printing, JSON); string operations give a plain `str`, which is tokenized
    as transformers does (special tokens parsed everywhere)."""

    user_spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, user_spans: Sequence[tuple[int, int]] = ()):
        prompt = super().__new__(cls, text)
        prompt.user_spans = tuple((int(a), int(b)) for a, b in user_spans)
        return prompt


_HIDDEN = re.compile("\ue000(\\d+)\ue001")  # a user text's stand-in while the chat template renders


def _single_token_id(tokenizer, text: str) -> int:
    """The tokenizer's own id for a separator character. SentencePiece tokenizers may prepend a word-boundary
    piece ("▁"), so the last piece is the character itself."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer has no token for {text!r}")
    return ids[-1]


class LlavaUHDProcessor(ProcessorMixin):
    r"""Prepares text and images for `LlavaUHDForConditionalGeneration`.

    Args:
        image_processor: a `LlavaUHDImageProcessor`.
        tokenizer: the LLM's tokenizer; ``image_token`` must be one of its tokens (see `add_image_token`).
        chat_template: a Jinja chat template (default: LLaVA's vicuna_v1).
        image_token: the placeholder written in prompts (``"<image>"``).
        num_queries: image tokens per crop with the resampler (64).
        projector: ``"resampler"`` or ``"mlp"`` (then every crop costs ``h_p * w_p`` tokens).
        spatial_schema, overview_position: the layout (see `image_token_layout`).

    Calling it returns ``input_ids``, ``attention_mask`` (padded on the tokenizer's ``padding_side``), the image
    processor's fields (``pixel_values``, ``patch_grid_hw``, ...) and, when ``answers`` are given, ``labels`` that
    cover only the answer tokens (prompts, image tokens and separators are ``-100``).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_queries: int = 64,
        projector: str = "resampler",
        spatial_schema: bool = True,
        overview_position: str = "after",
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("LlavaUHDProcessor needs an image_processor and a tokenizer")
        if projector not in ("resampler", "mlp"):
            raise ValueError(f"projector must be 'resampler' or 'mlp', got {projector!r}")
        self.image_token = image_token
        self.num_queries = int(num_queries)
        self.projector = projector
        self.spatial_schema = bool(spatial_schema)
        self.overview_position = overview_position
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"{image_token!r} is not a token of the tokenizer: call "
                             "LlavaUHDProcessor.add_image_token(tokenizer) first")
        self.comma_id = _single_token_id(tokenizer, ",")
        self.newline_id = _single_token_id(tokenizer, "\n")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or VICUNA_V1_TEMPLATE)

    @staticmethod
    def add_image_token(tokenizer, image_token: str = "<image>"):
        """Add the image placeholder as a special token (never split, never merged with text) and make sure the
        tokenizer can pad. Returns the tokenizer."""
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]},
                                         replace_extra_special_tokens=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        return tokenizer

    @classmethod
    def from_backbones(cls, vision, llm, gguf_file: str | None = None, **settings) -> "LlavaUHDProcessor":
        """The processor matching `LlavaUHDForConditionalGeneration.from_backbones`: the LLM's tokenizer with the
        image token added, and an image processor set up for the vision checkpoint (patch size, native size,
        mean/std). ``settings`` are the model's (``max_slices``, ``slice_size``, ``num_queries``, ``projector``,
        ``spatial_schema``, ``overview_position``, ``image_strategy``, ``fixed_grid``); others are ignored."""
        from transformers import AutoConfig, AutoTokenizer

        vision_config = AutoConfig.from_pretrained(vision)
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        slice_size = settings.get("slice_size") or int(vision_config.image_size)
        mean, std = vision_image_stats(vision)
        image_processor = LlavaUHDImageProcessor(
            size={"height": slice_size, "width": slice_size},
            patch_size=int(vision_config.patch_size),
            max_slices=settings.get("max_slices", 6),
            image_mean=mean,
            image_std=std,
            image_strategy=settings.get("image_strategy", "uhd"),
            fixed_grid=settings.get("fixed_grid", (2, 2)),
        )
        tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
        tokenizer = cls.add_image_token(AutoTokenizer.from_pretrained(llm, **tokenizer_kwargs))
        return cls(
            image_processor,
            tokenizer,
            num_queries=settings.get("num_queries", 64),
            projector=settings.get("projector", "resampler"),
            spatial_schema=settings.get("spatial_schema", True),
            overview_position=settings.get("overview_position", "after"),
        )

    def tokens_per_crop(self, grid_hw) -> int:
        return self.num_queries if self.projector == "resampler" else int(grid_hw[0]) * int(grid_hw[1])

    def image_layouts(self, image_inputs) -> list[list[int]]:
        """Token ids of every image in ``image_inputs`` (the image processor's output)."""
        grids = np.asarray(image_inputs["patch_grid_hw"])
        owners = np.asarray(image_inputs["crop_image_ids"])
        layouts = []
        for i, (rows, cols) in enumerate(np.asarray(image_inputs["image_layout"])):
            counts = [self.tokens_per_crop(g) for g in grids[owners == i]]
            layouts.append(image_token_layout(int(rows), int(cols), counts, self.image_token_id, self.comma_id,
                                              self.newline_id, self.spatial_schema, self.overview_position))
        return layouts

    def question_prompt(self, question: str, num_images: int = 1) -> "ChatPrompt":
        """The generation prompt for one user turn: ``num_images`` image placeholders, then ``question``, rendered
        with the processor's chat template (``add_generation_prompt=True``; special tokens typed in the question
        stay text: see `render_chat`). A question that already holds exactly
        ``num_images`` placeholders is used as it is (they stay where it puts them). ValueError for an empty
        question or a placeholder count that does not match."""
        placeholder = self.image_token
        if not question.replace(placeholder, "").strip():
            raise ValueError("the question is empty")
        if placeholder in question:
            if question.count(placeholder) != num_images:
                raise ValueError(f"the question holds {question.count(placeholder)} {placeholder} placeholder(s) "
                                 f"for {num_images} image(s)")
            messages = [{"role": "user", "content": question}]
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
        return self.render_chat(messages)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> ChatPrompt:
        """``apply_chat_template(messages)`` as a `ChatPrompt` that knows where the user turns' text lies, so that
        special tokens typed there stay text. Falls back to no spans (transformers' behaviour) for a template that
        rewrites the user's text rather than inserting it as it is (``| trim``, ``| upper``): the prompt is always
        exactly ``apply_chat_template(messages)``."""
        texts: list[str] = []

        def hide(text: str) -> str:
            texts.append(text)
            return f"\ue000{len(texts) - 1}\ue001"

        hidden = copy.deepcopy(messages)
        for message in hidden:
            if message.get("role") != "user":
                continue
            if isinstance(message.get("content"), str):
                message["content"] = hide(message["content"])
            elif isinstance(message.get("content"), list):
                for part in message["content"]:
                    if part.get("type") == "text" and isinstance(part.get("text"), str):
                        part["text"] = hide(part["text"])
        rendered = self.apply_chat_template(hidden, add_generation_prompt=add_generation_prompt)
        plain = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        found = [int(m.group(1)) for m in _HIDDEN.finditer(rendered)]
        if sorted(found) != list(range(len(texts))):
            return ChatPrompt(plain)
        pieces, spans, length, last = [], [], 0, 0
        for m in _HIDDEN.finditer(rendered):
            pieces += [rendered[last:m.start()], texts[int(m.group(1))]]
            length += m.start() - last
            spans.append((length, length + len(pieces[-1])))
            length += len(pieces[-1])
            last = m.end()
        pieces.append(rendered[last:])
        if "".join(pieces) != plain:  # the template changed the text it was given (| trim, | upper, ...)
            return ChatPrompt(plain)
        return ChatPrompt("".join(pieces), spans)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (image placeholders still one token each). Inside a `ChatPrompt`'s user spans,
        special tokens other than the image placeholder are tokenized as plain text (special-token parsing off,
        as a chat template means user text to be read)."""
        literal = self._literal_specials(text)
        if not literal:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        ids, last = [], 0
        for start, stop in literal:  # the tokenizer splits at special tokens anyway: the pieces between are as one
            ids += self.tokenizer(text[last:start], add_special_tokens=False)["input_ids"]
            ids += self.tokenizer(text[start:stop], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            last = stop
        ids += self.tokenizer(text[last:], add_special_tokens=False)["input_ids"]
        if add_special_tokens:  # the tokenizer's own prefix / suffix (BOS, ...), found around a probe
            probe = self.tokenizer(".", add_special_tokens=False)["input_ids"]
            full = self.tokenizer(".", add_special_tokens=True)["input_ids"]
            at = next(k for k in range(len(full) - len(probe) + 1) if full[k:k + len(probe)] == probe)
            ids = full[:at] + ids + full[at + len(probe):]
        return ids

    def _literal_specials(self, text: str) -> list[tuple[int, int]]:
        """``(start, stop)`` of every special token written inside a user span of ``text``, in order."""
        spans = getattr(text, "user_spans", ())
        if not spans:
            return []
        specials = sorted({t.content for t in self.tokenizer.added_tokens_decoder.values()
                           if t.special and t.content and t.content != self.image_token}, key=len, reverse=True)
        if not specials:
            return []
        pattern = re.compile("|".join(re.escape(t) for t in specials))
        return [m.span() for start, stop in spans for m in pattern.finditer(text, start, stop)]

    def count_prompt_tokens(self, prompt: str, image_sizes: Sequence[tuple[int, int]],
                            max_slices: int | None = None) -> int:
        """The length in tokens of ``prompt`` once its ``<image>`` placeholders are expanded for images of
        ``image_sizes`` (``(width, height)`` each): what `__call__` will make of it, known without any pixel."""
        ids = self.encode_text(prompt)
        return len(ids) - len(image_sizes) + sum(self.num_image_tokens(w, h, max_slices) for w, h in image_sizes)

    def num_image_tokens(self, width: int, height: int, max_slices: int | None = None) -> int:
        """LLM tokens one ``width x height`` image costs, known before processing it."""
        plan = self.image_processor.plan(width, height, max_slices)
        return len(image_token_layout(plan.rows, plan.cols, [self.tokens_per_crop(g) for g in plan.patch_grids],
                                      self.image_token_id, self.comma_id, self.newline_id, self.spatial_schema,
                                      self.overview_position))

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs: Unpack[LlavaUHDProcessorKwargs]
                 ) -> BatchFeature:
        """Tokenize ``text`` (one prompt or a batch), expanding each ``<image>`` into its image's layout.

        Images (a list, or one list per prompt as ``apply_chat_template`` passes them) are matched to placeholders
        in reading order across the batch (sample 0's images first). Keyword arguments are merged the way
        transformers merges processor kwargs (flat, or in ``text_kwargs`` / ``images_kwargs``): ``max_slices``
        (a per-call slice cap), ``answers`` (one per prompt: each answer and an end-of-sequence token are appended
        and ``labels`` mark only them), ``padding_side``, ``add_special_tokens``, ``return_tensors`` (default
        ``"pt"``; None gives numpy). Prompts are padded to the longest, never truncated (a cut would split an
        image's tokens). ``videos`` and ``audio`` are refused: LLaVA-UHD reads images and text.
        """
        for name, value in (("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(f"LLaVA-UHD reads images and text; {name} were given")
        merged = self._merge_kwargs(LlavaUHDProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                    **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        # what the caller asked for, flat or in text_kwargs (the merged kwargs also hold the tokenizer's saved
        # defaults, and a tokenizer_config.json that records a max_length must not make every call fail)
        asked = {**kwargs, **(kwargs.get("text_kwargs") or {})}
        if asked.get("truncation") or asked.get("max_length") is not None:
            raise ValueError("LlavaUHDProcessor does not truncate (a cut could split an image's tokens); shorten "
                             "the prompt instead")
        return_tensors = text_kwargs.get("return_tensors", "pt")
        answers = text_kwargs.get("answers")
        if text is None:
            raise ValueError("text is required (put an <image> placeholder where each image goes)")
        texts = [text] if isinstance(text, str) else list(text)
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(texts):
                raise ValueError(f"got {len(answers)} answers for {len(texts)} prompts")
        image_inputs = {}
        layouts: list[list[int]] = []
        if images is not None:
            image_inputs = self.image_processor(images, max_slices=images_kwargs.get("max_slices"),
                                                return_tensors=return_tensors)
            layouts = self.image_layouts(image_inputs)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(layouts):
            raise ValueError(f"the text has {n_placeholders} {self.image_token} placeholder(s) but "
                             f"{len(layouts)} image(s) were given")
        add_special_tokens = text_kwargs.get("add_special_tokens", True)
        sequences, label_seqs = [], []
        next_image = 0
        for k, t in enumerate(texts):
            ids: list[int] = []
            for token in self.encode_text(t, add_special_tokens=add_special_tokens):
                if token == self.image_token_id:
                    ids += layouts[next_image]
                    next_image += 1
                else:
                    ids.append(token)
            labels = [IGNORE_INDEX] * len(ids)
            if answers is not None:
                answer = self.tokenizer(answers[k], add_special_tokens=False)["input_ids"]
                answer = answer + [self.tokenizer.eos_token_id]
                ids, labels = ids + answer, labels + answer
            sequences.append(ids)
            label_seqs.append(labels)
        data = self._pad(sequences, label_seqs if answers is not None else None,
                         text_kwargs.get("padding_side") or self.tokenizer.padding_side)
        data.update({k: v for k, v in image_inputs.items()})
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """The LLM tokens (image tokens and separators) and ViT patches each image costs, from its
        ``(height, width)`` alone, before any pixel is processed: what serving engines plan batches with."""
        if image_sizes is None:
            return MultiModalData()
        max_slices = kwargs.get("max_slices")
        tokens, patches = [], []
        for height, width in image_sizes:
            tokens.append(self.num_image_tokens(int(width), int(height), max_slices))
            patches.append(self.image_processor.plan(int(width), int(height), max_slices).num_patches)
        return MultiModalData(num_image_tokens=tokens, num_image_patches=patches)

    def _pad(self, sequences, label_seqs, side: str) -> dict:
        length = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def pad(seq, value):
            fill = [value] * (length - len(seq))
            return fill + seq if side == "left" else seq + fill

        data = {
            "input_ids": np.asarray([pad(s, pad_id) for s in sequences], dtype=np.int64),
            "attention_mask": np.asarray([pad([1] * len(s), 0) for s in sequences], dtype=np.int64),
        }
        if label_seqs is not None:
            data["labels"] = np.asarray([pad(s, IGNORE_INDEX) for s in label_seqs], dtype=np.int64)
        return data

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask"] + list(self.image_processor.model_input_names)
