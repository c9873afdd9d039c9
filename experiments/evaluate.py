"""Evaluate one finished sweep point: ``function(checkpoint, datamodule, **args)`` into ``evaluation.json``.

    python -m experiments.evaluate POINT_DIR module:function [--args JSON]

The sweep runner calls this after a point's fit (a grid's ``evaluate`` entry), in a process of its
own. The data module is the one the point trained on, built from the configuration the CLI saved
in ``POINT_DIR/config.yaml``; the checkpoint is ``POINT_DIR/checkpoints/last.ckpt``. The function
is called with ``progress=False`` too (no progress bars in the point's log) and must return
something JSON can write, e.g. ``svflow_ode.training.depth:depth_curve``'s list of dicts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import yaml

__all__ = ["evaluate_point", "main"]


def load(name: str):
    """The object ``module:attribute`` names (``module.attribute`` for a class path)."""
    module, _, attribute = name.partition(":") if ":" in name else name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def evaluate_point(directory: Path, function: str, args: dict) -> Path:
    """Run ``function`` on the point in ``directory``; returns the path of the ``evaluation.json`` written."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    data = config["data"]
    datamodule = load(data["class_path"])(**(data.get("init_args") or {}))
    result = load(function)(directory / "checkpoints" / "last.ckpt", datamodule, **args, progress=False)
    path = directory / "evaluation.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a sweep point's directory")
    parser.add_argument("function", help="module:function, called as function(checkpoint, datamodule, **args)")
    parser.add_argument("--args", type=json.loads, default={}, help="the function's other arguments, as JSON")
    args = parser.parse_args(argv)
    print(f"wrote {evaluate_point(args.directory, args.function, args.args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
