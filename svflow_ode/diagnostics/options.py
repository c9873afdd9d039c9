"""The open definitions of docs/maths.md#open-definitions, as one documented set of options."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Options", "KAPPAS", "QUERIES", "READOUTS"]

KAPPAS = ("score", "query_key")
QUERIES = ("all", "last")
READOUTS = ("lens", "patch")


@dataclass(frozen=True)
class Options:
    """How the per-layer SVFlow metrics are defined.

    Args:
        kappa: the concentration reported as "kappa", per query i, averaged over the visible
            context j: "score" is the likelihood's ``kappa'_j = |W_o^h W_v^h x_j|`` (the
            concentration that sets the sharpness of p, hence KL(p||U)); "query_key" is the
            posterior kernel's ``kappa_ij = |W_q x_i| |W_k x_j| / sqrt(d_k)``.
        normaliser: include the vMF normaliser ``C_d(kappa'_j)`` in the likelihood-implied
            posterior ``p(j|x_i) ∝ C_d(kappa'_j) exp(W_o W_v x_j . x̂_i)``.
        queries: the query positions averaged into a layer's value: "all" real tokens, or
            "last" (the last real token of each sequence: the one that predicts the target).
        readout: how ``Δ(-log p_t)`` per layer is read: "lens" (logit lens: the model's final
            norm and head applied to the state after each layer, in the shuffled run) or
            "patch" (only layer k's attention reads the shuffled run's state; the loss at the
            model's output).
    """

    kappa: str = "score"
    normaliser: bool = True
    queries: str = "all"
    readout: str = "lens"

    def __post_init__(self):
        for name, value, allowed in [("kappa", self.kappa, KAPPAS), ("queries", self.queries, QUERIES),
                                     ("readout", self.readout, READOUTS)]:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    def describe(self) -> str:
        """One line naming every choice, for figure captions and result files."""
        kappa = {"score": "kappa = |W_o W_v x_j| (score norm)",
                 "query_key": "kappa = |W_q x_i||W_k x_j|/sqrt(d_k) (query-key)"}[self.kappa]
        readout = {"lens": "Δ(-log p_t) by logit lens (final norm + head on each layer's state)",
                   "patch": "Δ(-log p_t) at the output with only layer k's attention reading the shuffled run"}
        return (f"{kappa}, mean over the visible context; p {'with' if self.normaliser else 'without'} "
                f"the vMF normaliser C_d; queries: {self.queries}; {readout[self.readout]}")
