"""Run a grid of ``svflow-ode fit`` points, each in its own process and directory, into one report.

    python -m experiments.sweep GRID.yaml [--jobs N] [--dry-run] [--smoke] [--only NAME ...] [--out DIR]

A grid file (see ``experiments/grids/``)::

    name: main_job                       # the report's name (default: the grid file's stem)
    cli: svflow_ode.training.cli         # the command module each point runs (python -m; the default)
    base: [../configs/base.yaml]         # config files, in order, relative to the grid file
    out: runs/main_job                   # output directory, relative to the current directory
    overrides: {trainer.enable_model_summary: false}   # dotted keys, for every point
    points:                              # name: dotted overrides of any config key
      euler: {model.model.init_args.method: euler}
      heun: {model.model.init_args.method: heun}
      rkmk4: {refused: "rkmk4 has no action on the LayerNorm sphere"}   # listed, never run
    axes: {seed_everything: [0, 1, 2]}   # crossed with every point
    commands: [fit, test]                # fit, then (optionally) test on its last checkpoint
    smoke: {data.init_args.val_size: 32} # what --smoke adds to every point (on top of SMOKE)
    report: {metric: val/loss, baseline: euler, columns: [...], plot: {x: ..., y: ...}, template: sweep}

``cli: svflow_ode.training.finetune`` runs the points with ``svflow-ode-finetune`` instead
(``LitFineTune``: students of converted pretrained models).

``report.baseline`` is a point or a list of them: every other point gets its paired seed
differences against each. With ``report.win`` (a margin in the metric's units, lower is better),
the report's ``$verdict`` says which points beat every baseline by at least the margin beyond
noise (mean difference <= -win and mean + 2 SE < 0).

``evaluate: {function: "module:name", args: {...}}`` runs, after a point's commands, in a process
of its own (``experiments.evaluate``), ``function(last_checkpoint, datamodule, **args,
progress=False)`` with the point's data module built from its configuration, e.g.
``svflow_ode.training.depth:depth_curve``; what it returns (JSON) is kept in the point's
``evaluation.json`` and under ``evaluation`` in its ``result.json``. A point's own ``evaluate``
entry replaces the grid's ``args`` (``evaluate: null``: none for that point).

Every point ``P`` with axis values ``a`` runs in ``OUT/P_a/``: ``point.yaml`` (its overrides
nested, passed as the last ``--config``), ``config.yaml`` (the merged configuration it ran, saved
by the CLI), ``metrics.csv`` (a CSVLogger pinned there; the configuration's other loggers write
there too), ``checkpoints/``, ``fit.log`` (stdout and stderr) and ``result.json`` (last metrics,
parameters, training FLOPs per token at the measured NFE with a distillation's teacher pass, wall
time, command). A point with a ``result.json`` is skipped; one with ``checkpoints/last.ckpt`` and
no result resumes from it; one that fails (its command, or reading its results) leaves
``failed.json`` and is retried on the next run. The configuration must keep a ``ModelCheckpoint``
with ``save_last`` and no ``dirpath`` (the base config's): resuming and the model's costs read
``checkpoints/last.ckpt``. ``--smoke`` writes to ``OUT_smoke`` unless ``--out`` says otherwise.
The exit status is 1 if any point failed, 2 for a bad grid file. Then the study's ``NAME.md``,
``NAME.csv`` and ``NAME.png`` (``experiments.report``) are written to ``OUT``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from experiments import report

GRID_KEYS = {"name", "cli", "base", "out", "overrides", "points", "axes", "commands", "smoke", "report", "evaluate"}
REPORT_KEYS = {"template", "columns", "metric", "baseline", "pair", "plot", "title", "win"}
COMMANDS = ("fit", "test")
CLI = "svflow_ode.training.cli"  # a grid's default command module
PROGRAMS = {CLI: "svflow-ode", "svflow_ode.training.finetune": "svflow-ode-finetune"}  # their console scripts
# --smoke: a few steps, a tiny validation, on any data module (the grid's `smoke` adds to it).
SMOKE = {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 2,
         "trainer.limit_test_batches": 2, "trainer.log_every_n_steps": 1}
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
# Result columns shown when the grid's report names none (after the point and its axes).
DEFAULT_COLUMNS = ["status", "val/loss", "val/acc", "params", "train_flops_per_token", "wall_s"]


class GridError(ValueError):
    """A grid file that cannot be run: the message is one line naming the file and the problem."""


# --------------------------------------------------------------------------------------------
# The grid


def nested(dotted: dict) -> dict:
    """``{"a.b.c": 1}`` as ``{"a": {"b": {"c": 1}}}``; later keys deepen or replace earlier ones."""
    out: dict = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GridError(f"override {key!r} goes inside {part!r}, which another override sets to a value")
        node[last] = value
    return out


def merged(base: dict, top: dict) -> dict:
    """``top`` deep-merged over ``base`` (dicts merge, anything else, lists included, is replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_grid(path: Path, smoke: bool = False, out: Path | None = None) -> dict:
    """The grid file at ``path``, checked, with its base configs resolved and its points expanded.

    Returns the grid's entries plus ``runs``: one dict per point and axis combination, with
    ``name`` (its directory name), ``point``, ``axes`` (the axis values), ``overrides`` (dotted:
    the grid's, the point's, the axes', then the smoke ones) and ``refused`` (a reason, or None).
    Raises ``GridError`` (one line) on a file that cannot be run.
    """
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise GridError(f"{path}: cannot read the grid file: {' '.join(str(err).split())}") from None
    if not isinstance(grid, dict):
        raise GridError(f"{path}: a grid file is a mapping of {sorted(GRID_KEYS)}")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown keys {sorted(unknown)}; a grid file takes {sorted(GRID_KEYS)}")
    unknown = set(grid.get("report") or {}) - REPORT_KEYS
    if unknown:
        raise GridError(f"{path}: unknown report keys {sorted(unknown)}; report takes {sorted(REPORT_KEYS)}")
    base = grid.get("base")
    if not base or not isinstance(base, list):
        raise GridError(f"{path}: base must list at least one config file")
    grid["base"] = [(path.parent / b).resolve() for b in base]
    missing = [str(b) for b in grid["base"] if not b.is_file()]
    if missing:
        raise GridError(f"{path}: base config not found: {', '.join(missing)}")
    points, axes = grid.get("points"), grid.get("axes") or {}
    if not points or not isinstance(points, dict):
        raise GridError(f"{path}: the grid has no points (points: name -> overrides)")
    if not isinstance(axes, dict) or any(not isinstance(v, list) or not v for v in axes.values()):
        raise GridError(f"{path}: axes must map config keys to non-empty lists of values")
    commands = grid.setdefault("commands", ["fit"])
    if not isinstance(commands, list) or commands[:1] != ["fit"] or not set(commands) <= set(COMMANDS):
        raise GridError(f"{path}: commands must be [fit] or [fit, test], got {commands}")
    for key in ("overrides", "smoke"):
        if not isinstance(grid.get(key) or {}, dict):
            raise GridError(f"{path}: {key} must map dotted config keys to values")
    evaluate = grid.get("evaluate")
    if evaluate is not None and not (isinstance(evaluate, dict) and set(evaluate) <= {"function", "args"}
                                     and isinstance(evaluate.get("function"), str)
                                     and evaluate["function"].count(":") == 1
                                     and isinstance(evaluate.get("args") or {}, dict)):
        raise GridError(f"{path}: evaluate must be {{function: 'module:name', args: {{...}}}}, got {evaluate!r}")
    grid.setdefault("cli", CLI)
    if not isinstance(grid["cli"], str) or not all(part.isidentifier() for part in grid["cli"].split(".")):
        raise GridError(f"{path}: cli must name a command module (e.g. {CLI}), got {grid['cli']!r}")
    grid.setdefault("name", path.stem)
    grid["out"] = Path(out or grid.get("out") or Path("runs") / grid["name"])
    if smoke and not out:  # smoke results in the real directory would be skipped as finished by the real run
        grid["out"] = grid["out"].with_name(grid["out"].name + "_smoke")
    grid["report"] = grid.get("report") or {}
    extra = {**SMOKE, **(grid.get("smoke") or {})} if smoke else {}
    runs = []
    for point, overrides in points.items():
        overrides = dict(overrides or {})
        refused = overrides.pop("refused", None)
        evaluation = None
        if evaluate is not None:
            evaluation = {**evaluate, "args": overrides.pop("evaluate", evaluate.get("args") or {})}
            if evaluation["args"] is None:
                evaluation = None
            elif not isinstance(evaluation["args"], dict):
                raise GridError(f"{path}: point {point}: evaluate must map the function's arguments, or be null")
        for order, values in enumerate(itertools.product(*axes.values())):
            chosen = dict(zip(axes, values))
            suffix = "_".join(f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in chosen.items())
            all_overrides = {**(grid.get("overrides") or {}), **overrides, **chosen, **extra}
            try:
                nested(all_overrides)
            except GridError as err:
                raise GridError(f"{path}: point {point}: {err}") from None
            runs.append({"name": f"{point}_{suffix}" if suffix else str(point), "point": str(point),
                         "axes": chosen, "order": order, "overrides": all_overrides, "refused": refused,
                         "evaluate": evaluation})
    grid["runs"] = runs
    for run in runs:
        _check_checkpoints(path, run["name"], merged(loaded_config(grid["base"]), nested(run["overrides"])))
    return grid


def _check_checkpoints(path: Path, name: str, config: dict) -> None:
    """``GridError`` unless the point's configuration writes ``last.ckpt`` where the runner resumes and collects from.

    That is a ``ModelCheckpoint`` with ``save_last`` and no ``dirpath``: it writes into the first
    logger's directory, which the runner pins to the point's directory.
    """
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    checkpoints = [c.get("init_args") or {} for c in (callbacks if isinstance(callbacks, list) else [callbacks])
                   if isinstance(c, dict) and str(c.get("class_path", "")).endswith("ModelCheckpoint")]
    if not any(c.get("save_last") and not c.get("dirpath") for c in checkpoints):
        raise GridError(f"{path}: point {name}: the configuration needs a ModelCheckpoint with save_last: true "
                        f"and no dirpath (the runner resumes from, and reads the model from, its last.ckpt)")


def loaded_config(files: list[Path]) -> dict:
    """The plain YAML merge of ``files`` (what jsonargparse gets, before it checks and types it)."""
    config: dict = {}
    for file in files:
        config = merged(config, yaml.safe_load(file.read_text()) or {})
    return config


def loggers_into(directory: Path, loggers, test: bool = False) -> list[dict]:
    """The configuration's ``loggers`` rewritten to log into ``directory``.

    A CSVLogger comes first (metrics.csv and, through Lightning's default for the first logger,
    config.yaml and checkpoints/ land in ``directory`` itself); the other loggers keep their
    settings with ``save_dir`` moved into ``directory``. For ``test`` only the CSVLogger, into
    ``directory/test``: the test must not rewrite the fit's metrics.
    """
    csv_logger = {"class_path": CSV_LOGGER, "init_args": {"save_dir": str(directory), "name": "",
                                                          "version": "test" if test else ""}}
    if test:
        return [csv_logger]
    listed = loggers if isinstance(loggers, list) else [] if loggers in (None, True, False) else [loggers]
    others = [merged(entry, {"init_args": {"save_dir": str(directory)}}) for entry in listed
              if isinstance(entry, dict) and entry.get("class_path", "").rsplit(".", 1)[-1] != "CSVLogger"]
    return [csv_logger, *others]


def point_config(grid: dict, run: dict, directory: Path, test: bool = False) -> dict:
    """The per-point config file's contents: the run's overrides nested, with the loggers moved into ``directory``."""
    overrides = nested(run["overrides"])
    whole = merged(loaded_config(grid["base"]), overrides)
    loggers = loggers_into(directory, (whole.get("trainer") or {}).get("logger"), test)
    return merged(overrides, {"trainer": {"logger": loggers}})


# --------------------------------------------------------------------------------------------
# Running


def command(grid: dict, config: Path, subcommand: str, ckpt: Path | None) -> list[str]:
    """The command line (``svflow-ode``'s, or the grid's ``cli``) of one subcommand of one point."""
    args = [sys.executable, "-m", grid["cli"], subcommand]
    args += [f"--config={file}" for file in [*grid["base"], config]]
    return args + ([f"--ckpt_path={ckpt}"] if ckpt else [])


def last_value(rows: list[dict], column: str):
    """The last non-empty value of ``column`` in the CSV logger's ``rows``, as a float (None if none)."""
    values = [r[column] for r in rows if r.get(column) not in (None, "")]
    return float(values[-1]) if values else None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a CSVLogger's metrics file (none if it is missing)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_costs(checkpoint: Path, train_nfe: float | None) -> dict:
    """Parameter count and training FLOPs per token (at ``train_nfe``; a distillation's teacher pass
    included) of the model in ``checkpoint``."""
    # Imported here: torch and the model load only once a point finished, not for --dry-run.
    from svflow_ode.training.finetune import load_module

    module = load_module(checkpoint, weights_only=False)  # LitSVFlow, or LitFineTune
    model = module.model  # LitFineTune's student
    params = sum(p.numel() for p in model.parameters())
    flops = module.training_flops_per_token(train_nfe) if train_nfe is not None else None
    return {"params": params, "train_flops_per_token": flops, "method": model.method,
            "steps": model.steps, "context": model.context}


def evaluate_command(directory: Path, evaluation: dict) -> list[str]:
    """The command line that evaluates the point in ``directory`` (``experiments.evaluate``)."""
    return [sys.executable, "-m", "experiments.evaluate", str(directory), evaluation["function"],
            "--args", json.dumps(evaluation["args"])]


def collect(directory: Path, commands: list[list[str]], wall: float) -> dict:
    """``result.json``'s contents for a finished point in ``directory``."""
    fit = read_metrics(directory / "metrics.csv")
    test = read_metrics(directory / "test" / "metrics.csv")
    columns = {c for r in fit for c in r} | {c for r in test for c in r}
    result = {c: last_value(test if c.startswith("test/") else fit, c)
              for c in sorted(columns) if c.startswith(("val/", "test/", "train/"))}
    train_nfe = [float(r["train/nfe"]) for r in fit if r.get("train/nfe")]
    mean_nfe = sum(train_nfe) / len(train_nfe) if train_nfe else None
    result["step"] = last_value(fit, "step")
    result["train_nfe"] = mean_nfe
    result.update(model_costs(directory / "checkpoints" / "last.ckpt", mean_nfe))
    result["wall_s"] = round(wall, 2)
    if (directory / "evaluation.json").is_file():
        result["evaluation"] = json.loads((directory / "evaluation.json").read_text())
    result["commands"] = [" ".join(c) for c in commands]
    return result


def read_results(directory: Path) -> list[dict]:
    """The finished points' ``result.json`` rows of a sweep's output directory, each with its
    ``point`` and ``seed_everything`` (read off the directory name: grids whose one axis is the seed)."""
    rows = []
    for path in sorted(directory.glob("*/result.json")):
        result = json.loads(path.read_text())
        point, _, seed = path.parent.name.rpartition("_seed_everything-")
        rows.append({"point": point, "seed_everything": int(seed), **result})
    return rows


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (an error's one-line summary, or the traceback's end)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_logged(args: list[str], log: Path) -> dict | None:
    """Run ``args`` on one thread with its output in ``log``; None if it succeeded, else the failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    with open(log, "w") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode == 0:
        return None
    return {"status": "failed", "exit_status": done.returncode, "command": " ".join(args),
            "error": last_line(log.read_text(errors="replace"))}


def run_point(grid: dict, run: dict, dry_run: bool = False) -> dict:
    """Run (or skip, or resume) one point; returns its table row (``status``: done, skipped, failed)."""
    directory = grid["out"] / run["name"]
    row = {"point": run["point"], "name": run["name"], **run["axes"]}
    if (directory / "result.json").is_file():
        return {**row, **json.loads((directory / "result.json").read_text()), "status": "skipped"}
    directory.mkdir(parents=True, exist_ok=True)
    last = directory / "checkpoints" / "last.ckpt"
    commands = []
    started = time.perf_counter()
    for subcommand in grid["commands"]:
        test = subcommand == "test"
        config = directory / ("test.yaml" if test else "point.yaml")
        config.write_text(yaml.safe_dump(point_config(grid, run, directory, test), sort_keys=False))
        ckpt = last if test or last.is_file() else None
        commands.append(command(grid, config, subcommand, ckpt))
        failure = None if dry_run else run_logged(commands[-1], directory / f"{subcommand}.log")
        if failure:
            (directory / "failed.json").write_text(json.dumps(failure, indent=1))
            return {**row, **failure}
    if run["evaluate"] is not None:
        commands.append(evaluate_command(directory, run["evaluate"]))
        failure = None if dry_run else run_logged(commands[-1], directory / "evaluate.log")
        if failure:
            (directory / "failed.json").write_text(json.dumps(failure, indent=1))
            return {**row, **failure}
    if dry_run:
        return {**row, "status": "dry-run", "commands": [" ".join(c) for c in commands]}
    try:
        result = collect(directory, commands, time.perf_counter() - started)
    except Exception as err:  # noqa: BLE001 -- a point whose logs or checkpoint cannot be read fails alone, like a failed fit
        failure = {"status": "failed", "exit_status": None, "command": " ".join(commands[-1]),
                   "error": f"collecting the results: {type(err).__name__}: {err}"}
        (directory / "failed.json").write_text(json.dumps(failure, indent=1))
        return {**row, **failure}
    (directory / "failed.json").unlink(missing_ok=True)
    (directory / "result.json").write_text(json.dumps(result, indent=1))
    return {**row, **result, "status": "done"}


def sweep(grid: dict, jobs: int = 1, dry_run: bool = False, only: list[str] | None = None,
          progress=lambda line: print(line, flush=True)) -> list[dict]:
    """Run the grid's points, ``jobs`` at a time; returns every row (refused points included), in grid order.

    Points run one axis combination (seed) at a time, every point of it before the next: a study
    cut short has whole seeds to compare.
    """
    runs = [r for r in grid["runs"] if not only or r["point"] in only or r["name"] in only]
    todo = sorted((r for r in runs if r["refused"] is None), key=lambda r: r["order"])
    lock, finished = threading.Lock(), []
    started = time.perf_counter()

    def one(index_run):
        index, run = index_run
        with lock:  # one whole line per message: threads print at once
            progress(f"[{index + 1}/{len(todo)}] start {run['name']}")
        row = run_point(grid, run, dry_run)
        with lock:
            finished.append(row["status"])
            left = len(todo) - len(finished)
            ran = len([status for status in finished if status != "skipped"])
            # The pace of the points run so far (all jobs together; skipped ones cost nothing) predicts the rest.
            eta = f"{(time.perf_counter() - started) / ran * left / 60:.1f} min" if ran else "unknown"
            progress(f"[{index + 1}/{len(todo)}] {row['status']} {run['name']}"
                     f"{' (' + row['error'] + ')' if row.get('error') else ''}; {left} left, ETA {eta}")
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = {r["name"]: row for r, row in zip(todo, pool.map(one, enumerate(todo)))}
    return [done.get(r["name"]) or {"point": r["point"], "name": r["name"], **r["axes"], "status": "refused",
                                    "reason": r["refused"]} for r in runs]


def shown(arg: str | Path) -> str:
    """A command-line argument as a report shows it: a path inside the working directory, relative to it."""
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return str(arg)


def write_report(grid: dict, rows: list[dict], grid_path: Path, argv: list[str]) -> list[Path]:
    """The study's md, csv and png in the grid's output directory, through ``experiments.report``."""
    spec = grid["report"]
    metric, baselines = spec.get("metric", "val/loss"), spec.get("baseline") or []
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    pair = spec.get("pair", next(iter(grid.get("axes") or {}), None))
    differences = []
    for baseline in baselines if pair else []:
        for point in dict.fromkeys(r["point"] for r in rows):
            if point != baseline:
                diff = report.paired_difference(rows, metric, point, baseline, pair=pair)
                if diff:
                    differences.append({"point": point, "baseline": baseline, "metric": metric, **diff})
    refused = [r for r in rows if r["status"] == "refused"]
    failed = [r for r in rows if r["status"] == "failed"]
    fields = {
        "title": spec.get("title", grid["name"]),
        "command": " ".join(["python -m experiments.sweep", *map(shown, argv)]),
        "grid": shown(grid_path),
        "program": PROGRAMS.get(grid["cli"], f"python -m {grid['cli']}"),
        "table": report.markdown_table(rows, spec.get("columns", ["point", *(grid.get("axes") or {}), *DEFAULT_COLUMNS])),
        "differences": report.markdown_table(differences, ["point", "baseline", "metric", "mean", "se", "n"])
        if differences else "none (no baseline, or no shared seeds)",
        "verdict": verdict(differences, baselines, spec.get("win")),
        "refused": report.bullets(f"{r['name']}: {r['reason']}" for r in refused) or "none",
        "failed": report.bullets(f"{r['name']}: exit status {r['exit_status']}: {r['error']}" for r in failed)
        or "none",
    }
    return report.write_study(grid["name"], rows, grid["out"], template=spec.get("template", "sweep"),
                              fields=fields, plot_spec=spec.get("plot"))


def verdict(differences: list[dict], baselines: list[str], win: float | None) -> str:
    """A bullet per point that is no baseline: does it beat every baseline by ``win`` beyond noise?

    Beating a baseline: mean paired difference <= -win and mean + 2 SE < 0 over at least 2 seeds.
    """
    if win is None or not baselines:
        return "no margin set (report.win), no verdict"
    lines = []
    for point in dict.fromkeys(d["point"] for d in differences if d["point"] not in baselines):
        against = {d["baseline"]: d for d in differences if d["point"] == point}
        beaten = [b for b, d in against.items() if d["n"] >= 2 and d["mean"] <= -win and d["mean"] + 2 * d["se"] < 0]
        missing = [b for b in baselines if b not in against]
        if missing:
            lines.append(f"{point}: not compared with {', '.join(missing)} (no shared seeds)")
        elif len(beaten) == len(baselines):
            lines.append(f"{point}: beats every baseline by at least {win} beyond 2 standard errors")
        else:
            worst = max(against.values(), key=lambda d: d["mean"])
            lines.append(f"{point}: no win (beats {len(beaten)} of {len(baselines)} baselines by {win}; against "
                         f"{worst['baseline']} {worst['mean']:+.4f} +/- {worst['se']:.4f})")
    return report.bullets(lines) or "no point besides the baselines"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 all done, 1 some point failed, 2 a bad grid file)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the grid file (YAML)")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once, one thread each")
    parser.add_argument("--dry-run", action="store_true", help="write each point's config and print its command")
    parser.add_argument("--smoke", action="store_true", help="a few steps and a tiny validation per point")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="points (or point directories) to run")
    parser.add_argument("--out", type=Path, help="output directory (default: the grid's out)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid, smoke=args.smoke, out=args.out)
    except GridError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.only:
        unknown = set(args.only) - {r["point"] for r in grid["runs"]} - {r["name"] for r in grid["runs"]}
        if unknown:
            print(f"{parser.prog}: error: --only names no point of {args.grid}: {sorted(unknown)}", file=sys.stderr)
            return 2
    rows = sweep(grid, args.jobs, args.dry_run, args.only)
    if args.dry_run:
        for row in rows:
            print("\n".join(row.get("commands", [f"# {row['name']}: {row['status']}"])))
        return 0
    for path in write_report(grid, rows, args.grid, argv):
        print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
