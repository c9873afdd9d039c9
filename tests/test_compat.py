"""The private upstream APIs in ``solvers.compat``: one test per name, failing loudly if it is gone or changed."""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from solvers import compat
from svflow_ode.lm import SVFlowLM
from svflow_ode.training import LitSVFlow
from svflow_ode.training.cli import run

BASE = Path(__file__).parents[1] / "experiments" / "configs" / "base.yaml"


class Recorder(L.LightningModule):
    """Notes what ``compat.given_hyperparameters`` returns while it is being built."""

    seen = []

    def __init__(self, width: int = 3):
        super().__init__()
        Recorder.seen.append(compat.given_hyperparameters())
        self.layer = torch.nn.Linear(width, 1)


def test_given_hyperparameters_is_the_configuration_inside_lightningcli_and_none_outside(monkeypatch):
    # lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters: LightningCLI sets it around
    # a module's __init__ to the module's configuration, and LitSVFlow saves that (nested class paths
    # included) instead of its arguments, so that load_from_checkpoint can rebuild the model.
    monkeypatch.setattr(sys, "argv", ["test"])
    Recorder.seen.clear()
    Recorder()
    LightningCLI(Recorder, run=False, args=["--model.width=5", "--trainer.logger=false"],
                 save_config_callback=None)
    outside, inside = Recorder.seen
    assert outside is None
    assert inside is not None and inside["width"] == 5 and "_instantiator" in inside


def test_lit_svflow_saves_the_model_configuration_only_when_lightningcli_builds_it(monkeypatch, tmp_path):
    # What LitSVFlow does with the private name, end to end: the CLI-built module's hyperparameters
    # hold the model's class path and arguments; a directly built one's leave the model object out.
    monkeypatch.setattr(sys, "argv", ["svflow-ode"])
    monkeypatch.chdir(tmp_path)
    direct = LitSVFlow(SVFlowLM(vocab_size=8, d_model=8, n_heads=2, n_blocks=1, context=4), max_steps=2)
    assert "model" not in direct.hparams
    cli = run([f"--config={BASE}", "--model.model.init_args.d_model=8", "--model.model.init_args.n_heads=2",
               "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    assert cli.model.hparams["model"]["class_path"] == "svflow_ode.lm.SVFlowLM"
    assert cli.model.hparams["model"]["init_args"]["d_model"] == 8


def test_a_private_name_that_is_gone_fails_naming_it_and_the_version_written_against():
    with pytest.raises(ImportError) as info:
        compat._private("lightning", "lightning.pytorch.core.mixins.hparams_mixin", "_no_such_name", "2.6")
    message = str(info.value)
    assert "lightning.pytorch.core.mixins.hparams_mixin._no_such_name" in message
    assert "written against (lightning 2.6)" in message and "solvers/compat.py" in message


def test_torchdiffeq_solvers_is_the_registry_torchdiffeq_odeint_reads():
    # torchdiffeq._impl.odeint.SOLVERS: torchdiffeq.odeint looks method names up in it, so a class
    # registered there runs when named (what solvers.register_torchdiffeq relies on).
    import torchdiffeq

    registry = compat.torchdiffeq_solvers()
    assert registry["dopri5"].__module__.startswith("torchdiffeq")

    class Double:
        def __init__(self, func, y0, rtol, atol, **options):
            self.y0 = y0

        @classmethod
        def valid_callbacks(cls):
            return set()

        def integrate(self, t):
            return torch.stack([self.y0 * 2 for _ in t])

    registry["_compat_probe"] = Double
    try:
        ys = torchdiffeq.odeint(lambda t, y: y, torch.ones(2), torch.tensor([0.0, 1.0]), method="_compat_probe")
        assert torch.equal(ys, torch.full((2, 2), 2.0))
    finally:
        del registry["_compat_probe"]


def test_is_torchdiffeq_adjoint_backward_tells_its_backward_solve_from_a_forward_one():
    # torchdiffeq._impl.adjoint's local augmented_dynamics, wrapped in _PerturbFunc/_TupleFunc.
    import torchdiffeq

    registry, seen = compat.torchdiffeq_solvers(), []

    class Probe:
        def __init__(self, func, y0, rtol, atol, **options):
            seen.append(compat.is_torchdiffeq_adjoint_backward(func))
            self.func, self.y0 = func, y0

        @classmethod
        def valid_callbacks(cls):
            return set()

        def integrate(self, t):  # one Euler step per interval: enough to run both passes
            ys = [self.y0]
            for a, b in zip(t[:-1], t[1:]):
                ys.append(ys[-1] + (b - a) * self.func(a, ys[-1]))
            return torch.stack(ys)

    registry["_compat_probe"] = Probe
    try:
        w = torch.nn.Linear(2, 2)
        ys = torchdiffeq.odeint_adjoint(lambda t, y: w(y), torch.ones(2), torch.tensor([0.0, 1.0]),
                                        method="_compat_probe", adjoint_params=tuple(w.parameters()))
        ys.sum().backward()
    finally:
        del registry["_compat_probe"]
    assert seen == [False, True]


def test_geoopts_sphere_still_restricts_through_the_subspace_hook_layernormsphere_overrides():
    # geoopt.Sphere._project_on_subspace: geoopt's proju calls it, and manifolds.LayerNormSphere
    # (whose proju is geoopt's, scaled) overrides it to stay in the mean-zero plane. If geoopt
    # stopped calling it, LayerNormSphere's tangent vectors would silently keep a mean.
    from manifolds import LayerNormSphere

    sphere = LayerNormSphere()
    x = sphere.projx(torch.randn(4, 8, dtype=torch.float64))
    u = sphere.proju(x, torch.randn(4, 8, dtype=torch.float64))
    assert u.mean(-1).abs().max() < 1e-12 and (x * u).sum(-1).abs().max() < 1e-12
