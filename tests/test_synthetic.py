"""llava_uhd.data.synthetic: determinism, sizes, the LLaVA format, and the ground truth re-derived from pixels."""

from __future__ import annotations

import argparse
import json
import random
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from llava_uhd.data import synthetic as syn
from llava_uhd.data.synthetic import drawing, kinds, vocabulary
from llava_uhd.data.synthetic import (
    COLOURS,
    FINE_DETAIL_KINDS,
    KINDS,
    PADDING_GREY,
    SHAPES,
    generate_dataset,
    generate_sample,
    is_correct,
    sample_seed,
    sample_size,
    shape_mask,
)

GT_SEEDS = range(30)  # samples per kind whose answers are re-derived from the pixels
GT_MAX_SIDE = 400


# ------------------------------------------------------------------------------------------------ pixel analysis
def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in np.argwhere(mask):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        out.append(np.array(pixels))
    return out


def tight(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return ys.min(), xs.min(), ys.max() + 1, xs.max() + 1


def identify(pixels: np.ndarray) -> tuple[str, tuple[float, float], int]:
    """Which shape mask a blob is exactly, and the centre and side of the box it was drawn in."""
    y0, x0 = pixels.min(axis=0)
    y1, x1 = pixels.max(axis=0) + 1
    blob = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    blob[pixels[:, 0] - y0, pixels[:, 1] - x0] = True
    found = []
    for shape in SHAPES:
        for s in range(max(blob.shape), max(blob.shape) + 5):
            m = np.array(shape_mask(shape, s)) > 0
            ty0, tx0, ty1, tx1 = tight(m)
            if m[ty0:ty1, tx0:tx1].shape == blob.shape and np.array_equal(m[ty0:ty1, tx0:tx1], blob):
                found.append((shape, ((x0 - tx0) + s / 2, (y0 - ty0) + s / 2), s))
    assert len(found) == 1, f"blob at {(x0, y0)} matches {found}"
    return found[0]


def blobs(image: Image.Image, exclude: tuple[int, int, int, int] | None = None) -> list[dict]:
    """Every palette-coloured blob of the image, found from the pixels alone."""
    arr = np.asarray(image)
    out = []
    for name, rgb in COLOURS.items():
        mask = np.all(arr == rgb, axis=-1)
        if exclude is not None:
            x0, y0, x1, y1 = exclude
            mask[y0:y1, x0:x1] = False
        for pixels in components(mask):
            shape, centre, s = identify(pixels)
            out.append({"colour": name, "shape": shape, "center": centre, "size": s, "n": len(pixels)})
    return out


def check_shapes_exact(sample, exclude=None):
    """Every palette pixel is a drawn shape, every drawn shape is whole and is its own blob."""
    arr = np.asarray(sample.image)
    h, w = arr.shape[:2]
    expected = {name: np.zeros((h, w), dtype=bool) for name in COLOURS}
    for sh in sample.metadata["shapes"]:
        x0, y0, x1, y1 = sh["box"]
        assert 0 < x0 < x1 < w and 0 < y0 < y1 < h, "shape not inside the image"
        assert x1 - x0 == y1 - y0 >= syn.MIN_SHAPE_PX
        expected[sh["colour"]][y0:y1, x0:x1] |= np.array(shape_mask(sh["shape"], x1 - x0)) > 0
    for name, rgb in COLOURS.items():
        got = np.all(arr == rgb, axis=-1)
        if exclude is not None:
            x0, y0, x1, y1 = exclude
            got[y0:y1, x0:x1] = False
        assert np.array_equal(got, expected[name]), f"{name} pixels differ from the drawn {name} shapes"
    found = blobs(sample.image, exclude)
    assert len(found) == len(sample.metadata["shapes"])  # no two shapes touch
    return found


def kind_samples(kind, n=len(GT_SEEDS), max_side=GT_MAX_SIDE, **kw):
    return [generate_sample(seed, kinds=[kind], max_side=max_side, **kw) for seed in range(n)]


# ------------------------------------------------------------------------------------------------ determinism, sizes
def test_same_seed_same_sample_and_different_seed_differs():
    a, b = generate_sample(123, max_side=600), generate_sample(123, max_side=600)
    assert a.image.tobytes() == b.image.tobytes() and a.image.size == b.image.size
    assert (a.question, a.answer, a.kind, a.metadata) == (b.question, b.answer, b.kind, b.metadata)
    others = [generate_sample(s, max_side=600) for s in range(124, 130)]
    assert all(o.image.size != a.image.size or o.image.tobytes() != a.image.tobytes() for o in others)
    assert len({(o.image.size, o.question, o.answer) for o in others}) == len(others)
    # a random.Random is used as given; a numpy Generator only seeds one
    c = generate_sample(random.Random(123), max_side=600)
    assert c.image.tobytes() == a.image.tobytes() and c.metadata["seed"] is None
    g1, g2 = generate_sample(np.random.default_rng(5), max_side=300), generate_sample(np.random.default_rng(5),
                                                                                          max_side=300)
    assert g1.image.tobytes() == g2.image.tobytes() and g1.metadata == g2.metadata
    with pytest.raises(TypeError):
        generate_sample("7")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**64), min_side=st.integers(32, 300), extra=st.integers(0, 3000),
       max_aspect=st.floats(1.0, 10.0))
