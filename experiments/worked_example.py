"""What the worked neural-ODE examples share: the MLP field and the one-command driver.

Each example (``sphere_flow_fit``, ``so3_attitude``, ``poincare_flow``) fits the same field on a
manifold and without it, and writes ``<name>.md``, ``.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn


class MLPField(nn.Module):
    """An autonomous MLP field on points of shape ``point_shape``, read and written flattened."""

    def __init__(self, point_shape: tuple[int, ...], hidden: int):
        super().__init__()
        self.point_ndim = len(point_shape)
        n = math.prod(point_shape)
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n))

    def forward(self, t, x):
        return self.net(x.flatten(-self.point_ndim)).view_as(x)


def main(module: str, doc: str, argv, config, smoke, fit, write_csv, plot, write_report, summary) -> dict:
    """Parse the example's options, fit, write its md/csv/png, print ``summary(result)``.

    Args:
        module: the example's module name (``experiments.<module>``) and file stem of its outputs.
        config, smoke: the full run's and the smoke run's configuration (dataclasses with ``iters``
            and ``seed``).
        fit, write_csv, plot, write_report, summary: the example's own steps.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run of a few seconds")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"), help="output directory")
    parser.add_argument("--iters", type=int, help="override the number of Adam iterations")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = smoke if args.smoke else config
    overrides = {k: v for k, v in (("iters", args.iters), ("seed", args.seed)) if v is not None}
    cfg = type(cfg)(**{**asdict(cfg), **overrides})
    result = fit(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(result, args.out / f"{module}.csv")
    plot(result, args.out / f"{module}.png")
    command = f"python -m experiments.{module} " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(result, args.out / f"{module}.md", command.strip(), args.smoke)
    print(summary(result))
    print(f"{result['seconds']:.0f} s")
    return result
