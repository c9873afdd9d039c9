"""Comparing sentence embeddings of two models (a student against its teacher, a re-integrated model
against the original): cosine, nearest-neighbour agreement, rank correlation of similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .correlation import spearman

__all__ = ["mean_pool", "compare_embeddings"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over non-padding tokens, L2-normalised (sentence-transformers' pooling): ``(B, d)``.

    Args:
        hidden: ``(B, T, d)`` token states.
        mask: ``(B, T)``, 1 for tokens and 0 for padding, or None (every token counts).
    """
    if mask is None:
        return F.normalize(hidden.mean(1), dim=-1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


def _upper(sim: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(len(sim), len(sim), offset=1)
    return sim[i, j]


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k`` most similar other rows: ``(N, k)`` indices."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def compare_embeddings(reference: torch.Tensor, emb: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How ``emb`` differs from ``reference`` (both ``(N, d)`` unit rows, the same N sentences).

    Returns:
        ``cosine``: mean cosine between each sentence's two embeddings; ``top{k}``: mean share of
        each sentence's ``k`` nearest neighbours (by cosine, itself excluded) that the two agree
        on; ``spearman``: rank correlation of the ``N (N - 1) / 2`` pairwise similarities.
    """
    if reference.shape != emb.shape or reference.dim() != 2:
        raise ValueError(f"need two (N, d) embeddings of the same shape, got {tuple(reference.shape)} and "
                         f"{tuple(emb.shape)}")
    if not 0 < k < len(emb):
        raise ValueError(f"k must be in [1, N - 1] = [1, {len(emb) - 1}], got {k}")
    ours, theirs = _neighbours(emb, k), _neighbours(reference, k)
    shared = (ours.unsqueeze(2) == theirs.unsqueeze(1)).any(2).sum(1)
    return {
        "cosine": float((reference * emb).sum(-1).mean()),
        f"top{k}": float(shared.double().mean() / k),
        "spearman": spearman(_upper(reference @ reference.T), _upper(emb @ emb.T)),
    }
