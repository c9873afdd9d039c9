"""Bad input to the models and the solve loop gets one clear line before any work (issue: reliability)."""

import pytest
import torch

import solvers
from svflow_ode.lm import SVFlowLM


def _lm(**kw):
    return SVFlowLM(**{"vocab_size": 10, "d_model": 16, "n_heads": 2, "n_blocks": 2, "context": 8, **kw})


def test_the_default_post_ln_model_runs_adaptive_methods():
    # Relaxed steps retract any ambient point: the embedding's output needs no check on a layer's chart.
    out = _lm(method="dopri5", splitting="none", rtol=1e-4, atol=1e-6)(torch.randint(0, 10, (2, 8)))
    assert torch.isfinite(out.logits).all() and out.stats.steps >= 2 and out.stats.rejected >= 0


@pytest.mark.parametrize("name", ["vocab_size", "d_model", "n_heads", "n_blocks", "context", "d_ff"])
@pytest.mark.parametrize("value", [0, -1, "3", 2.5])
def test_model_sizes_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value!r}"):
        _lm(**{name: value})


def test_steps_must_be_a_positive_integer_named_as_given():
    with pytest.raises(ValueError, match="steps must be a positive integer, got '3'"):
        _lm()(torch.randint(0, 10, (1, 8)), steps="3")
    with pytest.raises(ValueError, match="steps=10,000,000 is more than max_steps=100,000"):
        _lm(time="continuous")(torch.randint(0, 10, (1, 8)), steps=10**7)


def test_empty_input_and_non_binary_masks_are_refused():
    model = _lm()
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(1, 0\)\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    ids = torch.randint(0, 10, (1, 8))
    for bad in (0.5, 2.0, -1.0, float("nan")):
        mask = torch.ones(1, 8)
        mask[0, -1] = bad
        with pytest.raises(ValueError, match="attention_mask must hold 1 \\(token\\) or 0 \\(padding\\) only"):
            model(ids, attention_mask=mask)


def test_the_solve_refuses_empty_states_and_gradients_through_its_times():
    field = lambda t, x: -x  # noqa: E731
    with pytest.raises(ValueError, match=r"y0 is empty \(shape \(0,\)\)"):
        solvers.odeint(field, torch.zeros(0), torch.tensor([0.0, 1.0]), method="rk4")
    t = torch.tensor([0.0, 1.0], requires_grad=True)
    with pytest.raises(ValueError, match="gradients with respect to the output times are not supported"):
        solvers.odeint(field, torch.ones(3), t, method="rk4")
