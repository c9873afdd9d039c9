"""Each solver/depth/re-integration experiment's --smoke run regenerates its md, csv and png."""

import argparse

import pytest
import torch
from smoke_outputs import assert_outputs, read_csv

from experiments import depth_sweep, reintegrate_minilm, solver_sweep
from experiments.char_lm import CharData

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rkmk4": 4}


@pytest.fixture(autouse=True)
def _threads():
    # The experiments set torch's thread count for the whole process; later tests get theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_solver_sweep_smoke(tmp_path):
    out = tmp_path / "solver_sweep"
    solver_sweep.main(["--smoke", "--out", str(out), "--save-dir", str(tmp_path / "models")])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert all(r["status"] == "ok" for r in rows)
    K = 2  # the smoke run's parameter sets
    assert {r["run"] for r in rows} == {
        f"post-LN Transformer (euler ×{K})", f"euler ×{K}", f"midpoint ×{K}", f"heun ×{K}", f"rk4 ×{K}",
        f"rkmk4 ×{K}", "dopri5", f"euler ×{2 * K}", f"rk4 ×{K // 2}", f"rkmk4 ×{K // 2}",
    }
    for r in rows:
        if r["method"] != "dopri5":
            terms = 2 if r["arch"] == "post_ln" else 1  # Lie splitting counts attention and FFN apart
            assert float(r["nfe_train"]) == int(r["steps"]) * STAGES[r["method"]] * terms
    # Matched FLOPs: every 2K-evaluation run costs the same; dopri5 restarts at each block (one
    # evaluation) and takes at least one step there (six more).
    matched = (f"euler ×{2 * K}", f"midpoint ×{K}", f"heun ×{K}", f"rk4 ×{K // 2}", f"rkmk4 ×{K // 2}")
    budget = {float(r["train_flops_per_token"]) for r in rows if r["run"] in matched}
    assert len(budget) == 1
    assert all(float(r["nfe_train"]) >= 7 * K for r in rows if r["method"] == "dopri5")
    assert "## Verdict" in out.with_suffix(".md").read_text()
    # Every trained model is saved, and rebuilds to the validation loss it was saved with.
    saved = sorted((tmp_path / "models").glob("*.pt"))
    assert len(saved) == len(rows)
    model, record = solver_sweep.load_run(tmp_path / "models" / f"flow_rkmk4_{K}_seed1.pt")
    args = argparse.Namespace(val_windows=8, context=16)  # the smoke run's
    val = solver_sweep.validation_windows(CharData.load(solver_sweep.DATA), args)
    assert solver_sweep.evaluate(model, val)[0] == pytest.approx(record["val_loss"], rel=1e-6)
    assert record["run"] == f"rkmk4 ×{K}" and record["seed"] == 1


def test_depth_sweep_smoke(tmp_path):
    out = tmp_path / "depth_sweep"
    depth_sweep.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    N = 4  # the smoke run's training steps
    assert {r["config"] for r in rows} == {c.name for c in depth_sweep.CONFIGS}
    # Per-step parameters: only multiples of N; the others: N/4 .. 4N; RKMK4 up to N.
    assert {int(r["M"]) for r in rows if r["config"] == "per-step"} == {N, 2 * N, 4 * N}
    assert {int(r["M"]) for r in rows if r["config"] == "continuous"} == {1, 2, N, 2 * N, 4 * N}
    assert max(int(r["M"]) for r in rows if r["method"] == "rkmk4") == N
    for r in rows:
        assert float(r["nfe"]) == int(r["M"]) * STAGES[r["method"]]


def test_reintegrate_minilm_smoke(tmp_path):
    out = tmp_path / "minilm_reintegration"
    reintegrate_minilm.main(["--smoke", "--out", str(out)])
    assert_outputs(out)
    rows = read_csv(out.with_suffix(".csv"))
    assert [r["method"].split(" ")[0] for r in rows] == [m for m, _ in reintegrate_minilm.METHODS]
    original = rows[0]
    assert float(original["cos_min"]) > 1 - 1e-12 and float(original["spearman"]) == pytest.approx(1.0)
    # NFE: steps x 2 terms (attention, FFN) x stages.
    for r, (method, steps) in zip(rows, reintegrate_minilm.METHODS):
        assert int(r["nfe"]) == 2 * steps * STAGES[method]
        assert -1.0 <= float(r["spearman"]) <= 1.0 and 0.0 <= float(r["top1_agreement"]) <= 1.0
