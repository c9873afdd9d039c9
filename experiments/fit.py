"""``svflow-ode fit`` in this process, for the analyses that train a model and then study it.

A fit lands in one directory laid out as a sweep point's (``experiments.sweep``): ``point.yaml``
(the overrides), ``config.yaml``, ``metrics.csv`` (a CSVLogger pinned there, the only logger) and
``checkpoints/last.ckpt``. ``validation_loss`` scores a trained model on a data module's fixed
validation set, as ``LitSVFlow`` logs ``val/loss``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
import yaml

from experiments import sweep
from svflow_ode.training.cli import run
from svflow_ode.training.module import token_metrics

__all__ = ["CHAR_LM", "fit", "validation_loss"]

CONFIGS = Path(__file__).parent / "configs"
CHAR_LM = (CONFIGS / "base.yaml", CONFIGS / "tinyshakespeare.yaml")  # the Tiny Shakespeare recipe
# For every fit: no wandb (the CSV log is what the analyses read) and no layer table.
QUIET = {"trainer.logger": False, "trainer.enable_model_summary": False}


def fit(directory: Path, overrides: dict, configs: tuple[Path, ...] = CHAR_LM) -> Path:
    """Fit ``configs`` with the dotted ``overrides`` (as a grid point's) into ``directory``; returns ``last.ckpt``."""
    directory.mkdir(parents=True, exist_ok=True)
    point = directory / "point.yaml"
    config = sweep.point_config({"base": list(configs)}, {"overrides": {**QUIET, **overrides}}, directory)
    point.write_text(yaml.safe_dump(config, sort_keys=False))
    # The process's own command line is the analysis's, not the CLI's (LightningCLI warns when it has arguments).
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        run(["fit", *(f"--config={file}" for file in [*configs, point])])
    return directory / "checkpoints" / "last.ckpt"


@torch.no_grad()
def validation_loss(model, datamodule) -> float:
    """Mean cross-entropy (nats per scored token) of ``model`` over ``datamodule``'s validation set.

    Each batch's loss weighted by its size, as Lightning averages ``val/loss``.
    """
    datamodule.setup("validate")
    total, sequences = 0.0, 0
    for input_ids, labels in datamodule.val_dataloader():
        total += len(input_ids) * token_metrics(model(input_ids).logits, labels)[0].item()
        sequences += len(input_ids)
    return total / sequences
