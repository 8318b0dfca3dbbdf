"""Single-shape probes and reproducible question sets (`llava_uhd.data.probes`)."""

from __future__ import annotations

import numpy as np
import pytest

from llava_uhd.data.probes import (
    ALL_KINDS,
    DEFAULT_KINDS,
    FINE_KINDS,
    PROBE_KINDS,
    SyntheticDataSettings,
    SyntheticSamples,
    make_samples,
    probe_sample,
)
from llava_uhd.data.synthetic import COLOURS, FINE_DETAIL_KINDS, KINDS, generate_sample, sample_seed


def test_probe_samples_are_deterministic_and_true_to_their_pixels():
    settings = SyntheticDataSettings(kinds=tuple(PROBE_KINDS), max_side=300)
    a, b = make_samples(30, 5, settings), make_samples(30, 5, settings)
    assert [s.answer for s in a] == [s.answer for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert {s.kind for s in a} == set(PROBE_KINDS)
    for s in a:
        w, h = s.image.size
        assert settings.min_side <= min(w, h) and max(w, h) <= settings.max_side
        shape = s.metadata["shape"]
        x0, y0, x1, y1 = shape["box"]
        arr = np.asarray(s.image)
        hits = np.argwhere((arr == COLOURS[shape["colour"]]).all(-1))  # (y, x) of the shape's pixels
        assert len(hits) > 0 and hits[:, 1].min() >= x0 and hits[:, 1].max() < x1 and hits[:, 0].min() >= y0
        assert hits[:, 0].max() < y1  # the only pixels of that colour are the shape's
        assert (x1 <= w // 2 or x0 >= w - w // 2) and (y1 <= h // 2 or y0 >= h - h // 2)  # never on a midline
        quarter = ("top" if y0 < h / 2 else "bottom") + "-" + ("left" if x0 < w / 2 else "right")
        expected = {"probe_shape": shape["shape"], "probe_colour": shape["colour"], "probe_where": quarter}
        assert s.answer == expected[s.kind]


def test_generator_kinds_give_the_generate_dataset_samples():
    settings = SyntheticDataSettings(kinds=("corner_colour", "count"), max_side=200)
    ours = make_samples(4, 9, settings)
    for i, s in enumerate(ours):
        ref = generate_sample(sample_seed(9, i), ["corner_colour", "count"], 64, 200, 6.0)
        assert (s.question, s.answer, s.kind) == (ref.question, ref.answer, ref.kind)
        assert np.array_equal(np.asarray(s.image), np.asarray(ref.image))


def test_default_kinds_are_the_probes_and_the_grey_control():
    assert set(DEFAULT_KINDS) == set(PROBE_KINDS) | {"grey_probe"}
    assert set(PROBE_KINDS) <= set(FINE_KINDS) and "grey_probe" not in FINE_KINDS
    assert set(FINE_DETAIL_KINDS) <= set(FINE_KINDS) and set(ALL_KINDS) == set(KINDS) | set(PROBE_KINDS)


def test_a_lazy_set_draws_the_same_samples():
    settings = SyntheticDataSettings(min_side=320, max_side=1200, max_aspect=4.0)
    lazy, eager = SyntheticSamples(6, 3, settings), make_samples(6, 3, settings)
    assert len(lazy) == 6
    assert [(s.kind, s.question, s.answer, s.image.size) for s in lazy] == \
        [(s.kind, s.question, s.answer, s.image.size) for s in eager]  # iteration stops at the end
    assert all(320 <= min(s.image.size) and max(s.image.size) <= 1200 for s in eager)
    with pytest.raises(IndexError):
        lazy[6]


def test_a_probe_of_a_given_size_and_a_too_small_one():
    sample = probe_sample(2, "probe_colour", SyntheticDataSettings(), size=(1008, 672))
    assert sample.image.size == (1008, 672) and sample.answer in COLOURS
    with pytest.raises(ValueError, match="at least 52 px"):
        probe_sample(2, "probe_colour", SyntheticDataSettings(), size=(40, 300))


def test_data_settings_are_checked():
    with pytest.raises(ValueError, match="unknown kinds"):
        SyntheticDataSettings(kinds=("nope",)).check()
    with pytest.raises(ValueError, match="eval_samples must be >= 1"):
        SyntheticDataSettings(eval_samples=0).check()
    assert SyntheticDataSettings(seed=3).held_out_seed == 4
