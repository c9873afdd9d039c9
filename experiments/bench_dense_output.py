"""Dense output: an adaptive solve with many output times, against torchdiffeq's dopri5.

The problem is torchdiffeq's ``examples/ode_demo.py``: ``y' = y**3 A`` from ``y0 = (2, 0)`` with
1,000 output times on ``[0, 25]``. Our dopri5 takes its own steps and reads the output times off
each accepted step's quartic continuous extension; "landing" is the same solver with its dense
output removed, so that every output time is a step end (what ``integrate`` did before). The
error is the largest deviation from an RK4 solve at ``h = 1e-3`` over all 1,000 outputs. All
three run in one process, at each tolerance (``atol = rtol / 100``), and the NFE ratio is printed.

    python -m experiments.bench_dense_output [--out experiments/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchdiffeq

import solvers

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)


class Field:
    """``y' = y**3 A``, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return (y**3) @ A


class Landing:
    """A solver's steps without their dense output: the loop then lands on every output time."""

    def __init__(self, solver):
        self.solver = solver
        self.order, self.error_order, self.fsal, self.strict = solver.order, solver.error_order, solver.fsal, solver.strict

    def field_value(self, *args):
        return self.solver.field_value(*args)

    def step(self, *args):
        return self.solver.step(*args)._replace(interpolant=None)


def run(solve) -> tuple[int, float, torch.Tensor]:
    field = Field()
    start = time.perf_counter()
    ys = solve(field)
    return field.calls, time.perf_counter() - start, ys


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--outputs", type=int, default=1000)
    args = parser.parse_args(argv)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0, 25, args.outputs, dtype=torch.float64)
    reference = solvers.odeint(Field(), y0, t, method="rk4", options={"step_size": 1e-3})
    rows = []
    for rtol in (1e-5, 1e-6, 1e-7):
        atol = rtol / 100
        controller = solvers.PIController(rtol=rtol, atol=atol)
        dopri5 = solvers.make_solver("dopri5")
        runs = {
            "ours (dense output)": lambda f: solvers.integrate(f, y0, t, solver=dopri5, controller=controller).ys,
            "ours (landing)": lambda f: solvers.integrate(f, y0, t, solver=Landing(dopri5), controller=controller).ys,
            "torchdiffeq": lambda f: torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=rtol, atol=atol),
        }
        for name, solve in runs.items():
            nfe, seconds, ys = run(solve)
            rows.append({"rtol": rtol, "solver": name, "nfe": nfe, "error": (ys - reference).abs().max().item(),
                         "seconds": seconds})
    lines = [
        "# Dense output: 1,000 output times, ours against torchdiffeq's dopri5",
        "",
        f"`python -m experiments.bench_dense_output`, torch {torch.__version__}, float64. Problem: torchdiffeq's "
        f"ode_demo (`y' = y**3 A`, {args.outputs} outputs on [0, 25]); atol = rtol / 100; error: max over all "
        "outputs against RK4 at h = 1e-3. Timings are one run each on a shared CPU: indicative only.",
        "",
        "| rtol | solver | NFE | NFE / torchdiffeq | max error | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        theirs = next(r for r in rows if r["rtol"] == row["rtol"] and r["solver"] == "torchdiffeq")
        lines.append(f"| {row['rtol']:g} | {row['solver']} | {row['nfe']} | {row['nfe'] / theirs['nfe']:.2f} | "
                     f"{row['error']:.2e} | {row['seconds']:.3f} |")
    lines += ["", "At equal or lower error (ours: the cheapest dense-output run whose error is at most torchdiffeq's):", ""]
    ours = [r for r in rows if r["solver"] == "ours (dense output)"]
    for theirs in (r for r in rows if r["solver"] == "torchdiffeq"):
        match = min((r for r in ours if r["error"] <= theirs["error"]), key=lambda r: r["nfe"], default=None)
        if match is not None:
            lines.append(f"- torchdiffeq at rtol {theirs['rtol']:g} (error {theirs['error']:.2e}, NFE {theirs['nfe']}): "
                         f"ours at rtol {match['rtol']:g} (error {match['error']:.2e}) takes {match['nfe']} NFE, "
                         f"**{match['nfe'] / theirs['nfe']:.2f}x**")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense_output_bench.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
