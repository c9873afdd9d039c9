"""The SVFlow model: time dependence, splitting, gradient modes, statistics and bad input."""

import numpy as np
import pytest
import torch

import geoopt
from solvers import RK4, ConstantStepSize, RungeKutta, Split, Term, integrate
from svflow_ode.lm import NORMS, SVFlowLM
from svflow_ode.model import Block, SVFlow


pytestmark = pytest.mark.usefixtures("float64")


def _lm(**kw):
    return SVFlowLM(**{"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_blocks": 3, "context": 8, "init": "nanogpt", **kw})


def test_continuous_parameters_reproduce_the_per_step_stack_at_unit_steps():
    per_step = _lm(time="per_step")
    continuous = _lm(time="continuous")
    continuous.load_state_dict(per_step.state_dict())
    ids = torch.randint(0, 20, (2, 8))
    a, b = per_step(ids), continuous(ids)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # Between the nodes the continuous model is a different (interpolated) field.
    assert not torch.allclose(per_step(ids, steps=6).logits, continuous(ids, steps=6).logits)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("time", ["per_step", "shared", "continuous"])
def test_every_norm_and_time_mode_runs_with_rk4_and_counts_evaluations(norm, time):
    model = _lm(norm=norm, time=time)
    out = model(torch.randint(0, 20, (2, 8)), method="rk4", steps=6)
    assert out.logits.shape == (2, 8, 20) and torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == 7
    assert out.stats.steps == 6 and out.stats.nfe == 6 * 2 * 4  # steps x terms x stages


def test_strang_splitting_is_second_order_and_lie_first():
    # x' = (A + B) x with non-commuting A, B; each term is integrated exactly enough by RK4.
    torch.manual_seed(0)
    A, B = torch.randn(4, 4), torch.randn(4, 4)
    x0 = torch.randn(4)
    exact = torch.linalg.matrix_exp(A + B) @ x0
    euclid = geoopt.Euclidean(ndim=1)
    terms = (Term(lambda t, x: x @ A.T, euclid), Term(lambda t, x: x @ B.T))  # None: the solve's manifold
    hs = [1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128]
    for scheme, order in (("lie", 1), ("strang", 2)):
        solver = Split(RungeKutta(RK4), scheme)
        assert solver.order == order
        errs = []
        for h in hs:
            sol = integrate(terms, x0, [0.0, 1.0], solver=solver, manifold=euclid, controller=ConstantStepSize(h))
            assert sol.stats.steps == round(1 / h) and sol.stats.nfe == sol.stats.steps * 4 * (2 if scheme == "lie" else 3)
            errs.append((sol.ys[-1] - exact).norm().item())
        fitted = np.polyfit(np.log(hs), np.log(errs), 1)[0]
        assert abs(fitted - order) < 0.3, (scheme, fitted)


@pytest.mark.parametrize("steps", [3, 12])  # checkpoints per step; two levels (segments of 4)
def test_checkpointed_gradients_equal_backprop(steps):
    model = _lm(norm="post_ln")
    ids = torch.randint(0, 20, (2, 8))
    grads = []
    for mode in ("backprop", "checkpoint"):
        model.gradient = mode
        model.zero_grad()
        model(ids, method="heun", steps=steps).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_bad_configuration_and_input_fail_clearly():
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        _lm(time="per_step", steps=4)
    with pytest.raises(ValueError, match="unknown method 'rk5'; known methods: euler"):
        _lm(method="rk5")
    with pytest.raises(ValueError, match="Lie-group methods need"):
        _lm(norm="post_ln", method="rkmk4")
    with pytest.raises(ValueError, match="unknown norm"):
        _lm(norm="batchnorm")
    with pytest.raises(ValueError, match="unknown time mode"):
        _lm(time="sometimes")
    model = _lm()
    uneven = [model.blocks[0], Block(*model.blocks[1].terms[:1])]
    with pytest.raises(ValueError, match=r"same number of terms, got \[2, 1\]"):
        SVFlow(model.embed, uneven)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.full((1, 4), 20))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="exceeds the model.s 8 learned positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model(torch.zeros(1, 4, dtype=torch.long), steps=0)


def test_rkmk_on_the_sphere_keeps_every_state_on_it():
    model = _lm(norm="sphere", time="continuous", method="rkmk4")
    out = model(torch.randint(0, 20, (2, 8)), steps=5)
    for x in out.hidden_states:
        torch.testing.assert_close(x.norm(dim=-1), torch.full(x.shape[:-1], 4.0), rtol=0, atol=1e-12)


def test_adaptive_methods_choose_their_steps_and_report_them():
    model = _lm(norm="sphere", time="continuous", splitting="none", mode="strict", rtol=1e-8, atol=1e-8)
    ids = torch.randint(0, 20, (2, 8))
    out = model(ids, method="dopri5")
    assert len(out.hidden_states) == 4 and out.stats.steps >= 3 and out.stats.nfe >= 6 * out.stats.steps
    # Tight tolerances agree with a fine fixed-step RK4 solve of the same field (strict mode:
    # relaxed mode is first order for a field with a normal component).
    fine = model(ids, method="rk4", steps=96)
    torch.testing.assert_close(out.last_hidden_state, fine.last_hidden_state, rtol=0, atol=1e-7)
    per_step = _lm(norm="pre_ln", splitting="none")
    assert len(per_step(ids, method="bosh3").hidden_states) == 4  # one state per block boundary
    with pytest.raises(ValueError, match="splitting='none'"):
        _lm(norm="sphere", time="continuous")(ids, method="dopri5")
    with pytest.raises(ValueError, match="charts change with t"):
        _lm(norm="post_ln", time="continuous", splitting="none")(ids, method="dopri5")


@pytest.mark.parametrize("method,splitting", [("euler", "lie"), ("rk4", "strang"), ("rkmk2", "none")])
def test_reported_nfe_equals_the_evaluations_made(method, splitting):
    model = _lm(norm="sphere", time="continuous", method=method, splitting=splitting)
    calls = []
    for block in model.blocks:
        for term in block.terms:
            term.field.register_forward_hook(lambda *args: calls.append(1))
    out = model(torch.randint(0, 20, (2, 8)), steps=5)
    per_evaluation = 2 if splitting == "none" else 1  # the summed field calls both terms
    assert out.stats.nfe * per_evaluation == len(calls) > 0


def test_adjoint_gradients_converge_to_backprop_at_the_solver_order():
    # The adjoint differentiates the exact flow, backprop the discrete one: their gap is the
    # solver's error, O(h^4) for RK4 (strict mode on the sphere, where the adjoint is sound).
    model = _lm(norm="sphere", time="continuous", splitting="none", mode="strict")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # a field that moves the state, so that the gradients are not trivial
    ids = torch.randint(0, 20, (2, 8))
    gaps = []
    for steps in (12, 24):
        grads = []
        for mode in ("backprop", "adjoint"):
            model.gradient = mode
            model.zero_grad()
            model(ids, method="rk4", steps=steps).logits.square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        gaps.append((grads[0] - grads[1]).abs().max().item())
    assert gaps[1] <= 1e-6
    assert gaps[0] / gaps[1] > 8  # ~16 for a fourth-order method
    # Refused when the model is built, in words a model user can act on.
    with pytest.raises(ValueError, match="use splitting='none'"):
        _lm(norm="sphere", mode="strict", gradient="adjoint")
    for kw in ({"norm": "post_ln"}, {"norm": "sphere", "splitting": "none"}):
        with pytest.raises(ValueError, match="mode='strict'.*use gradient='checkpoint'"):
            _lm(gradient="adjoint", **kw)