def test_sample_size_ranges(seed, min_side, extra, max_aspect):
    max_side = min_side + extra
    w, h = sample_size(seed, min_side, max_side, max_aspect)
    assert min_side <= w <= max_side and min_side <= h <= max_side
    assert max(w, h) / min(w, h) <= max_aspect + 1e-9


def test_default_sizes_cover_the_range():
    sizes = [sample_size(s) for s in range(3000)]
    aspects = [w / h for w, h in sizes]
    assert min(min(s) for s in sizes) < 100 and max(max(s) for s in sizes) > 1950
    assert all(64 <= v <= 2000 for s in sizes for v in s)
    assert min(aspects) < 1 / 5 and max(aspects) > 5 and all(1 / 6 <= a <= 6 for a in aspects)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**63), max_aspect=st.sampled_from([1.0, 2.0, 6.0]))
def test_generated_sizes_and_fields(seed, max_aspect):
    sample = generate_sample(seed, min_side=48, max_side=320, max_aspect=max_aspect)
    w, h = sample.image.size
    assert sample.image.mode == "RGB" and (w, h) == (sample.metadata["width"], sample.metadata["height"])
    assert 48 <= w <= 320 and 48 <= h <= 320 and max(w, h) / min(w, h) <= max_aspect + 1e-9
    assert sample.kind in KINDS and sample.question.endswith("?") and sample.answer
    assert sample.answer == sample.answer.strip() and len(sample.answer.split()) == 1
    json.dumps(sample.metadata)


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_sample(0, kinds=["nope"])
    with pytest.raises(ValueError):
        generate_sample(0, min_side=10)
    with pytest.raises(ValueError):
        generate_sample(0, min_side=300, max_side=200)
    with pytest.raises(ValueError):
        generate_sample(0, max_aspect=0.5)


def test_registry():
    assert set(KINDS) == {"count", "corner_colour", "edge_colour", "shape_at", "read_text", "grey_probe"}
    assert set(FINE_DETAIL_KINDS) == set(KINDS) - {"grey_probe"}
    assert all(info.name == name and info.answer_type in ("number", "colour", "shape", "code")
               for name, info in KINDS.items())
    for kind in KINDS:
        assert generate_sample(1, kinds=kind, max_side=200).kind == kind
    drawn = {generate_sample(s, max_side=128).kind for s in range(60)}
    assert drawn == set(KINDS)
    assert len(set(COLOURS.values())) == len(COLOURS) and PADDING_GREY not in COLOURS.values()


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("size", range(syn.MIN_SHAPE_PX, 81))
def test_shape_masks_are_connected_symmetric_and_distinct(size):
    masks = {}
    for shape in SHAPES:
        if size < syn.MIN_SHAPE_SIZES.get(shape, syn.MIN_SHAPE_PX):
            continue
        m = np.array(shape_mask(shape, size)) > 0
        assert m.shape == (size, size) and set(np.unique(np.array(shape_mask(shape, size)))) <= {0, 255}
        assert len(components(m)) == 1
        assert np.array_equal(m, m[:, ::-1]), f"{shape} {size} not symmetric"
        masks[shape] = m
    assert masks["square"].all() and 0.65 < masks["circle"].mean() < 0.9 and 0.4 < masks["triangle"].mean() < 0.65
    keys = list(masks)
    for i, a in enumerate(keys):  # no shape looks like another at this size, whatever the size of the other
        for b in keys[i + 1:]:
            assert not np.array_equal(masks[a], masks[b])


