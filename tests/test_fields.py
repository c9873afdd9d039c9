"""SVFlow fields: the diagnostics path equals the fast path, and each field is the formula it claims."""

import math
import re
from pathlib import Path

import pytest
import torch

from manifolds import Sphere
from solvers import EULER, RungeKutta
from svflow_ode.fields import (
    AttentionField, FFNField, GaussianMixtureField, Interpolated, MoEField, NGPTField, SumField,
)



pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv,rope", [(4, None), (2, 10000.0)])
def test_attention_posterior_path_equals_fast_path(causal, kv, rope):
    torch.manual_seed(0)
    field = AttentionField(16, 4, n_kv_heads=kv, causal=causal, rope_theta=rope)
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    parts = field.posterior(x, attention_mask=mask)
    torch.testing.assert_close(parts["field"], field(0.0, x, attention_mask=mask), rtol=0, atol=1e-12)
    q = parts["q"]
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)), rtol=0, atol=1e-12)
    assert (q[1, :, :, -2:] == 0).all(), "padding keys must get zero posterior mass"
    if causal:
        assert (q.triu(1) == 0).all(), "future tokens must get zero posterior mass"


@pytest.mark.parametrize("shape", [(2, 6), (3, 7), (2, 7, 1)])
def test_attention_mask_of_the_wrong_shape_is_named(shape):
    # Without the check these broadcast silently or fail inside scaled_dot_product_attention.
    field, x = AttentionField(16, 4, causal=True), torch.randn(2, 7, 16)
    for run in (lambda: field(0.0, x, attention_mask=torch.ones(shape)),
                lambda: field.posterior(x, attention_mask=torch.ones(shape))):
        with pytest.raises(ValueError, match=re.escape(f"must be (batch, sequence) = (2, 7), got {shape}")):
            run()
    field(0.0, x, attention_mask=torch.ones(1, 7))  # one mask for the whole batch broadcasts


def test_attention_logits_are_kappa_times_cosine():
    # q(j|x_i) = softmax(kappa_ij cos(W_q x_i, W_k x_j)): check the vMF reading numerically.
    torch.manual_seed(1)
    field = AttentionField(8, 2)
    x = torch.randn(1, 5, 8)
    parts = field.posterior(x)
    qh = field.q(x).view(1, 5, 2, 4).transpose(1, 2)
    kh = field.k(x).view(1, 5, 2, 4).transpose(1, 2)
    cos = torch.nn.functional.cosine_similarity(qh[..., :, None, :], kh[..., None, :, :], dim=-1)
    torch.testing.assert_close(parts["q"], (parts["kappa"] * cos).softmax(-1), rtol=0, atol=1e-12)


def router_calls(field):
    """A list that collects the router posterior of every call (a forward hook), and its handle."""
    calls = []
    return calls, field.router.register_forward_hook(lambda module, args, out: calls.append(out))


def test_moe_with_all_experts_is_the_dense_posterior_mixture():
    torch.manual_seed(2)
    field = MoEField(8, 16, n_experts=3, top_k=3)
    x = torch.randn(2, 5, 8)
    calls, handle = router_calls(field)
    out = field(0.0, x)
    handle.remove()
    [probs] = calls
    torch.testing.assert_close(probs, field.router.logits(x).softmax(-1), rtol=0, atol=0)
    dense = sum(probs[..., e, None] * field.experts[e](0.0, x) for e in range(3))
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)


