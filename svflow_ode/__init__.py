"""svflow-ode: Score-based Variational Flow -- Transformers as manifold ODEs."""
