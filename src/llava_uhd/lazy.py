"""Package faces that import their names on first use (PEP 562), so importing a package stays cheap.

    __getattr__, __dir__ = lazy_attributes(__name__, {"Name": "submodule"}, globals())

The first ``package.Name`` imports ``package.submodule`` and keeps the value as a plain attribute; a missing torch
or transformers becomes an ImportError naming the pip command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, module_of: dict[str, str], namespace: dict[str, Any],
                    on_load: Callable[[str], None] | None = None):
    """``(__getattr__, __dir__)`` for ``package``: each name of ``module_of`` comes from its submodule (relative
    to ``package``) on first use and is stored in ``namespace``; ``on_load(name)`` runs after it is loaded."""

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(f".{module}", package), name)
        except ModuleNotFoundError as e:
            if e.name in ("torch", "transformers"):
                raise ImportError(f"{package}.{name} needs {e.name}: pip install {e.name}") from e
            raise
        if on_load is not None:
            on_load(name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(module_of))

    return __getattr__, __dir__
