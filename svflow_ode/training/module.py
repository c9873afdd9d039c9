"""``LitSVFlow``: trains an SVFlow language model (AdamW, warm-up then cosine decay)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import lightning as L
import torch
import torch.nn.functional as F

import solvers
from solvers.compat import given_hyperparameters
from svflow_ode.diagnostics.consistency import PARTS, consistency_recorder
from svflow_ode.flops import training_flops_per_token
from svflow_ode.lm import SVFlowLM
from svflow_ode.model import SVFlow

from .checkpoints import check_compatible
from .data import IGNORE, seeded_generator

__all__ = ["LitSVFlow", "token_metrics", "warmup_cosine"]


def warmup_cosine(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` divided by ``lr``: a linear warm-up over
    ``warmup_steps``, then a cosine decay to ``min_lr`` at ``total_steps``, flat after it."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)) / lr


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (nats per scored token) and argmax accuracy of ``logits`` ``(B, T, V)`` on
    ``labels`` ``(B, T)``, positions labelled ``IGNORE`` left out."""
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    scored = labels != IGNORE
    return loss, (logits.argmax(-1)[scored] == labels[scored]).float().mean()


class LitSVFlow(L.LightningModule):
    """Next-token training of an SVFlow language model.

    Logs per stage (``train``, ``val``, ``test``): ``loss`` (nats per scored token), ``bpc``
    (bits per token: ``loss / ln 2``), ``acc`` (argmax accuracy on the scored tokens) and
    ``nfe`` (field evaluations per forward pass); and ``lr`` while training. With the
    variational-consistency regulariser on (``consistency_beta > 0``) also ``consistency``: the
    mean ``KL(q || p)`` over the forward pass's attention/MoE field evaluations
    (``svflow_ode.diagnostics.consistency_recorder``); the optimised loss is then the
    cross-entropy plus ``consistency_beta`` times it, while ``loss`` stays the cross-entropy.

    Args:
        model: the network; its solver, step count and norm placement are its own arguments.
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW weight decay, applied to matrices and embeddings only (as nanoGPT).
        betas: AdamW betas.
        warmup_steps: steps of linear warm-up from ``lr / (warmup_steps + 1)`` to ``lr``.
        max_steps: length of the schedule (default: the trainer's ``max_steps``); the learning
            rate stays at ``min_lr`` after it.
        consistency_beta: weight of the consistency regulariser (0: off, the plain cross-entropy).
        consistency_parts: the fields it reads: "attention", "moe" or both (fields the model
            lacks are skipped).
        consistency_detach_p: stop gradients through the likelihood posterior p, so that only the
            posteriors q (attention queries/keys, routers) are pulled towards it.
        train_steps: ``(min, max)``: elastic depth, each training batch runs the model with a step
            count drawn uniformly from ``min..max`` (inclusive); validation and test keep the
            model's own ``steps``. For models whose step count is free (``time="continuous"`` or
            ``"shared"``) with a fixed-step method; None (default): always the model's steps.
        seed: seeds the per-batch draws, of ``train_steps`` and of the model's LayerDrop: the
            batch of optimizer step ``s`` draws from a generator seeded by ``(seed, s)``, so a
            resumed run draws what the uninterrupted one would have (batches accumulated into one
            optimizer step share a draw).
    """

    def __init__(
        self,
        model: SVFlowLM,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        max_steps: int | None = None,
        consistency_beta: float = 0.0,
        consistency_parts: tuple[str, ...] = PARTS,
        consistency_detach_p: bool = False,
        train_steps: tuple[int, int] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        # NaN passes every comparison below unnoticed, and would only show as a NaN loss.
        floats = {"lr": lr, "min_lr": min_lr, "weight_decay": weight_decay, "consistency_beta": consistency_beta}
        bad = {name: value for name, value in [*floats.items(), *zip(("beta1", "beta2"), betas)]
               if not math.isfinite(value)}
        if bad:
            raise ValueError(f"need finite values, got {', '.join(f'{k}={v}' for k, v in bad.items())}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"need two betas in [0, 1) and weight_decay >= 0, got betas={tuple(betas)}, "
                             f"weight_decay={weight_decay}")
        if not 0 <= min_lr <= lr or lr == 0:  # the schedule is a multiple of lr
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got min_lr={min_lr}, lr={lr}")
        if warmup_steps < 0 or (max_steps is not None and max_steps < 1):
            raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1, got {warmup_steps}, {max_steps}")
        if consistency_beta < 0:
            raise ValueError(f"need consistency_beta >= 0, got {consistency_beta}")
        unknown = set(consistency_parts) - set(PARTS)
        if unknown:  # here, not at the first forward pass: before anything is trained
            raise ValueError(f"unknown consistency_parts {sorted(unknown)}; expected some of {PARTS}")
        # The regulariser is read by hooks during the forward pass: a checkpointed step recomputes
        # without them, and the adjoint's forward pass keeps no graph.
        if consistency_beta and model.gradient != "backprop":
            raise ValueError(f"the consistency regulariser needs gradient='backprop', got {model.gradient!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:  # numpy's SeedSequence takes no other
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if train_steps is not None:
            train_steps = _checked_train_steps(train_steps, model)
        # Under LightningCLI the hyperparameters are the configuration, with the model's class path
        # and arguments: load_from_checkpoint rebuilds the model. A model object is no hyperparameter.
        self.save_hyperparameters(ignore=None if given_hyperparameters() else ["model"])
        self.model = model
        self.lr, self.min_lr, self.weight_decay, self.betas = lr, min_lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.consistency_beta, self.consistency_parts = consistency_beta, tuple(consistency_parts)
        self.consistency_detach_p = consistency_detach_p
        self.train_steps, self.seed = train_steps, seed

    def training_options(self, step: int) -> dict:
        """The model's forward options for the training batch of optimizer step ``step``.

        ``steps`` drawn from ``train_steps``, and the ``generator`` of the model's LayerDrop (when
        either is on), from one generator seeded by ``(seed, step)``; else none.
        """
        layerdrop = getattr(self.model, "layerdrop", 0)
        if self.train_steps is None and not layerdrop:
            return {}
        generator = seeded_generator(self.seed, step)
        options = {"generator": generator} if layerdrop else {}
        if self.train_steps is not None:
            low, high = self.train_steps
            options["steps"] = int(torch.randint(low, high + 1, (), generator=generator))
        return options

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, **options) -> torch.Tensor:
        """Loss of one batch ``(input_ids, labels)``, both ``(B, T)``; logs the stage's metrics.

        ``options`` go to the model's forward pass (``training_options``).
        """
        input_ids, labels = batch
        # The regulariser reads the fields during the one forward pass; off, nothing is recorded.
        recording = (consistency_recorder(self.model, self.consistency_parts, detach_p=self.consistency_detach_p)
                     if self.consistency_beta else nullcontext())
        with recording as kls:
            out = self.model(input_ids, **options)
        loss, acc = token_metrics(out.logits, labels)
        training = stage == "train"
        options = dict(on_step=training, on_epoch=not training, sync_dist=not training, batch_size=len(input_ids))
        self.log(f"{stage}/loss", loss, prog_bar=True, **options)
        extras = {"bpc": loss / math.log(2), "acc": acc, "nfe": float(out.stats.nfe)}
        self.log_dict({f"{stage}/{name}": value for name, value in extras.items()}, **options)
        if kls is None:
            return loss
        consistency = torch.stack(kls).mean()
        self.log(f"{stage}/consistency", consistency, **options)
        return loss + self.consistency_beta * consistency

    def training_step(self, batch, batch_idx):
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return self.model_step(batch, "train", **self.training_options(self.global_step))

    def validation_step(self, batch, batch_idx):
        self.model_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.model_step(batch, "test")

    def training_flops_per_token(self, nfe: float) -> float:
        """Matmul FLOPs per token of a training step whose forward passes made ``nfe`` field
        evaluations (``svflow_ode.flops``: the forward and a backward costing twice as much)."""
        if self.model.context is None:  # attention's cost grows with the span
            raise ValueError("FLOPs per token need the model's context (the sequence length): set context")
        return training_flops_per_token(self.model, nfe, self.model.context)

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` divided by ``lr`` (``warmup_cosine``)."""
        return warmup_cosine(step, self.lr, self.min_lr, self.warmup_steps, self.max_steps or self.trainer.max_steps)

    def configure_optimizers(self):
        if not self.max_steps and self.trainer.max_steps < 1:
            raise ValueError("the learning-rate schedule needs trainer.max_steps or model.max_steps")
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_compatible(checkpoint, self)  # a checkpoint of another shape: say which settings differ


def _checked_train_steps(train_steps, model) -> tuple[int, int]:
    """``train_steps`` as a tuple, once it is a range of step counts that ``model`` can run each batch with."""
    if not (isinstance(train_steps, (list, tuple)) and len(train_steps) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in train_steps)
            and 1 <= train_steps[0] <= train_steps[1]):
        raise ValueError(f"train_steps must be [min, max] step counts with 1 <= min <= max, got {train_steps!r}")
    if not isinstance(model, SVFlow) or model.time == "per_step":
        what = f"time={model.time!r}" if isinstance(model, SVFlow) else f"a {type(model).__name__}"
        raise ValueError(
            f"train_steps draws a step count per batch, which needs an SVFlow whose step count is free "
            f"(time='continuous' or 'shared'), not {what}; per-step models train for pruning with layerdrop"
        )
    if model.method in solvers.ADAPTIVE:
        raise ValueError(f"train_steps draws fixed step counts, but the model's method {model.method!r} is "
                         f"adaptive (it chooses its own steps): use a fixed-step method")
    return tuple(train_steps)
