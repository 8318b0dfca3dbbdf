"""Big-model loading support: code that reads a module's weights without calling that module.

``from_pretrained(..., device_map="auto", max_memory=...)`` lets accelerate offload blocks of the model to the
CPU or the disk: their weights sit on the ``meta`` device and a hook on each module loads them for the duration of
that module's own ``forward``. Code that reads ``module.weight`` directly (the vision encoder takes the tower's
position embedding and CLS token apart; ``nn.MultiheadAttention`` reads ``out_proj.weight``) must load them itself::

    with onloaded(tower.embeddings):          # its weights (and its submodules') are real inside the block
        cls = tower.embeddings.class_embedding
    device = execution_device(tower.embeddings.patch_embedding)   # where that module computes

Both are no-ops on a model that accelerate did not dispatch. Inside the block, do not call the loaded modules
and then read their weights again: their own hook unloads them when their ``forward`` returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["onloaded", "execution_device"]

# ids of the modules whose offloaded weights an enclosing `onloaded` block holds loaded
_LOADED: set[int] = set()


def _hooks(module: nn.Module) -> tuple:
    """The accelerate hooks on ``module`` (a `SequentialHook` unpacked), or ``()``."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return ()
    return tuple(getattr(hook, "hooks", (hook,)))


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of its accelerate hook if it was dispatched with a
    ``device_map`` (its weights may be on ``meta`` then), else the device of its first parameter or buffer (the
    CPU if it has none)."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the offloaded weights of ``modules`` and of all their submodules are loaded on their
    execution device; they are offloaded again at its end. Nested blocks over the same modules load them once."""
    todo = []
    for root in modules:
        for module in root.modules():
            offload = [hook for hook in _hooks(module) if getattr(hook, "offload", False)]
            if offload and id(module) not in _LOADED:
                todo.append((module, offload))
    with contextlib.ExitStack() as stack:
        for module, hooks in todo:
            _LOADED.add(id(module))
            stack.callback(_LOADED.discard, id(module))
            for hook in hooks:
                hook.pre_forward(module)
                stack.callback(hook.post_forward, module, None)
        yield
