"""SVFlow diagnostics: attention vs likelihood posteriors, prefix shuffling, consistency losses.

- ``layer_metrics``: per layer and head, KL(q||p), KL(q||U), KL(p||U) and kappa, with q the
  attention posterior and p the likelihood-implied vMF posterior, for any SVFlow model (see
  docs/maths.md#measurements-on-pretrained-models);
- ``prefix_shuffle_study``: the same metrics and ``Δ(-log p_t)`` under prefix shuffling;
- ``consistency_loss`` / ``consistency_recorder``: the variational-consistency regulariser for
  training (attention and MoE);
- ``metric_loss_correlation``, ``permutation_p``: metrics vs validation loss across models;
- ``mean_pool`` / ``compare_embeddings``: sentence embeddings of two models compared (cosine,
  top-k neighbour agreement, Spearman of pairwise similarities);
- ``log_bessel_iv`` / ``log_vmf_normaliser``: the high-order log-Bessel function behind ``C_d``.

The open definitions (docs/maths.md#open-definitions) are the fields of ``Options``.
"""

from .bessel import log_bessel_iv, log_vmf_normaliser
from .consistency import (
    PARTS,
    attention_consistency,
    consistency_loss,
    consistency_recorder,
    expert_log_posterior,
    moe_consistency,
)
from .embeddings import compare_embeddings, mean_pool
from .correlation import metric_loss_correlation, pearson, permutation_p, spearman
from .layerwise import METRICS, attention_metrics, layer_metrics
from .options import Options
from .posteriors import kl_divergence, kl_to_uniform, likelihood_log_posterior, visible_keys
from .shuffling import logit_lens_nll, prefix_shuffle_study, shuffle_prefix

__all__ = [
    "METRICS", "Options", "PARTS",
    "attention_consistency", "attention_metrics", "compare_embeddings", "consistency_loss", "consistency_recorder",
    "expert_log_posterior", "kl_divergence", "kl_to_uniform", "layer_metrics",
    "likelihood_log_posterior", "log_bessel_iv", "log_vmf_normaliser", "logit_lens_nll", "mean_pool",
    "metric_loss_correlation", "moe_consistency", "pearson", "permutation_p", "prefix_shuffle_study",
    "shuffle_prefix", "spearman", "visible_keys",
]