# ------------------------------------------------------------------------------------------------ ground truth
def test_count_ground_truth():
    answers = []
    for sample in kind_samples("count"):
        found = check_shapes_exact(sample)
        target = sample.metadata["target"]
        n = sum((target["colour"] is None or b["colour"] == target["colour"])
                and (target["shape"] is None or b["shape"] == target["shape"]) for b in found)
        assert sample.answer == str(n), sample.question
        assert 0 <= n <= 6
        answers.append(n)
        words = sample.question.split()
        if target["colour"]:
            assert target["colour"] in words
        if target["shape"]:
            assert vocabulary.PLURALS[target["shape"]] in words
    assert len(set(answers)) >= 4


def _nearest_check(kind, attr):
    answers = set()
    for sample in kind_samples(kind):
        found = check_shapes_exact(sample)
        w, h = sample.image.size
        loc = sample.metadata["location"]
        dist = kinds.distances(found, loc, w, h)
        order = sorted(range(len(found)), key=lambda i: dist[i])
        best = found[order[0]]
        assert best[attr] == sample.answer
        rivals = [dist[i] for i in order[1:] if found[i][attr] != best[attr]]
        assert not rivals or min(rivals) > dist[order[0]] + best["size"] * 0.9  # unambiguous
        # the pixel at the reported shape's centre has the answer's colour
        cx, cy = sample.metadata["nearest"]["center"]
        rgb = tuple(np.asarray(sample.image)[int(cy), int(cx)])
        assert rgb == COLOURS[sample.metadata["nearest"]["colour"]]
        if attr == "colour":
            assert rgb == COLOURS[sample.answer]
        assert loc.replace("centre", "centre of the image") in sample.question
        answers.add(sample.answer)
    assert len(answers) >= 3


def test_corner_colour_ground_truth():
    _nearest_check("corner_colour", "colour")


def test_edge_colour_ground_truth():
    _nearest_check("edge_colour", "colour")


def test_shape_at_ground_truth():
    _nearest_check("shape_at", "shape")


def test_read_text_ground_truth():
    for sample in kind_samples("read_text"):
        check_shapes_exact(sample)
        text = sample.metadata["text"]
        assert sample.answer == text["text"] and 3 <= len(text["text"]) <= 6
        assert set(text["text"]) <= set(syn.CODE_DIGITS + syn.CODE_LETTERS)
        arr = np.asarray(sample.image).astype(int)
        w, h = sample.image.size
        x0, y0, x1, y1 = text["box"]
        assert 0 < x0 < x1 < w and 0 < y0 < y1 < h
        # the ink there is the code rendered alone: the text's coverage, read off the red channel (text red 20 on
        # a light background), equals that of the code drawn black on white at the recorded font size and origin
        font = ImageFont.load_default(size=text["font_size"])  # Pillow >= 10.1 with FreeType, as here
        ref = Image.new("L", (w, h), 255)
        ImageDraw.Draw(ref).text(tuple(text["origin"]), text["text"], fill=0, font=font)
        ref_cov = (255 - np.asarray(ref).astype(float)) / 255
        ring = np.concatenate([arr[y0 - 1, x0 - 1:x1 + 1, 0], arr[y1, x0 - 1:x1 + 1, 0],
                               arr[y0:y1, x0 - 1, 0], arr[y0:y1, x1, 0]])
        bg = np.median(ring)
        assert bg >= 195 and ring.min() >= 190  # no ink outside the box
        cov = (bg - arr[y0:y1, x0:x1, 0]) / (bg - syn.TEXT_COLOUR[0])
        assert ref_cov.sum() == pytest.approx(ref_cov[y0:y1, x0:x1].sum()) and ref_cov.sum() > 3  # box holds all ink
        assert np.abs(cov - ref_cov[y0:y1, x0:x1]).max() < 0.08
        # nothing else is drawn in the box (plus a margin)
        region = arr[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2]
        for rgb in COLOURS.values():
            assert not np.all(region == rgb, axis=-1).any()
        assert is_correct(f"The code is {sample.answer}.", sample.answer, "read_text")


