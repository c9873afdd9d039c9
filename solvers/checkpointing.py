"""Two-level checkpointing of a chain of steps: memory like ``sqrt(n)`` states, not ``n``."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_steps"]


def checkpointed_steps(
    step: Callable[[int, torch.Tensor], tuple[torch.Tensor, int]], x: torch.Tensor, n: int
) -> tuple[torch.Tensor, int]:
    """``x`` after ``x, c = step(i, x)`` for ``i = 0..n-1``, keeping ~``2 sqrt(n)`` states for backward.

    Two-level checkpointing: the steps run in segments of ``ceil(sqrt(n))`` and the forward pass
    keeps only each segment's input. The backward pass reruns one segment at a time, keeping the
    input of each of its steps, then reruns each step to differentiate it. Memory peaks at about
    ``2 sqrt(n)`` states plus one step's activations, where a checkpoint per step keeps ``n``
    states; the price is a second rerun of every step (three forward passes instead of two).
    Below 6 steps two levels would keep as many states as one: each step is checkpointed alone.
    Gradients are plain backpropagation's (the same operations, recomputed), so ``step`` must
    compute the same thing each time it runs.

    The count ``c`` each step returns (its field evaluations) is summed over the forward pass only:
    it comes back as a value, not a side effect, so the reruns do not add to it and
    ``torch.compile`` traces the checkpoints without a graph break.

    Args:
        step: ``step(i, x) -> (x, count)``, the state after step ``i`` from the state before it.
        x: the initial state.
        n: the number of steps.

    Returns:
        ``(x, total count)``.
    """
    if n < 0:
        raise ValueError(f"the number of steps must be >= 0, got {n}")
    if n == 0:
        return x, 0
    size = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    starts = range(0, n, size)

    def run(start: int, stop: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        total = 0
        for i in range(start, stop):
            x, count = checkpoint(step, i, x, use_reentrant=False)
            total += count
        return x, total

    if len(starts) + size >= n:  # a few steps: two levels would keep as many states as one
        return run(0, n, x)
    total = 0
    for start in starts:
        x, count = checkpoint(run, start, min(start + size, n), x, use_reentrant=False)
        total += count
    return x, total
