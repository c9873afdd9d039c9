"""The one report module: a study's ``NAME.md``, ``NAME.csv`` and ``NAME.png`` from its rows.

A study is a list of rows (dicts: one per trained point and seed). The prose of its markdown
lives in a template, ``experiments/templates/<template>.md``, with ``string.Template``
placeholders (``$table``, ``$plot``, ...) that the study fills; tables are rendered from rows;
the plot comes from a small declarative spec::

    {"x": "train_flops_per_token", "y": "val/loss", "group": "point", "logx": true,
     "logy": false, "errorbars": true, "xlabel": "...", "ylabel": "...", "ylim": [1.6, 1.9]}

(with ``errorbars`` the rows sharing a group and an x are drawn as their mean with the standard
error over them, i.e. over seeds). ``paired_difference`` gives the per-seed difference of a
metric between two points sharing seeds, which verdicts need.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from string import Template

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TEMPLATES = Path(__file__).parent / "templates"
PLOT_KEYS = {"x", "y", "group", "logx", "logy", "errorbars", "xlabel", "ylabel", "ylim"}

__all__ = ["bullets", "markdown_table", "mean_se", "paired_difference", "plot", "render", "write_csv", "write_study"]


def render(template: str, fields: dict) -> str:
    """``templates/<template>.md`` with its ``$placeholders`` filled from ``fields`` (a missing one is a ``KeyError``)."""
    return Template((TEMPLATES / f"{template}.md").read_text()).substitute(fields)


def _cell(value) -> str:
    """A table cell: floats to 4 significant digits, large numbers in scientific notation, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3e}" if abs(value) >= 1e5 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``columns`` of ``rows`` (a row lacking a column gets an empty cell)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """``rows`` as CSV at ``path``; the columns default to every key, in order of first appearance."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: ("" if row.get(c) is None else row[c]) for c in columns} for row in rows)
    return path


def _number(value) -> float | None:
    """``value`` as a finite float, or None (missing, text, NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def plot(path: Path, rows: list[dict], spec: dict) -> Path | None:
    """Draw ``spec``'s ``y`` against ``x`` per ``group`` (see the module docstring) to ``path``; None if no row has both."""
    unknown = set(spec) - PLOT_KEYS
    if unknown or not {"x", "y"} <= set(spec):
        raise ValueError(f"a plot spec needs x and y and takes {sorted(PLOT_KEYS)}, got {sorted(spec)}")
    x, y, group = spec["x"], spec["y"], spec.get("group")
    groups: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get(y))
        if xv is not None and yv is not None:
            groups.setdefault(str(row.get(group, "")) if group else "", {}).setdefault(xv, []).append(yv)
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, points in groups.items():
        xs = sorted(points)
        if spec.get("errorbars", True):
            means, errors = zip(*(mean_se(points[xv]) for xv in xs))
            ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=name or None)
        else:
            pairs = [(xv, yv) for xv in xs for yv in points[xv]]
            ax.plot(*zip(*pairs), "o", label=name or None)
    ax.set_xscale("log" if spec.get("logx") else "linear")
    ax.set_yscale("log" if spec.get("logy") else "linear")
    if spec.get("ylim"):  # [low, high]: points outside are off the chart, the table keeps them
        ax.set_ylim(*spec["ylim"])
    ax.set_xlabel(spec.get("xlabel", x))
    ax.set_ylabel(spec.get("ylabel", y))
    if group:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def paired_difference(rows: list[dict], metric: str, a: str, b: str, pair: str = "seed_everything",
                      by: str = "point") -> dict | None:
    """Mean and standard error of ``metric(a) - metric(b)`` over the ``pair`` values (seeds) both have.

    ``a`` and ``b`` are values of the rows' ``by`` column; a row without a finite ``metric`` is
    left out. Returns ``{"mean", "se", "n"}`` (``se`` over the ``n`` per-seed differences, 0 for
    n = 1), or None when the two share no seed.
    """
    def by_seed(name):
        return {row[pair]: _number(row.get(metric)) for row in rows
                if row.get(by) == name and pair in row and _number(row.get(metric)) is not None}

    first, second = by_seed(a), by_seed(b)
    shared = [seed for seed in first if seed in second]
    if not shared:
        return None
    mean, se = mean_se([first[s] - second[s] for s in shared])
    return {"mean": mean, "se": se, "n": len(shared)}


def bullets(lines: Iterable[str]) -> str:
    """A markdown list of ``lines`` ("" for none)."""
    return "\n".join(f"- {line}" for line in lines)


def write_study(name: str, rows: list[dict], out: Path, template: str, fields: dict,
                columns: list[str] | None = None, plot_spec: dict | None = None) -> list[Path]:
    """Write ``out/NAME.csv`` (``columns`` of ``rows``, default all), ``out/NAME.png`` (from
    ``plot_spec``, if given and some row has its x and y) and ``out/NAME.md`` (the template with
    ``fields`` and ``$plot``: the image link, or a line saying there is none); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(out / f"{name}.csv", rows, columns)]
    image = plot(out / f"{name}.png", rows, plot_spec) if plot_spec else None
    written += [image] if image else []
    picture = f"![{name}]({name}.png)" if image else "(no plot: no point has finished with both axes' values)"
    md = out / f"{name}.md"
    md.write_text(render(template, {**fields, "plot": picture}))
    return [*written, md]
