"""FLOPs per token: a hand count for a tiny model, and the count follows the field evaluations."""

import pytest
import torch

from svflow_ode.fields import AttentionField, FFNField
from svflow_ode.flops import (
    evaluations_per_term,
    field_flops_per_token,
    forward_flops_per_token,
    training_flops_per_token,
)
from svflow_ode.lm import SVFlowLM

V, D, HEADS, FF, T = 10, 8, 2, 16, 5

# By hand, per token: attention = q, k, v (3 * 2*8*8 = 384) + scores and weighted sum
# (2 * 2*5*8 = 160) + output (2*8*8 = 128) = 672; FFN = 2*8*16 + 2*16*8 = 512; head = 2*8*10 = 160.
ATTENTION, FFN, HEAD = 672, 512, 160


def tiny(**kw):
    return SVFlowLM(V, D, HEADS, n_blocks=2, d_ff=FF, context=T, **kw)


def test_hand_count():
    model = tiny()  # post-LN, Lie splitting, Euler, one step per block: nfe 4 (2 steps x 2 terms)
    out = model(torch.randint(0, V, (3, T)))
    assert out.stats.nfe == 4
    assert field_flops_per_token(model.blocks[0].terms[0].field, T) == ATTENTION
    assert field_flops_per_token(model.blocks[0].terms[1].field, T) == FFN
    assert forward_flops_per_token(model, out.stats.nfe, T) == 2 * ATTENTION + 2 * FFN + HEAD
    assert training_flops_per_token(model, out.stats.nfe, T) == 3 * (2 * ATTENTION + 2 * FFN + HEAD)


@pytest.mark.parametrize("method,stages", [("euler", 1), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [2, 4])
def test_flops_scale_with_nfe(method, stages, steps):
    model = tiny(norm="sphere", time="continuous", splitting="none")
    out = model(torch.randint(0, V, (2, T)), method=method, steps=steps)
    assert out.stats.nfe == steps * stages
    # Unsplit: each evaluation is attention + FFN.
    assert forward_flops_per_token(model, out.stats.nfe, T) == steps * stages * (ATTENTION + FFN) + HEAD


# Adaptive methods integrate the unsplit field only.
CASES = [(s, m) for s in ("none", "lie", "strang") for m in ("euler", "rk4")] + [("none", "dopri5")]


@pytest.mark.parametrize("splitting,method", CASES)
def test_term_evaluations_match_calls(splitting, method):
    # Counted from the modules actually called, not from the formula under test.
    model = tiny(norm="sphere", time="continuous", splitting=splitting)
    calls = {AttentionField: 0, FFNField: 0}

    def hook(module, args, output):
        calls[type(module)] += 1

    for m in model.modules():
        if type(m) in calls:
            m.register_forward_hook(hook)
    out = model(torch.randint(0, V, (2, T)), method=method, steps=2 if method != "dopri5" else None)
    assert evaluations_per_term(model, out.stats.nfe) == [calls[AttentionField], calls[FFNField]]
    flops = calls[AttentionField] * ATTENTION + calls[FFNField] * FFN + HEAD
    assert forward_flops_per_token(model, out.stats.nfe, T) == pytest.approx(flops)