def test_read_text_without_sized_default_font(monkeypatch):
    """Pillow < 10.1 (or no FreeType) has one fixed bitmap font: the code is still written and recorded."""
    monkeypatch.setattr(drawing, "load_font", lambda size: (ImageFont.load_default(), None))
    for seed in range(5):
        sample = generate_sample(seed, kinds=["read_text"], min_side=32, max_side=300)
        text = sample.metadata["text"]
        assert text["font_size"] is None and sample.answer == text["text"] and 3 <= len(sample.answer) <= 6
        x0, y0, x1, y1 = text["box"]
        assert (np.asarray(sample.image)[y0:y1, x0:x1, 0] < 120).any()
        check_shapes_exact(sample)


def test_grey_probe_ground_truth():
    answers, padding, padded_side = [], 0, 0
    for sample in kind_samples("grey_probe", n=40):
        band = sample.metadata["band"]
        x0, y0, x1, y1 = band["box"]
        arr = np.asarray(sample.image)
        h, w = arr.shape[:2]
        rgb = tuple(band["rgb"])
        assert np.all(arr[y0:y1, x0:x1] == rgb)
        side = band["side"]
        assert {"left": x0 == 0 and (y0, y1) == (0, h), "right": x1 == w and (y0, y1) == (0, h),
                "top": y0 == 0 and (x0, x1) == (0, w), "bottom": y1 == h and (x0, x1) == (0, w)}[side]
        thickness = (x1 - x0) if side in ("left", "right") else (y1 - y0)
        assert thickness >= 4 and thickness <= 0.36 * (w if side in ("left", "right") else h) + 4
        # the leftmost column (or rightmost, ...) has that colour everywhere; the image's other end never does
        edge = {"left": arr[:, 0], "right": arr[:, -1], "top": arr[0], "bottom": arr[-1]}[side]
        other = {"left": arr[:, -1], "right": arr[:, 0], "top": arr[-1], "bottom": arr[0]}[side]
        assert np.all(edge == rgb) and not np.all(other == rgb)
        expected = "grey" if rgb in (PADDING_GREY, COLOURS["grey"]) else next(n for n, c in COLOURS.items() if c == rgb)
        assert sample.answer == expected
        assert f"{side}most region" in sample.question
        check_shapes_exact(sample, exclude=band["box"])
        answers.append(sample.answer)
        padding += band["padding_colour"]
        padded_side += band["on_llava15_padded_side"]
    assert 10 <= answers.count("grey") <= 30 and padding >= 3 and padded_side >= 5
    assert len(set(answers)) >= 4


def test_shapes_are_small_and_text_small():
    for sample in kind_samples("count", n=10, max_side=2000) + kind_samples("read_text", n=10, max_side=2000):
        short = min(sample.image.size)
        for sh in sample.metadata["shapes"]:
            s = sh["box"][2] - sh["box"][0]
            assert s <= max(12, round(0.04 * short))
        if sample.kind == "read_text":
            assert 8 <= sample.metadata["text"]["font_size"] <= max(9, round(0.03 * short))


