"""LLaVA-UHD: a large multimodal model that perceives images of any aspect ratio and high resolution.

Importing the package registers ``model_type = "llava_uhd"`` with transformers' Auto classes (when torch is
installed; the slicing geometry and the image processor work without it).
"""

import importlib.util

from .slicing import Slice, SliceConfig, SlicePlan, plan_slices

__version__ = "0.1.0"

__all__ = [
    "Slice",
    "SliceConfig",
    "SlicePlan",
    "plan_slices",
    "LlavaUHDImageProcessor",
    "LlavaUHDProcessor",
    "LlavaUHDConfig",
    "LlavaUHDForConditionalGeneration",
]

if importlib.util.find_spec("torch") is not None:
    from .modeling import LlavaUHDConfig, LlavaUHDForConditionalGeneration  # registers the Auto classes


def __getattr__(name):
    # Processors pull in transformers: import them only when asked for.
    if name == "LlavaUHDImageProcessor":
        from .image_processing import LlavaUHDImageProcessor

        return LlavaUHDImageProcessor
    if name == "LlavaUHDProcessor":
        from .processing import LlavaUHDProcessor

        return LlavaUHDProcessor
    if name in ("LlavaUHDConfig", "LlavaUHDForConditionalGeneration"):
        raise ImportError(f"llava_uhd.{name} needs torch: pip install torch")
    raise AttributeError(f"module 'llava_uhd' has no attribute {name!r}")
