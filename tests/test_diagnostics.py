"""svflow_ode.diagnostics: log-Bessel, posteriors, per-layer metrics, shuffling, consistency losses."""

import math

import numpy as np
import pytest
import scipy.special as sp
import torch

from svflow_ode.diagnostics import (
    Options,
    attention_metrics,
    consistency_loss,
    consistency_recorder,
    kl_divergence,
    kl_to_uniform,
    layer_metrics,
    likelihood_log_posterior,
    log_bessel_iv,
    log_vmf_normaliser,
    logit_lens_nll,
    metric_loss_correlation,
    permutation_p,
    moe_consistency,
    pearson,
    prefix_shuffle_study,
    shuffle_prefix,
    visible_keys,
)
from svflow_ode.diagnostics.recording import on_calls
from svflow_ode.fields import AttentionField, MoEField
from svflow_ode.lm import SVFlowLM

# ---------------------------------------------------------------- log I_nu(x)

ORDERS = [0.0, 0.5, 1.0, 2.5, 10.0, 19.5, 20.0, 31.0, 50.5, 191.0, 500.0]
ARGS = np.logspace(-3, 4, 36)


@pytest.mark.parametrize("nu", ORDERS)
def test_log_bessel_matches_scipy_where_scipy_is_finite(nu):
    ive = sp.ive(nu, ARGS)
    finite = ive > 1e-300  # scipy underflows below: covered by the next tests
    reference = np.log(ive[finite]) + ARGS[finite]
    ours = log_bessel_iv(nu, torch.tensor(ARGS[finite])).numpy()
    assert finite.sum() >= 10
    np.testing.assert_array_less(np.abs(ours - reference), 1e-11 * np.maximum(1.0, np.abs(reference)))


@pytest.mark.parametrize("nu, x", [(191.0, 1e-3), (500.0, 1e-2), (2047.0, 0.5), (3.5, 1e-200)])
def test_log_bessel_small_argument_series_where_scipy_underflows(nu, x):
    # I_nu(x) = (x/2)^nu / Gamma(nu + 1) * (1 + (x/2)^2 / (nu + 1) + O(x^4)).
    assert sp.ive(nu, x) == 0.0
    y = (x / 2) ** 2
    reference = nu * math.log(x / 2) - math.lgamma(nu + 1) + math.log1p(y / (nu + 1) + y**2 / (2 * (nu + 1) * (nu + 2)))
    assert float(log_bessel_iv(nu, torch.tensor(x, dtype=torch.float64))) == pytest.approx(reference, rel=1e-13)


@pytest.mark.parametrize("nu, x", [(191.0, 1e-3), (2047.0, 3.0), (1000.0, 1e5), (0.0, 1e8), (100.5, 7.3)])
def test_log_bessel_matches_mpmath(nu, x):
    import mpmath  # a test dependency (pyproject's [test] extra; torch's sympy brings it too)

    mpmath.mp.dps = 40
    reference = float(mpmath.log(mpmath.besseli(nu, mpmath.mpf(x))))
    assert float(log_bessel_iv(nu, torch.tensor(x, dtype=torch.float64))) == pytest.approx(reference, rel=1e-13)


def test_log_bessel_at_zero_and_validation():
    out = log_bessel_iv(torch.tensor([0.0, 1.0, 191.0]), torch.zeros(3, dtype=torch.float64))
    assert out[0] == 0 and out[1:].eq(-math.inf).all()
    with pytest.raises(ValueError, match="nu >= 0 and x >= 0"):
        log_bessel_iv(1.0, torch.tensor([-1.0]))


