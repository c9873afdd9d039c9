"""Reading fields where the model evaluates them: forward pre-hooks on every field of a kind.

A hook sees exactly what the field reads (``norm(x)`` inside a ``PreNorm``, the raw state in a
post-norm model) and, inside ``Interpolated``, the interpolated parameters, so the diagnostics
work for any SVFlow model, solver and time mode. Each call is tagged with its time ``t``; layer
k is the interval ``[k, k+1)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

from torch import nn

__all__ = ["on_calls", "replace_inputs", "layer_of"]


def layer_of(t: float, n_blocks: int) -> int:
    """The layer whose time interval ``[k, k+1)`` holds ``t`` (the last one holds ``t = n_blocks``)."""
    return min(int(math.floor(float(t) + 1e-9)), n_blocks - 1)


def _fields(model: nn.Module, kind: type) -> list[nn.Module]:
    fields = [m for m in model.modules() if isinstance(m, kind)]
    if not fields:
        raise ValueError(f"{type(model).__name__} has no {kind.__name__}")
    return fields


@contextmanager
def on_calls(model: nn.Module, kind: type, fn: Callable):
    """Call ``fn(field, x, context)`` before every call of a ``kind`` field inside ``model``.

    Yields the list that collects ``(t, fn(...))`` per call, in call order.
    """
    records = []

    def hook(field, args, kwargs):
        t, x = args[:2]
        records.append((float(t), fn(field, x, kwargs)))

    handles = [f.register_forward_pre_hook(hook, with_kwargs=True) for f in _fields(model, kind)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replace_inputs(model: nn.Module, kind: type, inputs: dict):
    """Feed ``inputs[n]`` instead of the state to call ``n`` (0-based, in call order) of ``kind`` fields."""
    count = [0]

    def hook(field, args, kwargs):
        n = count[0]
        count[0] += 1
        if n in inputs:
            return (args[0], inputs[n], *args[2:]), kwargs
        return None

    handles = [f.register_forward_pre_hook(hook, with_kwargs=True) for f in _fields(model, kind)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
