"""LLaVA-UHD: a large multimodal model that perceives images of any aspect ratio and high resolution."""

from .slicing import Slice, SliceConfig, SlicePlan, plan_slices

__version__ = "0.1.0"

__all__ = ["Slice", "SliceConfig", "SlicePlan", "plan_slices", "LlavaUHDImageProcessor"]


def __getattr__(name):
    # The image processor pulls in transformers: import it only when asked for.
    if name == "LlavaUHDImageProcessor":
        from .image_processing import LlavaUHDImageProcessor

        return LlavaUHDImageProcessor
    raise AttributeError(f"module 'llava_uhd' has no attribute {name!r}")
