"""Text from a trained checkpoint: ``svflow-ode-sample last.ckpt --prompt "ROMEO:"``.

A character-level checkpoint (``CharDataModule`` data) holds its vocabulary. A token-level one
(``TokenDataModule`` data, from ``svflow-ode fit`` or ``svflow-ode-finetune fit``) names the
tokenizer its data was prepared with, which encodes the prompt and decodes the sample as
``svflow-ode-prepare`` encoded the corpus (no special tokens added).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import CLI, ArgumentParser

from .checkpoints import read_checkpoint
from .cli import OneLineErrors
from .data import CharDataModule
from .finetune import load_module
from .prepare import load_tokenizer
from .tokens import TokenDataModule

__all__ = ["generate", "sample", "tokenizer_dir", "main"]


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
    tokenizer: str | None = None,
) -> str:
    """Continue ``prompt`` with ``num_chars`` characters (tokens, for a token-level model) sampled from a model.

    Args:
        checkpoint: a checkpoint written by ``svflow-ode fit`` or ``svflow-ode-finetune fit`` with
            ``CharDataModule`` or ``TokenDataModule`` data (it holds the model's configuration and
            the vocabulary, or names the tokenizer); the model must have a language-model head.
        prompt: the text to continue; every character must be in a character model's vocabulary.
        num_chars: characters (tokens, for a token-level model) to generate.
        temperature: softmax temperature (lower is more conservative).
        top_k: sample among the ``top_k`` most likely characters or tokens only (None: all).
        seed: seed of the sampling.
        tokenizer: for a token-level model, a tokenizer directory to use instead of the one the
            checkpoint names (``tokenizer_dir``).

    Returns:
        The prompt followed by the generated text.
    """
    _check_sampling(num_chars, temperature, top_k, "num_chars")  # before the checkpoint is read
    if not prompt:
        raise ValueError("the prompt must hold at least one character")
    state = read_checkpoint(checkpoint)
    if CharDataModule.__qualname__ in state:
        vocab = state[CharDataModule.__qualname__]["vocab"]
        unknown = sorted(set(prompt) - set(vocab))
        if unknown:
            shown = "".join(unknown[:20]) + ("..." if len(unknown) > 20 else "")
            raise ValueError(f"the prompt has {len(unknown)} characters outside the vocabulary ({len(vocab)} "
                             f"characters, the training text's): {shown!r}")
        prompt_ids = [vocab.index(c) for c in prompt]

        def decode(ids: list[int]) -> str:
            return "".join(vocab[i] for i in ids)
    elif TokenDataModule.__qualname__ in state:
        directory = tokenizer_dir(checkpoint, state[TokenDataModule.__qualname__]["tokenizer"], tokenizer)
        encoder, _ = load_tokenizer(str(directory))
        prompt_ids = encoder.encode(prompt, add_special_tokens=False).ids
        if not prompt_ids:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens with {directory}: give some text")
        decode = encoder.decode
    else:
        raise ValueError(f"{checkpoint} holds neither a character vocabulary nor a tokenizer: it was not trained "
                         f"on CharDataModule or TokenDataModule data")
    model = load_module(checkpoint).model.eval()
    if model.head is None:
        raise ValueError(f"{checkpoint} holds a model without a language-model head: it predicts no tokens")
    out = generate(model, torch.tensor([prompt_ids]), num_chars, temperature, top_k,
                   torch.Generator().manual_seed(seed))
    return decode(out[0].tolist())


def tokenizer_dir(checkpoint: str, recorded: dict, given: str | None = None) -> Path:
    """The tokenizer directory of a token-level checkpoint: ``given``, else the one its data was prepared with.

    ``recorded`` is the data's ``meta.json`` entry kept in the checkpoint. A transformers tokenizer
    is recorded by its absolute path; a BPE that ``prepare`` trained (``--bpe``), relative to the
    data directory, which the run's ``config.yaml`` names (the CLI saves it beside the
    ``checkpoints`` folder; a relative data path is read from the current directory).

    Raises:
        FileNotFoundError: the directory cannot be found; the message says how to give it.
    """
    path = Path(given if given is not None else recorded["path"])
    if not path.is_absolute() and given is None:
        config = Path(checkpoint).resolve().parent.parent / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{checkpoint} names its tokenizer relative to its data directory ({path}), and "
                                    f"no config.yaml of its run says which that is: pass --tokenizer DATA_DIR/{path}")
        path = Path(yaml.safe_load(config.read_text())["data"]["init_args"]["path"]) / path
    if not path.is_dir():
        which = "" if given is not None else f", the one {checkpoint}'s data was prepared with: pass --tokenizer DIR"
        raise FileNotFoundError(f"tokenizer directory not found: {path}{which}")
    return path


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
    except (ValueError, FileNotFoundError) as err:  # the checks above, the checkpoint's and tokenizer's: one line each
        print(f"svflow-ode-sample: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


if __name__ == "__main__":
    main()