def test_moe_top1_uses_only_the_argmax_expert():
    torch.manual_seed(3)
    field = MoEField(8, 16, n_experts=4, top_k=1)
    x = torch.randn(6, 8)
    calls, handle = router_calls(field)
    out = field(0.0, x)
    handle.remove()
    best = calls[0].argmax(-1)
    expected = torch.stack([field.experts[int(e)](0.0, x[i]) for i, e in enumerate(best)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="top_k"):
        MoEField(8, 16, n_experts=2, top_k=3)


def test_moe_forward_writes_no_attribute_and_keeps_its_parameter_names():
    # The posterior comes back through the router's hook, not as state on the module (a side
    # effect in forward would break torch.compile's graph); checkpoints keep "router.weight".
    torch.manual_seed(6)
    field = MoEField(8, 16, n_experts=3, top_k=2)
    before = {name: dict(vars(m)) for name, m in field.named_modules()}
    field(0.0, torch.randn(4, 8))
    assert {name: dict(vars(m)) for name, m in field.named_modules()} == before
    assert "router.weight" in field.state_dict() and "router.bias" not in field.state_dict()


def test_gaussian_field_with_exact_posterior_is_the_score_of_the_evidence():
    # For equal isotropic components, softmax(A x + b) with A = mu / s^2, b = -|mu|^2 / 2s^2 is the
    # true posterior, so the field must equal grad log p(x) (docs/maths.md#variational-consistency).
    torch.manual_seed(4)
    means, s = torch.randn(3, 2) * 2, 0.7
    field = GaussianMixtureField(means, sigma=s)
    with torch.no_grad():
        field.posterior.weight.copy_(means / s**2)
        field.posterior.bias.copy_(-(means**2).sum(-1) / (2 * s**2))
    x = torch.randn(10, 2, requires_grad=True)
    torch.testing.assert_close(field.q(x), field.true_posterior(x), rtol=0, atol=1e-12)
    log_evidence = torch.logsumexp(field.log_likelihood(x), -1) - math.log(3)
    (grad,) = torch.autograd.grad(log_evidence.sum(), x)
    torch.testing.assert_close(field(0.0, x), grad, rtol=0, atol=1e-10)
    # ...and the ELBO equals the evidence when q is the true posterior.
    torch.testing.assert_close(field.elbo(x), log_evidence, rtol=0, atol=1e-10)


def test_interpolated_is_exact_at_nodes_and_linear_in_parameters_between():
    torch.manual_seed(5)
    nodes = [FFNField(4, 8) for _ in range(3)]
    field = Interpolated(nodes)
    x = torch.randn(5, 4)
    for k in range(3):
        torch.testing.assert_close(field(float(k), x), nodes[k](0.0, x), rtol=0, atol=0)
    mid = FFNField(4, 8)
    with torch.no_grad():
        for p, a, b in zip(mid.parameters(), nodes[1].parameters(), nodes[2].parameters()):
            p.copy_(0.75 * a + 0.25 * b)
    torch.testing.assert_close(field(1.25, x), mid(0.0, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(field(7.0, x), nodes[2](0.0, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="identical parameter names"):
        Interpolated([FFNField(4, 8), AttentionField(4, 2)])


def test_sum_field_and_ngpt_update():
    torch.manual_seed(6)
    a, b = FFNField(6, 12), FFNField(6, 12)
    x = torch.randn(3, 6)
    torch.testing.assert_close(SumField(a, b)(0.0, x), a(0.0, x) + b(0.0, x))
    sphere = Sphere(None)
    x = sphere.projx(x)
    ngpt = NGPTField(a, sphere, 6, alpha=0.3)
    step = RungeKutta(EULER, "relaxed").step(ngpt, 0.0, x, 1.0, sphere)[0]
    expected = sphere.projx(x + 0.3 * (sphere.projx(a(0.0, x)) - x))
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-12)


ROOT = Path(__file__).resolve().parents[1]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_cited_section_of_the_maths_page_exists():
    # Docstrings point at docs/maths.md#<anchor>; renaming a heading must not leave them dangling.
    page = (ROOT / "docs" / "maths.md").read_text(encoding="utf-8")
    anchors = {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", page, flags=re.MULTILINE)}
    cited = {}
    for path in sorted(ROOT.rglob("*.py")):
        if ".git" in path.parts or "site-packages" in path.parts:
            continue
        for anchor in re.findall(r"docs/maths\.md#([\w-]+)", path.read_text(encoding="utf-8")):
            cited.setdefault(anchor, path.relative_to(ROOT).as_posix())
    for anchor in re.findall(r"\]\(#([\w-]+)\)", page):  # the page's own links
        cited.setdefault(anchor, "docs/maths.md")
    assert cited, "no citations of docs/maths.md found"
    missing = {anchor: where for anchor, where in cited.items() if anchor not in anchors}
    assert not missing, f"cited sections missing from docs/maths.md: {missing}"
