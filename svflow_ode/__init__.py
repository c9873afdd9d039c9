"""svflow-ode: Score-based Variational Flow -- Transformers as manifold ODEs."""

from .pretrained import from_pretrained

__all__ = ["from_pretrained"]
