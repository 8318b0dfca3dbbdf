"""LLaVA-UHD in transformers' Auto classes (``model_type = "llava_uhd"``), registered on demand.

`AutoConfig`, `AutoModelForImageTextToText`, `AutoModelForMultimodalLM`, `AutoModelForCausalLM`,
`AutoImageProcessor` and `AutoProcessor` learn the model when it is first needed, so ``import llava_uhd`` stays free
of torch and transformers:

* touching ``llava_uhd.LlavaUHDConfig`` / ``LlavaUHDProcessor`` / ``LlavaUHDImageProcessor`` registers the config
  and the processors, touching ``llava_uhd.LlavaUHDForConditionalGeneration`` everything;
* once ``import llava_uhd`` has run, transformers' Auto modules register it as soon as they are imported (an
  import hook, `install_import_hook`), in either order: ``import llava_uhd`` then ``AutoModel...`` /
  ``pipeline(...)``, or the other way round.

`register_auto_classes` does it all at once, explicitly.
"""

from __future__ import annotations

import importlib.abc
import sys

__all__ = ["register_config_and_processors", "register_models", "register_auto_classes", "install_import_hook"]

# transformers' Auto modules: once one is imported, the model is registered with it
_CONFIG_TRIGGERS = ("transformers.models.auto.configuration_auto", "transformers.models.auto.image_processing_auto",
                    "transformers.models.auto.processing_auto")
_MODEL_TRIGGERS = ("transformers.models.auto.modeling_auto",)
# our modules that registration imports (it waits while one of them is half imported)
_OURS = ("llava_uhd.modeling.configuration_llava_uhd", "llava_uhd.modeling.modeling_llava_uhd",
         "llava_uhd.image_processing", "llava_uhd.image_processing_fast", "llava_uhd.processing")

_done = {"config": False, "models": False}
_busy = False


def register_config_and_processors() -> None:
    """`AutoConfig`, `AutoImageProcessor` and `AutoProcessor` (no torch needed). Idempotent.

    `AutoImageProcessor` gets the PIL processor as its ``"pil"`` backend and, where torch is installed,
    `LlavaUHDImageProcessorFast` (torch only, no torchvision) as its ``"torchvision"`` one, the backend that
    ``use_fast=True`` asks for."""
    if _done["config"]:
        return
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    from .image_processing import LlavaUHDImageProcessor
    from .modeling.configuration_llava_uhd import LlavaUHDConfig
    from .processing import LlavaUHDProcessor

    AutoConfig.register("llava_uhd", LlavaUHDConfig, exist_ok=True)
    image_processors = {"pil": LlavaUHDImageProcessor}
    try:
        from .image_processing_fast import LlavaUHDImageProcessorFast
    except ModuleNotFoundError as e:  # torch is optional
        if e.name != "torch":
            raise
    else:
        image_processors["torchvision"] = LlavaUHDImageProcessorFast
    AutoImageProcessor.register(LlavaUHDConfig, image_processor_classes=image_processors, exist_ok=True)
    AutoProcessor.register(LlavaUHDConfig, LlavaUHDProcessor, exist_ok=True)
    _done["config"] = True


def register_models() -> None:
    """`AutoModelForImageTextToText`, `AutoModelForMultimodalLM` (``pipeline("any-to-any")``) and
    `AutoModelForCausalLM`, after the config and processors. Imports torch. Idempotent."""
    if _done["models"]:
        return
    register_config_and_processors()
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    from .modeling.configuration_llava_uhd import LlavaUHDConfig
    from .modeling.modeling_llava_uhd import LlavaUHDForConditionalGeneration

    for auto in (AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForCausalLM):
        auto.register(LlavaUHDConfig, LlavaUHDForConditionalGeneration, exist_ok=True)
    _done["models"] = True


def register_auto_classes() -> None:
    """Register the config, the processors and the model with every Auto class. Idempotent."""
    register_models()


def _half_imported(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register_what_is_needed() -> None:
    """Register with the Auto modules that are loaded (never from inside a registration, nor while one of our
    modules is half imported: the end of that import calls this again)."""
    global _busy
    if _busy or all(_done.values()) or any(_half_imported(m) for m in _OURS):
        return
    _busy = True
    try:
        if any(m in sys.modules for m in _MODEL_TRIGGERS):
            register_models()
        elif any(m in sys.modules for m in _CONFIG_TRIGGERS):
            register_config_and_processors()
    finally:
        _busy = False


_depth = 0  # imports of watched modules under way


class _ThenRegister(importlib.abc.Loader):
    """A module's own loader; once the outermost watched import has finished (no transformers module half
    imported, so registering imports nothing circular), `_register_what_is_needed`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        global _depth
        _depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            _depth -= 1
        if _depth == 0:
            _register_what_is_needed()


class _AutoImportHook(importlib.abc.MetaPathFinder):
    """Finds transformers' modules and ours with the other finders and wraps their loaders in `_ThenRegister`,
    until everything is registered."""

    def find_spec(self, name, path, target=None):
        if all(_done.values()) or not (name == "transformers" or name.startswith("transformers.") or name in _OURS):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


def install_import_hook() -> None:
    """Register as soon as transformers' Auto modules are imported (now, for those already imported)."""
    if not any(isinstance(f, _AutoImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoImportHook())
    _register_what_is_needed()
