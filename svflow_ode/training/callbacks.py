"""Training callbacks."""

from __future__ import annotations

import time

import lightning as L

__all__ = ["TokenThroughput"]


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: input tokens of all processes per second of each training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch[0].numel() * trainer.world_size
        pl_module.log("train/tokens_per_s", tokens / (time.perf_counter() - self._start), on_step=True)
