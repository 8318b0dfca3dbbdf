"""`LlavaUHDForConditionalGeneration`: adaptive vision encoder -> shared resampler -> causal LLM.

Data flow for a batch (shapes as ``(P, ...)`` for packed patches, ``K`` crops, ``T`` text positions)::

    pixel_values (P, 3*p*p), patch_grid_hw (K, 2)
      -> AdaptiveVisionEncoder            (P, D_v)     every crop at its own patch grid, penultimate layer
      -> PerceiverResampler / MLP         K x (n_k, H)  64 tokens per crop (resampler) or h_p*w_p (MLP)
      -> scattered, in crop order, into the positions of input_ids == image_token_id
      -> the LLM on inputs_embeds         (B, T, H)
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .checkpoint_files import check_model_folder
from .configuration_llava_uhd import LlavaUHDConfig
from .context import check_context, context_limit
from .projector import MLPProjector
from .resampler import PerceiverResampler
from .spatial_resampler import SpatialResampler
from .vision import AdaptiveVisionEncoder

# the image processor's packed fields: one row per patch, crop or image, not per sample
_PACKED_IMAGE_FIELDS = ("pixel_values", "patch_grid_hw", "crop_image_ids", "crop_is_overview", "image_layout",
                        "image_sizes")

__all__ = ["LlavaUHDForConditionalGeneration", "LlavaUHDPreTrainedModel"]


class LlavaUHDPreTrainedModel(PreTrainedModel):
    config_class = LlavaUHDConfig
    config: LlavaUHDConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module):
        # The vision tower and the LLM are PreTrainedModels and initialise themselves; only our own parts here.
        if isinstance(module, (PerceiverResampler, SpatialResampler)):
            module.reset_parameters()
        elif isinstance(module, MLPProjector):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)


class LlavaUHDForConditionalGeneration(LlavaUHDPreTrainedModel, GenerationMixin):
    r"""LLaVA-UHD: a LLaVA-style LMM whose images arrive as variable-size slices plus an overview.

    Args:
        config: a `LlavaUHDConfig`.
        vision_model, language_model: optional pretrained modules to use instead of building random ones from the
            config (what `from_backbones` passes).
    """

    def __init__(self, config: LlavaUHDConfig, vision_model: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        super().__init__(config)
        trainable = not config.freeze_vision_tower
        if vision_model is not None:
            self.vision_tower = AdaptiveVisionEncoder(vision_model, config.vision_feature_layer, trainable)
        else:
            self.vision_tower = AdaptiveVisionEncoder.from_config(config.vision_config, config.vision_feature_layer,
                                                                  trainable)
        text_hidden = config.text_config.hidden_size
        if config.projector == "resampler" and config.resampler_type == "spatial":
            self.projector = SpatialResampler(self.vision_tower.hidden_size, text_hidden, config.num_queries,
                                              config.resampler_heads)
        elif config.projector == "resampler":
            self.projector = PerceiverResampler(self.vision_tower.hidden_size, text_hidden, config.num_queries,
                                                config.resampler_heads, attention=config.resampler_attention)
        else:
            self.projector = MLPProjector(self.vision_tower.hidden_size, text_hidden)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        # Blocks device_map="auto" keeps on one device: the tower's and the LLM's own (post_init collects only
        # direct children's, and the tower sits inside AdaptiveVisionEncoder) and the projector, whose forward
        # uses its own parameters and its submodules' together.
        self._no_split_modules = sorted({*(getattr(self.vision_tower.vision_model, "_no_split_modules", None) or ()),
                                         *(getattr(self.language_model, "_no_split_modules", None) or ()),
                                         type(self.projector).__name__})
        self.post_init()

    # ----------------------------------------------------------------------------------------- plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def freeze_vision_tower(self, frozen: bool = True) -> None:
        """Freeze (default, both stages of the paper) or unfreeze the ViT."""
        self.vision_tower.freeze() if frozen else self.vision_tower.unfreeze()
        self.config.freeze_vision_tower = frozen

    # ----------------------------------------------------------------------------------------- images
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        patch_grid_hw: torch.Tensor,
        crop_image_ids: torch.Tensor | None = None,
        crop_is_overview: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encode and compress every crop.

        Args:
            pixel_values: ``(P, 3*p*p)`` packed patches (see `LlavaUHDImageProcessor`).
            patch_grid_hw: ``(K, 2)`` each crop's ``(h_p, w_p)``.
            crop_image_ids, crop_is_overview: ``(K,)``; needed only to move overviews first
                (``overview_position="before"``).

        Returns:
            K tensors ``(n_k, hidden)`` in the order their tokens appear in the text.
        """
        features = self.vision_tower(pixel_values.to(self.vision_tower.dtype), patch_grid_hw)  # (P, D_v)
        return self.project_features(features, patch_grid_hw, crop_image_ids, crop_is_overview)

    def project_features(
        self,
        features: torch.Tensor,
        patch_grid_hw: torch.Tensor,
        crop_image_ids: torch.Tensor | None = None,
        crop_is_overview: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """`get_image_features` after the tower: compress the tower's features ``(P, D_v)`` of every crop (e.g.
        computed once beforehand, as the nano training does) into K tensors ``(n_k, hidden)`` in text order."""
        # the projector is called (not its forward_split): the hooks FSDP2 and DeepSpeed ZeRO-3 put around a module's
        # call gather its sharded parameters (and reduce their gradients); its rows are the crops' tokens in order
        out = self.projector(features.to(self.projector_dtype), patch_grid_hw)
        sizes = [self.projector.tokens_per_crop(grid) for grid in patch_grid_hw.tolist()]
        per_crop = list(out.reshape(-1, out.shape[-1]).split(sizes))
        if self.config.overview_position == "before" and crop_is_overview is not None:
            per_crop = [per_crop[k] for k in _overview_first_order(crop_image_ids, crop_is_overview)]
        return per_crop

    @property
    def projector_dtype(self) -> torch.dtype:
        """The dtype the projector takes its input in (its input projection's compute dtype, whatever the
        quantization of that layer)."""
        return self.projector.compute_dtype

    def merge_image_features(self, input_ids, inputs_embeds, image_features: list[torch.Tensor]) -> torch.Tensor:
        """``inputs_embeds`` ``(B, T, hidden)`` with the image-token positions of ``input_ids`` replaced by
        ``image_features`` (`get_image_features`), in order; a count mismatch is a ValueError naming both."""
        mask = input_ids == self.config.image_token_id  # (B, T)
        n_tokens = int(mask.sum())
        n_features = sum(f.shape[0] for f in image_features)
        if n_tokens != n_features:
            raise ValueError(
                f"the prompt has {n_tokens} image tokens but the images give {n_features} features; build the inputs "
                "with LlavaUHDProcessor (one <image> placeholder per image, same slicing and projector settings)"
            )
        flat = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds), flat)

    def generate(self, *args, **kwargs):
        """transformers' `generate`, after checking that every prompt (image tokens included) and the answer's
        budget (``max_new_tokens``, else ``max_length``) fit in the LLM's context: a `ValueError` with the numbers
        (`check_context`) before any work, instead of an answer from positions the model never learned."""
        ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        config = (args[1] if len(args) > 1 else kwargs.get("generation_config")) or self.generation_config
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            mask = kwargs.get("attention_mask")
            lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
            check_context(lengths, kwargs.get("max_new_tokens", config.max_new_tokens), context_limit(self.config),
                          kwargs.get("max_length", config.max_length))
        return super().generate(*args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """transformers repeats every input along its first axis for beam search / ``num_return_sequences``; the
        packed image fields have no batch axis, so they are repeated per image instead (`_expand_packed_images`)."""
        packed = {k: model_kwargs.pop(k) for k in _PACKED_IMAGE_FIELDS if model_kwargs.get(k) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder,
                                                                           input_ids, **model_kwargs)
        if packed and expand_size > 1:
            if input_ids is None:
                raise ValueError("beam search / num_return_sequences over images needs input_ids")
            packed = _expand_packed_images(packed, input_ids, expand_size, self.config.image_token_id,
                                           self.projector.tokens_per_crop)
        return expanded_ids, {**model_kwargs, **packed}

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_grid_hw: torch.Tensor | None = None,
        crop_image_ids: torch.Tensor | None = None,
        crop_is_overview: torch.Tensor | None = None,
        image_layout: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: ``(B, T)`` with the image layout already expanded by the processor.
            pixel_values, patch_grid_hw, crop_image_ids, crop_is_overview: the image processor's outputs; only
                needed on the step that reads the prompt (during generation, later steps carry none).
            image_layout, image_sizes: accepted for convenience (``**processor(...)``), not needed.
            labels: ``(B, T)`` with ``-100`` wherever no loss is wanted.

        Remaining keyword arguments (``cache``, ``use_cache``, ...) go to the language model.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            image_mask = input_ids == self.config.image_token_id
            # the placeholder id may lie past the LLM's vocabulary: embed something harmless, it is overwritten
            text_ids = input_ids.masked_fill(image_mask, 0) if image_mask.any() else input_ids
            inputs_embeds = self.get_input_embeddings()(text_ids)
            if pixel_values is not None:
                if patch_grid_hw is None:
                    raise ValueError("pixel_values need patch_grid_hw (pass every field of the image processor)")
                features = self.get_image_features(pixel_values, patch_grid_hw, crop_image_ids, crop_is_overview)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, features)
            elif image_mask.any() and (kwargs.get("cache") is None or kwargs["cache"].get_seq_length() == 0):
                raise ValueError(f"input_ids hold {int(image_mask.sum())} image tokens but no pixel_values were given")
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Positions count real tokens only, so a left-padded row gets the same positions as when run alone
            # (prefill and every cached decoding step: the mask always covers the whole sequence so far).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------- composition
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # A local folder is checked first (config.json, its model_type and numbers, the weight files' headers): a
        # damaged or foreign one is a ValueError naming the file, not an error from inside safetensors or torch.
        folder = os.path.join(pretrained_model_name_or_path or "", kwargs.get("subfolder") or "")
        if pretrained_model_name_or_path is not None and os.path.isdir(folder):
            check_model_folder(folder, cls.config_class, need_config=kwargs.get("config") is None)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # Loading swaps in fresh Parameters (requires_grad=True): freeze the tower again as the config says.
        model.freeze_vision_tower(model.config.freeze_vision_tower)
        return model

    @classmethod
    def from_backbones(
        cls,
        vision: str | nn.Module,
        llm: str | nn.Module,
        processor=None,
        gguf_file: str | None = None,
        dtype: torch.dtype | str | None = None,
        **settings,
    ) -> "LlavaUHDForConditionalGeneration":
        """Compose a fresh LLaVA-UHD from a pretrained vision tower and a pretrained causal LM.

        Args:
            vision: a local path or hub id of a CLIP / SigLIP (full or vision-only) or DINOv2 checkpoint, or a
                loaded tower.
            llm: a local path or hub id of a causal LM (with ``gguf_file``: the folder / repo holding that GGUF
                file), or a loaded model.
            processor: the matching `LlavaUHDProcessor` (it knows the image token id); built with
                `LlavaUHDProcessor.from_backbones` when None.
            **settings: `LlavaUHDConfig` fields (``max_slices``, ``projector``, ``image_strategy``, ...).

        The resampler (or MLP) is newly initialized; the tower is frozen unless ``freeze_vision_tower=False``.
        """
        from ..processing import LlavaUHDProcessor

        from .loading import load_causal_lm, load_vision_tower

        vision_model = vision if isinstance(vision, nn.Module) else load_vision_tower(vision, dtype=dtype)
        language_model = llm if isinstance(llm, nn.Module) else load_causal_lm(llm, gguf_file=gguf_file, dtype=dtype)
        if processor is None:
            if isinstance(vision, nn.Module) or isinstance(llm, nn.Module):
                raise ValueError("pass processor= when the backbones are given as modules")
            processor = LlavaUHDProcessor.from_backbones(vision, llm, gguf_file=gguf_file, **settings)
        config = LlavaUHDConfig(
            vision_config=vision_model.config.to_dict(),
            text_config=language_model.config.to_dict(),
            image_token_id=processor.image_token_id,
            **settings,
        )
        model = cls(config, vision_model=vision_model, language_model=language_model)
        if dtype is not None:
            model.projector.to(dtype=vision_model.dtype if isinstance(dtype, str) else dtype)
        return model


