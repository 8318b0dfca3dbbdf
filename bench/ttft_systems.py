"""The three systems `bench/ttft.py` compares, built from one configuration and sharing their weights.

LLaVA-UHD (this package), transformers' `LlavaNextForConditionalGeneration` (anyres, 336 tiles) and
`LlavaForConditionalGeneration` (LLaVA-1.5: pad to a square, one 336 view) get the *same* CLIP-L/14-336-shaped
vision tower and the same Llama-shaped LLM: the modules are built once (random weights) and assigned into the
other two models, so only the projectors (UHD's resampler, the peers' 2-layer MLPs) and NeXT's ``image_newline``
differ. Each system comes with its own processor: LLaVA-UHD's, transformers' `LlavaNextProcessor` over
`LlavaNextImageProcessorPil`, `LlavaProcessor` over `LlavaImageProcessorPil` with ``do_pad=True``; one small
word-level tokenizer (built here, no download) serves all three.

    from ttft_systems import SCALES, build_systems
    systems = build_systems(SCALES["quick"], dtype=torch.bfloat16)
    inputs = systems["llava-uhd"].prepare(image)          # the system's processor: image + prompt
    systems["llava-uhd"].model.generate(**inputs, max_new_tokens=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_uhd import LlavaUHDConfig, LlavaUHDForConditionalGeneration
from llava_uhd.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, LlavaUHDImageProcessor
from llava_uhd.peers import LLAVA_NEXT_GRID_PINPOINTS
from llava_uhd.processing import LlavaUHDProcessor

PROMPT = "USER: <image>\nWhat is shown in this image? Describe it in detail. ASSISTANT:"
SYSTEMS = ("llava-uhd", "llava-next", "llava-1.5")


@dataclass(frozen=True)
class Scale:
    """A model scale: the CLIP-L/14-336-shaped tower's depth and the Llama-shaped LLM's shape."""

    name: str
    vision_layers: int
    llm_hidden: int
    llm_layers: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    vocab_size: int = 32000
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_heads: int = 16
    image_size: int = 336


SCALES: dict[str, Scale] = {s.name: s for s in (
    # The quick CPU scale: CLIP-L/14-336 cut to 3 layers, a 4-layer Llama of width 2048.
    Scale("quick", 3, 2048, 4, 5632, 16, 16),
    # Realistic: the full 24-layer CLIP-L/14-336 and a Llama-3.2-1B-shaped LLM (vocabulary cut to 32k).
    Scale("1b", 24, 2048, 16, 8192, 32, 8),
    # Vicuna-7B / LLaMA-2-7B shaped.
    Scale("7b", 24, 4096, 32, 11008, 32, 32),
    # For tests: everything tiny (the tower still sees 336x336 crops of 14-pixel patches).
    Scale("tiny", 2, 64, 1, 128, 2, 2, vocab_size=512, vision_hidden=32, vision_intermediate=64, vision_heads=2),
)}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for `PROMPT` (ids well inside ``vocab_size``), with ``<image>``, ``,`` and ``\\n`` as
    single tokens (what LLaVA-UHD's spatial schema needs)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = sorted({w for w in PROMPT.replace("<image>", " ").replace("?", " ? ").replace(".", " . ").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    if len(vocab) + 3 > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the prompt's {len(vocab) + 3} tokens")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_tokens([AddedToken(",", normalized=False), AddedToken("\n", normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    return LlavaUHDProcessor.add_image_token(tokenizer)


@dataclass
class System:
    """One model with its processor; ``prepare(image)`` runs the processor (the preprocessing that TTFT counts)."""

    name: str
    model: torch.nn.Module
    processor: Any
    vision: torch.nn.Module  # the module whose forward is the vision tower's time
    projector: torch.nn.Module
    projector_methods: tuple[str, ...]  # the projector's methods the model may call (timed once when nested)

    def prepare(self, image) -> dict:
        inputs = self.processor(images=[image], text=[PROMPT], return_tensors="pt")
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return dict(inputs)

    def to(self, device) -> "System":
        self.model.to(device)
        return self


def _configs(scale: Scale, vocab_size: int):
    vision = CLIPVisionConfig(hidden_size=scale.vision_hidden, intermediate_size=scale.vision_intermediate,
                              num_hidden_layers=scale.vision_layers, num_attention_heads=scale.vision_heads,
                              image_size=scale.image_size, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=scale.llm_hidden, intermediate_size=scale.llm_intermediate,
                       num_hidden_layers=scale.llm_layers, num_attention_heads=scale.llm_heads,
                       num_key_value_heads=scale.llm_kv_heads, vocab_size=vocab_size, max_position_embeddings=8192)
    return vision, text


def _materialize(module: torch.nn.Module, dtype: torch.dtype, std: float = 0.02) -> None:
    """Give a module built on the meta device real random weights (its buffers hold none: projectors only)."""
    module.to_empty(device="cpu")
    for p in module.parameters():
        with torch.no_grad():
            p.normal_(0.0, std) if p.dim() > 1 else p.zero_()
    module.to(dtype)


def build_systems(scale: Scale, dtype: torch.dtype = torch.bfloat16, max_slices: int = 6,
                  resampler_attention: str = "plain", seed: int = 0) -> dict[str, System]:
    """The three systems of `SYSTEMS` on the CPU, in ``dtype``, sharing the tower and the LLM (see the module
    docstring). Weights are random (seeded)."""
    tokenizer = build_tokenizer(scale.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision, text = _configs(scale, scale.vocab_size)
    side = scale.image_size
    torch.manual_seed(seed)

    uhd_processor = LlavaUHDProcessor(
        LlavaUHDImageProcessor(size={"height": side, "width": side}, patch_size=14, max_slices=max_slices,
                               image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
        tokenizer, num_queries=64)
    uhd_config = LlavaUHDConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                image_token_id=image_token_id, num_queries=64, max_slices=max_slices,
                                vision_feature_layer=-2, resampler_attention=resampler_attention)
    uhd = LlavaUHDForConditionalGeneration._from_config(uhd_config, dtype=dtype).eval()
    clip = uhd.vision_tower.vision_model
    llm_body, lm_head = uhd.language_model.model, uhd.language_model.lm_head

    pinpoints = [[h // 336 * side, w // 336 * side] for h, w in LLAVA_NEXT_GRID_PINPOINTS]
    next_config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                  image_token_index=image_token_id, image_grid_pinpoints=pinpoints,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    llava_config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=image_token_id, vision_feature_layer=-2,
                               vision_feature_select_strategy="default")
    peers = {}
    for name, cls, config in (("llava-next", LlavaNextForConditionalGeneration, next_config),
                              ("llava-1.5", LlavaForConditionalGeneration, llava_config)):
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = cls(config)
        # The shared modules replace the meta ones before anything is allocated.
        model.model.vision_tower = clip
        model.model.language_model = llm_body
        model.lm_head = lm_head
        _materialize(model.model.multi_modal_projector, dtype)
        if hasattr(model.model, "image_newline"):
            model.model.image_newline = torch.nn.Parameter(torch.randn(scale.llm_hidden, dtype=dtype) * 0.02)
        peers[name] = model.eval()

    next_processor = LlavaNextProcessor(
        LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                   image_grid_pinpoints=pinpoints, image_mean=OPENAI_CLIP_MEAN,
                                   image_std=OPENAI_CLIP_STD),
        tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    llava_processor = LlavaProcessor(
        LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                               do_pad=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
        tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    return {
        "llava-uhd": System("llava-uhd", uhd, uhd_processor, uhd.vision_tower, uhd.projector, ("forward", "forward_split")),
        "llava-next": System("llava-next", peers["llava-next"], next_processor, clip,
                             peers["llava-next"].model.multi_modal_projector, ("forward",)),
        "llava-1.5": System("llava-1.5", peers["llava-1.5"], llava_processor, clip,
                            peers["llava-1.5"].model.multi_modal_projector, ("forward",)),
    }


def llm_decoder_params(system: System) -> int:
    """Parameters the LLM's prefill multiplies by (decoder layers and final norm; the embedding is a lookup and
    generation's head runs on the last token only)."""
    body = system.model.language_model.model if isinstance(system.model, LlavaUHDForConditionalGeneration) \
        else system.model.model.language_model
    return sum(p.numel() for n, p in body.named_parameters() if not n.startswith("embed_tokens"))


