"""Tokenise a text corpus into memory-mapped token shards for ``TokenDataModule``.

Examples::

    # with a local Hugging Face tokenizer directory (MiniLM's, a converted model's)
    python -m svflow_ode.training.prepare tinyshakespeare --out data/shakespeare-minilm --tokenizer DIR
    # with a byte-level BPE of 4096 tokens trained on the corpus's training split
    python -m svflow_ode.training.prepare books/*.txt --out data/books-bpe --bpe 4096
    # the same tokens for another corpus, reusing that BPE
    python -m svflow_ode.training.prepare more.txt --out data/more --tokenizer data/books-bpe/tokenizer

The output directory holds ``train_NNNN.bin`` and ``val_NNNN.bin`` (raw little-endian token ids,
``uint16`` when every id fits, else ``uint32``: what ``numpy.memmap`` reads), ``meta.json`` and,
for ``--bpe``, the trained tokenizer in ``tokenizer/`` (loadable by ``AutoTokenizer`` and by
``--tokenizer``).

The corpus is the files in the order given, read as UTF-8 bytes in blocks of whole lines (nothing
is translated: the tokens decode to the files' exact text where the tokenizer allows). The split is
by lines: a line that starts before byte ``floor((1 - val_fraction) * total bytes)`` of the corpus
trains, the rest validates, so the split falls at the first line boundary (a newline or a file's
end) at or after that byte; it depends on the bytes only, never on chance. Each line is encoded by
itself (``str.splitlines``, line ends kept), so no token spans two lines and the token stream does
not depend on how the corpus was cut into blocks; no special tokens are added.

Errors in the input (a missing file or tokenizer directory, an empty corpus or split, text that is
not UTF-8, a vocabulary too large for ``--dtype``, an existing output directory without
``--overwrite``) end the command with one line on stderr and exit status 2, and leave no output
behind (it is written beside the output directory and moved there once complete).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .checkpoints import _umask
from .data import CORPORA, corpus_path
from .tokens import DTYPES, META_FORMAT

__all__ = ["DTYPES", "prepare", "load_tokenizer", "main"]

BLOCK_BYTES = 1 << 20  # corpus bytes read, decoded and encoded at a time
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)


def prepare(
    corpus: list[str],
    out: str,
    tokenizer: str | None = None,
    bpe: int | None = None,
    val_fraction: float = 0.1,
    dtype: str = "auto",
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise ``corpus`` into token shards and ``meta.json`` in the directory ``out``.

    Args:
        corpus: UTF-8 text files, read in this order as one corpus, or names of shipped corpora
            (``CORPORA``: ``"tinyshakespeare"``).
        out: the output directory; it must not exist, be empty, or (with ``overwrite``) hold an
            earlier output (a ``meta.json``), which is replaced once the new one is complete.
        tokenizer: a local Hugging Face tokenizer directory (``AutoTokenizer``; a fast tokenizer).
        bpe: instead of ``tokenizer``, train a byte-level BPE of at most this many tokens on the
            training split and save it into ``out/tokenizer``.
        val_fraction: fraction of the corpus's bytes, from its end, that validates (split at a line
            boundary, see the module's docstring).
        dtype: ``"uint16"``, ``"uint32"`` or ``"auto"`` (``uint16`` when the vocabulary has at most
            65,536 tokens).
        shard_tokens: tokens per shard file (the last of each split holds the rest).
        overwrite: replace an earlier output in ``out``.
        progress: show progress bars on stderr.

    Returns:
        The metadata written to ``out/meta.json``.

    Raises:
        FileNotFoundError: a corpus file or the tokenizer directory does not exist.
        FileExistsError: ``out`` exists and is neither empty nor (with ``overwrite``) an earlier output.
        ValueError: any other input that cannot be prepared; the message says why.
    """
    if (tokenizer is None) == (bpe is None):
        raise ValueError("give exactly one of --tokenizer DIR and --bpe VOCAB_SIZE")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, uint16 or uint32, got {dtype!r}")
    if bpe is not None and bpe < 256:
        raise ValueError(f"--bpe needs a vocabulary of at least 256 tokens (the byte alphabet), got {bpe}")
    files = [_corpus_file(name) for name in corpus]
    total = sum(f.stat().st_size for f in files)
    if total == 0:
        raise ValueError(f"the corpus is empty: {', '.join(map(str, files))} hold no bytes")
    out = Path(out)
    _check_output(out, overwrite)
    boundary = math.floor((1 - val_fraction) * total)  # the first line starting here or later validates

    if bpe is not None:
        _store_dtype(bpe, dtype)  # refused before training: the trained vocabulary may have all bpe tokens
        encoder = _train_bpe(files, boundary, bpe, progress)
        source = {"type": "bpe", "path": "tokenizer", "requested_vocab_size": bpe,
                  "trained_on": "the training split"}
    else:
        encoder, source = load_tokenizer(tokenizer)
    vocab_size = encoder.get_vocab_size(with_added_tokens=True)
    stored = _store_dtype(vocab_size, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` and renamed into place when complete: a failed run leaves no half output.
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        if bpe is not None:
            _save_tokenizer(encoder, work / "tokenizer")
        digest, corpus_digest = hashlib.sha256(), hashlib.sha256()
        writers = {split: _ShardWriter(work, split, shard_tokens, digest) for split in ("train", "val")}
        lines = {"train": 0, "val": 0}
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", disable=not progress) as bar:
            for split, block in _blocks(files, boundary):
                corpus_digest.update(block)
                text = block.decode("utf-8")  # valid: _blocks checked it
                pieces = text.splitlines(keepends=True)
                encodings = encoder.encode_batch_fast(pieces, add_special_tokens=False)
                ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), DTYPES[stored])
                writers[split].write(ids)
                lines[split] += len(pieces)
                bar.update(len(block))
        shards = {split: writer.close() for split, writer in writers.items()}
        tokens = {split: sum(s["tokens"] for s in shards[split]) for split in shards}
        for split, name in [("train", "training"), ("val", "validation")]:
            if tokens[split] == 0:
                raise ValueError(f"the {name} split holds no tokens ({lines[split]} lines of the corpus): "
                                 f"give a longer corpus, with more lines, or another --val-fraction")
        meta = {
            "format": META_FORMAT,
            "tokenizer": source,
            "vocab_size": vocab_size,
            "dtype": stored,
            "tokens": tokens,
            "lines": lines,
            "shards": shards,
            "split": {
                "rule": "lines starting before byte floor((1 - val_fraction) * bytes) of the corpus train, "
                        "the rest validate",
                "val_fraction": val_fraction,
                "boundary_byte": boundary,
            },
            "corpus": {"files": [str(f.resolve()) for f in files], "bytes": total, "sha256": corpus_digest.hexdigest()},
            # Of the token ids (as uint32), training shards then validation shards: the data a model trains on.
            "checksum": digest.hexdigest(),
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        work.chmod(0o777 & ~_umask())  # mkdtemp's is private; the output gets what mkdir would give it
        if out.exists():  # empty, or an earlier output to replace (_check_output)
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return meta


def _corpus_file(name: str) -> Path:
    path = corpus_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {name} (neither a file nor a shipped corpus: "
                                f"{', '.join(CORPORA)})")
    return path


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"the output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"the output directory {out} exists: pass --overwrite to replace it")
        if not (out / "meta.json").is_file():  # --overwrite never empties a directory prepare did not write
            raise FileExistsError(f"the output directory {out} exists and holds no meta.json: "
                                  f"not an earlier output of prepare, so it is not replaced")


def _store_dtype(vocab_size: int, dtype: str) -> str:
    """The dtype that stores ids below ``vocab_size``: ``dtype``, or the smallest for ``"auto"``."""
    fits = [name for name, d in DTYPES.items() if vocab_size - 1 <= np.iinfo(d).max]
    if dtype == "auto":
        return fits[0]  # every vocabulary a tokenizer has fits uint32
    if dtype not in fits:
        raise ValueError(f"a vocabulary of {vocab_size:,} tokens does not fit {dtype} "
                         f"(ids up to {np.iinfo(DTYPES[dtype]).max:,}): use --dtype {fits[0]} or auto")
    return dtype


def load_tokenizer(directory: str):
    """The fast (Rust) tokenizer of the Hugging Face tokenizer directory, and its description for meta.json."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)  # never the network
    except (OSError, ValueError, KeyError, TypeError) as err:  # what transformers raises for unusable folders
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{directory} holds no tokenizer that transformers can load: {first}") from None
    if not loaded.is_fast:
        raise ValueError(f"{directory} loads as a slow (Python) tokenizer ({type(loaded).__name__}); "
                         f"prepare needs a fast one: save it with a tokenizer.json")
    encoder = loaded.backend_tokenizer
    # Some tokenizer.json files pad and truncate every encoding (MiniLM's to 128 tokens): a corpus
    # line must be encoded whole, and padding is no text.
    encoder.no_padding()
    encoder.no_truncation()
    return encoder, {"type": "huggingface", "path": str(Path(directory).resolve()), "class": type(loaded).__name__}


def _train_bpe(files: list[Path], boundary: int, vocab_size: int, progress: bool):
    """A byte-level BPE (GPT-2's pre-tokenisation, no prefix space) trained on the training split's lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    encoder = Tokenizer(models.BPE())
    encoder.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # decoding gives the text back exactly
    encoder.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    with tqdm(total=boundary, unit="B", unit_scale=True, desc="reading for BPE", disable=not progress) as bar:
        def training_lines() -> Iterator[list[str]]:
            for split, block in _blocks(files, boundary):
                if split == "val":
                    return
                bar.update(min(len(block), boundary - bar.n))  # the split's last line may end past the boundary
                yield block.decode("utf-8").splitlines(keepends=True)

        encoder.train_from_iterator(training_lines(), trainer)
    return encoder


def _save_tokenizer(encoder, directory: Path) -> None:
    """``encoder`` saved as a transformers tokenizer directory (``AutoTokenizer`` and ``--tokenizer`` load it)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=encoder).save_pretrained(str(directory))


def _blocks(files: list[Path], boundary: int) -> Iterator[tuple[str, bytes]]:
    """The corpus as ``(split, bytes)`` blocks of whole lines, in order, each in one split.

    Raises ``ValueError`` for bytes that are not UTF-8 text (naming the file and the offset).
    """
    position = 0  # of the next block in the corpus
    for path in files:
        for offset, lines in _line_blocks(path):
            _check_text(lines, path, offset)
            start, position = position, position + len(lines)
            if start >= boundary:
                yield "val", lines
                continue
            # The first line starting at or after `boundary` follows the first newline at boundary - 1
            # or later; with none in the block, every line of it starts before `boundary`.
            cut = lines.find(b"\n", boundary - 1 - start) + 1 or len(lines)
            yield "train", lines[:cut]
            if cut < len(lines):
                yield "val", lines[cut:]


def _line_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)``: the file in blocks of about ``BLOCK_BYTES`` that end at a newline or at its end."""
    offset, pending = 0, []  # pending: bytes read of a line not yet ended
    with open(path, "rb") as f:
        while read := f.read(BLOCK_BYTES):
            cut = read.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a block: read on
                pending.append(read)
                continue
            block = b"".join([*pending, read[:cut]])
            pending = [read[cut:]]
            yield offset, block
            offset += len(block)
    tail = b"".join(pending)  # the last line, without a newline
    if tail:
        yield offset, tail


def _check_text(data: bytes, path: Path, offset: int) -> None:
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text file holds NUL bytes
        raise ValueError(f"{path} looks binary (a NUL byte at offset {offset + nul}): prepare reads text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {offset + err.start} ({err.reason}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


class _ShardWriter:
    """Appends a split's tokens to ``{split}_NNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, digest):
        self.directory, self.split, self.shard_tokens, self.digest = directory, split, shard_tokens, digest
        self.shards: list[dict] = []  # {"file", "tokens"} of each file begun
        self.file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self.file.write(part)
            self.digest.update(part.astype(DTYPES["uint32"]))  # the same ids hash the same, stored in either dtype
            self.shards[-1]["tokens"] += len(part)

    def _next_file(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict]:
        """The shards written: ``[{"file": name, "tokens": count}, ...]``."""
        if self.file is not None:
            self.file.close()
        return self.shards


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit status 2, without the usage lines."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (every option: {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m svflow_ode.training.prepare``: see the module's docstring, or ``--help``."""
    parser = _OneLineParser(prog="python -m svflow_ode.training.prepare", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="+", help=f"UTF-8 text files, or a shipped corpus ({', '.join(CORPORA)})")
    parser.add_argument("--out", required=True, help="output directory")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer directory")
    which.add_argument("--bpe", type=int, metavar="VOCAB_SIZE",
                       help="train a byte-level BPE of at most this many tokens on the training split")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the corpus's bytes, from its end, that validates (default 0.1)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="token storage (default auto: uint16 when the vocabulary fits)")
    parser.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS,
                        help=f"tokens per shard file (default {SHARD_TOKENS:,})")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.corpus, args.out, tokenizer=args.tokenizer, bpe=args.bpe, val_fraction=args.val_fraction,
                       dtype=args.dtype, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                       progress=not args.quiet)
    except (ValueError, OSError) as err:  # FileNotFoundError and FileExistsError are OSErrors
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"{args.out}: {meta['tokens']['train']:,} training and {meta['tokens']['val']:,} validation tokens, "
          f"vocabulary {meta['vocab_size']:,}, {meta['dtype']}")


if __name__ == "__main__":
    main()
