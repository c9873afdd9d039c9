"""Next-token data modules: an endless, step-seeded training stream and fixed held-out sets.

A batch is ``(input_ids, labels)``, both ``(B, T)`` int64; ``labels[b, i]`` is the token that
should follow ``input_ids[b, :i + 1]``, or ``IGNORE`` where nothing is scored.

Training batch ``k`` on rank ``r`` is drawn from a generator seeded by ``(seed, k, r)``, with ``k``
counted from the trainer's ``global_step``: a run resumed from a checkpoint sees exactly the
batches the uninterrupted run would have seen, and every DDP rank sees different ones.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

__all__ = ["CORPORA", "IGNORE", "LMDataModule", "CharDataModule", "corpus_path", "seeded_generator"]

IGNORE = -100  # label of positions without a target (F.cross_entropy's ignore_index)
TRAIN, VAL, TEST = 0, 1, 2  # stream ids mixed into every seed
# Corpora shipped with the package, by name (their sources: corpora/README.md).
CORPORA = {"tinyshakespeare": Path(__file__).parent / "corpora" / "tinyshakespeare.txt"}


def corpus_path(path: str) -> Path:
    """``path`` itself, or the shipped file when ``path`` is a name in ``CORPORA``."""
    return CORPORA.get(str(path), Path(path))


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of the integers ``key`` (numpy's ``SeedSequence``)."""
    words = np.random.SeedSequence(list(key)).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


class _StepBatches(IterableDataset):
    """Endless batches; the one for step ``k`` depends only on ``(seed, k, rank)``."""

    def __init__(self, draw: Callable, batch_size: int, seed: int, rank: int, first_step: Callable[[], int]):
        self.draw, self.batch_size, self.seed, self.rank = draw, batch_size, seed, rank
        self.first_step = first_step

    def __iter__(self):
        for step in itertools.count(self.first_step()):
            yield self.draw(self.batch_size, seeded_generator(self.seed, TRAIN, step, self.rank), "train")


class LMDataModule(L.LightningDataModule):
    """Base class of the next-token data modules.

    Subclasses set ``vocab_size`` and ``context`` (the sequence length) in ``__init__`` and
    implement ``draw``.

    Args:
        batch_size: sequences per batch (per process).
        seed: seed of the training stream and of the held-out sets.
        val_size: sequences in the fixed validation set.
        test_size: sequences in the fixed test set.
    """

    vocab_size: int
    context: int

    def __init__(self, batch_size: int, seed: int, val_size: int, test_size: int):
        super().__init__()
        for name, value in [("batch_size", batch_size), ("val_size", val_size), ("test_size", test_size)]:
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if seed < 0:  # numpy's SeedSequence, which draws every batch, takes none
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batch_size, self.seed, self.val_size, self.test_size = batch_size, seed, val_size, test_size

    def draw(self, n: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples ``(input_ids, labels)``, each ``(n, context)``, from ``split``'s data."""
        raise NotImplementedError

    def val_set(self) -> TensorDataset:
        """The fixed validation set."""
        return TensorDataset(*self.draw(self.val_size, seeded_generator(self.seed, VAL), "val"))

    def test_set(self) -> TensorDataset:
        """The fixed test set."""
        return TensorDataset(*self.draw(self.test_size, seeded_generator(self.seed, TEST), "test"))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer else 0
        # One optimizer step consumes accumulate_grad_batches batches.
        first_step = (lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer else (lambda: 0)
        return DataLoader(_StepBatches(self.draw, self.batch_size, self.seed, rank, first_step), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set(), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set(), batch_size=self.batch_size)


class CharDataModule(LMDataModule):
    """Character-level language modelling on a text file.

    The first 90% of the characters train, the last 10% validate (the project's split); the
    vocabulary is the file's sorted characters and travels with the checkpoint. Training and
    validation sequences are random windows of ``context + 1`` characters; the test set is every
    non-overlapping window of the validation split.

    Args:
        path: the text file (UTF-8), or the name of a corpus shipped with the package
            (``CORPORA``: ``"tinyshakespeare"``, Tiny Shakespeare's 1,115,394 characters).
        context: context length (characters per sequence).
        batch_size: sequences per batch (per process).
        seed: seed of the training windows and of the validation windows.
        val_size: windows in the fixed validation set.
        train_fraction: fraction of the file, from its start, used for training.
    """

    def __init__(
        self,
        path: str = "tinyshakespeare",
        context: int = 64,
        batch_size: int = 12,
        seed: int = 0,
        val_size: int = 2400,
        train_fraction: float = 0.9,
    ):
        super().__init__(batch_size, seed, val_size, test_size=1)
        if context < 1 or not 0 < train_fraction < 1:
            raise ValueError(f"need context >= 1 and 0 < train_fraction < 1, got {context}, {train_fraction}")
        text = _read_text(corpus_path(path))
        self.vocab = "".join(sorted(set(text)))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.data = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.n_train = int(train_fraction * len(text))
        self.vocab_size, self.context = len(self.vocab), context
        for split, n in [("training", self.n_train), ("validation", len(text) - self.n_train)]:
            if n <= context:
                raise ValueError(
                    f"{path}: the {split} split has {n} characters, fewer than context + 1 = {context + 1}: "
                    f"use a longer file or a shorter context"
                )

    def _split(self, split: str) -> torch.Tensor:
        return self.data[: self.n_train] if split == "train" else self.data[self.n_train :]

    def draw(self, n, generator, split):
        data = self._split(split)
        starts = torch.randint(len(data) - self.context, (n,), generator=generator)
        windows = data[starts[:, None] + torch.arange(self.context + 1)]  # (n, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def test_set(self):
        data = self._split("test")
        n = (len(data) - 1) // self.context
        inputs = data[: n * self.context].view(n, self.context)
        labels = data[1 : n * self.context + 1].view(n, self.context)
        return TensorDataset(inputs, labels)

    def state_dict(self) -> dict:
        return {"vocab": self.vocab}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["vocab"] != self.vocab:
            raise ValueError(
                f"the checkpoint's vocabulary ({len(state_dict['vocab'])} characters) differs from the one "
                f"of the data file ({len(self.vocab)}): the file changed since the checkpoint was written"
            )


def _read_text(path: str) -> str:
    """The file's text (UTF-8, newlines as ``\\n``), or an error saying why it is no text to train on."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = Path(path).read_bytes()
    if not raw:
        raise ValueError(f"{path} is empty")
    nul = raw.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text file holds NUL bytes
        raise ValueError(f"{path} looks binary (a NUL byte at offset {nul}): CharDataModule reads text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} ({err.reason}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    del raw  # the text alone from here: a large corpus should not sit in memory twice
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads
