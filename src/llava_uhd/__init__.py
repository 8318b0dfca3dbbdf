"""LLaVA-UHD: a large multimodal model that perceives images of any aspect ratio and high resolution.

    import llava_uhd                                   # fast: neither torch nor transformers is imported
    llava_uhd.plan_slices(1008, 672)                   # the slicing geometry, pure Python
    model = llava_uhd.LlavaUHDForConditionalGeneration.from_pretrained("out")   # loads torch + transformers

The model and processor classes load on first use and register ``model_type = "llava_uhd"`` with transformers'
Auto classes then; after ``import llava_uhd``, transformers' own Auto classes and ``pipeline`` find the model too
(`llava_uhd.auto`).
"""

from .auto import install_import_hook, register_config_and_processors, register_models
from .lazy import lazy_attributes
from .slicing import Slice, SliceConfig, SlicePlan, plan_slices

__version__ = "0.1.0"

# name -> (module, what registering it needs)
_LAZY = {
    "LlavaUHDImageProcessor": ("image_processing", register_config_and_processors),
    "LlavaUHDImageProcessorFast": ("image_processing_fast", register_config_and_processors),
    "LlavaUHDProcessor": ("processing", register_config_and_processors),
    "LlavaUHDConfig": ("modeling.configuration_llava_uhd", register_config_and_processors),
    "LlavaUHDForConditionalGeneration": ("modeling.modeling_llava_uhd", register_models),
}

__all__ = ["Slice", "SliceConfig", "SlicePlan", "plan_slices", *_LAZY]

install_import_hook()


__getattr__, __dir__ = lazy_attributes(__name__, {name: module for name, (module, _) in _LAZY.items()}, globals(),
                                       on_load=lambda name: _LAZY[name][1]())