def _expand_packed_images(packed: dict, input_ids: torch.Tensor, expand_size: int, image_token_id: int,
                         tokens_per_crop) -> dict:
    """The packed image fields of a batch for ``input_ids.repeat_interleave(expand_size, 0)``: every row's images
    repeated ``expand_size`` times, in the new rows' order (what beam search and ``num_return_sequences`` need;
    repeating the packed tensors along their first axis would mix up crops and patches). Which images a row owns
    follows from its count of image tokens, the images taken in reading order; ``tokens_per_crop(grid_hw)``."""
    grids, owners = packed["patch_grid_hw"], packed["crop_image_ids"]
    n_images = int(owners.max()) + 1 if owners.numel() else 0
    crops_of = [[] for _ in range(n_images)]
    for k, image in enumerate(owners.tolist()):
        crops_of[image].append(k)
    tokens_of = [sum(tokens_per_crop(grids[k]) for k in crops) for crops in crops_of]
    per_row = (input_ids == image_token_id).sum(-1).tolist()
    images_of_row, next_image = [], 0
    for count in per_row:
        mine = []
        while count > 0:
            mine.append(next_image)
            count -= tokens_of[next_image]
            next_image += 1
        images_of_row.append(mine)
    order = [image for mine in images_of_row for _ in range(expand_size) for image in mine]
    patch_start = torch.cumsum(grids[:, 0] * grids[:, 1], 0) - grids[:, 0] * grids[:, 1]
    crops = [k for image in order for k in crops_of[image]]
    patches = torch.cat([torch.arange(int(patch_start[k]), int(patch_start[k] + grids[k, 0] * grids[k, 1]))
                         for k in crops]) if crops else torch.zeros(0, dtype=torch.long)
    out = dict(packed)
    out["pixel_values"] = packed["pixel_values"][patches.to(packed["pixel_values"].device)]
    out["patch_grid_hw"] = grids[crops]
    out["crop_image_ids"] = torch.tensor([j for j, image in enumerate(order) for _ in crops_of[image]],
                                         dtype=owners.dtype, device=owners.device)
    for key in ("crop_is_overview",):
        if key in packed:
            out[key] = packed[key][crops]
    for key in ("image_layout", "image_sizes"):
        if key in packed:
            out[key] = packed[key][order]
    return out


def _overview_first_order(crop_image_ids: torch.Tensor, crop_is_overview: torch.Tensor) -> list[int]:
    """Crop indices reordered so each image's overview comes before its slices."""
    ids = crop_image_ids.tolist()
    overview = crop_is_overview.tolist()
    order: list[int] = []
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and ids[end] == ids[start]:
            end += 1
        group = list(range(start, end))
        order += [k for k in group if overview[k]] + [k for k in group if not overview[k]]
        start = end
    return order
