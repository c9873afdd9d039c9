"""``FiniteGuard``: training stops at the first non-finite loss or gradient, saying where it began."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from solvers.errors import NonFiniteError, describe

__all__ = ["FiniteGuard", "NonFiniteTrainingError"]


class NonFiniteTrainingError(RuntimeError):
    """A training step produced a non-finite loss or gradient."""


class FiniteGuard(L.Callback):
    """Stops training at the first non-finite state, loss or gradient, before the optimizer applies it.

    A state that turns non-finite inside the forward pass is caught by the solver itself
    (``solvers.NonFiniteError``, naming the solver step and time); the guard then reports and
    saves as below, before anything of the step has been applied.

    The check runs after the backward pass and before gradient clipping and the optimizer step:
    one reduction over the gradients and one host sync per step (in DDP, plus one all-reduce so
    the ranks agree on the verdict). Under fp16 mixed precision only the loss is checked: there
    GradScaler itself skips steps whose gradients overflow. When the check fails nothing of the
    step has been applied, so the weights and optimizer state, those after the last good step, are
    saved to ``<dirpath>/nonfinite-step<N>.ckpt``: resume from it with ``--ckpt_path``, e.g.
    clipping the gradients (``--trainer.gradient_clip_val``). Finite is not the same as healthy:
    weights that are finite but already huge are saved too, and resuming from them fails again;
    restart then from an earlier periodic checkpoint. If the weights are already non-finite (set
    from outside, or an update that overflowed) no checkpoint is written and the last periodic one
    is the place to restart.

    Then the guard runs the step's inputs through ``pl_module.model`` again with a hook on every
    module and raises ``NonFiniteTrainingError`` naming: the loss; the parameters whose gradients
    are non-finite; the first module to turn finite inputs into a non-finite output (its place in
    the flow, e.g. ``model.blocks.1.terms.0.field``, the attention of block 1) and the time ``t``
    of that field evaluation; the first solver step after which the SVFlow state was non-finite;
    each tensor's shape, NaN and inf counts and the range of its finite entries. With gradient
    accumulation the loss is the micro-batches' sum and the re-run uses the last micro-batch.

    Args:
        dirpath: where to save (default: the ModelCheckpoint's directory, else the log directory).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self._loss = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        # Summed over the micro-batches of an accumulated step: non-finite if any one of them is.
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # No backward ran (training_step returned None): no loss to check, only the gradients.
        loss, self._loss = (torch.zeros(()) if self._loss is None else self._loss), None
        # Under fp16 mixed precision GradScaler skips steps with overflowing gradients and lowers
        # its scale: that is its normal working, so only the loss is checked then.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [] if scaled else [p.grad for p in pl_module.parameters() if p.grad is not None]
        # One norm of the per-tensor norms (torch.nn.utils.get_total_norm needs torch >= 2.6).
        norms = [torch.linalg.vector_norm(g.float()) for g in grads]
        total = loss + (torch.linalg.vector_norm(torch.stack(norms)).to(loss) if norms else 0.0)
        # A sum of finite but huge terms can overflow: only then is the exact check needed.
        bad = not math.isfinite(total.item()) and not all(torch.isfinite(x).all() for x in [loss, *grads])
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteTrainingError(self._report(trainer, pl_module, loss))

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, NonFiniteError) and trainer.training:
            raise NonFiniteTrainingError(self._report(trainer, pl_module, None, str(exception))) from exception

    def _report(self, trainer, pl_module, loss: torch.Tensor | None, forward_error: str | None = None) -> str:
        step = trainer.global_step
        named = list(pl_module.named_parameters())
        bad_weights = [n for n, p in named if not torch.isfinite(p).all()]
        if bad_weights:
            saved = (f"the weights themselves are non-finite ({', '.join(bad_weights[:3])}"
                     f"{', ...' if len(bad_weights) > 3 else ''}): no checkpoint written; "
                     f"restart from the last periodic checkpoint")
        else:  # before the re-run below, which must not be able to touch what is saved
            path = self._directory(trainer) / f"nonfinite-step{step}.ckpt"
            trainer.save_checkpoint(path)
            saved = (f"weights and optimizer state before step {step} saved to {path}; resume from it "
                     f"with --ckpt_path, e.g. clipping gradients (--trainer.gradient_clip_val)")
        if forward_error is None:
            lines = [f"training step {step} turned non-finite (loss {loss.item():.4g})"]
        else:
            lines = [f"training step {step} turned non-finite in the forward pass: {forward_error}"]
        bad_grads = [(n, p.grad) for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad_grads:
            name, grad = bad_grads[0]
            lines.append(f"gradients non-finite in {len(bad_grads)} of {len(named)} parameters, "
                         f"first {name}: {describe(grad)}")
        return "\n  ".join([*lines, *self._locate(pl_module), saved])

    @torch.no_grad()
    def _locate(self, pl_module) -> list[str]:
        """Re-run the step's inputs with a hook on every module; report where non-finite values began."""
        model, first, now = pl_module.model, [], {}

        def before(module, args):
            if args and (isinstance(args[0], (int, float)) or (torch.is_tensor(args[0]) and args[0].dim() == 0)):
                now["t"] = float(args[0])  # a field, called as f(t, x)

        def after(module, args, output):
            # The culprit turns finite inputs into a non-finite output; modules downstream only pass it on.
            if first or not torch.is_tensor(output) or torch.isfinite(output).all():
                return
            if all(torch.isfinite(a).all() for a in args if torch.is_tensor(a)):
                at = f" at t={now['t']:.4g}" if "t" in now else ""
                first.append(f"first module to turn finite inputs non-finite: {names[module]} "
                             f"({type(module).__name__}){at}; its output: {describe(output)}")

        names = {m: f"model.{n}" if n else "model" for n, m in model.named_modules()}
        hooks = [h for m in names for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        # The re-run must go past the solver's own check to see every state.
        checking = getattr(model, "check_finite", None)
        if checking is not None:
            model.check_finite = False
        try:
            out = model(self._batch[0])
        except Exception as err:  # e.g. an adaptive solve's StepSizeError; it must not hide the report
            return [*first, f"the re-run stopped: {type(err).__name__}: {err}"]
        finally:
            for h in hooks:
                h.remove()
            if checking is not None:
                model.check_finite = checking
        states = getattr(out, "hidden_states", ())
        n = len(states) - 1
        # Adaptive and adjoint solves keep only the pieces' ends (evenly spaced), not every step.
        kept = "solver step" if n == getattr(getattr(out, "stats", None), "steps", None) else "kept state"
        for i, state in enumerate(states):
            if not torch.isfinite(state).all():
                where = f"after {kept} {i} of {n} (t={i * model.horizon / n:.4g})" if i else "initial (t=0)"
                return [*first, f"first non-finite state: {where}: {describe(state)}"]
        return first

    def _directory(self, trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            return Path(trainer.checkpoint_callback.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)
