"""Model components of LLaVA-UHD: the adaptive vision encoder (`vision`, with `pos_embed` and `packed_attention`),
the compression layer (`resampler`, `spatial_resampler`), the MLP projector baseline (`projector`), and the LMM that
ties them to a causal LLM (`modeling_llava_uhd`, `configuration_llava_uhd`; backbones loaded by `loading`)."""

from .configuration_llava_uhd import LlavaUHDConfig
from .modeling_llava_uhd import LlavaUHDForConditionalGeneration, LlavaUHDPreTrainedModel

__all__ = ["LlavaUHDConfig", "LlavaUHDForConditionalGeneration", "LlavaUHDPreTrainedModel", "register_auto_classes"]


def register_auto_classes() -> None:
    """Make ``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoProcessor`` and ``AutoImageProcessor`` know
    ``model_type = "llava_uhd"``. Idempotent."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from ..image_processing import LlavaUHDImageProcessor
    from ..processing import LlavaUHDProcessor

    AutoConfig.register("llava_uhd", LlavaUHDConfig, exist_ok=True)
    AutoModelForImageTextToText.register(LlavaUHDConfig, LlavaUHDForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(LlavaUHDConfig, LlavaUHDForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(LlavaUHDConfig, slow_image_processor_class=LlavaUHDImageProcessor, exist_ok=True)
    AutoProcessor.register(LlavaUHDConfig, LlavaUHDProcessor, exist_ok=True)


register_auto_classes()
