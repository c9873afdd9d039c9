"""Prefix shuffling: disrupt the order of the context, compare per layer (docs/maths.md#prefix-shuffling).

For a causal LM the input is ``s_0 .. s_{T-1}`` and the target ``s_T``; a rate ``r`` moves
``round(r P)`` of the ``P`` prefix positions ``[start, stop)`` (by default every input but the
last, so the query that predicts the target keeps its token), each to another chosen position.
Per layer the study reports ``Δ(-log p_t)`` (see ``Options.readout``) and the change of every
metric of ``layerwise.METRICS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..fields import AttentionField
from .layerwise import METRICS, layer_batches
from .options import Options
from .recording import layer_of, on_calls, replace_inputs

__all__ = ["shuffle_prefix", "logit_lens_nll", "layer_states", "prefix_shuffle_study"]


def shuffle_prefix(
    input_ids: torch.Tensor, rate: float, start: int = 0, stop: int = -1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Move a fraction ``rate`` of the positions in ``[start, stop)`` of every row.

    ``m = round(rate * P)`` positions are drawn per row; their tokens rotate by one along a random
    order of them, so every drawn position receives the token of another one (for ``m >= 2``).
    Positions outside ``[start, stop)`` keep their tokens.

    Args:
        input_ids: ``(B, T)``.
        rate: fraction in ``[0, 1]``.
        start, stop: the prefix, as a slice of positions (``stop`` may be negative).
        generator: random source.

    Returns:
        The shuffled copy, ``(B, T)``.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    B, T = input_ids.shape
    positions = torch.arange(T)[start:stop]  # (P,)
    m = round(rate * len(positions))
    if m < 2:
        return input_ids.clone()
    order = torch.rand(B, len(positions), generator=generator).argsort(-1)[:, :m]  # (B, m)
    chosen = positions[order].to(input_ids.device)  # (B, m) positions to permute
    moved = input_ids.gather(1, chosen.roll(1, dims=1))  # token of the previous chosen position
    return input_ids.scatter(1, chosen, moved)


def layer_states(out, n_blocks: int) -> list[torch.Tensor]:
    """The states at integer times ``0..n_blocks`` (after each layer) from a model's output."""
    steps = len(out.hidden_states) - 1
    return [out.hidden_states[round(k * steps / n_blocks)] for k in range(n_blocks + 1)]


@torch.no_grad()
def logit_lens_nll(model, out, targets: torch.Tensor, position: int = -1) -> torch.Tensor:
    """``-log p(target)`` at ``position`` read from the state after each layer: ``(L + 1, B)``.

    The logit lens: the model's final norm (pre-norm models; the last state already has it) and
    head applied to every layer's state. Row 0 reads the embedding.
    """
    if model.head is None:
        raise ValueError("the logit lens needs a model with a head (a language model)")
    states = layer_states(out, model.horizon)
    rows = []
    for k, state in enumerate(states):
        z = state[:, position]  # (B, d)
        if model.final_norm is not None and k < len(states) - 1:
            z = model.final_norm(z)
        rows.append(-F.log_softmax(model.head(z).double(), -1).gather(1, targets[:, None])[:, 0])
    return torch.stack(rows)


def _patched_nll(model, ids, shuffled_ids, targets):
    """``(L, B)``: output ``-log p(target)`` when only layer k's attention reads the shuffled run."""
    with torch.no_grad(), on_calls(model, AttentionField, lambda field, x, context: x) as records:
        model(shuffled_ids)
    rows = []
    for k in range(model.horizon):
        patch = {i: x for i, (t, x) in enumerate(records) if layer_of(t, model.horizon) == k}
        with torch.no_grad(), replace_inputs(model, AttentionField, patch):
            logits = model(ids).logits[:, -1]
        rows.append(-F.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0])
    return torch.stack(rows)


def prefix_shuffle_study(
    model,
    input_ids: torch.Tensor,
    rates,
    *,
    targets: torch.Tensor | None = None,
    start: int = 0,
    stop: int = -1,
    options: Options = Options(),
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Per shuffle rate and layer: the metrics of the shuffled vs the original run.

    Args:
        model: an ``SVFlow``; with a head and ``targets``, ``Δ(-log p_t)`` is measured too.
        input_ids: ``(N, T)`` unpadded sequences.
        rates: shuffle rates (fractions of prefix positions moved).
        targets: ``(N,)`` the token after each sequence, or None (encoders: no ``-log p_t``).
        start, stop: the prefix (see ``shuffle_prefix``).
        options: metric definitions and the ``Δ(-log p_t)`` readout.
        batch_size: sequences per forward pass.
        seed: seed of the shuffles (the same positions for every model given the same data).

    Returns:
        Rows ``{rate, layer (1-based), <metric>, <metric>_shuffled, ..., nll, nll_shuffled,
        d_nll}`` (layer k: the attention field of layer k and the state after it); each value is
        a mean over sequences (and the queries of ``options.queries``) and heads.
    """
    lm = targets is not None
    base = _accumulate(model, input_ids, targets, options, batch_size, None)
    rows = []
    for i, rate in enumerate(tqdm(rates, desc="shuffle rates")):
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        shuffled = shuffle_prefix(input_ids, rate, start, stop, generator)
        other = _accumulate(model, shuffled, targets, options, batch_size, input_ids if lm else None)
        for k in range(model.horizon):
            row = {"rate": rate, "layer": k + 1}
            for m in METRICS:
                row[m], row[f"{m}_shuffled"] = base[m][k], other[m][k]
            if lm:
                row["nll"], row["nll_shuffled"] = base["nll"][k], other["nll"][k]
                row["d_nll"] = row["nll_shuffled"] - row["nll"]
            rows.append(row)
    return rows


def _accumulate(model, input_ids, targets, options, batch_size, original):
    """Layer means of the metrics (over heads too) and, with ``targets``, of ``-log p_t``.

    With the "patch" readout, ``original`` (the unshuffled ids, or None for the unshuffled run
    itself) is the run the shuffled states are patched into.
    """
    L = model.horizon
    totals = {m: torch.zeros(L, dtype=torch.float64) for m in METRICS}
    nll, weight = torch.zeros(L, dtype=torch.float64), 0.0
    for rows, out, sums, w in layer_batches(model, input_ids, None, options, batch_size):
        for m in METRICS:
            totals[m] += sums[m].mean(-1)
        weight += w
        if targets is None:
            continue
        if options.readout == "lens":
            nll += logit_lens_nll(model, out, targets[rows])[1:].sum(-1)
        elif original is None:  # the unpatched run: every layer's value is the output's
            nll += -F.log_softmax(out.logits[:, -1].double(), -1).gather(1, targets[rows, None]).sum()
        else:
            nll += _patched_nll(model, original[rows], input_ids[rows], targets[rows]).sum(-1)
    means = {m: (totals[m] / weight).tolist() for m in METRICS}
    if targets is not None:
        means["nll"] = (nll / len(input_ids)).tolist()
    return means
