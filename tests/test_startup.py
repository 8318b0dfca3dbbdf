"""Fast start: the package and the light commands load neither torch nor transformers (what they cost in seconds
is measured by ``bench/startup.py``, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers")


def _modules_after(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\n"
                           f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_llava_uhd_is_light():
    assert _modules_after("import llava_uhd; llava_uhd.plan_slices(4000, 3000)") == []


def test_help_slice_and_cost_are_light(tmp_path):
    image = tmp_path / "ex.png"
    code = (
        "import contextlib, io\n"
        "from llava_uhd.cli import build_parser, main\n"
        f"main(['example-image', {str(image)!r}, '--width', '300', '--height', '200'])\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    build_parser().format_help()\n"
        f"    assert main(['slice', {str(image)!r}, '--json']) == 0\n"
        "    assert main(['cost', '--width', '672', '--height', '1008']) == 0\n")
    assert _modules_after(code) == []
