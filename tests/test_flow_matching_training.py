"""Flow matching with Lightning: the YAML configuration trains through the CLI, resumes, refuses bad input;
the vMF-mixture example's smoke run writes its outputs."""

import math
from pathlib import Path

import pytest
import torch
from smoke_outputs import assert_outputs, read_csv

import manifolds
from experiments import vmf_mixture
from svflow_ode.training.flow_matching import LitFlowMatching, TangentMLP, VMFMixtureDataModule, run

ROOT = Path(__file__).parents[1]
CONFIG = [f"--config={ROOT / 'experiments' / 'configs' / 'rfm_vmf_mixture.yaml'}",
          "--model.field.init_args.hidden=16", "--model.field.init_args.layers=1", "--model.val_steps=2",
          "--data.init_args.n_train=256", "--data.init_args.n_val=64", "--data.init_args.batch_size=64",
          "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"]


pytestmark = pytest.mark.usefixtures("cli_in_tmp")  # in tmp_path, one thread, explicit args


def test_the_shipped_configuration_trains_validates_and_resumes(tmp_path):
    run(["fit", *CONFIG])
    directory = tmp_path / "runs" / "rfm_vmf_mixture" / "version_0"
    rows = read_csv(directory / "metrics.csv")
    val = [r for r in rows if r.get("val/nll")]
    assert len(val) == 2
    assert all(math.isfinite(float(r["val/nll"])) and float(r["val/target_nll"]) > 0 for r in val)
    assert (directory / "checkpoints" / "last.ckpt").exists()
    cli = run(["fit", *CONFIG, "--trainer.max_steps=9", "--ckpt_path=last"])
    assert cli.trainer.global_step == 9
    assert (tmp_path / "runs" / "rfm_vmf_mixture" / "version_1").is_dir()  # its own run directory


def test_configuration_errors_are_one_line_and_start_nothing(tmp_path, capsys):
    for override, message in [
        ("--model.field.init_args.manifold=so3", "the field is built for 'so3' but the data live on 'sphere'"),
        ("--data.init_args.kappas=[1.0]", "need one kappa per mean, got 3 means and 1 kappas"),
        ("--model.min_lr=0.1", "need finite 0 <= min_lr <= lr and lr > 0, got min_lr=0.1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(["fit", *CONFIG, override])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_the_tangent_mlp_is_tangent_on_every_space_and_takes_a_time_per_point():
    for name, points in [("sphere", manifolds.UniformSphere(3).sample(5)), ("so3", manifolds.HaarSO3().sample(5)),
                         ("poincare_disk", 0.3 * torch.randn(5, 2).tanh())]:
        field = TangentMLP(name, hidden=8, layers=1)
        out = field(torch.rand(5), points)
        assert out.shape == points.shape
        torch.testing.assert_close(field.manifold.proju(points, out), out)
        torch.testing.assert_close(field(0.5, points), field(torch.full((5,), 0.5), points))
    with pytest.raises(ValueError, match="unknown space 'torus'"):
        TangentMLP("torus")
    with pytest.raises(ValueError, match="the field is built for 'so3' but the data live on 'sphere'"):
        LitFlowMatching(TangentMLP("so3"), "sphere")


def test_the_vmf_mixture_data_have_the_targets_density():
    data = VMFMixtureDataModule(n_train=4000, n_val=16, seed=3)
    x = data.train_set.tensors[0].double()
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-6
    # Each component's mean direction holds about a third of the points within 0.7 rad.
    for component in data.target.components:
        share = ((x @ component.mu).clamp(-1, 1).acos() < 0.7).double().mean().item()
        assert 0.25 < share < 0.4, share


def test_the_vmf_mixture_example_smoke_run_writes_its_outputs(tmp_path):
    out = tmp_path / "vmf_mixture"
    result = vmf_mixture.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = {r["metric"]: float(r["value"]) for r in read_csv(out.with_suffix(".csv"))}
    assert rows["held_out_nll"] == pytest.approx(result["nll"], rel=1e-5)
    # The target's Monte Carlo entropy agrees with its NLL on the held-out points (both estimate it).
    assert abs(result["entropy"] - result["target_nll"]) < 4 * (result["entropy_se"] + result["nll_se"])
    assert torch.isfinite(result["learned"]).all()


def test_the_flow_matching_bench_smoke_run_agrees_with_flow_matching(tmp_path):
    from experiments import bench_flow_matching  # imports Meta's flow_matching (a test dependency)

    out = tmp_path / "bench_flow_matching"
    result = bench_flow_matching.main(["--smoke", "--out", str(out)])
    assert "SMOKE RUN" in out.with_suffix(".md").read_text()
    assert max(result["drift"].values()) < 1e-5  # both project onto the sphere
    assert result["gap"] < 0.1  # the same field and step count: close solutions (rk4 variants differ in the stages)


def test_the_console_script_exits_0_after_a_run(tmp_path):
    import subprocess
    import sys as system

    # A console script passes main's return value to sys.exit: anything but None is a failure status.
    done = subprocess.run([system.executable, "-c", "import sys; from svflow_ode.training.flow_matching import main; "
                           "sys.argv = ['svflow-ode-rfm', *sys.argv[1:]]; sys.exit(main())", "fit", *CONFIG],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
