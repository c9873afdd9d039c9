"""Across models: how the per-layer SVFlow metrics correlate with validation loss.

See docs/maths.md#measurements-on-pretrained-models.
"""

from __future__ import annotations

import math

import torch

from .layerwise import METRICS, layer_metrics
from .options import Options

__all__ = ["pearson", "spearman", "permutation_p", "metric_loss_correlation"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D samples (nan if either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ranks by sorting; ties get distinct consecutive ranks)."""
    return pearson(a.argsort().argsort(), b.argsort().argsort())


def permutation_p(a: torch.Tensor, b: torch.Tensor, statistic=spearman, n_permutations: int = 4999,
                  groups=None, seed: int = 0) -> float:
    """Two-sided permutation p-value of a correlation ``statistic(a, b)``.

    The share of pairings, the observed one and ``n_permutations`` random ones (``b`` shuffled,
    within each group if ``groups`` labels the samples), whose ``|statistic|`` is at least the
    observed one: exact in level for any number of samples, with no normality assumed.
    """
    generator = torch.Generator().manual_seed(seed)
    groups = torch.zeros(len(b), dtype=torch.long) if groups is None else torch.as_tensor(groups)
    members = [torch.nonzero(groups == g).flatten() for g in groups.unique()]
    observed = abs(statistic(a, b))
    if math.isnan(observed):  # e.g. a constant input: no evidence of anything
        return math.nan
    hits = 0
    for _ in range(n_permutations):
        order = torch.arange(len(b))
        for idx in members:
            order[idx] = idx[torch.randperm(len(idx), generator=generator)]
        hits += abs(statistic(a, b[order])) >= observed * (1 - 1e-12)  # ties with the observed count
    return (hits + 1) / (n_permutations + 1)


def metric_loss_correlation(
    models, val_losses, input_ids: torch.Tensor, options: Options = Options(), batch_size: int = 32
) -> list[dict]:
    """Correlate each metric, per layer and averaged over layers, with the models' validation losses.

    Args:
        models: SVFlow models with the same number of layers (e.g. one architecture trained with
            different solvers).
        val_losses: their validation losses, in the same order.
        input_ids: ``(N, T)`` the sequences the metrics are measured on (the same for every model).
        options: metric definitions.
        batch_size: sequences per forward pass.

    Returns:
        Rows ``{metric, layer ("mean" for the layer average), pearson, spearman, values}``.
    """
    if len(models) != len(val_losses) or len(models) < 3:
        raise ValueError(f"need at least 3 models and one loss each, got {len(models)} and {len(val_losses)}")
    losses = torch.as_tensor(val_losses, dtype=torch.float64)
    per_model = [layer_metrics(m, input_ids, None, options, batch_size) for m in models]
    rows = []
    for metric in METRICS:
        table = torch.stack([r[metric].mean(-1) for r in per_model])  # (models, L) mean over heads
        columns = [(k + 1, table[:, k]) for k in range(table.shape[1])] + [("mean", table.mean(-1))]
        for layer, values in columns:
            rows.append({"metric": metric, "layer": layer, "pearson": pearson(values, losses),
                         "spearman": spearman(values, losses), "values": values.tolist()})
    return rows