@pytest.mark.parametrize("nu", [0.0, 1.5, 31.0, 191.0])
def test_log_bessel_gradient_is_the_bessel_ratio(nu):
    # d/dx log I_nu(x) = I_{nu+1}(x) / I_nu(x) + nu / x.
    x = torch.tensor([0.01, 1.0, 10.0, 100.0, 1e3], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(nu, x).sum(), x)
    xs = x.detach().numpy()
    with np.errstate(invalid="ignore"):  # scipy's 0 / 0 where both underflow
        reference = sp.ive(nu + 1, xs) / sp.ive(nu, xs) + nu / xs
    ok = np.isfinite(reference)
    np.testing.assert_allclose(grad.numpy()[ok], reference[ok], rtol=1e-10)


def test_vmf_normaliser_in_three_dimensions_is_closed_form():
    # C_3(kappa) = kappa / (4 pi sinh kappa); its kappa -> 0 limit is 1 / (4 pi), the uniform density.
    kappa = torch.tensor([0.0, 1e-3, 1.0, 10.0, 300.0], dtype=torch.float64)
    k = kappa[1:]
    closed = torch.log(k) - math.log(4 * math.pi) - (k + torch.log(-torch.expm1(-2 * k)) - math.log(2))
    ours = log_vmf_normaliser(kappa, 3)
    torch.testing.assert_close(ours[1:], closed, rtol=1e-12, atol=1e-12)
    assert float(ours[0]) == pytest.approx(-math.log(4 * math.pi), rel=1e-14)


def test_vmf_normaliser_limit_in_high_dimension_is_continuous():
    out = log_vmf_normaliser(torch.tensor([0.0, 1e-8], dtype=torch.float64), 384)
    assert torch.isfinite(out).all()
    assert float(out[0]) == pytest.approx(float(out[1]), rel=1e-12)


# ---------------------------------------------------------------- posteriors and divergences


def test_identical_distributions_have_zero_kl_and_uniform_is_zero_from_uniform():
    q = torch.rand(4, 7, dtype=torch.float64).softmax(-1)
    assert kl_divergence(q, q.log()).abs().max() < 1e-15
    visible = torch.ones(1, 7, dtype=torch.bool)
    assert kl_to_uniform(torch.full((4, 7), 1 / 7, dtype=torch.float64), visible).abs().max() < 1e-15
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)  # zero entries: q log q -> 0
    assert float(kl_to_uniform(p, torch.ones(3, dtype=torch.bool))) == pytest.approx(math.log(3) - math.log(2))


def test_kl_to_uniform_counts_only_visible_latents():
    q = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert float(kl_to_uniform(q, torch.tensor([True, True, False, False]))) == pytest.approx(0.0, abs=1e-15)


def test_visible_keys_causal_with_padding():
    mask = torch.tensor([[0, 1, 1]])  # left padding
    visible = visible_keys(3, True, mask)[0, 0]
    expected = torch.tensor([[True, True, True], [False, True, False], [False, True, True]])
    assert torch.equal(visible, expected)  # the padding query that sees nothing gets every key


def test_likelihood_posterior_by_hand_in_two_dimensions():
    # p(j|x_i) ∝ C_2(|s_j|) exp(s_j . x̂_i), C_2(kappa) = 1 / (2 pi I_0(kappa)).
    scores = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    direction = np.array([0.6, 0.8])
    kappa = np.linalg.norm(scores.numpy(), axis=-1)
    for normaliser in (True, False):
        logits = scores.numpy() @ direction - (np.log(2 * np.pi * sp.i0(kappa)) if normaliser else 0)
        expected = logits - np.log(np.exp(logits).sum())
        ours = likelihood_log_posterior(scores, x, torch.ones(1, 3, dtype=torch.bool), normaliser)[0]
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-13)


def identity_head(d: int, causal: bool) -> AttentionField:
    """One head with W_v = W_o = I (scores s_j = x_j) and no biases."""
    field = AttentionField(d, 1, bias=False, causal=causal).double()
    with torch.no_grad():
        field.v.weight.copy_(torch.eye(d))
        field.o.weight.copy_(torch.eye(d))
    return field


