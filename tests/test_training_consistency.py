"""``LitSVFlow``'s variational-consistency regulariser, checked against a hand computation."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F

from experiments.moe_collapse import MoELM
from svflow_ode.fields import AttentionField, MoEField
from svflow_ode.lm import SVFlowLM
from svflow_ode.training import LitSVFlow
from svflow_ode.training.cli import run

CONFIGS = Path(__file__).parents[1] / "experiments" / "configs"


def attention_lm(**kwargs) -> SVFlowLM:
    torch.manual_seed(0)
    return SVFlowLM(7, d_model=8, n_heads=2, n_blocks=2, context=6, **kwargs).double()


def moe_model(n_blocks: int = 2) -> SVFlowLM:
    torch.manual_seed(0)
    model = MoELM(7, n_experts=3, d_model=8, n_heads=4, n_blocks=n_blocks, d_ff=8, context=6, norm="post_ln",
                  init="nanogpt").double()
    for expert in model.modules():  # scores of norm ~1, so that C_d(|f_e|) differs between experts
        if isinstance(expert, MoEField):
            for p in expert.experts.parameters():
                torch.nn.init.normal_(p, std=0.5)
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(7, (2, 6), generator=generator), torch.randint(7, (2, 6), generator=generator)


def cross_entropy(model, batch) -> torch.Tensor:
    ids, labels = batch
    return F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())


def field_inputs(model, kind) -> list[tuple]:
    """``(field, x)`` for every evaluation of a ``kind`` field in one forward pass, by our own hooks."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args[1])))
               for m in model.modules() if isinstance(m, kind)]
    model(batch()[0])
    for handle in handles:
        handle.remove()
    return calls


def log_vmf_normaliser(kappa: np.ndarray, d: int) -> np.ndarray:
    """``log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log 2π - log I_{d/2-1}(kappa)`` by scipy."""
    nu = d / 2 - 1
    return nu * np.log(kappa) - d / 2 * math.log(2 * math.pi) - (np.log(sp.ive(nu, kappa)) + kappa)


def kl_to_likelihood_posterior(q: np.ndarray, scores: np.ndarray, x: np.ndarray) -> float:
    """``KL(q || p)`` with ``p(z) ∝ C_d(|s_z|) exp(s_z . x/|x|)``; q, scores ``(Z,)``, ``(Z, d)``."""
    logits = scores @ (x / np.linalg.norm(x)) + log_vmf_normaliser(np.linalg.norm(scores, axis=-1), len(x))
    log_p = logits - sp.logsumexp(logits)
    return float(np.sum(q * (np.log(q) - log_p)))


def hand_attention_kls(model) -> list[float]:
    """Per attention evaluation: the mean over batch, heads and queries (causal context j <= i)."""
    kls = []
    for field, x in field_inputs(model, AttentionField):
        parts = {k: v.detach().numpy() for k, v in field.posterior(x).items()}
        x = x.detach().numpy()
        B, nh, T, _ = parts["q"].shape
        kls.append(np.mean([kl_to_likelihood_posterior(parts["q"][b, h, i, : i + 1], parts["scores"][b, h, : i + 1],
                                                        x[b, i])
                            for b in range(B) for h in range(nh) for i in range(T)]))
    return kls


def hand_moe_kls(model) -> list[float]:
    """Per MoE evaluation: the mean over tokens of KL(router || experts' likelihood posterior)."""
    kls = []
    for field, x in field_inputs(model, MoEField):
        q = field.router(x).detach().numpy().reshape(-1, len(field.experts))  # (N, E)
        outputs = torch.stack([e(0.0, x) for e in field.experts], -2).detach().numpy()  # (B, T, E, d)
        outputs, x = outputs.reshape(len(q), *outputs.shape[-2:]), x.detach().numpy().reshape(len(q), -1)
        kls.append(np.mean([kl_to_likelihood_posterior(q[n], outputs[n], x[n]) for n in range(len(q))]))
    return kls


