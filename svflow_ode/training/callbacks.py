"""Training callbacks."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["SigtermCheckpoint", "TokenThroughput"]


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: input tokens of all processes per second of each training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch[0].numel() * trainer.world_size
        pl_module.log("train/tokens_per_s", tokens / (time.perf_counter() - self._start), on_step=True)


class SigtermCheckpoint(L.Callback):
    """On SIGTERM, saves a checkpoint to resume from and makes the process exit with status 143.

    Lightning notes a SIGTERM and, at the end of the running training step (or validation batch),
    raises ``SIGTERMException``: a ``SystemExit`` without a status, so the process exits with 0 and
    a batch scheduler records the unfinished run as a success. This callback then saves the
    weights, optimizer and loop state to ``last.ckpt`` in the ``ModelCheckpoint``'s directory (else
    ``<log dir>/checkpoints``), where ``--ckpt_path last`` finds it, and gives the exit status
    ``EXIT_STATUS`` = 143 (128 + SIGTERM's 15: what a shell reports for a process SIGTERM ended).
    A SIGTERM during the sanity check, before any training, saves nothing.
    """

    EXIT_STATUS = 128 + signal.SIGTERM

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = self.EXIT_STATUS
        if trainer.sanity_checking:
            outcome = "before training began; nothing saved"
        else:
            path = self._directory(trainer) / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # every rank: collective in distributed runs
            outcome = f"after step {trainer.global_step}; state saved to {path}: resume with --ckpt_path last"
        if trainer.is_global_zero:
            print(f"svflow-ode: stopped by SIGTERM {outcome} (exit status {self.EXIT_STATUS})", file=sys.stderr)

    @staticmethod
    def _directory(trainer) -> Path:
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            return Path(trainer.checkpoint_callback.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