def test_attention_metrics_by_hand():
    field = identity_head(2, causal=True)
    with torch.no_grad():
        field.q.weight.copy_(2 * torch.eye(2))
        field.k.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)  # (1, T=3, d=2)
    field.requires_grad_(False)
    out = attention_metrics(field, x, options=Options(kappa="score", normaliser=False))
    norms = x[0].norm(dim=-1)
    # query 2 sees keys 0..2: kappa = mean |x_j|; p = softmax(x_j . x̂_2); q = softmax(2 x_2 . x_j / sqrt(2)).
    assert float(out["kappa"][0, 0, 2]) == pytest.approx(float(norms.mean()))
    assert float(out["kappa"][0, 0, 0]) == pytest.approx(float(norms[0]))
    p = (x[0] @ (x[0, 2] / norms[2])).softmax(-1)
    q = (2 * x[0] @ x[0, 2] / math.sqrt(2)).softmax(-1)
    assert float(out["kl_qp"][0, 0, 2]) == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-12)
    assert float(out["kl_pu"][0, 0, 2]) == pytest.approx(float((p * (3 * p).log()).sum()), rel=1e-12)
    assert float(out["kl_qu"][0, 0, 0]) == pytest.approx(0.0, abs=1e-15)  # one visible key
    qk = attention_metrics(field, x, options=Options(kappa="query_key"))["kappa"]
    expected = (2 * norms[1] * norms[:2] / math.sqrt(2)).mean()  # query 1, keys 0..1
    assert float(qk[0, 0, 1]) == pytest.approx(float(expected))


def zero_queries(model):
    for field in (m for m in model.modules() if isinstance(m, AttentionField)):
        with torch.no_grad():
            field.q.weight.zero_()
            field.q.bias.zero_()
    return model


@pytest.mark.parametrize("norm", ["post_ln", "pre_ln", "ngpt"])
def test_zero_query_weights_give_uniform_attention_in_every_layer(norm):
    model = zero_queries(SVFlowLM(50, 32, 4, 3, context=12, norm=norm).double().eval())
    ids = torch.randint(0, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 9:] = 0
    table = layer_metrics(model, ids, mask)
    assert table["kl_qu"].shape == (3, 4)
    assert table["kl_qu"].abs().max() < 1e-12
    assert (table["kl_pu"] > 0).all() and (table["kappa"] > 0).all()
    # KL(q||p) with uniform q is log n - mean_j log(n p_j) >= KL(U||p) > 0.
    assert (table["kl_qp"] > 0).all()


def test_hooks_read_the_state_the_field_reads():
    # In a pre-norm model, layer k's attention reads norm_k(state after k layers).
    model = SVFlowLM(50, 32, 4, 2, context=8, norm="pre_ln").double().eval()
    with torch.no_grad(), on_calls(model, AttentionField, lambda field, x, context: x) as records:
        out = model(torch.randint(0, 50, (2, 8)))
    assert [t for t, _ in records] == [0.0, 1.0]
    for k, (_, x) in enumerate(records):
        torch.testing.assert_close(x, model.blocks[k].terms[0].field.norm(out.hidden_states[k]))
        assert not torch.allclose(x, out.hidden_states[k])


def test_layer_metrics_group_solver_stages_by_layer():
    model = SVFlowLM(50, 32, 4, 3, context=8, norm="pre_ln", method="rk4").double().eval()
    with on_calls(model, AttentionField, lambda field, x, context: None) as records:
        model(torch.randint(0, 50, (2, 8)))
    assert len(records) == 12  # 4 stages per layer
    table = layer_metrics(model, torch.randint(0, 50, (2, 8)))
    assert table["kl_qp"].shape == (3, 4) and torch.isfinite(table["kl_qp"]).all()


def test_options_are_validated():
    with pytest.raises(ValueError, match="kappa"):
        Options(kappa="mean")
    assert "without the vMF normaliser" in Options(normaliser=False).describe()


# ---------------------------------------------------------------- prefix shuffling


