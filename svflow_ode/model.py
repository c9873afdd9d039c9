"""The SVFlow model: embeddings -> a state on a manifold -> one solve -> readout.

A block is a list of terms, each a field and the manifold its substep retracts onto (post-LN:
``AffineChart(LayerNormSphere, gamma, beta)``; pre-norm: ``Euclidean`` with a ``PreNorm`` field).
The flow runs over ``t in [0, T]`` with ``T`` (the horizon) the number of parameter sets (or
given, when they are shared), so the default, one Euler step per block, has ``h = 1``: a Transformer. The
model only describes the flow (a ``solvers.Piecewise`` field); ``solvers.integrate`` solves it.

Depth is elastic two ways: a model with continuous or shared parameters runs any step count over
its horizon (``steps=``); a per-step model runs a subset of its layers (``layers=``, Fan et al.
2019's pruning, with ``pruned_layers`` choosing them evenly) and can be trained for that with
LayerDrop (``layerdrop``: each block skipped with probability p per training batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import geoopt
import torch
from torch import nn

from manifolds import AffineChart
import solvers
from solvers import GRADIENT_MODES, SCHEMES, ConstantStepSize, PIController, Piecewise, SolveStats, integrate, make_solver
from solvers.defaults import ATOL, MAX_NFE, RTOL

from .fields import Interpolated, SumField, locate

__all__ = ["Term", "Block", "SVFlow", "SVFlowOutput", "TIME_MODES", "SPLITTINGS"]

TIME_MODES = ("per_step", "shared", "continuous")
SPLITTINGS = SCHEMES + ("none",)


class Term(nn.Module):
    """``solvers.Term`` as a module: a field and the manifold its substep retracts onto, holding
    their parameters (an affine chart's gain and shift are the layer's norm weights)."""

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
    # Interpolated between two checked charts: no need to check again (a read-back per call).
    return AffineChart(left.base, torch.lerp(left.weight, right.weight, w), torch.lerp(left.bias, right.bias, w),
                       check=False)


class SVFlow(nn.Module):
    """An SVFlow network.

    Args:
        embed: module mapping ``input_ids`` ``(B, T)`` to the initial state ``(B, T, d)``.
        blocks: the parameter sets (one per layer; one when ``time="shared"``).
        time: "per_step" (piecewise constant in t: block k on ``[k, k+1)``), "continuous"
            (parameters interpolated linearly between blocks at integer times) or "shared"
            (one block for all t: an autonomous field).
        horizon: the horizon ``T`` for ``time="shared"`` (and its default step count); otherwise
            the number of blocks.
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
        check_finite: raise ``solvers.NonFiniteError`` naming the step and time when the state
            turns non-finite (one reduction per step; skipped under ``torch.compile``).
        rtol, atol: tolerances of adaptive methods.
        max_nfe: adaptive methods stop with ``StepSizeError`` past this many field evaluations.
        final_norm: applied to the last state (pre-norm models), or None.
        head: readout from the last state to logits, or None.
        layerdrop: LayerDrop's rate (Fan et al. 2019; per-step models only, any solver): in
            training mode each forward pass skips each block with this probability, the state
            passing it unchanged (every block may be skipped: then the readout sees the
            embedding); 0 (default) never skips. Evaluation mode runs every block.
    """

    def __init__(
        self,
        embed: nn.Module,
        blocks: Sequence[Block],
        *,
        time: str = "per_step",
        horizon: int | None = None,
        method: str = "euler",
        steps: int | None = None,
        mode: str = "relaxed",
        splitting: str = "lie",
        gradient: str = "backprop",
        check_finite: bool = True,
        rtol: float = RTOL,
        atol: float = ATOL,
        max_nfe: int = MAX_NFE,
        final_norm: nn.Module | None = None,
        head: nn.Module | None = None,
        layerdrop: float = 0.0,
    ):
        super().__init__()
        if time not in TIME_MODES:
            raise ValueError(f"unknown time mode {time!r}; expected one of {TIME_MODES}")
        if splitting not in SPLITTINGS:
            raise ValueError(f"unknown splitting {splitting!r}; expected one of {SPLITTINGS}")
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES}")
        if not blocks:
            raise ValueError("an SVFlow needs at least one block")
        if time == "shared" and len(blocks) != 1:
            raise ValueError(f"time='shared' takes exactly one block, got {len(blocks)}")
        if len({len(block.terms) for block in blocks}) > 1:  # interpolation pairs terms up by position
            raise ValueError(f"every block needs the same number of terms, got {[len(b.terms) for b in blocks]}")
        if time == "shared" and horizon is None:
            raise ValueError("time='shared' needs horizon (T, the time the one block is integrated for)")
        if isinstance(layerdrop, bool) or not (isinstance(layerdrop, (int, float)) and 0 <= layerdrop < 1):
            raise ValueError(f"layerdrop must be a probability in [0, 1), got {layerdrop!r}")
        if layerdrop and time != "per_step":
            raise ValueError(
                f"layerdrop skips whole layers of a per-step model, but this model has time={time!r}: train it "
                f"at random depths with LitSVFlow's train_steps instead"
            )
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.time, self.mode, self.splitting, self.gradient = time, mode, splitting, gradient
        self.check_finite = check_finite
        charts = any(isinstance(term.manifold, AffineChart) for block in blocks for term in block.terms)
        if charts and mode == "strict":
            raise ValueError(
                "mode='strict' needs the state on each substep's manifold, but the state of a model with "
                "affine charts (post-LN, post-RMS) moves from one layer's chart to the next; use "
                "mode='relaxed', the Transformer's own step"
            )
        if gradient == "adjoint":
            self._check_adjoint(charts)
        self.horizon = horizon if time == "shared" else len(blocks)
        self.method = method
        self.rtol, self.atol, self.max_nfe = rtol, atol, max_nfe
        self.steps = self.horizon if steps is None else steps
        self.layerdrop = float(layerdrop)
        self.final_norm = final_norm
        self.head = head
        self._solver(method)  # fail early on bad names and combinations
        self._check_steps(self.steps)

    def _step_mode(self) -> str:
        """The solver's mode: on Euclidean states strict and relaxed steps are the same method, and
        strict is the one the adjoint accepts."""
        euclidean = all(isinstance(t.manifold, geoopt.Euclidean) for b in self.blocks for t in b.terms)
        return "strict" if euclidean else self.mode

    def _check_adjoint(self, charts: bool) -> None:
        if charts or self._step_mode() != "strict":
            raise ValueError(
                "gradient='adjoint' solves the adjoint of a tangent field (mode='strict'); this model steps "
                "by the relaxed retraction (post-LN/post-RMS charts or mode='relaxed'), whose steps have no "
                "continuous adjoint: use gradient='checkpoint' (memory like 2 sqrt(steps) states)"
            )
        if self.splitting != "none":
            raise ValueError("gradient='adjoint' integrates one field: use splitting='none'")

    def _solver(self, method: str):
        """The solver object for a method name: the model's mode and splitting applied."""
        if method in solvers.ADAPTIVE and self.splitting != "none":
            raise ValueError(
                f"adaptive methods integrate one field: use splitting='none' with {method!r} (got {self.splitting!r})"
            )
        splitting = None if self.splitting == "none" else self.splitting
        return make_solver(method, self.blocks[0].terms[0].manifold, self._step_mode(), splitting)

    def _check_steps(self, steps: int, blocks: int | None = None) -> None:
        """``ValueError`` unless ``steps`` can cover ``blocks`` blocks (default: all): zero steps for none."""
        blocks = len(self.blocks) if blocks is None else blocks
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0 or (steps == 0 and blocks):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if self.time == "per_step" and (steps % blocks if blocks else steps):
            raise ValueError(
                f"with per-step parameters, steps ({steps}) must be a multiple of the number of "
                f"blocks ({blocks}); use time='continuous' for any step count"
            )

    def pruned_layers(self, depth: int) -> list[int]:
        """The ``depth`` blocks a per-step model keeps when pruned to that depth, evenly spread.

        Block ``floor(i L / depth)`` for ``i < depth`` of ``L``: Fan et al. (2019)'s "every other"
        layer for ``depth = L / 2`` (0, 2, 4, ...), all of them for ``depth = L``, the first alone
        for ``depth = 1``.
        """
        L = len(self.blocks)
        if self.time != "per_step":
            raise ValueError(f"pruning keeps layers of a per-step model; this one has time={self.time!r}: "
                             f"run it at another depth with steps=")
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= L:
            raise ValueError(f"a model of {L} layers prunes to a depth in 0..{L}, got {depth!r}")
        return [i * L // depth for i in range(depth)]

    def _check_layers(self, layers) -> list[int]:
        """``layers`` as a list, once it is known to name blocks of a per-step model in order."""
        L = len(self.blocks)
        if self.time != "per_step":
            raise ValueError(f"layers= prunes a per-step model; this one has time={self.time!r}: run it at "
                             f"another depth with steps=")
        layers = list(layers)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in layers) or any(
                not 0 <= a < b <= L for a, b in zip(layers, [*layers[1:], L])):
            raise ValueError(f"layers must be increasing block indices in 0..{L - 1}, got {layers}")
        return layers

    def drawn_layers(self, generator: torch.Generator | None = None) -> list[int]:
        """LayerDrop's draw: the blocks a training pass runs, each kept with probability ``1 - layerdrop``."""
        kept = torch.rand(len(self.blocks), generator=generator) >= self.layerdrop
        return kept.nonzero().flatten().tolist()

    def _term(self, k: int | None, t: float, context: dict) -> solvers.Term:
        """The field on block ``k``, or the continuous-in-time field (``k`` None; charts taken at
        ``t``), as a ``solvers.Term``: split into its terms unless ``splitting="none"``. Fields
        bind the context (e.g. the padding mask)."""
        if k is None and len(self.blocks) > 1:
            columns = list(zip(*(b.terms for b in self.blocks)))  # per term: its K parameter sets
            fields = [Interpolated([term.field for term in col]) for col in columns]
            manifolds = [chart_at([term.manifold for term in col], t) for col in columns]
        else:
            block = self.blocks[k or 0]
            fields = [term.field for term in block.terms]
            manifolds = [term.manifold for term in block.terms]
        if self.splitting == "none":
            return solvers.Term(partial(SumField(*fields), **context), manifolds[-1])
        terms = tuple(solvers.Term(partial(f, **context), m) for f, m in zip(fields, manifolds))
        return solvers.Term(terms, manifolds[-1])

    def _field(self, steps: int, adaptive: bool, context: dict, layers: Sequence[int]) -> Piecewise:
        """The flow as a ``solvers.Piecewise`` field over ``[0, horizon]``; per-step models: over
        ``[0, len(layers)]``, a unit of time per block run (the blocks' fields do not read t)."""
        L, T = len(self.blocks), self.horizon
        if self.time == "per_step":
            return Piecewise(range(len(layers) + 1), lambda i: self._term(layers[i], i, context))
        if self.time == "shared" or L == 1:
            return Piecewise((0, T), lambda i: self._term(0, 0.0, context))
        charts = any(isinstance(term.manifold, AffineChart) for term in self.blocks[0].terms)
        if charts and adaptive:
            raise ValueError(
                "adaptive methods need one manifold per piece; this model's charts change with t "
                "(use time='per_step' or a model without charts)"
            )
        if charts:  # a chart per step, taken at the step's start
            times = [n * T / steps for n in range(steps + 1)]
            return Piecewise(times, lambda n: self._term(None, times[n], context))
        # Adaptive steps restart where the interpolated parameters kink.
        return Piecewise(range(L + 1) if adaptive else (0, T), lambda i: self._term(None, 0.0, context))

    def flow(self, x: torch.Tensor, *, method: str, steps: int, context: dict, layers: Sequence[int] | None = None):
        """Integrate from the embedded state; returns the states and the stats.

        Fixed-step methods return the state after every step, except when checkpointing with
        gradients enabled: the two ends only (holding every state would undo the memory saving).
        Adaptive methods (bosh3, dopri5: ``rtol``/``atol``/``max_nfe``) and the adjoint return the
        states at the breaks of the field: the block boundaries for per-step parameters (and for
        continuous ones under adaptive steps), else the two ends.

        ``layers`` (per-step models): the blocks to run, in order (default: all); ``steps``
        counts the steps over them. With none, the state is returned as it came, at no cost.
        """
        solver = self._solver(method)
        layers = range(len(self.blocks)) if layers is None else layers
        self._check_steps(steps, len(layers))
        if not steps:  # a per-step model with every block skipped: nothing to integrate
            return [x], SolveStats()
        adaptive = solver.error_order is not None
        T = len(layers) if self.time == "per_step" else self.horizon
        if adaptive:
            controller = PIController(rtol=self.rtol, atol=self.atol, max_nfe=self.max_nfe)
        else:
            controller = ConstantStepSize(step_size=T / steps)
            if steps > controller.max_steps:  # before building the output times
                raise ValueError(f"steps={steps:,} is more than max_steps={controller.max_steps:,}")
        field = self._field(steps, adaptive, context, layers)
        if adaptive or self.gradient == "adjoint":
            times = [0.0, float(T)] if len(field) == 1 else list(field.breaks)
        elif self.gradient == "checkpoint" and torch.is_grad_enabled():
            times = [0.0, float(T)]
        else:
            times = [n * T / steps for n in range(steps + 1)]
        solution = integrate(
            field, x, times, solver=solver, controller=controller, gradient=self.gradient,
            check_finite=self.check_finite,
            # The blocks run, only: a skipped block's parameters are not in the solve.
            adjoint_params=(tuple(p for k in layers for p in self.blocks[k].parameters())
                            if self.gradient == "adjoint" else None),
        )
        return list(solution.ys.unbind(0)), solution.stats

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        method: str | None = None,
        steps: int | None = None,
        layers: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SVFlowOutput:
        """Run the flow.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 for tokens and 0 for padding, or None.
            method: solver name (default: the model's).
            steps: number of steps (default: the model's; with ``layers``, the model's steps per
                block times the blocks run).
            layers: per-step models only: the blocks to run, increasing indices (e.g.
                ``pruned_layers(depth)``); the others are skipped, the state passing them unchanged.
                Default: every block, or in training mode with ``layerdrop`` those LayerDrop keeps.
            generator: the generator of LayerDrop's draw (default: torch's global one).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): there are no tokens to run")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                    f"{tuple(input_ids.shape)}"
                )
            if not torch.compiler.is_compiling() and not ((attention_mask == 0) | (attention_mask == 1)).all():
                raise ValueError("attention_mask must hold 1 (token) or 0 (padding) only; found other values")
        if layers is None and self.training and self.layerdrop:
            layers = self.drawn_layers(generator)
        if layers is not None:
            layers = self._check_layers(layers)
            if steps is None:
                steps = self.steps // len(self.blocks) * len(layers)
        context = {} if attention_mask is None else {"attention_mask": attention_mask}
        x = self.embed(input_ids)
        states, stats = self.flow(
            x,
            method=self.method if method is None else method,
            steps=self.steps if steps is None else steps,
            context=context,
            layers=layers,
        )
        if self.final_norm is not None:
            states[-1] = self.final_norm(states[-1])
        logits = None if self.head is None else self.head(states[-1])
        return SVFlowOutput(states[-1], tuple(states), logits, stats)
