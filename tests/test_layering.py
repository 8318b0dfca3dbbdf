"""The package's layers: imports only go downward, without cycles, and inference needs no training code.

Layers, lowest first: ``slicing`` -> ``image_processing`` -> ``processing`` -> ``modeling`` -> ``data``, ``eval``,
``train``, ``serve`` -> ``cli``; ``nano`` spans several (`RANKS`). Every ``import`` of a ``llava_uhd`` module, at the
top of a file or inside a function, is an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llava_uhd"

# the rank of each top-level module or package; a module may import only ranks at or below its own
RANKS = {
    "runinfo": 0, "slicing": 0, "peers": 0, "image_io": 0, "lazy": 0, "commandline": 0,
    "image_processing": 1, "image_processing_fast": 1, "visualize": 1,
    "processing": 2,
    "modeling": 3, "flops": 3, "auto": 3,
    "backbones": 4, "backbone_cache": 4, "convert": 4,
    "data": 5,
    "eval": 6, "train": 6, "serve": 6,
    "nano": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
    # the nano model spans layers: its rounding sits with the backbones; its settings (data settings included),
    # weights folder, data encoding and feature cache with the data, below inference; the recipe above training
    "nano.rounding": 4,
    "nano.settings": 5, "nano.checkpoint": 5, "nano.bundle": 5, "nano.data": 5, "nano.features": 5, "nano.budget": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The ``llava_uhd`` modules that ``path`` imports (relative imports resolved; ``from X import y`` counts
    ``X.y`` when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("llava_uhd")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("llava_uhd"):
                continue
            out.add(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                        (SRC.parent / sub.replace(".", "/")).is_dir():
                    out.add(sub)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _rank(module: str) -> int:
    """The rank of the longest `RANKS` key that ``module`` (``llava_uhd.x.y``) is or lies in."""
    parts = module.split(".")[1:] or ["__init__"]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return RANKS[".".join(parts[:n])]
    raise KeyError(module)


def test_every_module_has_a_layer():
    for module in _graph():
        _rank(module)


def test_imports_only_go_downward():
    upward = [(m, t) for m, targets in _graph().items() for t in targets
              if t != "llava_uhd" and _rank(t) > _rank(m)]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ is not an edge to its submodules' importers (python runs it first, whatever is asked)
    edges = {m: {t for t in ts if t in graph and t != "llava_uhd"} for m, ts in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(t):] + [t])}")
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", ["llava_uhd.serve.ask", "llava_uhd.nano.checkpoint"])
def test_inference_reaches_no_training_or_evaluation_module(module):
    graph = _graph()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        todo += graph[m]
    bad = sorted(m for m in seen if m.startswith(("llava_uhd.train", "llava_uhd.eval", "llava_uhd.nano.train",
                                                  "llava_uhd.nano.stage", "llava_uhd.nano.evaluate")))
    assert not bad, bad