def test_shuffle_prefix_moves_exactly_the_requested_share():
    ids = torch.arange(40).repeat(3, 1)  # distinct tokens: a moved token is visible
    out = shuffle_prefix(ids, 0.5, 0, -1, torch.Generator().manual_seed(0))
    moved = out != ids
    assert moved[:, -1].sum() == 0  # the last input keeps its token
    assert moved.sum(-1).tolist() == [20, 20, 20]  # round(0.5 * 39) = 20 positions per row
    assert torch.equal(out.sort(-1).values, ids)  # a permutation of each row
    assert torch.equal(shuffle_prefix(ids, 0.0), ids)
    full = shuffle_prefix(ids, 1.0, 1, -1)
    assert (full[:, 1:-1] != ids[:, 1:-1]).all() and torch.equal(full[:, [0, -1]], ids[:, [0, -1]])


def test_logit_lens_last_row_is_the_model_output():
    model = SVFlowLM(50, 32, 4, 3, context=8, norm="pre_ln").double().eval()
    ids, targets = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4,))
    with torch.no_grad():
        out = model(ids)
    nll = logit_lens_nll(model, out, targets)
    assert nll.shape == (4, 4)
    expected = -out.logits[:, -1].log_softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(nll[-1], expected)
    assert not torch.allclose(nll[1], nll[-1])  # earlier layers read through the final norm differ


