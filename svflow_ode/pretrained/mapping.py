"""Weight maps: which source tensor fills each parameter of a converted model.

A map is ``{our parameter name: (source key, transform or None)}``; the transform turns the
source tensor into ours (a transpose, a slice, a scale).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["WeightMap", "same"]

WeightMap = dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]


def same(ours: str, theirs: str, names=("weight", "bias")) -> WeightMap:
    """``ours.<name>`` <- ``theirs.<name>`` unchanged, for each name (a Linear, a LayerNorm)."""
    return {f"{ours}.{n}": (f"{theirs}.{n}", None) for n in names}