def test_beta_zero_is_exactly_the_cross_entropy():
    model = attention_lm()
    assert torch.equal(LitSVFlow(model).model_step(batch(), "train"), cross_entropy(model, batch()))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_attention_regulariser_adds_beta_times_the_hand_computed_kl(method):
    model = attention_lm(method=method)
    loss = LitSVFlow(model, consistency_beta=0.3).model_step(batch(), "train")
    kls = hand_attention_kls(model)
    assert len(kls) == {"euler": 1, "heun": 2}[method] * 2  # every stage of every layer
    assert float(loss - cross_entropy(model, batch())) == pytest.approx(0.3 * np.mean(kls), rel=1e-10)


@pytest.mark.parametrize("parts", [("moe",), ("attention", "moe")])
def test_moe_regulariser_adds_beta_times_the_hand_computed_kl(parts):
    model = moe_model()
    loss = LitSVFlow(model, consistency_beta=0.3, consistency_parts=parts).model_step(batch(), "train")
    kls = hand_moe_kls(model) + (hand_attention_kls(model) if "attention" in parts else [])
    assert float(loss - cross_entropy(model, batch())) == pytest.approx(0.3 * np.mean(kls), rel=1e-10)


def gradients(model, **options) -> dict[str, torch.Tensor]:
    model.zero_grad()
    LitSVFlow(model, **options).model_step(batch(), "train").backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# One layer: the parameters of the posteriors q and of the scores that define p, per part. The
# attention field reads the embedding and the MoE field the state after attention, so with p
# detached nothing but the scores' own path reaches their weights.
ROLES = {
    "attention": ({"blocks.0.terms.0.field.q.weight", "blocks.0.terms.0.field.k.weight"},
                  {"blocks.0.terms.0.field.v.weight", "blocks.0.terms.0.field.o.weight"}),
    "moe": ({"blocks.0.terms.1.field.router.weight"},
            {f"blocks.0.terms.1.field.experts.{e}.{w}.weight" for e in range(3) for w in ("up", "down")}),
}


@pytest.mark.parametrize("detach_p", [False, True])
@pytest.mark.parametrize("part", sorted(ROLES))
def test_gradients_reach_the_posteriors_and_through_p_unless_detached(part, detach_p):
    model = moe_model(n_blocks=1)
    plain = gradients(model)
    regularised = gradients(model, consistency_beta=1.0, consistency_parts=(part,), consistency_detach_p=detach_p)
    changed = {name for name in plain if not torch.allclose(plain[name], regularised[name], rtol=1e-9, atol=0)}
    posteriors, scores = ROLES[part]
    assert posteriors <= changed
    assert (scores & changed) == (set() if detach_p else scores)


def test_negative_beta_and_recomputed_gradients_are_refused():
    with pytest.raises(ValueError, match="consistency_beta"):
        LitSVFlow(attention_lm(), consistency_beta=-1.0)
    with pytest.raises(ValueError, match="backprop"):
        LitSVFlow(attention_lm(gradient="checkpoint"), consistency_beta=0.1)
    with pytest.raises(ValueError, match=r"unknown consistency_parts \['atention'\]"):
        LitSVFlow(attention_lm(), consistency_beta=0.1, consistency_parts=("atention",))


def test_consistency_config_trains_through_the_command_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["svflow-ode"])  # the CLI runs in-process
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = run(["fit", f"--config={CONFIGS / 'base.yaml'}", f"--config={CONFIGS / 'consistency.yaml'}",
                   "--model.model.init_args.d_model=16", "--model.model.init_args.n_heads=2", "--data.batch_size=8",
                   "--data.val_size=16", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
                   "--trainer.callbacks=[]", "--trainer.fast_dev_run=true"])
    finally:
        torch.set_num_threads(threads)
    assert cli.model.consistency_beta > 0 and cli.model.consistency_parts == ("attention",)
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(metrics["train/consistency"]) and math.isfinite(metrics["val/consistency"])