@pytest.mark.parametrize("readout", ["lens", "patch"])
def test_shuffle_study_with_rate_zero_changes_nothing(readout):
    model = SVFlowLM(50, 32, 4, 2, context=10, norm="pre_ln").double().eval()
    ids, targets = torch.randint(0, 50, (6, 10)), torch.randint(0, 50, (6,))
    rows = prefix_shuffle_study(model, ids, [0.0, 1.0], targets=targets, options=Options(readout=readout),
                                batch_size=4)
    assert [(r["rate"], r["layer"]) for r in rows] == [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    for r in rows[:2]:
        assert r["d_nll"] == pytest.approx(0.0, abs=1e-12)
        assert r["kl_qp_shuffled"] == pytest.approx(r["kl_qp"], rel=1e-12)
    assert any(abs(r["d_nll"]) > 1e-9 for r in rows[2:])


def test_shuffle_study_of_an_encoder_has_no_nll():
    model = SVFlowLM(50, 32, 4, 2, context=10, causal=False).double().eval()
    rows = prefix_shuffle_study(model, torch.randint(0, 50, (4, 10)), [1.0], start=1, stop=-1)
    assert len(rows) == 2 and "d_nll" not in rows[0]


# ---------------------------------------------------------------- consistency regulariser


def moe_with_identical_experts(d=16, n_experts=3):
    field = MoEField(d, 8, n_experts, top_k=1, renormalise=False).double().requires_grad_(False)
    for expert in field.experts[1:]:
        expert.load_state_dict(field.experts[0].state_dict())
    return field


def test_moe_consistency_with_identical_experts_is_kl_to_uniform():
    field = moe_with_identical_experts()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        field.router.weight.zero_()
    assert float(moe_consistency(field, x)) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        field.router.weight.normal_()
    q = field.router(x)  # the router outputs the posterior q(e|x)
    expected = (q * (3 * q).log()).sum(-1).mean()  # identical experts: p is uniform
    assert float(moe_consistency(field, x)) == pytest.approx(float(expected), rel=1e-12)


def moe_lm():
    model = SVFlowLM(50, 16, 2, 2, context=8)
    for block in model.blocks:
        block.terms[1].field = MoEField(16, 8, 3, top_k=1, renormalise=False)
    return model


def test_consistency_loss_scales_with_beta_and_has_finite_gradients():
    model = moe_lm()
    ids = torch.randint(0, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    one = consistency_loss(model, ids, mask)
    scaled = consistency_loss(model, ids, mask, beta=2.5).item()
    assert scaled == pytest.approx(2.5 * one.item(), rel=1e-6)
    one.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].terms[1].field.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detach_p", [False, True])
def test_detached_p_trains_only_the_router(detach_p):
    field = MoEField(16, 8, 3, top_k=1, renormalise=False)
    moe_consistency(field, torch.randn(4, 16), detach_p=detach_p).backward()
    assert field.router.weight.grad.abs().sum() > 0
    expert_grad = field.experts[0].up.weight.grad
    assert (expert_grad is None or expert_grad.abs().sum() == 0) == detach_p


def test_consistency_recorder_shares_the_forward_pass():
    model = moe_lm()
    ids = torch.randint(0, 50, (2, 8))
    with consistency_recorder(model) as kls:
        model(ids)
    assert len(kls) == 4  # 2 attention + 2 MoE evaluations
    with consistency_recorder(model, parts=("moe",)) as moe_only:
        model(ids)
    assert len(moe_only) == 2
    with pytest.raises(ValueError, match="none of the fields"):
        with consistency_recorder(SVFlowLM(50, 16, 2, 1, context=8), parts=("moe",)):
            pass


def test_zero_query_attention_consistency_is_kl_from_uniform_to_p():
    model = zero_queries(SVFlowLM(50, 32, 4, 2, context=8).double())
    ids = torch.randint(0, 50, (2, 8))
    table = layer_metrics(model, ids)
    loss = consistency_loss(model, ids, parts=("attention",))
    assert loss.item() == pytest.approx(float(table["kl_qp"].mean()), rel=1e-10)


# ---------------------------------------------------------------- metrics vs validation loss


def test_correlation_across_models_ranks_sharper_attention():
    # Scaling W_q by c sharpens every first-layer posterior: KL(q||U) increases with c.
    base = SVFlowLM(50, 32, 4, 2, context=8).double().eval()
    models = []
    for c in (0.0, 1.0, 3.0, 9.0):
        model = SVFlowLM(50, 32, 4, 2, context=8).double().eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            model.blocks[0].terms[0].field.q.weight.mul_(c * 20)
        models.append(model)
    rows = metric_loss_correlation(models, [0.0, 1.0, 3.0, 9.0], torch.randint(0, 50, (4, 8)))
    first = next(r for r in rows if r["metric"] == "kl_qu" and r["layer"] == 1)
    assert first["spearman"] == pytest.approx(1.0)
    assert first["values"][0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 3 models"):
        metric_loss_correlation(models[:2], [0.0, 1.0], torch.randint(0, 50, (4, 8)))


def test_permutation_p_of_a_perfect_ranking_is_the_exact_minimum():
    # n = 5: only 2 of the 120 pairings reach |rho| = 1, so p -> 2/120 with many permutations.
    a, b = torch.arange(5.0), torch.tensor([0.1, 0.4, 0.5, 2.0, 9.0])
    assert permutation_p(a, b, n_permutations=20000) == pytest.approx(2 / 120, abs=0.004)
    assert permutation_p(a, torch.tensor([0.5, 0.1, 9.0, 2.0, 0.4])) > 0.5  # rho = 0.1


def test_permutation_p_of_an_undefined_correlation_is_nan():
    # Pearson's r of a constant is undefined: that is no evidence, not the smallest p-value.
    assert math.isnan(permutation_p(torch.arange(5.0), torch.zeros(5), statistic=pearson, n_permutations=99))


def test_permutation_p_within_groups_keeps_the_between_group_pairing():
    # Within each group b is constant: no within-group permutation changes Pearson's r, so p = 1
    # however strong the correlation that the group means carry.
    a, b, groups = torch.arange(6.0), torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0]), [0, 0, 0, 1, 1, 1]
    assert abs(pearson(a, b)) > 0.8
    assert permutation_p(a, b, statistic=pearson, n_permutations=99, groups=groups) == 1.0