class StageTimer:
    """Times the vision tower, the projector and the LLM's prefill of each run by wrapping the modules' methods
    (outermost call only, so a tower called inside another timed tower counts once). ``llm`` is the decoder body:
    the first call of a generation is the prefill."""

    def __init__(self, systems: dict[str, System], sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.times: dict[str, float] = {}
        self._depth: dict[str, int] = {}
        seen: set[tuple[int, str]] = set()
        for s in systems.values():
            llm = s.model.language_model.model if s.name == "llava-uhd" else s.model.model.language_model
            timed = [("vision", s.vision, "forward"), ("llm", llm, "forward"),
                     *(("projector", s.projector, m) for m in s.projector_methods)]
            for stage, module, method in timed:
                if (id(module), method) not in seen:
                    seen.add((id(module), method))
                    setattr(module, method, self._wrap(stage, getattr(module, method)))

    def reset(self) -> None:
        self.times = {"vision": 0.0, "projector": 0.0, "llm": 0.0}
        self._depth = {"vision": 0, "projector": 0, "llm": 0}
        self._llm_calls = 0

    def _wrap(self, stage: str, fn):
        import time

        def timed(*args, **kwargs):
            if not self._depth or self._depth[stage] or (stage == "llm" and self._llm_calls):
                return fn(*args, **kwargs)  # nested, untimed, or a decoding step after the prefill
            self._depth[stage] += 1
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.times[stage] += time.perf_counter() - start
                self._depth[stage] -= 1
                if stage == "llm":
                    self._llm_calls += 1
        return timed
