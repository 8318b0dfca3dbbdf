"""Lazy package faces (`llava_uhd.lazy`)."""

from __future__ import annotations

import importlib

import pytest

from llava_uhd.lazy import lazy_attributes


def test_names_load_once_from_their_module_and_missing_backends_are_named(monkeypatch):
    namespace: dict = {}
    loaded = []
    getattr_, dir_ = lazy_attributes("llava_uhd", {"plan_slices": "slicing", "Model": "needs_torch"}, namespace,
                                     on_load=loaded.append)
    from llava_uhd.slicing import plan_slices

    assert getattr_("plan_slices") is plan_slices and namespace["plan_slices"] is plan_slices
    assert loaded == ["plan_slices"] and dir_() == ["Model", "plan_slices"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        getattr_("nope")
    real = importlib.import_module

    def no_torch(name, package=None):
        if name == ".needs_torch":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_torch)
    with pytest.raises(ImportError, match=r"llava_uhd.Model needs torch: pip install torch"):
        getattr_("Model")
