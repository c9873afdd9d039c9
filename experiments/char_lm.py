"""Character data and a plain PyTorch training loop for the small models of the diagnostics experiments.

Tiny Shakespeare (shipped: ``svflow_ode.training.data.CORPORA``; first 90% train, last 10% validation)
when present, otherwise a generated text (``generated_text``), so the experiments run anywhere.
The loop takes a ``forward(model, input_ids) -> (output, extra loss)`` (for balancing or
consistency terms computed during the one forward pass) and a ``probe(model, step)`` for
measurements during training.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from svflow_ode.training.data import CORPORA

__all__ = ["DATA", "CharData", "generated_text", "train", "validation_loss"]

DATA = CORPORA["tinyshakespeare"]


def generated_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """A deterministic stand-in corpus: sentences from a tiny grammar with long-range agreement."""
    rng = random.Random(seed)
    names = ["ANNA", "BORIS", "CLARA", "DMITRI"]
    nouns = ["king", "queen", "river", "sword", "letter", "garden", "horse", "crown"]
    verbs = ["sees", "keeps", "loses", "finds", "praises", "fears"]
    lines = []
    while sum(map(len, lines)) < n_chars:
        who = rng.choice(names)
        things = rng.sample(nouns, 2)
        # The speaker's name returns at the end of the speech: context matters for the last word.
        lines.append(f"{who}:\nthe {things[0]} {rng.choice(verbs)} the {things[1]}, said {who.lower()}.\n\n")
    return "".join(lines)[:n_chars]


@dataclass
class CharData:
    """A character corpus split into training and validation token tensors."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    vocab: str
    source: str  # where the text came from

    @classmethod
    def load(cls, path: Path = DATA) -> "CharData":
        if path.is_file():
            text, source = path.read_text(encoding="utf-8"), str(path.name)
        else:
            text, source = generated_text(), "generated text (Tiny Shakespeare not found)"
        vocab = "".join(sorted(set(text)))
        index = {c: i for i, c in enumerate(vocab)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(data))
        return cls(data[:n], data[n:], vocab, source)

    def windows(self, split: str, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random windows of ``length`` tokens, ``(n, length)``."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - length, (n,), generator=generator)
        return data[starts[:, None] + torch.arange(length)]


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-character cross-entropy (nats) over ``windows`` ``(N, T + 1)``."""
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        w = windows[start : start + batch_size]
        logits = model(w[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (len(windows) * (windows.shape[1] - 1))


def train(
    model,
    data: CharData,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    forward: Callable | None = None,
    probe: Callable | None = None,
    probe_every: int = 25,
    desc: str = "training",
) -> None:
    """AdamW with linear warm-up (5% of the steps) and cosine decay to lr/10.

    Args:
        model: an ``SVFlowLM`` (anything returning ``.logits`` for ``(B, T)`` ids).
        data: the corpus.
        steps: optimiser steps.
        batch_size: sequences per step, each ``model.context`` characters.
        lr: peak learning rate.
        seed: seed of the training windows.
        forward: ``forward(model, input_ids) -> (output, extra)``; ``extra`` (a scalar) is added
            to the cross-entropy. Default: the plain forward pass, nothing added.
        probe: ``probe(model, step)`` called before step 0, every ``probe_every`` steps and at
            the end (for measurements; the model is in train mode).
        desc: progress-bar label.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        if probe is not None and step % probe_every == 0:
            probe(model, step)
        w = data.windows("train", batch_size, model.context + 1, generator)
        ids = w[:, :-1]
        out, extra = (model(ids), 0.0) if forward is None else forward(model, ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), w[:, 1:].flatten()) + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    if probe is not None:
        probe(model, steps)
    model.eval()
