import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_uhd.cli import main
from llava_uhd.visualize import make_example_image


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "example.png"
    make_example_image(672, 1008).save(path)
    return path


def test_slice_report(example, capsys):
    assert main(["slice", str(example)]) == 0
    out = capsys.readouterr().out
    assert "2 cols x 3 rows = 6 slices" in out
    assert "= 454" in out
    assert "llava-1.5" in out and " 576 " in out
    assert "llava-next" in out and " 2160 " in out
    assert "(336, 672, 672, 1008)" in out


def test_slice_json_is_only_json(example, capsys):
    assert main(["slice", str(example), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"cols", "rows", "slices", "overview", "tokens"}
    assert (data["cols"], data["rows"], data["tokens"]) == (2, 3, 454)
    assert data["slices"][5]["box"] == [336, 672, 672, 1008] and data["slices"][0]["size"] == [336, 336]


def test_slice_max_slices_and_picture(example, tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["slice", str(example), "--max-slices", "2", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cols"] * data["rows"] == 2
    picture = Image.open(out)
    # the image (scaled) plus the overview beside it
    assert picture.width > 672 * min(1, 900 / 1008) + data["overview"]["size"][0]


def test_release_preset(tmp_path, capsys):
    path = tmp_path / "wide.png"
    make_example_image(336 * 7, 336).save(path)
    main(["slice", str(path), "--json", "--preset", "release"])
    assert json.loads(capsys.readouterr().out)["cols"] == 7


def test_bad_image_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"hello")
    assert main(["slice", str(bad)]) == 2
    assert "not an image" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "llava_uhd", "slice", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-slices" in out.stdout and "--json" in out.stdout


def test_cost_json(capsys):
    assert main(["cost", "--width", "672", "--height", "1008", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == {"llava-uhd", "llava-1.5", "llava-next"}
    keys = {"vit_patches", "visual_tokens", "vit_tflops", "projector_tflops", "llm_tflops", "total_tflops"}
    assert all(keys <= set(entry) for entry in table.values())
    assert [table[m]["visual_tokens"] for m in ("llava-uhd", "llava-1.5", "llava-next")] == [454, 576, 2160]
    assert abs(table["llava-uhd"]["total_tflops"] / 14.6 - 1) < 0.03
    assert abs(table["llava-1.5"]["total_tflops"] / 15.5 - 1) < 0.03


def test_cost_text(capsys):
    assert main(["cost", "--width", "1000", "--height", "500", "--llm-params", "7e9"]) == 0
    out = capsys.readouterr().out
    assert "total TFLOPs" in out and "llava-next" in out and "7B" in out


def test_example_image_with_a_question(tmp_path, capsys):
    from llava_uhd.data.synthetic import generate_sample

    out = tmp_path / "q.png"
    assert main(["example-image", str(out), "--width", "640", "--height", "480", "--kind", "corner_colour",
                 "--seed", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    sample = generate_sample(5, kinds="corner_colour", size=(640, 480))
    assert printed[1:] == [f"question: {sample.question}", f"answer: {sample.answer}"]
    assert Image.open(out).size == (640, 480)
    assert Image.open(out).tobytes() == sample.image.tobytes()
    assert main(["example-image", str(out), "--width", "20", "--height", "480", "--kind", "count"]) == 2
    assert "at least 32x32" in capsys.readouterr().err
    assert _status(["example-image", str(out), "--width", "0", "--height", "480"]) == 2
    assert "argument --width: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["example-image", str(out), "--kind", "nope"])
    # a single-shape probe (the nano model's default kinds)
    from llava_uhd.data.probes import probe_sample
    from llava_uhd.nano.settings import NanoSettings

    assert main(["example-image", str(out), "--width", "500", "--height", "900", "--kind", "probe_colour"]) == 0
    probe = probe_sample(0, "probe_colour", NanoSettings(), size=(500, 900))
    assert capsys.readouterr().out.splitlines()[1:] == [f"question: {probe.question}", f"answer: {probe.answer}"]
    assert Image.open(out).tobytes() == probe.image.tobytes()


def _status(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("options, message", [
    (["--queries", "-5"], "llava-uhd slice: error: argument --queries: must be >= 1, got -5"),
    (["--queries", "many"], "argument --queries: expected an integer, got 'many'"),
    (["--max-slices", "0"], "argument --max-slices: must be >= 1, got 0"),
    (["--out", "no/such/folder/plan.png"], "cannot write 'no/such/folder/plan.png': the folder 'no/such/folder' "
                                           "does not exist"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
])
def test_slice_mistakes_are_one_line_before_any_work(example, capsys, monkeypatch, tmp_path, options, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("llava_uhd.image_io.load_rgb", lambda *a, **k: pytest.fail("the image was read"))
    assert _status(["slice", str(example), *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


def test_the_plan_picture_follows_queries_and_wraps_its_title(tmp_path, capsys):
    from llava_uhd.slicing import plan_slices
    from llava_uhd.visualize import draw_plan

    tall = make_example_image(300, 2000)
    plan = plan_slices(300, 2000)
    small, large = draw_plan(tall, plan, queries=16), draw_plan(tall, plan, queries=64)
    # the title is the only difference (7 crops x 16 queries + 6 separators = 118 tokens against 454)
    assert small.size == large.size and small.width < 400
    differs = [y for y in range(small.height)
               if any(small.getpixel((x, y)) != large.getpixel((x, y)) for x in range(0, small.width, 2))]
    assert differs and max(differs) < 120
    # the title is wrapped to the picture: no dark text pixel in its right margin
    for picture in (small, large):
        strip = picture.crop((picture.width - 18, 0, picture.width, 120)).convert("L")
        assert np.asarray(strip).min() > 200
    out = tmp_path / "plan.png"
    assert main(["slice", str(tmp_path / "t.png"), "--out", str(out)]) == 2  # no such image yet
    tall.save(tmp_path / "t.png")
    assert main(["slice", str(tmp_path / "t.png"), "--queries", "16", "--out", str(out)]) == 0
    assert "= 118" in capsys.readouterr().out and Image.open(out).size == small.size


def test_a_closed_pipe_ends_quietly(example):
    # `llava-uhd slice x.png | true`: the reader is gone before the first line; no BrokenPipeError, status 141
    done = subprocess.run(f"{sys.executable} -m llava_uhd slice {example} | true; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert done.stderr == "" and done.returncode == 141
