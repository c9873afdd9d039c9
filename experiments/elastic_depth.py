"""The elastic-depth study: one model run at every depth against LayerDrop and separately trained depths.

    python -m experiments.elastic_depth [--jobs N] [--smoke] [--out DIR]

Runs the grid ``experiments/grids/elastic_depth.yaml`` (``experiments.sweep``: every point a
``svflow-ode fit`` with its depth curve evaluated after it), then writes ``depth_study.md``,
``.csv`` and ``.png`` beside the grid's report: validation loss against forward FLOPs per token
at depths 1..8 for each model, and per depth the paired seed differences of the elastic SVFlow
against LayerDrop and against the Transformer trained at that depth. The separately trained 4- and
8-layer Transformers are study v2's ``euler_x4`` and ``transformer_8`` (same recipe, same seeds),
read from ``--study-v2``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import report, sweep

GRID = Path(__file__).parent / "grids" / "elastic_depth.yaml"
STUDY_V2 = Path(__file__).parent / "results" / "study_v2"
ELASTIC = "elastic_euler"
SEPARATE = "separate"  # the family of Transformers trained at one depth each
# Study v2's points that are separately trained Transformers, by depth.
STUDY_V2_DEPTHS = {"euler_x4": 4, "transformer_8": 8}
MARGIN = 0.02  # the claim: within this many nats of the separately trained model of each depth

__all__ = ["depth_rows", "comparisons", "write", "main"]


def depth_rows(results: list[dict], study_v2: list[dict]) -> list[dict]:
    """One row per model family, seed and depth: ``model``, ``seed_everything``, ``depth``, ``loss``,
    ``forward_flops_per_token`` and ``point`` (``model@depth``, what ``report.paired_difference`` pairs by).

    ``results`` are the elastic grid's finished rows (with ``evaluation``: a depth curve);
    ``transformer_k`` points join the ``separate`` family. ``study_v2`` rows (``euler_x4``,
    ``transformer_8``) join it too, at their final validation loss; they were not evaluated
    apart, so their FLOPs are those of a LayerDrop model pruned to the same depth (the same blocks
    at the same depth: the FLOP count depends on nothing else), which is checked where a
    separately trained model was evaluated.
    """
    rows = []
    for result in results:
        for entry in result.get("evaluation") or []:
            family = SEPARATE if result["point"].startswith("transformer_") else result["point"]
            rows.append({"model": family, "seed_everything": result["seed_everything"], "depth": entry["depth"],
                         "loss": entry["loss"], "forward_flops_per_token": entry["forward_flops_per_token"]})
    pruned = {r["depth"]: r["forward_flops_per_token"] for r in rows if r["model"].startswith("layerdrop")}
    for r in rows:
        if r["model"] == SEPARATE and r["depth"] in pruned and r["forward_flops_per_token"] != pruned[r["depth"]]:
            raise ValueError(f"a {r['depth']}-layer Transformer costs {r['forward_flops_per_token']} FLOPs per "
                             f"token, LayerDrop pruned to that depth {pruned[r['depth']]}: the models differ")
    for result in study_v2:
        depth = STUDY_V2_DEPTHS.get(result["point"])
        if depth is not None and result.get("val/loss") is not None:
            rows.append({"model": SEPARATE, "seed_everything": result["seed_everything"], "depth": depth,
                         "loss": result["val/loss"], "forward_flops_per_token": pruned.get(depth)})
    for r in rows:
        r["point"] = f"{r['model']}@{r['depth']}"
    return sorted(rows, key=lambda r: (r["model"], r["depth"], r["seed_everything"]))


def comparisons(rows: list[dict]) -> list[dict]:
    """Per depth, the elastic model's paired loss difference against every other family there."""
    out = []
    depths = sorted({r["depth"] for r in rows if r["model"] == ELASTIC})
    others = sorted({r["model"] for r in rows} - {ELASTIC})
    for depth in depths:
        for other in others:
            diff = report.paired_difference(rows, "loss", f"{ELASTIC}@{depth}", f"{other}@{depth}")
            if diff:
                out.append({"depth": depth, "against": other, **diff})
    return out


def claim(differences: list[dict]) -> str:
    """The study's claim checked depth by depth, as bullets."""
    lines = []
    for depth in sorted({d["depth"] for d in differences}):
        at = {d["against"]: d for d in differences if d["depth"] == depth}
        layerdrop = [d for name, d in at.items() if name.startswith("layerdrop")]
        # Matching LayerDrop: not worse beyond 2 standard errors of the paired difference.
        beats = all(d["mean"] - 2 * d["se"] <= 0 for d in layerdrop) if layerdrop else None
        near = at[SEPARATE]["mean"] <= MARGIN if SEPARATE in at else None
        said = {True: "yes", False: "no", None: "not measured"}
        separate = f" ({at[SEPARATE]['mean']:+.4f} +/- {at[SEPARATE]['se']:.4f})" if SEPARATE in at else ""
        lines.append(f"depth {depth}: matches or beats every LayerDrop model: {said[beats]}; within {MARGIN} nats "
                     f"of the Transformer trained at this depth: {said[near]}{separate}")
    return report.bullets(lines) or "no depth measured"


def summary(rows: list[dict]) -> list[dict]:
    """Mean and standard error over seeds of each family's loss at each depth."""
    out = []
    for point in dict.fromkeys(r["point"] for r in rows):
        these = [r for r in rows if r["point"] == point]
        mean, se = report.mean_se([r["loss"] for r in these])
        out.append({"model": these[0]["model"], "depth": these[0]["depth"], "loss": mean, "se": se,
                    "seeds": len(these), "forward_flops_per_token": these[0]["forward_flops_per_token"]})
    return out


def write(out: Path, results: list[dict], study_v2: list[dict], command: str) -> list[Path]:
    """The depth study's md, csv and png in ``out``."""
    rows = depth_rows(results, study_v2)
    differences = comparisons(rows)
    fields = {
        "command": command,
        "summary": report.markdown_table(summary(rows), ["model", "depth", "loss", "se", "seeds",
                                                          "forward_flops_per_token"]),
        "differences": report.markdown_table(differences, ["depth", "against", "mean", "se", "n"])
        if differences else "none (no shared seeds)",
        "claim": claim(differences),
    }
    plot = {"x": "forward_flops_per_token", "y": "loss", "group": "model", "errorbars": True, "logx": True,
            "xlabel": "inference FLOPs per token", "ylabel": "validation loss (nats per character)"}
    return report.write_study("depth_study", rows, out, template="depth_study", fields=fields,
                              columns=["model", "seed_everything", "depth", "loss", "forward_flops_per_token"],
                              plot_spec=plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.elastic_depth", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="points trained at once, one thread each")
    parser.add_argument("--smoke", action="store_true", help="a few steps per point")
    parser.add_argument("--out", type=Path, help="output directory (default: the grid's)")
    parser.add_argument("--study-v2", type=Path, default=STUDY_V2, help="study v2's output directory")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    grid = sweep.load_grid(GRID, smoke=args.smoke, out=args.out)
    rows = sweep.sweep(grid, args.jobs)
    sweep.write_report(grid, rows, GRID, [str(GRID), *argv])
    done = [r for r in rows if r["status"] in ("done", "skipped")]
    command = " ".join(["python -m experiments.elastic_depth", *argv])
    # A smoke run's models are not comparable with study v2's.
    study_v2 = sweep.read_results(args.study_v2) if args.study_v2.is_dir() and not args.smoke else []
    for path in write(grid["out"], done, study_v2, command):
        print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
