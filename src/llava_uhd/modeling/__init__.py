"""Model components of LLaVA-UHD: the adaptive vision encoder (`vision`, with `pos_embed` and `packed_attention`),
the compression layer (`resampler`, `spatial_resampler`), the MLP projector baseline (`projector`), and the LMM that
ties them to a causal LLM (`modeling_llava_uhd`, `configuration_llava_uhd`; backbones loaded by `loading`); int8
inference (`quantization`) and offloaded weights (`offload`).

Names load from their module on first use (the config needs no torch); registration with transformers' Auto
classes is `llava_uhd.auto`'s.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

_MODULE_OF = {"LlavaUHDConfig": "configuration_llava_uhd",
              "LlavaUHDForConditionalGeneration": "modeling_llava_uhd",
              "LlavaUHDPreTrainedModel": "modeling_llava_uhd"}

__all__ = sorted(_MODULE_OF)


__getattr__, __dir__ = lazy_attributes(__name__, _MODULE_OF, globals())
