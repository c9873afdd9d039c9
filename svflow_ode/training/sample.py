"""Text from a trained character-level checkpoint: ``svflow-ode-sample last.ckpt --prompt "ROMEO:"``."""

from __future__ import annotations

import math
import sys

import torch
from jsonargparse import CLI, ArgumentParser

from .checkpoints import read_checkpoint
from .cli import OneLineErrors
from .data import CharDataModule
from .module import LitSVFlow

__all__ = ["generate", "sample", "main"]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    num_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append ``num_tokens`` sampled tokens to ``input_ids`` ``(B, T)``; returns ``(B, T + num_tokens)``.

    The context is cropped to the model's ``context`` latest tokens (as nanoGPT).
    """
    _check_sampling(num_tokens, temperature, top_k, "num_tokens")
    for _ in range(num_tokens):
        logits = model(input_ids[:, -model.context :]).logits[:, -1, :] / temperature  # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        input_ids = torch.cat([input_ids, next_ids], 1)
    return input_ids


def sample(
    checkpoint: str,
    prompt: str = "\n",
    num_chars: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` with ``num_chars`` characters sampled from a character-level model.

    Args:
        checkpoint: a checkpoint written by ``svflow-ode fit`` with ``CharDataModule`` data (it
            holds the model's configuration and the vocabulary).
        prompt: the text to continue; every character must be in the vocabulary.
        num_chars: characters to generate.
        temperature: softmax temperature (lower is more conservative).
        top_k: sample among the ``top_k`` most likely characters only (None: all).
        seed: seed of the sampling.

    Returns:
        The prompt followed by the generated characters.
    """
    _check_sampling(num_chars, temperature, top_k, "num_chars")  # before the checkpoint is read
    if not prompt:
        raise ValueError("the prompt must hold at least one character")
    state = read_checkpoint(checkpoint)
    if CharDataModule.__qualname__ not in state:
        raise ValueError(f"{checkpoint} holds no character vocabulary: it was not trained on CharDataModule data")
    vocab = state[CharDataModule.__qualname__]["vocab"]
    unknown = sorted(set(prompt) - set(vocab))
    if unknown:
        shown = "".join(unknown[:20]) + ("..." if len(unknown) > 20 else "")
        raise ValueError(f"the prompt has {len(unknown)} characters outside the vocabulary ({len(vocab)} "
                         f"characters, the training text's): {shown!r}")
    model = LitSVFlow.load_from_checkpoint(checkpoint, map_location="cpu").model.eval()
    input_ids = torch.tensor([[vocab.index(c) for c in prompt]])  # (1, T)
    out = generate(model, input_ids, num_chars, temperature, top_k, torch.Generator().manual_seed(seed))
    return "".join(vocab[i] for i in out[0].tolist())


def _check_sampling(count: int, temperature: float, top_k: int | None, name: str) -> None:
    """``ValueError`` naming the first sampling setting that cannot work."""
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None: all characters), got {top_k}")


class _Parser(OneLineErrors, ArgumentParser):
    """The command's parser: its errors are one line."""


def main(args: list[str] | None = None) -> None:
    """The ``svflow-ode-sample`` command: prints ``sample(...)``.

    Exit status 2, with one line on stderr, for a bad option, prompt or checkpoint file.
    """
    try:
        text = CLI(sample, args=args, parser_class=_Parser, prog="svflow-ode-sample")
    except (ValueError, FileNotFoundError) as err:  # the checks above and read_checkpoint's: one line each
        print(f"svflow-ode-sample: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


if __name__ == "__main__":
    main()
