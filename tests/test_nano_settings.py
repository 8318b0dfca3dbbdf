"""What defines a nano run (`llava_uhd.nano.settings`) and how the command line sets it (`llava_uhd.nano.cli`)."""

from __future__ import annotations

import argparse

import pytest

from llava_uhd.data.probes import DEFAULT_KINDS, SyntheticDataSettings
from llava_uhd.nano.cli import add_train_nano_arguments
from llava_uhd.nano.settings import VARIANTS, NanoSettings, model_settings
from llava_uhd.nano.train import train_nano


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        NanoSettings(kinds=("nope",)).check()
    NanoSettings(kinds=("corner_colour", "probe_colour")).check()  # generator kinds and probes mix
    with pytest.raises(ValueError, match="steps1"):
        NanoSettings(steps1=0).check()
    with pytest.raises(ValueError, match="train_samples"):
        NanoSettings(train_samples=0).check()
    with pytest.raises(ValueError, match="vision_rounding"):
        NanoSettings(vision_rounding="int4").check()
    with pytest.raises(ValueError, match="variants"):
        train_nano(tmp_path, variants=("mlp",))


def test_settings_share_the_data_fields_with_their_own_defaults():
    settings = NanoSettings()
    assert isinstance(settings, SyntheticDataSettings) and settings.kinds == DEFAULT_KINDS
    assert (settings.min_side, settings.max_side, settings.max_aspect) == (320, 1200, 4.0)
    assert settings.held_out_seed == 1 and NanoSettings(seed=4, eval_seed=9).held_out_seed == 9
    assert NanoSettings(device="cuda").use_bf16 and not NanoSettings().use_bf16 and NanoSettings(bf16=True).use_bf16
    quick = NanoSettings.quick(steps2=5)
    assert (quick.steps1, quick.steps2, quick.num_queries) == (1, 5, 8)


def test_variants_differ_only_in_the_image_strategy():
    settings = NanoSettings()
    uhd, pad = (model_settings(settings, v) for v in ("uhd", "pad"))
    assert {k for k in uhd if uhd[k] != pad[k]} == {"image_strategy"} and set(VARIANTS) == {"uhd", "pad"}


def test_command_line_defaults_come_from_the_settings():
    parser = add_train_nano_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--steps1", "7", "--kinds", "probe_colour", "--no-bf16"])
    assert (args.steps1, args.kinds, args.bf16, args.variants) == (7, ["probe_colour"], False, ["uhd", "pad"])
    assert f"default {NanoSettings().train_samples}" in parser.format_help()


def test_the_package_face_names_load_from_their_modules():
    import llava_uhd.nano as nano

    for name in nano.__all__:
        value = getattr(nano, name)  # imported from its module on first use
        if callable(value):
            assert value.__module__.startswith("llava_uhd.nano."), name
    assert set(nano.__all__) <= set(dir(nano))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nano.nope
