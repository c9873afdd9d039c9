"""The per-step affine chart ``x = weight * s + bias`` that post-LN Transformers put on a sphere.

A post-LN block computes ``x' = weight * LN(x + f(x)) + bias``: normalise onto the base manifold,
then map through the layer's own affine chart. ``AffineChart(base, weight, bias)`` is that map as a
geoopt manifold whose points are the chart's image. Its ``projx`` is "normalise, then chart"
(exactly ``F.layer_norm`` with affine when the base is ``LayerNormSphere``): it maps any ambient
point onto the image, but it is not idempotent on the image unless the chart is the identity. That
is the Transformer's retraction, and relaxed Euler with it reproduces a post-LN sublayer exactly.
"""

from __future__ import annotations

import geoopt
import torch

__all__ = ["AffineChart"]


def _entries(n: int, kind: str) -> str:
    return f"{n} {kind} {'entry' if n == 1 else 'entries'}"


def _check_values(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``weight`` is finite and non-zero and ``bias`` is finite."""
    with torch.no_grad():
        if bool(torch.isfinite(weight).all() & torch.isfinite(bias).all() & (weight != 0).all()):
            return  # one read-back when all is well
        for name, value in (("weight", weight), ("bias", bias)):
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                raise ValueError(
                    f"AffineChart {name} has {_entries(int(bad.sum()), 'non-finite')} (first at index "
                    f"{int(bad.nonzero()[0, 0])}: {value[bad][0].item()}); the chart needs finite values: "
                    f"check where the {name} came from (a diverged run, a bad checkpoint)"
                )
        zero = weight == 0
        if bool(zero.any()):
            raise ValueError(
                f"AffineChart weight has {_entries(int(zero.sum()), 'zero')} (first at index "
                f"{int(zero.nonzero()[0, 0])}): the chart x = weight * s + bias is then not invertible "
                f"(to_base divides by the weight); use non-zero weights, e.g. ones for a fresh gain"
            )


class AffineChart(geoopt.Manifold):
    """Image of ``base`` under ``s -> weight * s + bias`` (elementwise, last dimension).

    Args:
        base: the manifold the chart is laid on (e.g. ``LayerNormSphere``).
        weight: per-coordinate scale, shape ``(d,)``; finite and non-zero (``to_base`` divides by it).
        bias: per-coordinate shift, shape ``(d,)``; finite.

    The values are checked here, once (skipped while torch.compile traces, as a data-dependent
    check would break the graph); a trainable weight is not watched after construction. ``check=False``
    skips it, for charts derived from checked ones inside a forward pass (one host sync saved each).
    """

    name = "AffineChart"
    ndim = 1
    reversible = False

    def __init__(self, base: geoopt.Manifold, weight: torch.Tensor, bias: torch.Tensor, *, check: bool = True):
        super().__init__()
        if weight.shape != bias.shape or weight.dim() != 1:
            raise ValueError(
                f"weight and bias must be 1-D of equal shape, got {tuple(weight.shape)} and "
                f"{tuple(bias.shape)}"
            )
        check_dimension = getattr(base, "check_dimension", None)  # LayerNormSphere needs d >= 2
        if check_dimension is not None:
            check_dimension(weight.shape[0])
        if check and not torch.compiler.is_compiling() and "meta" not in (weight.device.type, bias.device.type):
            _check_values(weight, bias)
        self.base = base
        # Parameters train with the model; plain tensors (a fixed zero shift, an interpolated
        # chart) are buffers so that .to(dtype/device) moves them too.
        for name, value in (("weight", weight), ("bias", bias)):
            if isinstance(value, torch.nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)

    def to_base(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse chart: the base-manifold point ``(x - bias) / weight``."""
        return (x - self.bias) / self.weight

    def from_base(self, s: torch.Tensor) -> torch.Tensor:
        return self.weight * s + self.bias

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.base, "projx_affine"):  # our spheres fuse it (nn.LayerNorm's kernel)
            return self.base.projx_affine(x, self.weight, self.bias)
        return self.from_base(self.base.projx(x))

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.projx(x + u)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # Tangent vectors at x are the chart's pushforward of tangent vectors at to_base(x).
        return self.weight * self.base.proju(self.to_base(x), u / self.weight)

    egrad2rgrad = proju

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.from_base(self.base.expmap(self.to_base(x), u / self.weight))

    def inner(self, x, u, v=None, *, keepdim=False):
        # The metric pulled back from the base manifold through the chart.
        v = u if v is None else v
        return self.base.inner(self.to_base(x), u / self.weight, v / self.weight, keepdim=keepdim)

    def transp(self, x, y, v):
        return self.proju(y, v)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        return self.base._check_point_on_manifold(self.to_base(x), atol=atol, rtol=rtol)

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        return self.base._check_vector_on_tangent(
            self.to_base(x), u / self.weight, atol=atol, rtol=rtol
        )

    def random(self, *size, dtype=None, device=None):
        return self.from_base(self.base.random(*size, dtype=dtype, device=device))

    def extra_repr(self):
        return f"base={self.base!r}, dim={self.weight.shape[0]}"
