"""The SVFlow model: embeddings -> a state on a manifold -> integrate with any solver -> readout.

A block is a list of terms, each a field and the manifold its substep retracts onto (post-LN:
``AffineChart(LayerNormSphere, gamma, beta)``; pre-norm: ``Euclidean`` with a ``PreNorm`` field).
The flow runs over ``t in [0, T]`` with ``T`` the number of parameter sets (or ``depth`` when
they are shared), so the default, one Euler step per block, has ``h = 1``: a Transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import geoopt
import torch
from torch import nn

from manifolds import AffineChart
from solvers import SCHEMES, SolveStats, checkpointed_steps, make_solver, odeint, odeint_adjoint, split_step

from .fields import Interpolated, SumField, locate

__all__ = ["Term", "Block", "SVFlow", "SVFlowOutput", "TIME_MODES", "SPLITTINGS"]

TIME_MODES = ("per_step", "shared", "continuous")
SPLITTINGS = SCHEMES + ("none",)
GRADIENT_MODES = ("backprop", "checkpoint", "adjoint")


class Term(nn.Module):
    """One substep of a block: a field and the manifold its step retracts onto."""

    def __init__(self, field: nn.Module, manifold: geoopt.Manifold):
        super().__init__()
        self.field = field
        self.manifold = manifold


class Block(nn.Module):
    """The terms integrated in one unit of time (attention then FFN, for a Transformer layer)."""

    def __init__(self, *terms: Term):
        super().__init__()
        self.terms = nn.ModuleList(terms)


@dataclass
class SVFlowOutput:
    """What a forward pass returns.

    ``hidden_states`` holds the embedding output and the state after every step (with the
    default one step per block: aligned with transformers' ``output_hidden_states``; the last
    entry is after ``final_norm`` when the model has one, as in transformers). Checkpointing,
    the adjoint and adaptive methods keep fewer states: see ``SVFlow.flow``.
    """

    last_hidden_state: torch.Tensor  # (B, T, d)
    hidden_states: tuple  # tensors (B, T, d): steps + 1 of them for plain fixed-step solves
    logits: torch.Tensor | None  # (B, T, vocab) when the model has a head
    stats: SolveStats


def chart_at(manifolds: Sequence[geoopt.Manifold], t: float) -> geoopt.Manifold:
    """The manifold at time ``t`` for continuous-in-time parameters: affine charts interpolate."""
    k, w = locate(t, len(manifolds))
    if w == 0.0 or not isinstance(manifolds[k], AffineChart):
        return manifolds[k]
    left, right = manifolds[k], manifolds[k + 1]
    return AffineChart(left.base, torch.lerp(left.weight, right.weight, w), torch.lerp(left.bias, right.bias, w))


class SVFlow(nn.Module):
    """An SVFlow network.

    Args:
        embed: module mapping ``input_ids`` ``(B, T)`` to the initial state ``(B, T, d)``.
        blocks: the parameter sets (one per layer; one when ``time="shared"``).
        time: "per_step" (piecewise constant in t: block k on ``[k, k+1)``), "continuous"
            (parameters interpolated linearly between blocks at integer times) or "shared"
            (one block for all t: an autonomous field).
        depth: the horizon ``T`` for ``time="shared"`` (and its default step count).
        method: default solver name (``solvers.METHODS``).
        steps: default number of steps (default: one per unit of time).
        mode: "relaxed" (``retr(x + h f)``, the Transformer's form) or "strict".
        splitting: "lie" (a Transformer block: each term a full substep), "strang", or "none"
            (one step of the summed field, retracted onto the last term's manifold).
        gradient: "backprop", "checkpoint" (recompute the steps in the backward pass, two-level:
            memory like ``2 sqrt(steps)`` states, see ``solvers.checkpointed_steps``) or
            "adjoint" (continuous adjoint, ``solvers.odeint_adjoint``: memory flat in the steps;
            strict mode or Euclidean state, ``splitting="none"``; its gradient is the exact
            flow's, which differs from the discrete one by the solver's error).
        rtol, atol: tolerances of adaptive methods.
        max_nfe: adaptive methods stop with ``StepSizeError`` past this many field evaluations.
        final_norm: applied to the last state (pre-norm models), or None.
        head: readout from the last state to logits, or None.
    """

    def __init__(
        self,
        embed: nn.Module,
        blocks: Sequence[Block],
        *,
        time: str = "per_step",
        depth: int | None = None,
        method: str = "euler",
        steps: int | None = None,
        mode: str = "relaxed",
        splitting: str = "lie",
        gradient: str = "backprop",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        max_nfe: int = 1000,
        final_norm: nn.Module | None = None,
        head: nn.Module | None = None,
    ):
        super().__init__()
        if time not in TIME_MODES:
            raise ValueError(f"unknown time mode {time!r}; expected one of {TIME_MODES}")
        if splitting not in SPLITTINGS:
            raise ValueError(f"unknown splitting {splitting!r}; expected one of {SPLITTINGS}")
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES}")
        if gradient == "adjoint" and splitting != "none":
            raise ValueError("gradient='adjoint' integrates one field: use splitting='none'")
        if not blocks:
            raise ValueError("an SVFlow needs at least one block")
        if time == "shared" and len(blocks) != 1:
            raise ValueError(f"time='shared' takes exactly one block, got {len(blocks)}")
        if len({len(block.terms) for block in blocks}) > 1:  # interpolation and NFE pair terms up by position
            raise ValueError(f"every block needs the same number of terms, got {[len(b.terms) for b in blocks]}")
        if time == "shared" and depth is None:
            raise ValueError("time='shared' needs depth (the horizon T)")
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.time, self.mode, self.splitting, self.gradient = time, mode, splitting, gradient
        self.horizon = depth if time == "shared" else len(blocks)
        self.method = method
        self.rtol, self.atol, self.max_nfe = rtol, atol, max_nfe
        self.steps = self.horizon if steps is None else steps
        self.final_norm = final_norm
        self.head = head
        make_solver(method, self.blocks[0].terms[0].manifold, mode)  # fail early on bad names
        self._check_steps(self.steps)

    def _check_steps(self, steps: int) -> None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if self.time == "per_step" and steps % len(self.blocks):
            raise ValueError(
                f"with per-step parameters, steps ({steps}) must be a multiple of the number of "
                f"blocks ({len(self.blocks)}); use time='continuous' for any step count"
            )

    def _terms(self, k: int | None, t: float, context: dict):
        """``(f, manifold)`` per term of block ``k``, or of the continuous-in-time field (``k``
        None; charts taken at time ``t``); ``f`` binds the context (e.g. the padding mask)."""
        if k is None and len(self.blocks) > 1:
            columns = list(zip(*(b.terms for b in self.blocks)))  # per term: its K parameter sets
            fields = [Interpolated([term.field for term in col]) for col in columns]
            manifolds = [chart_at([term.manifold for term in col], t) for col in columns]
        else:
            block = self.blocks[k or 0]
            fields = [term.field for term in block.terms]
            manifolds = [term.manifold for term in block.terms]
        if self.splitting == "none":
            fields, manifolds = [SumField(*fields)], manifolds[-1:]
        return [(partial(field, **context), m) for field, m in zip(fields, manifolds)]

    def flow(self, x: torch.Tensor, *, method: str, steps: int, context: dict):
        """Integrate from the embedded state; returns the states and the stats.

        Fixed-step methods return the state after every step, except when checkpointing with
        gradients enabled: the two ends only (holding every state would undo the memory saving).
        Adaptive methods (bosh3, dopri5: ``rtol``/``atol``/``max_nfe``) and the adjoint solve
        piece by piece and return the states at the pieces' ends: the block boundaries, or the
        two ends for shared parameters (and for continuous ones with fixed steps).
        """
        solver = make_solver(method, self.blocks[0].terms[0].manifold, self.mode)
        self._check_steps(steps)
        if solver.adaptive or self.gradient == "adjoint":
            return self._flow_by_pieces(x, method, solver.adaptive, steps, context)
        scheme = "lie" if self.splitting == "none" else self.splitting
        h = self.horizon / steps

        def step(n: int, x: torch.Tensor) -> torch.Tensor:
            k = n * len(self.blocks) // steps if self.time == "per_step" else None
            return split_step(solver, self._terms(k, n * h, context), n * h, x, h, scheme)

        # Counted here, not inside the fields: a side effect would break torch.compile's graph
        # under checkpointing. Strang takes every term but the last twice.
        terms = 1 if self.splitting == "none" else len(self.blocks[0].terms)
        substeps = terms if scheme == "lie" else 2 * terms - 1
        stats = SolveStats(steps=steps, nfe=steps * substeps * solver.tableau.stages)
        if self.gradient == "checkpoint" and torch.is_grad_enabled():
            return [x, checkpointed_steps(step, x, steps)], stats
        states = [x]
        for n in range(steps):
            states.append(step(n, states[-1]))
        return states, stats

    def _flow_by_pieces(self, x, method: str, adaptive: bool, steps: int, context: dict):
        if self.splitting != "none":
            raise ValueError(
                f"adaptive methods and the adjoint integrate one field: use splitting='none' (got {self.splitting!r})"
            )
        L = len(self.blocks)
        # Restart at every block boundary where the parameters jump (per-step) or, for adaptive
        # steps, kink (continuous): an embedded error estimate does not see a kink inside a step.
        if self.time == "shared" or (self.time == "continuous" and not adaptive):
            pieces = [(None, 0, self.horizon, steps)]
        else:
            pieces = [(k if self.time == "per_step" else None, k, k + 1, steps // L) for k in range(L)]
        stats, states = SolveStats(), [x]
        for k, t0, t1, n in pieces:
            [(f, manifold)] = self._terms(k, t0, context)
            if k is None and L > 1 and isinstance(manifold, AffineChart):
                raise ValueError(
                    "adaptive methods and the adjoint need one manifold per solve; this model's "
                    "charts change with t (use time='per_step' or a model without charts)"
                )
            piece = SolveStats()
            options = {"stats": piece, "max_nfe": self.max_nfe, **({} if adaptive else {"steps": n})}
            kwargs = dict(method=method, manifold=manifold, rtol=self.rtol, atol=self.atol, options=options)
            t = torch.tensor([float(t0), float(t1)], dtype=x.dtype)
            if self.gradient == "adjoint":
                if self.mode != "strict" and not isinstance(manifold, geoopt.Euclidean):
                    raise ValueError("the adjoint is sound for the tangent field only: use mode='strict'")
                x = odeint_adjoint(f, x, t, adjoint_params=tuple(self.blocks.parameters()), **kwargs)[-1]
            else:
                options.update(gradient=self.gradient, mode=self.mode)
                x = odeint(f, x, t, **kwargs)[-1]
            states.append(x)
            for name in ("steps", "nfe", "rejected"):
                setattr(stats, name, getattr(stats, name) + getattr(piece, name))
        return states, stats

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        method: str | None = None,
        steps: int | None = None,
    ) -> SVFlowOutput:
        """Run the flow.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 for tokens and 0 for padding, or None.
            method: solver name (default: the model's).
            steps: number of steps (default: the model's).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        context = {} if attention_mask is None else {"attention_mask": attention_mask}
        x = self.embed(input_ids)
        states, stats = self.flow(
            x,
            method=self.method if method is None else method,
            steps=self.steps if steps is None else steps,
            context=context,
        )
        if self.final_norm is not None:
            states[-1] = self.final_norm(states[-1])
        logits = None if self.head is None else self.head(states[-1])
        return SVFlowOutput(states[-1], tuple(states), logits, stats)
