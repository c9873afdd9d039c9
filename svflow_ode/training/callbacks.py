"""Training callbacks."""

from __future__ import annotations

import time

import lightning as L
from torch import nn

__all__ = ["LinearInit", "TokenThroughput"]


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: input tokens of all processes per second of each training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch[0].numel() * trainer.world_size
        pl_module.log("train/tokens_per_s", tokens / (time.perf_counter() - self._start), on_step=True)


class LinearInit(L.Callback):
    """Re-draws every linear weight from ``N(0, gain^2 / fan_in)`` (LeCun) and zeroes its bias.

    ``SVFlowLM`` draws its weights with nanoGPT's ``std = 0.02``, a scale made for
    ``d_model ~ 768``. In a small model attention then starts nearly uniform, and a two-layer model
    sits on a plateau for thousands of steps before it forms an induction head (associative
    recall); with ``std = 1 / sqrt(fan_in)`` it learns the task in a few hundred. Embeddings, and
    the head tied to them, keep their initialisation. Runs when fitting starts; a resumed run then
    loads the checkpoint's weights over it.

    Args:
        gain: the standard deviation times ``sqrt(fan_in)``.
    """

    def __init__(self, gain: float = 1.0):
        if gain <= 0:
            raise ValueError(f"gain must be positive, got {gain}")
        self.gain = gain

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        embeddings = {id(m.weight) for m in pl_module.modules() if isinstance(m, nn.Embedding)}
        for module in pl_module.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in embeddings:
                nn.init.normal_(module.weight, std=self.gain / module.in_features**0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
