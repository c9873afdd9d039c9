"""Students of a converted model: fewer parameter sets, taken from its layers, integrated by any solver.

A converted model (``from_pretrained``) is a continuous-in-time field whose parameter set ``k``
sits at ``t = k``. A student keeps some of those sets: ``layers=[0, 2, 4]`` copies layers 0, 2
and 4 of a six-layer teacher, so the student with Euler and one step per set is the teacher with
layers 1, 3 and 5 dropped (layer dropping); a fractional entry such as ``2.5`` takes the
teacher's own interpolated parameters at that time. Any solver and step count then integrates the
student's field over ``[0, len(layers)]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from ..model import SVFlow

__all__ = ["student"]


def student(teacher: SVFlow, layers: Sequence[float], *, method: str = "euler", steps: int | None = None) -> SVFlow:
    """A new SVFlow with parameter sets copied (or interpolated) from ``teacher``'s layers.

    Args:
        teacher: a multi-layer SVFlow with ``time="continuous"`` (what ``from_pretrained`` returns)
            or ``"per_step"``; it is not modified.
        layers: strictly increasing source times in ``[0, L - 1]`` (``L`` the teacher's layers):
            an integer copies that layer, a fraction ``k + w`` interpolates layers ``k`` and
            ``k + 1`` linearly (the continuous-time field's own parameters at that time).
        method: the student's solver.
        steps: the student's step count (default: one per parameter set).

    Returns:
        An independent SVFlow (embedding, final norm and head copied) with continuous-in-time
        parameters, the teacher's mode, splitting and tolerances, in the teacher's train/eval mode.
    """
    L = len(teacher.blocks)
    if teacher.time == "shared" or L < 2:
        raise ValueError(f"a student takes layers of a multi-layer teacher; this one has time={teacher.time!r} "
                         f"and {L} block(s)")
    times = [float(s) for s in layers]
    if not times or any(not math.isfinite(s) or not 0 <= s <= L - 1 for s in times) or \
            any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"layers must be strictly increasing source times in [0, {L - 1}], got {list(layers)}")
    blocks = [_block_at(teacher, s) for s in times]
    # One deepcopy of the three keeps a head tied to the embedding tied.
    embed, final_norm, head = copy.deepcopy((teacher.embed, teacher.final_norm, teacher.head))
    model = SVFlow(
        embed, blocks, time="continuous", method=method, steps=steps,
        mode=teacher.mode, splitting=teacher.splitting, gradient=teacher.gradient,
        check_finite=teacher.check_finite, rtol=teacher.rtol, atol=teacher.atol, max_nfe=teacher.max_nfe,
        final_norm=final_norm, head=head,
    )
    return model.train(teacher.training)


def _block_at(teacher: SVFlow, s: float):
    """A copy of the teacher's block at source time ``s`` (interpolated between layers when fractional)."""
    k = math.floor(s)
    block = copy.deepcopy(teacher.blocks[k])
    if s > k:
        right = dict(teacher.blocks[k + 1].named_parameters())
        with torch.no_grad():
            for name, p in block.named_parameters():
                p.copy_(torch.lerp(p, right[name], s - k))
    return block
