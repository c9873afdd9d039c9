"""Generated sequence tasks that need no files and that only attention can solve."""

from __future__ import annotations

import torch

from .data import IGNORE, LMDataModule

__all__ = ["AssociativeRecallDataModule", "DyckDataModule"]


class AssociativeRecallDataModule(LMDataModule):
    """Multi-query associative recall (MQAR, Arora et al. 2023).

    A sequence lists ``n_pairs`` key-value pairs, then ``n_queries`` of those keys again, each
    followed by its value::

        k_1 v_1 k_2 v_2 ... k_P v_P | q_1 a_1 ... q_Q a_Q      (a_i = the value bound to q_i)

    Only the answers are scored: the label at each query key is its value, ``IGNORE`` elsewhere.
    The model must find the query's earlier occurrence and copy the token after it (an induction
    head). Keys are tokens ``0 .. n_keys - 1`` (distinct within a sequence), values
    ``n_keys .. n_keys + n_values - 1``. Each query is a key of the sequence drawn independently
    (with replacement: distinct queries would let the last ones be found by elimination). Guessing
    a value seen in the sequence is right with probability about ``1 / n_pairs``.

    Args:
        n_pairs: key-value pairs per sequence.
        n_queries: queries per sequence.
        n_keys: size of the key vocabulary (at least ``n_pairs``).
        n_values: size of the value vocabulary.
        batch_size: sequences per batch (per process).
        seed: seed of the training stream and of the held-out sets.
        val_size: sequences in the fixed validation set.
        test_size: sequences in the fixed test set.
    """

    def __init__(
        self,
        n_pairs: int = 8,
        n_queries: int = 8,
        n_keys: int = 32,
        n_values: int = 32,
        batch_size: int = 64,
        seed: int = 0,
        val_size: int = 1024,
        test_size: int = 1024,
    ):
        super().__init__(batch_size, seed, val_size, test_size)
        if not 1 <= n_pairs <= n_keys or n_queries < 1:
            raise ValueError(
                f"need 1 <= n_pairs <= n_keys and n_queries >= 1, got n_pairs={n_pairs}, n_keys={n_keys}, "
                f"n_queries={n_queries}"
            )
        if n_values < 1:
            raise ValueError(f"n_values must be positive, got {n_values}")
        self.n_pairs, self.n_queries, self.n_keys, self.n_values = n_pairs, n_queries, n_keys, n_values
        self.vocab_size = n_keys + n_values
        self.context = 2 * (n_pairs + n_queries) - 1  # the last answer is a label, never an input

    def draw(self, n, generator, split):
        P, Q = self.n_pairs, self.n_queries
        keys = torch.rand(n, self.n_keys, generator=generator).argsort(-1)[:, :P]  # (n, P) distinct
        values = self.n_keys + torch.randint(self.n_values, (n, P), generator=generator)  # (n, P)
        asked = torch.randint(P, (n, Q), generator=generator)  # (n, Q) which pairs
        pairs = torch.stack([keys, values], -1).flatten(1)  # (n, 2P)
        queries = torch.stack([keys.gather(1, asked), values.gather(1, asked)], -1).flatten(1)  # (n, 2Q)
        seq = torch.cat([pairs, queries], 1)  # (n, 2P + 2Q)
        labels = torch.full((n, self.context), IGNORE)
        answer_at = 2 * P + 2 * torch.arange(Q)  # positions of the query keys
        labels[:, answer_at] = seq[:, answer_at + 1]
        return seq[:, :-1], labels


class DyckDataModule(LMDataModule):
    """Prefixes of Dyck-k words (balanced brackets of ``n_types`` kinds), next-token prediction.

    Tokens ``0 .. k-1`` open and ``k .. 2k-1`` close. Each position opens a random bracket with
    probability ``p_open`` (always when nothing is open, never at ``max_depth``), otherwise closes
    the innermost open one. Only closing brackets are scored: their kind is fixed by the prefix
    (it matches the innermost unclosed opener, which attention must find), so a perfect model
    reaches accuracy 1 on them; the label at every other position is ``IGNORE``.

    Args:
        n_types: bracket kinds k.
        context: sequence length.
        max_depth: the deepest nesting.
        p_open: probability of opening when both opening and closing are allowed.
        batch_size: sequences per batch (per process).
        seed: seed of the training stream and of the held-out sets.
        val_size: sequences in the fixed validation set.
        test_size: sequences in the fixed test set.
    """

    def __init__(
        self,
        n_types: int = 3,
        context: int = 64,
        max_depth: int = 8,
        p_open: float = 0.5,
        batch_size: int = 64,
        seed: int = 0,
        val_size: int = 1024,
        test_size: int = 1024,
    ):
        super().__init__(batch_size, seed, val_size, test_size)
        if n_types < 1 or max_depth < 1 or not 0 < p_open < 1 or context < 1:
            raise ValueError(
                f"need n_types >= 1, max_depth >= 1, 0 < p_open < 1 and context >= 1, got {n_types}, {max_depth}, "
                f"{p_open}, {context}"
            )
        self.n_types, self.max_depth, self.p_open = n_types, max_depth, p_open
        self.vocab_size, self.context = 2 * n_types, context

    def draw(self, n, generator, split):
        k, T = self.n_types, self.context
        stack = torch.zeros(n, self.max_depth, dtype=torch.long)  # open kinds, innermost at depth - 1
        depth = torch.zeros(n, dtype=torch.long)
        rows = torch.arange(n)
        seq = torch.empty(n, T + 1, dtype=torch.long)
        for i in range(T + 1):
            kinds = torch.randint(k, (n,), generator=generator)
            coin = torch.rand(n, generator=generator) < self.p_open
            opens = (depth == 0) | ((depth < self.max_depth) & coin)
            innermost = stack[rows, (depth - 1).clamp_min(0)]
            seq[:, i] = torch.where(opens, kinds, k + innermost)
            stack[rows[opens], depth[opens]] = kinds[opens]
            depth = depth + opens.long() * 2 - 1
        labels = torch.where(seq[:, 1:] >= k, seq[:, 1:], IGNORE)
        return seq[:, :-1], labels
