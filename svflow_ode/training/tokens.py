"""Token-level language modelling on shards written by ``python -m svflow_ode.training.prepare``.

In a configuration::

    data:
      class_path: svflow_ode.training.tokens.TokenDataModule
      init_args: {path: data/shakespeare-bpe, context: 64, batch_size: 12}
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import LMDataModule

__all__ = ["TokenDataModule"]

# Token ids as stored (by svflow_ode.training.prepare): little-endian whatever the machine, so
# shards move between machines.
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
META_FORMAT = 1  # meta.json's layout, as prepare writes it and this module reads it


class _Shards:
    """A split's shard files, memory-mapped, and where each one's windows begin in the split's count."""

    def __init__(self, arrays: list[np.memmap], windows: list[int]):
        self.arrays = arrays
        self.windows = np.array(windows)  # windows of each shard
        self.ends = np.cumsum(self.windows)  # windows of shards 0..i together

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard of each window number in ``index`` and the window's number within that shard."""
        shard = np.searchsorted(self.ends, index, side="right")
        return shard, index - (self.ends[shard] - self.windows[shard])


class _TestWindows(Dataset):
    """Every non-overlapping window of ``context + 1`` tokens of a split, read from the shards when indexed."""

    def __init__(self, arrays: list[np.memmap], context: int):
        self.context = context
        self.shards = _Shards(arrays, [(len(a) - 1) // context for a in arrays])

    def __len__(self) -> int:
        return int(self.shards.ends[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)  # which locate would map to a wrong window, not refuse
        shard, window = self.shards.locate(np.array(i))
        start = int(window) * self.context
        tokens = torch.from_numpy(self.shards.arrays[int(shard)][start : start + self.context + 1].astype(np.int64))
        return tokens[:-1], tokens[1:]


class TokenDataModule(LMDataModule):
    """Language modelling on token shards, read with ``numpy.memmap``: the corpus never sits in memory.

    Training and validation sequences are random windows of ``context + 1`` tokens of the training
    and validation split; a window lies within one shard file, and every window of a split is drawn
    with the same probability. The test set is every non-overlapping window of the validation split,
    read when its batch is (the CharDataModule's split roles, at any size). ``vocab_size`` is the
    tokenizer's, from ``meta.json``; the state saved with a checkpoint holds the data's checksum
    (``prepare``'s, of the token ids of both splits), and a checkpoint made on other data is refused.

    Args:
        path: a directory written by ``python -m svflow_ode.training.prepare``.
        context: context length (tokens per sequence).
        batch_size: sequences per batch (per process).
        seed: seed of the training windows and of the validation windows.
        val_size: windows in the fixed validation set.
    """

    def __init__(self, path: str, context: int = 64, batch_size: int = 12, seed: int = 0, val_size: int = 2400):
        super().__init__(batch_size, seed, val_size, test_size=1)  # the test set is every window: no size
        if context < 1:
            raise ValueError(f"need context >= 1, got {context}")
        self.path, self.context = Path(path), context
        self.meta = _read_meta(self.path)
        self.vocab_size = self.meta["vocab_size"]
        # A shard of L tokens holds L - context windows of context + 1 tokens.
        self.shards = {split: _Shards(arrays, [max(len(a) - context, 0) for a in arrays])
                       for split, arrays in [("train", self._open("train")), ("val", self._open("val"))]}
        self.offsets = np.arange(context + 1)

    def _open(self, split: str) -> list[np.memmap]:
        dtype, name = DTYPES[self.meta["dtype"]], {"train": "training", "val": "validation"}[split]
        arrays = []
        for shard in self.meta["shards"][split]:
            file = self.path / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            size = file.stat().st_size if file.is_file() else None
            if size != expected:
                found = "is missing" if size is None else f"has {size:,} bytes"
                raise ValueError(f"{file} {found}, but meta.json says {shard['tokens']:,} {self.meta['dtype']} tokens "
                                 f"({expected:,} bytes): the directory is incomplete or changed; prepare it again")
            array = np.memmap(file, dtype=dtype, mode="r")
            if hasattr(mmap, "MADV_RANDOM"):  # not on Windows
                # A window is a few hundred bytes at a random place: the kernel's read-ahead around each
                # one (up to megabytes) would multiply the reading of a corpus that is not in memory.
                array._mmap.madvise(mmap.MADV_RANDOM)
            arrays.append(array)
        longest = max((len(a) for a in arrays), default=0)
        if longest <= self.context:
            raise ValueError(f"{self.path}: the {name} split's longest shard has {longest:,} tokens, fewer than "
                             f"context + 1 = {self.context + 1}: use a shorter context or a larger corpus")
        return arrays

    def draw(self, n, generator, split):
        shards = self.shards[split]
        picks = torch.randint(int(shards.ends[-1]), (n,), generator=generator).numpy()
        which, starts = shards.locate(picks)
        windows = np.empty((n, self.context + 1), dtype=np.int64)
        for shard in np.unique(which):
            rows = which == shard
            windows[rows] = shards.arrays[shard][starts[rows, None] + self.offsets]  # reads these pages only
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def test_set(self) -> _TestWindows:
        return _TestWindows(self.shards["val"].arrays, self.context)

    def state_dict(self) -> dict:
        return {"checksum": self.meta["checksum"], "tokenizer": self.meta["tokenizer"]}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["checksum"] != self.meta["checksum"]:
            raise ValueError(
                f"the checkpoint was trained on other token data (checksum {state_dict['checksum'][:12]}...) than "
                f"{self.path} holds ({self.meta['checksum'][:12]}...): another corpus, tokenizer or split"
            )


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no token data in {path} (no meta.json): "
                                f"write it with python -m svflow_ode.training.prepare")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}, this version reads {META_FORMAT}: "
                         f"prepare the data again")
    return meta
