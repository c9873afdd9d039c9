"""One trained checkpoint evaluated at several depths: the elastic-depth curve.

Depth ``k`` is ``k`` steps over the horizon for a model with continuous or shared parameters
(trained at random depths with ``LitSVFlow(train_steps=...)``, or not), and ``k`` of the layers of a
per-step model, chosen evenly by ``SVFlow.pruned_layers`` (Fan et al. 2019's pruning of a model
trained with LayerDrop, or of any other).
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import lightning as L
import solvers
import torch
from tqdm import tqdm

from svflow_ode.flops import forward_flops_per_token
from svflow_ode.model import SVFlow

from .checkpoints import read_checkpoint
from .module import LitSVFlow, token_metrics

__all__ = ["depth_curve", "depth_options"]


def depth_options(model: SVFlow, depth: int) -> dict:
    """The forward options that run ``model`` at ``depth``: ``steps`` and, for per-step models, ``layers``.

    A per-step model keeps its steps per layer (one for a Transformer); a model with continuous or
    shared parameters takes ``depth`` steps of its own (fixed-step) method.
    """
    if model.time == "per_step":
        layers = model.pruned_layers(depth)
        return {"steps": model.steps // len(model.blocks) * depth, "layers": layers}
    if model.method in solvers.ADAPTIVE:
        raise ValueError(f"the model's method {model.method!r} is adaptive: it chooses its own steps, so it has "
                         f"no depth to set")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"a depth is a positive number of steps, got {depth!r}")
    return {"steps": depth}


@torch.no_grad()
def depth_curve(
    checkpoint_path: str | os.PathLike,
    datamodule: L.LightningDataModule,
    depths: Iterable[int] = range(1, 9),
    *,
    progress: bool = True,
) -> list[dict]:
    """Validation metrics and forward FLOPs of one ``LitSVFlow`` checkpoint run at each depth.

    Args:
        checkpoint_path: a checkpoint written by ``svflow-ode fit``.
        datamodule: the data it was trained on; its validation set is evaluated (a checkpoint that
            holds the data module's state, e.g. a character vocabulary, is checked against it).
        depths: the depths (``depth_options``); a per-step model takes at most its layer count.
        progress: show a progress bar (on stderr).

    Returns:
        One dict per depth, in order: ``depth``, ``steps``, ``layers`` (the blocks run, per-step
        models; else None), ``loss`` (nats per scored token), ``bpc``, ``acc`` (each, as
        ``LitSVFlow``'s ``val/...``, the batches' values averaged weighted by batch size), ``nfe``
        (field evaluations per forward pass) and ``forward_flops_per_token``
        (``svflow_ode.flops``, at the batches' sequence length).
    """
    checkpoint = read_checkpoint(checkpoint_path)  # a clear error for a file that is no checkpoint
    model = LitSVFlow.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True).model.eval()
    options = [(depth, depth_options(model, depth)) for depth in depths]  # every depth checked before any runs
    state = checkpoint.get(type(datamodule).__qualname__)
    if state is not None:  # as Lightning does on resuming: e.g. the vocabulary must be the checkpoint's
        datamodule.load_state_dict(state)
    datamodule.prepare_data()
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    curve = []
    with tqdm(total=len(options) * len(loader), desc="depth curve", disable=not progress) as bar:
        for depth, forward in options:
            bar.set_postfix(depth=depth)
            sums = {"loss": 0.0, "acc": 0.0, "nfe": 0.0, "forward_flops_per_token": 0.0}
            sequences = 0
            for input_ids, labels in loader:
                out = model(input_ids, **forward)
                loss, acc = token_metrics(out.logits, labels)
                n = len(input_ids)
                sums["loss"] += n * loss.item()
                sums["acc"] += n * acc.item()
                sums["nfe"] += n * out.stats.nfe
                sums["forward_flops_per_token"] += n * forward_flops_per_token(model, out.stats.nfe, input_ids.shape[1])
                sequences += n
                bar.update()
            means = {name: total / sequences for name, total in sums.items()}
            curve.append({"depth": depth, "steps": forward["steps"], "layers": forward.get("layers"), **means,
                          "bpc": means["loss"] / math.log(2)})
    return curve
