"""A finished sweep's curves, per point: a validation metric against the training step, or an
evaluated one against the depth.

    python -m experiments.curves OUT [--y val/loss] [--threshold T]   # each point's metrics.csv
    python -m experiments.curves OUT --depth [--y loss]               # each point's evaluation

``OUT`` is a sweep's output directory (``experiments.sweep``); its finished points are read
(``result.json``). Validation curves come from the point's ``metrics.csv`` (a validation logged
at step column ``s`` ran after ``s + 1`` optimizer steps); depth curves from its ``evaluation``,
the list of dicts with ``depth`` that ``svflow_ode.training.depth.depth_curve`` returns. Writes
``OUT/curves.csv`` (one row per run and x), ``OUT/curves.png`` (y against x per point, the mean
over seeds with standard errors) and ``OUT/curves.md``: the means, and per run the last y, the
range of y over x and, with ``--threshold``, the first x at which y reached it (against the step,
also the wall time until then: the run's, times the share of its steps done).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from experiments import report
from experiments.sweep import read_results

__all__ = ["curve_rows", "means", "per_run", "write", "main"]


def curve_rows(directory: Path, y: str, depth: bool = False) -> list[dict]:
    """One row per finished run in the sweep output ``directory`` and x (``step`` or ``depth``):
    ``point``, ``seed_everything``, x, ``y``'s value and the run's ``wall_s`` and ``steps`` trained."""
    rows = []
    for result in read_results(directory):
        run = {"point": result["point"], "seed_everything": result["seed_everything"]}
        if depth:
            points = [(entry["depth"], entry[y]) for entry in result.get("evaluation") or []]
        else:
            name = f"{result['point']}_seed_everything-{result['seed_everything']}"
            with open(directory / name / "metrics.csv", newline="") as f:
                points = [(int(r["step"]) + 1, float(r[y])) for r in csv.DictReader(f) if r.get(y)]
        rows += [{**run, "depth" if depth else "step": x, y: value, "wall_s": result["wall_s"],
                  "steps": int(result["step"]) + 1} for x, value in points]
    return rows


def per_run(rows: list[dict], x: str, y: str, threshold: float | None = None) -> list[dict]:
    """Per run (point and seed): y at the last x, y's range over x and the first x with y >= ``threshold``.

    Against the step, ``wall_s_to_threshold`` is the run's wall time scaled by the share of its
    steps done by then (validation included, as in ``wall_s``).
    """
    out = []
    for run in dict.fromkeys((r["point"], r["seed_everything"]) for r in rows):
        curve = sorted((r for r in rows if (r["point"], r["seed_everything"]) == run), key=lambda r: r[x])
        values = [r[y] for r in curve]
        summary = {"point": run[0], "seed_everything": run[1], "last": values[-1], "range": max(values) - min(values)}
        if threshold is not None:
            reached = next((r[x] for r in curve if r[y] >= threshold), None)
            summary["first_reaching"] = reached
            if x == "step" and reached is not None:
                summary["wall_s_to_threshold"] = curve[0]["wall_s"] * reached / curve[0]["steps"]
        out.append(summary)
    return out


def means(rows: list[dict], x: str, y: str) -> list[dict]:
    """Mean and standard error over seeds of y, per point and x."""
    out = []
    for point, at in dict.fromkeys((r["point"], r[x]) for r in rows):
        values = [r[y] for r in rows if (r["point"], r[x]) == (point, at)]
        mean, se = report.mean_se(values)
        out.append({"point": point, x: at, y: mean, "se": se, "seeds": len(values)})
    return out


def write(directory: Path, y: str, depth: bool, threshold: float | None, command: str) -> list[Path]:
    """The curves' md, csv and png in ``directory``; returns the paths written."""
    x = "depth" if depth else "step"
    rows = curve_rows(directory, y, depth)
    if not rows:
        raise ValueError(f"{directory} has no finished point with {'a depth curve' if depth else 'a logged ' + y}")
    runs = per_run(rows, x, y, threshold)
    columns = ["point", "seed_everything", "last", "range"]
    if threshold is not None:
        columns += ["first_reaching", "wall_s_to_threshold"] if x == "step" else ["first_reaching"]
    fields = {
        "title": f"{y} against the {x}: {directory.name}",
        "command": command,
        "source": ("each point's evaluation at several depths (its grid's `evaluate` entry)" if depth
                   else "the validations each point's fit logged (`metrics.csv`)"),
        "threshold": "" if threshold is None else (
            f" `first_reaching`: the first {x} at which {y} reached {threshold} (empty if never)."
            + (" `wall_s_to_threshold`: the run's wall time (validation included) times the share of its steps "
               "done by then." if x == "step" else "")),
        "table": report.markdown_table(means(rows, x, y), ["point", x, y, "se", "seeds"]),
        "runs": report.markdown_table(runs, columns),
    }
    plot = {"x": x, "y": y, "group": "point", "errorbars": True, "logx": depth, "xlabel": x, "ylabel": y}
    return report.write_study("curves", rows, directory, template="curves", fields=fields,
                              columns=["point", "seed_everything", x, y], plot_spec=plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a sweep's output directory")
    parser.add_argument("--y", help="the metric (default: val/loss; with --depth, loss)")
    parser.add_argument("--depth", action="store_true", help="the points' evaluated depth curves")
    parser.add_argument("--threshold", type=float, help="report the first x at which y >= this")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    y = args.y or ("loss" if args.depth else "val/loss")
    command = " ".join(["python -m experiments.curves", *argv])
    for path in write(args.directory, y, args.depth, args.threshold, command):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
