"""Block-diagonal attention over one packed sequence of crops, as a transformers attention function.

`packed_attention_forward` attends each segment of a ``(1, T, ...)`` sequence only to itself; the segments come in as
``cu_seqlens`` / ``max_seqlen`` keyword arguments that the tower's layers forward to their attention function.
`use_packed_attention` registers it with transformers' ``AttentionInterface`` under ``PACKED_ATTENTION_NAME`` and
switches some modules' configs to it for the duration of a ``with`` block::

    with use_packed_attention(layers):
        out = layer(packed, attention_mask, cu_seqlens=cu, max_seqlen=m)

On CUDA in fp16 / bf16 the attention is torch's flash varlen kernel (``torch.nn.attention.varlen.varlen_attn``) when
the running torch has it (`torch_has_varlen_attn`, `varlen_kernel_available`); otherwise (CPU, fp32, an older torch,
attention dropout) it is one SDPA call per run of consecutive equal-length segments.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PACKED_ATTENTION_NAME",
    "MissingSegmentsError",
    "packed_attention_forward",
    "register_packed_attention",
    "torch_has_varlen_attn",
    "torch_varlen_attn",
    "use_packed_attention",
    "varlen_kernel_available",
]

# The name `packed_attention_forward` is registered under in transformers' AttentionInterface.
PACKED_ATTENTION_NAME = "llava_uhd_varlen"

# torch_varlen_attn: torch.nn.attention.varlen.varlen_attn (flash varlen kernel, CUDA fp16 / bf16), None if this torch
# lacks it. It appeared in torch 2.9 and its keyword arguments changed since (is_causal -> window_size, scale added),
# so only the positional core is relied on.
try:
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except Exception:  # pragma: no cover - depends on the torch build
    torch_varlen_attn = None
try:
    _VARLEN_TAKES_SCALE = torch_varlen_attn is not None and (
        "scale" in inspect.signature(torch_varlen_attn).parameters)
except (TypeError, ValueError):  # pragma: no cover
    _VARLEN_TAKES_SCALE = False
_varlen_kernel_broken = False  # set if the kernel ever raised: later calls use the SDPA fallback


def torch_has_varlen_attn() -> bool:
    """Whether the running torch has ``torch.nn.attention.varlen.varlen_attn`` (the flash varlen kernel)."""
    return torch_varlen_attn is not None


def varlen_kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `packed_attention_forward` runs the flash varlen kernel for tensors on ``device`` in ``dtype``
    (CUDA, fp16 / bf16, a torch with ``torch.nn.attention.varlen.varlen_attn``); else it loops over SDPA calls."""
    return (torch_varlen_attn is not None and not _varlen_kernel_broken
            and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16))


class MissingSegmentsError(RuntimeError):
    """The packed attention was called without ``cu_seqlens``: the layers did not forward the segments."""


def _equal_length_runs(seqlens) -> list[tuple[int, int]]:
    """``[(length, count), ...]``: maximal runs of consecutive segments of equal length."""
    runs: list[list[int]] = []
    for n in seqlens:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return [(n, c) for n, c in runs]


def _varlen_kernel(q, k, v, cu_seqlens, max_seqlen, scaling):
    """``(T, H, d)`` q/k/v through torch's flash varlen kernel."""
    head_dim = q.shape[-1]
    kwargs = {}
    if not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):  # the kernel's default scale
        if _VARLEN_TAKES_SCALE:
            kwargs["scale"] = scaling
        else:
            q = q * (scaling * head_dim ** 0.5)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return torch_varlen_attn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), **kwargs)


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    seqlens: tuple[int, ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Block-diagonal (per-segment) attention over one packed sequence, as a transformers attention function.

    Registered in ``transformers.AttentionInterface`` as ``"llava_uhd_varlen"``; the tower's attention modules
    call it with ``(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)``.

    Args:
        query, key, value: ``(1, H, T, d)``, the packed sequence (``T`` tokens of all segments).
        attention_mask: must be None (the segments are the mask).
        cu_seqlens: ``(N + 1,)`` integer segment boundaries (``0, len_0, len_0 + len_1, ..., T``).
        max_seqlen: the longest segment.
        seqlens: optional, the ``N`` segment lengths as Python ints (spares a device sync in the SDPA fallback).

    Returns:
        ``((1, T, H, d), None)``, as transformers' sdpa / eager attention functions (no attention weights).

    On CUDA in fp16 / bf16 without attention dropout it runs ``torch.nn.attention.varlen.varlen_attn``;
    otherwise one ``scaled_dot_product_attention`` call per run of consecutive equal-length segments, batched.
    """
    if cu_seqlens is None:
        raise MissingSegmentsError(
            f"{PACKED_ATTENTION_NAME!r} attention needs cu_seqlens / max_seqlen keyword arguments: the layers of "
            f"{type(module).__name__} did not forward them")
    if attention_mask is not None:
        raise ValueError(f"{PACKED_ATTENTION_NAME!r} attention takes no attention_mask: the segments are the mask")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed sequence (batch 1), got batch {query.shape[0]}")
    head_dim = query.shape[-1]
    if scaling is None:
        scaling = head_dim ** -0.5
    # (1, H, T, d) -> (T, H, d): for the towers' q/k/v, views of the projection output, no copy.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))

    global _varlen_kernel_broken
    if (not dropout and varlen_kernel_available(q.device, q.dtype) and k.shape[1] == q.shape[1]
            and head_dim % 8 == 0 and head_dim <= 256):
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        try:
            return _varlen_kernel(q, k, v, cu_seqlens, max_seqlen, scaling).unsqueeze(0), None
        except RuntimeError as err:  # pragma: no cover - needs a GPU
            _varlen_kernel_broken = True
            warnings.warn(f"torch varlen_attn failed ({err}); packed attention falls back to SDPA per segment "
                          "length from now on", RuntimeWarning, stacklevel=2)

    if seqlens is None:
        seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outputs, start = [], 0
    for length, count in _equal_length_runs(seqlens):
        end = start + length * count

        def group(t):  # (T, H, d) slice -> (count, H, length, d), the layout of a dense batch
            return t[start:end].unflatten(0, (count, length)).transpose(1, 2)

        out = F.scaled_dot_product_attention(group(q), group(k), group(v), dropout_p=dropout, scale=scaling)
        outputs.append(out.transpose(1, 2).reshape(end - start, out.shape[1], out.shape[-1]))
        start = end
    if start != q.shape[0]:
        raise ValueError(f"segments cover {start} tokens but the packed sequence has {q.shape[0]}")
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.unsqueeze(0), None


_registered = False


def register_packed_attention() -> None:
    """Register `packed_attention_forward` in transformers' ``AttentionInterface`` as ``PACKED_ATTENTION_NAME``.
    Idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION_NAME, packed_attention_forward)
        _registered = True


@contextlib.contextmanager
def use_packed_attention(module: nn.Module):
    """Switch the ``config._attn_implementation`` of ``module`` and its submodules to `packed_attention_forward`
    (registering it first); restore every one on exit, also on error. Not thread safe: do not run the same modules
    from two threads at once."""
    register_packed_attention()
    configs = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    saved = [(config, config._attn_implementation) for config in configs.values()]
    try:
        for config, _ in saved:
            config._attn_implementation = PACKED_ATTENTION_NAME
        yield
    finally:
        for config, previous in saved:
            config._attn_implementation = previous
