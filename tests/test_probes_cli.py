"""``llava-uhd probe`` (`llava_uhd.eval.probes`, `probe_systems`, `probe_plots`, `probe_cli`): the pictures hold
what the sweep says, answers are read and aggregated right, the endpoint client answers what the local model
answers through this project's server, and a whole ``--quick`` run on a tiny model writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from llava_uhd.data.synthetic import COLOURS, PADDING_GREY
from llava_uhd.eval.probes import (PadSettings, PositionSettings, ResolutionSettings, aggregate, padding_items,
                                   parse_answer, parse_ratio, position_items, resolution_items, score)


def _box_of(image: Image.Image, rgb) -> tuple[int, int, int, int] | None:
    """The bounding box (exclusive) of the pixels of exactly ``rgb``."""
    a = np.asarray(image)
    ys, xs = np.nonzero((a == np.asarray(rgb, dtype=np.uint8)).all(-1))
    return None if len(xs) == 0 else (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ------------------------------------------------------------------------------------------------ pictures
def test_position_pictures_hold_the_shape_in_its_cell():
    s = PositionSettings(width=448, height=336, cols=4, rows=2, question="quarter", variants=2, shape_size=16)
    items = position_items(s)
    assert len(items) == 4 * 2 * 2 and len({i.id for i in items}) == len(items)
    assert {i.cell["colour"] for i in items} == set(COLOURS)  # the colours rotate over the cells and variants
    for item in items:
        assert item.image.size == (448, 336)
        col, row = item.cell["col"], item.cell["row"]
        box = _box_of(item.image, COLOURS[item.cell["colour"]])
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        assert abs(cx - item.cell["x"]) <= 1 and abs(cy - item.cell["y"]) <= 1
        if item.cell["variant"] == 0:  # centred; the other variants anywhere inside the cell
            assert abs(cx - (col + 0.5) * 112) <= 1 and abs(cy - (row + 0.5) * 168) <= 1
        assert col * 112 <= box[0] and box[2] <= (col + 1) * 112 and row * 168 <= box[1] and box[3] <= (row + 1) * 168
        assert item.truth == ("top" if row == 0 else "bottom") + "-" + ("left" if col < 2 else "right")
    colour = position_items(PositionSettings(width=448, height=336, cols=4, rows=2, question="colour", variants=1))
    assert all(i.truth == i.cell["colour"] and i.question == "What colour is the small shape?" for i in colour)


def test_position_count_pictures_hold_that_many_circles():
    items = position_items(PositionSettings(width=600, height=300, cols=3, rows=2, question="count", count=4,
                                            variants=1))
    for item in items:
        assert item.truth == "4" and item.question == "How many circles are there?"
        a = (np.asarray(item.image) == np.asarray(COLOURS[item.cell["colour"]], dtype=np.uint8)).all(-1)
        # four blobs along the row through the cell's centre, each in its own box
        assert len(item.cell["boxes"]) == 4 and a.sum() > 0
        for x0, y0, x1, y1 in item.cell["boxes"]:
            assert a[y0:y1, x0:x1].any() and 0 <= x0 and x1 <= 600
        columns = np.nonzero(a.any(0))[0]
        assert (np.diff(columns) > 1).sum() == 3  # three gaps between four circles
        box = _box_of(item.image, COLOURS[item.cell["colour"]])
        assert abs((box[0] + box[2]) / 2 - item.cell["x"]) <= 1


@pytest.mark.parametrize("bad", [dict(question="quarter", cols=3), dict(cols=40), dict(question="nothing")])
def test_position_settings_refuse_impossible_sweeps(bad):
    with pytest.raises(ValueError):
        position_items(PositionSettings(**{"width": 448, "height": 336, "cols": 4, "rows": 2, **bad}))


def test_resolution_pictures_are_one_master_resized():
    s = ResolutionSettings(sizes=(896, 224, 448), aspect=parse_ratio("3:2"), variants=2, question="colour")
    items = resolution_items(s)
    assert [i.cell["long_side"] for i in items] == [224, 448, 896] * 2
    for item in items:
        w, h = item.image.size
        assert max(w, h) == item.cell["long_side"] and abs(w / h - 1.5) < 0.01
        assert item.truth == item.cell["colour"]
    largest = [i for i in items if i.cell["long_side"] == 896]
    for item in largest:  # the master, unresized: the shape's exact colour where it was drawn
        assert _box_of(item.image, COLOURS[item.cell["colour"]]) == tuple(item.cell["boxes"][0])
    small = items[0].image.resize((896, 597))  # the same picture: the shape's place survives the resizing
    a = np.asarray(small).astype(int) - np.asarray(Image.new("RGB", (896, 597), (236, 233, 226))).astype(int)
    ys, xs = np.nonzero(np.abs(a).sum(-1) > 60)
    x0, y0, x1, y1 = items[2].cell["boxes"][0]
    assert x0 - 8 <= xs.mean() <= x1 + 8 and y0 - 8 <= ys.mean() <= y1 + 8
    counts = resolution_items(ResolutionSettings(sizes=(300, 600), question="count", count=5, variants=1))
    assert all(i.truth == "5" and len(i.cell["boxes"]) == 5 for i in counts)


def test_padding_pictures_have_the_band_on_their_side():
    s = PadSettings(aspects=(1 / 3, 1.0, 2.0), long_side=300, variants=1, band_fraction=0.2)
    items = padding_items(s)
    assert len(items) == 3 * 4 * 2
    assert {i.cell["aspect"] for i in items} == {"1:3", "1:1", "2:1"}
    greys = {tuple(i.cell["rgb"]) for i in items if i.cell["grey"]}
    assert greys == {PADDING_GREY, COLOURS["grey"]}
    for item in items:
        w, h = item.image.size
        assert abs(w / h - item.cell["aspect_value"]) < 0.02 and max(w, h) == 300
        a = np.asarray(item.image)
        rgb = np.asarray(item.cell["rgb"], dtype=np.uint8)
        side = item.cell["side"]
        strip = {"left": a[:, :2], "right": a[:, -2:], "top": a[:2], "bottom": a[-2:]}[side]
        opposite = {"left": a[:, -2:], "right": a[:, :2], "top": a[-2:], "bottom": a[:2]}[side]
        assert (strip == rgb).all() and not (opposite == rgb).all(-1).any()
        assert item.truth == ("grey" if item.cell["grey"] else next(n for n, c in COLOURS.items()
                                                                   if tuple(c) == tuple(item.cell["rgb"])))
        word = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]
        assert item.question == f"What colour is the {word} region of the image?"
        # LLaVA-1.5 pads a wide picture above and below, a tall one left and right
        assert item.cell["on_padded_side"] == (side in (("top", "bottom") if w > h else ("left", "right") if h > w
                                                        else ()))


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("text, kind, want", [
    ("There are three.", "count", "3"), ("3", "count", "3"), ("none", "count", "0"), ("2 or 3", "count", None),
    ("circles", "count", None), ("Gray.", "colour", "grey"), ("It is red", "colour", "red"),
    ("red and blue", "colour", None), ("white", "colour", "white"), ("", "colour", None),
    ("Top-left.", "quarter", "top-left"), ("the upper right quarter", "quarter", "top-right"),
    ("lower left", "quarter", "bottom-left"), ("left", "quarter", None), ("top left or top right", "quarter", None),
])
def test_parse_answer(text, kind, want):
    assert parse_answer(text, kind) == want


def test_the_heat_map_holds_the_mean_parsed_answer_per_cell():
    items = position_items(PositionSettings(width=600, height=300, cols=3, rows=2, question="count", variants=2))
    rng = np.random.default_rng(0)
    fake = {i.id: [str(int(n)) for n in rng.integers(0, 7, size=3)] for i in items}
    fake[items[0].id] = ["two", "I see 4 circles", "many"]  # words, a sentence and one unreadable answer
    records = score(items, [fake[i.id] for i in items])
    assert len(records) == len(items) * 3 and records[2]["parsed"] is None
    summary = aggregate("position", items, records)
    assert summary["truth"] == "3" and len(summary["grid"]) == 2 and len(summary["grid"][0]) == 3
    for row in range(2):
        for col in range(3):
            numbers = [int(parse_answer(a, "count")) for i in items if (i.cell["col"], i.cell["row"]) == (col, row)
                       for a in fake[i.id] if parse_answer(a, "count") is not None]
            assert summary["grid"][row][col] == pytest.approx(sum(numbers) / len(numbers))
    assert summary["cells"][0][0]["unreadable"] == 1 and summary["overall"]["answers"] == len(records)
    # colour questions: the share of right answers
    items = position_items(PositionSettings(width=448, height=336, cols=4, rows=2, variants=1))
    answers = [[i.truth] if k % 2 == 0 else ["It is white."] for k, i in enumerate(items)]
    summary = aggregate("position", items, score(items, answers))
    assert summary["grid"] == [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    assert summary["overall"]["accuracy"] == 0.5 and summary["overall"]["unreadable"] == 0


def test_resolution_and_padding_aggregates():
    items = resolution_items(ResolutionSettings(sizes=(224, 448), question="count", variants=2))
    answers = [["3"], ["3"], ["4"], ["nope"]]  # items: (224, v0), (448, v0), (224, v1), (448, v1)
    summary = aggregate("resolution", items, score(items, answers))
    assert [s["long_side"] for s in summary["sizes"]] == [224, 448]
    assert summary["sizes"][0]["distribution"] == {"3": 1, "4": 1} and summary["sizes"][0]["mean"] == 3.5
    assert summary["sizes"][1]["distribution"] == {"3": 1, "unreadable": 1} and summary["sizes"][1]["mean"] == 3
    assert summary["sizes"][0]["accuracy"] == 0.5
    items = padding_items(PadSettings(aspects=(0.5, 2.0), long_side=200, sides=("left",)))
    answers = [["purple"] if i.cell["grey"] else [i.truth] for i in items]  # grey read as something else
    summary = aggregate("padding", items, score(items, answers))
    for a in summary["aspects"]:
        assert a["grey"]["accuracy"] == 0 and a["coloured"]["accuracy"] == 1 and a["all"]["accuracy"] == 0.5
    assert summary["padded_side"]["answers"] == 2  # the tall picture's left side is a padded side
    colour = resolution_items(ResolutionSettings(sizes=(224,), variants=3))
    answers = [[colour[0].truth], ["white"], ["hm"]]
    assert aggregate("resolution", colour, score(colour, answers))["sizes"][0]["distribution"] == {
        "right": 1, "unreadable": 1, "wrong": 1}


def test_the_plots_draw():
    from llava_uhd.eval.probe_plots import distribution_plot, heat_map, padding_plot, side_by_side

    items = position_items(PositionSettings(width=448, height=336, cols=4, rows=2, variants=1))
    summary = aggregate("position", items, score(items, [[i.truth] for i in items]))
    a = heat_map(summary, 448, 336, "t", slices=[[0, 0, 224, 336], [224, 0, 448, 336]], plot_width=400)
    assert a.width == 400 + 32 and abs((a.height - 106) - 400 * 336 / 448) <= 1
    items = resolution_items(ResolutionSettings(sizes=(224, 448), question="count", variants=1))
    b = distribution_plot(aggregate("resolution", items, score(items, [["3"], ["6"]])), "t")
    items = padding_items(PadSettings(aspects=(1.0,), long_side=100, sides=("top",)))
    c = padding_plot(aggregate("padding", items, score(items, [["grey"], ["red"]])), "t")
    both = side_by_side([a, b, c], gap=10)
    assert both.size == (a.width + b.width + c.width + 20, max(a.height, b.height, c.height))


# ------------------------------------------------------------------------------------------------ systems
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serve_helpers import save_tiny

    folder = tmp_path_factory.mktemp("tiny-probe")
    model, processor = save_tiny(folder)
    return folder, model.eval(), processor


def test_the_endpoint_client_answers_what_the_local_model_answers(tiny):
    from llava_uhd.eval.probe_systems import EndpointSystem, LocalSystem, ProbeError, chat_url
    from llava_uhd.serve.generation import GenerationSettings
    from llava_uhd.serve.server import create_app, running_server

    _, model, processor = tiny
    items = padding_items(PadSettings(aspects=(0.5, 2.0), long_side=120, sides=("left", "top")))
    images, questions = [i.image for i in items], [i.question for i in items]
    local = LocalSystem(model, processor, GenerationSettings(max_new_tokens=5), batch_size=3).answer(images, questions)
    with running_server(create_app(model, processor, "tiny-probe")) as url:
        endpoint = EndpointSystem(url, max_tokens=5, concurrency=3)
        assert endpoint.model_name() == "tiny-probe"  # from /v1/models
        assert endpoint.answer(images, questions) == local
        assert len(set(a[0] for a in local)) > 1  # the pictures are told apart
        with pytest.raises(ProbeError, match="404"):
            EndpointSystem(url + "/v1", model="no-such-model").ask(images[0], questions[0])
    with pytest.raises(ProbeError, match="cannot reach"):
        EndpointSystem(url, model="x", timeout_s=5).ask(images[0], questions[0])
    assert chat_url("http://h:1/v1/") == chat_url("http://h:1") == "http://h:1/v1/chat/completions"


def test_a_quick_run_on_a_tiny_model_folder(tiny, tmp_path, capsys):
    from llava_uhd.cli import main

    folder = tiny[0]
    out = tmp_path / "pos"
    assert main(["probe", "position", "--quick", "--model", str(folder), "--out", str(out), "--label", "tiny",
                 "--save-images"]) == 0
    lines = [json.loads(line) for line in open(out / "answers.jsonl")]
    assert len(lines) == 8 and {line["system"] for line in lines} == {"tiny"}
    assert set(lines[0]) >= {"probe", "id", "cell", "question", "truth", "answer", "parsed", "correct"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pictures"] == 8 and summary["system"]["system"] == "local"
    assert len(summary["aggregate"]["grid"]) == 2 and len(summary["aggregate"]["grid"][0]) == 4
    assert summary["slices"]["boxes"]  # the tiny model slices a 448x336 canvas
    assert Image.open(out / "position.png").size[0] > 500 and len(list((out / "images").iterdir())) == 8
    assert "overall:" in capsys.readouterr().out
    # sampled repeats, reproducible with a seed
    runs = []
    for k in range(2):
        o = tmp_path / f"res{k}"
        assert main(["probe", "resolution", "--quick", "--model", str(folder), "--out", str(o), "--repeats", "2",
                     "--temperature", "1.0", "--seed", "3", "--sizes", "112", "224", "--question", "count"]) == 0
        runs.append([json.loads(line)["answer"] for line in open(o / "answers.jsonl")])
    assert len(runs[0]) == 4 and runs[0] == runs[1]
    assert "slices" in json.loads((tmp_path / "res0" / "summary.json").read_text())["aggregate"]["sizes"][0]


@pytest.mark.parametrize("argv, message", [
    (["probe", "position", "--repeats", "3"], "needs --temperature > 0"),
    (["probe", "position", "--model", "m", "--endpoint", "http://127.0.0.1:9"], "not both"),
    (["probe", "position", "--question", "quarter", "--grid", "3x2"], "even number"),
    (["probe", "position", "--grid", "3by2"], "expected WxH"),
    (["probe", "padding", "--aspects", "2:0"], "aspect ratio"),
    (["probe", "padding", "--endpoint", "ftp://x"], "http:// or https://"),
    (["probe", "padding", "--endpoint", "http://127.0.0.1:9", "--image-strategy", "pad"], "for a local model"),
    (["probe", "padding", "--endpoint", f"http://127.0.0.1:{free_port()}", "--quick"], "cannot reach"),  # no one there
])
def test_user_mistakes_are_one_line(argv, message, tmp_path, capsys):
    from llava_uhd.cli import main

    code = None
    try:
        code = main([*argv, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


_FAKE = textwrap.dedent("""
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "fake"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            parts = body["messages"][0]["content"]
            assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
            asked.append((self.headers.get("authorization"), body["model"]))
            self._send({"choices": [{"message": {"role": "assistant", "content": "Grey."}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from llava_uhd.cli import main
    code = main(["probe", "padding", "--quick", "--endpoint", f"http://127.0.0.1:{server.server_port}",
                 "--api-key", "k", "--out", sys.argv[1]])
    server.shutdown()
    print(json.dumps({"code": code, "torch": "torch" in sys.modules, "asked": asked[:1], "n": len(asked)}))
""")


def test_the_endpoint_path_needs_no_torch(tmp_path):
    run = subprocess.run([sys.executable, "-c", _FAKE, str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=120)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "torch": False, "asked": [["Bearer k", "fake"]], "n": 12}, run.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    # "Grey." is right on every grey band and wrong on every coloured one
    assert all(a["grey"]["accuracy"] == 1 and a["coloured"]["accuracy"] == 0 for a in summary["aggregate"]["aspects"])
