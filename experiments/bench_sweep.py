"""The sweep runner's overhead per point, against the same fit run directly by ``svflow-ode fit``.

Both ways run the Tiny Shakespeare recipe (``configs/base.yaml`` + ``configs/tinyshakespeare.yaml``,
its loggers included) for a short fit on one thread:

- direct: ``python -m svflow_ode.training.cli fit`` for ``short`` and ``long`` steps; the
  difference gives the time per training step, the rest the fixed cost of a fit;
- runner: ``python -m experiments.sweep`` on a grid of ``points`` identical points of ``short``
  steps (``--jobs 1``), whose wall time beyond ``points`` direct fits is the runner's overhead
  (its own start, config writing, collecting each point's metrics and model costs, the report),
  spread over the points.

The overhead is then expressed as a fraction of a 2,000-step fit, extrapolated as fixed cost
plus 2,000 steps at the measured rate (validation left out: the real fit is longer, so the
fraction is an upper bound). Repeats alternate the two ways and keep the median.

    python -m experiments.bench_sweep [--short 10] [--long 40] [--points 2] [--repeats 2]

writes ``experiments/results/sweep_bench.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIGS = Path(__file__).parent / "configs"
BASE = [CONFIGS / "base.yaml", CONFIGS / "tinyshakespeare.yaml"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_SILENT": "true"}
FIT_STEPS = 2000


def timed(args: list[str], cwd: Path) -> float:
    """Wall seconds of the command ``args`` run in ``cwd`` (its output discarded); fails loudly if it fails."""
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def direct(steps: int, cwd: Path) -> float:
    """One ``svflow-ode fit`` of ``steps`` steps, logging under ``cwd/runs`` as the base config says."""
    return timed([sys.executable, "-m", "svflow_ode.training.cli", "fit", *(f"--config={c}" for c in BASE),
                  f"--trainer.max_steps={steps}"], cwd)


def through_runner(steps: int, points: int, cwd: Path) -> float:
    """One ``experiments.sweep`` run of ``points`` identical points of ``steps`` steps, into a fresh directory."""
    out = Path(tempfile.mkdtemp(dir=cwd))
    grid = {"name": "bench", "base": [str(c) for c in BASE], "out": str(out),
            "overrides": {"trainer.max_steps": steps}, "points": {f"p{i}": {} for i in range(points)}}
    path = out / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return timed([sys.executable, "-m", "experiments.sweep", str(path), "--jobs", "1"], Path.cwd())


def measure(short: int, long: int, points: int, repeats: int) -> dict:
    """The medians over ``repeats`` of each timing, and what they imply for a 2,000-step fit."""
    times: dict[str, list[float]] = {"short": [], "long": [], "runner": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # alternated, so that a busy spell of the machine hits both ways
            times["short"].append(direct(short, Path(tmp)))
            times["runner"].append(through_runner(short, points, Path(tmp)))
            times["long"].append(direct(long, Path(tmp)))
    t = {k: statistics.median(v) for k, v in times.items()}
    per_step = (t["long"] - t["short"]) / (long - short)
    fixed = t["short"] - short * per_step
    overhead = (t["runner"] - points * t["short"]) / points
    full = fixed + FIT_STEPS * per_step
    return {**{f"{k}_s": v for k, v in t.items()}, "all": times, "per_step_s": per_step, "fixed_s": fixed,
            "overhead_s": overhead, "fit_2000_s": full, "fraction": overhead / full}


def write(path: Path, r: dict, args) -> None:
    """The benchmark's markdown, from ``experiments/templates/sweep_bench.md``."""
    from experiments.report import render

    listed = {k: ", ".join(f"{v:.1f}" for v in vs) for k, vs in r["all"].items()}
    fields = {
        "command": " ".join(["python -m experiments.bench_sweep", *sys.argv[1:]]),
        "short": args.short, "long": args.long, "points": args.points, "repeats": args.repeats,
        "short_s": f"{r['short_s']:.1f}", "long_s": f"{r['long_s']:.1f}", "runner_s": f"{r['runner_s']:.1f}",
        "all_short": listed["short"], "all_long": listed["long"], "all_runner": listed["runner"],
        "per_step_ms": f"{1000 * r['per_step_s']:.1f}", "fixed_s": f"{r['fixed_s']:.1f}",
        "overhead_s": f"{r['overhead_s']:.2f}", "fit_2000_s": f"{r['fit_2000_s']:.0f}",
        "fraction": f"{100 * r['fraction']:.1f}%", "verdict": "within" if r["fraction"] <= 0.05 else "over",
        "cpus": os.cpu_count(), "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    path.write_text(render("sweep_bench", fields))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10, help="steps of the short fit (and of each runner point)")
    parser.add_argument("--long", type=int, default=40, help="steps of the long direct fit (per-step time)")
    parser.add_argument("--points", type=int, default=2, help="points in the runner's grid")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep_bench.md")
    args = parser.parse_args(argv)
    result = measure(args.short, args.long, args.points, args.repeats)
    write(args.out, result, args)
    print(args.out.read_text())
    return result


if __name__ == "__main__":
    main()