def test_backgrounds_are_light_and_varied():
    styles = set()
    for seed in range(40):
        sample = generate_sample(seed, max_side=160)
        bg = sample.metadata["background"]
        styles.add(bg["style"])
        assert all(195 <= c <= 252 for colour in bg["colours"] for c in colour)
    assert styles == {"solid", "horizontal", "vertical", "diagonal"}


# ------------------------------------------------------------------------------------------------ datasets
def _read_tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_llava_format_and_byte_identical(tmp_path):
    a = generate_dataset(tmp_path / "a", 14, seed=7, max_side=300, progress=False)
    b = generate_dataset(tmp_path / "b", 14, seed=7, max_side=300, progress=True, workers=2)
    assert a.name == "synthetic.json" and _read_tree(tmp_path / "a") == _read_tree(tmp_path / "b")
    records = json.loads(a.read_text())
    assert isinstance(records, list) and len(records) == 14
    assert len({r["id"] for r in records}) == 14
    for i, r in enumerate(records):
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert r["question"] in human["value"] and syn.SHORT_ANSWER_PROMPT in human["value"]
        assert gpt["value"] == r["answer"] and r["kind"] in KINDS
        image = Image.open(tmp_path / "a" / r["image"])
        assert not r["image"].startswith("/") and image.size == (r["metadata"]["width"], r["metadata"]["height"])
        again = generate_sample(sample_seed(7, i), max_side=300)  # each sample is reproducible on its own
        assert again.answer == r["answer"] and np.array_equal(np.asarray(image.convert("RGB")),
                                                              np.asarray(again.image))
    c = generate_dataset(tmp_path / "c", 14, seed=8, max_side=300, progress=False)
    assert c.read_bytes() != a.read_bytes()


def test_dataset_jsonl_and_options(tmp_path):
    path = generate_dataset(tmp_path, 5, seed=1, kinds=["count"], format="jsonl", max_side=200, progress=False,
                            answer_prompt=None, image_format="jpg")
    lines = path.read_text().splitlines()
    assert path.name == "synthetic.jsonl" and len(lines) == 5
    for line in lines:
        r = json.loads(line)
        assert r["kind"] == "count" and r["conversations"][0]["value"] == "<image>\n" + r["question"]
        assert r["image"].endswith(".jpg") and (tmp_path / r["image"]).exists()
    assert syn.load_records(path) == [json.loads(x) for x in lines]
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, 1, format="csv")
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, 1, image_format="gif")


def test_cli_helpers(tmp_path, capsys):
    parser = syn.add_synth_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path), "--n", "6", "--seed", "3", "--max-side", "256",
                              "--kinds", "count", "read_text", "--format", "jsonl", "--no-progress"])
    assert syn.run_synth(args) == 0
    out = capsys.readouterr().out
    assert "wrote 6 samples" in out and "synthetic.jsonl" in out and "width" in out
    assert all(json.loads(x)["kind"] in ("count", "read_text") for x in (tmp_path / "synthetic.jsonl").open())
    bad = parser.parse_args(["--out", str(tmp_path), "--min-side", "8", "--no-progress"])
    assert syn.run_synth(bad) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--kinds", "nope"])


def test_fixed_size_keeps_the_scene_stream_and_checks_the_size():
    """``size=`` replaces the drawn size only: kind and question come from the same random stream, the scene is
    laid out on the requested canvas, and a canvas too small for a scene is refused."""
    free = generate_sample(11, kinds=["corner_colour", "count"], max_side=600)
    fixed = generate_sample(11, kinds=["corner_colour", "count"], max_side=600, size=(700, 300))
    assert fixed.image.size == (700, 300) and (fixed.metadata["width"], fixed.metadata["height"]) == (700, 300)
    assert fixed.kind == free.kind
    assert generate_sample(11, size=(700, 300)).image.tobytes() == generate_sample(11, size=(700, 300)).image.tobytes()
    assert all(0 <= sh["box"][0] and sh["box"][2] <= 700 and sh["box"][3] <= 300 for sh in fixed.metadata["shapes"])
    with pytest.raises(ValueError, match="at least 32x32"):
        generate_sample(0, size=(31, 400))
