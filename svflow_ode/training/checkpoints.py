"""Checkpoint files: written whole or not at all, read as plain data only, checked against the model."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO", "CheckpointError", "UntrustedCheckpointError", "load_checkpoint", "read_checkpoint",
    "untrusted", "check_compatible", "differences",
]


class CheckpointError(ValueError):
    """A file given as a checkpoint cannot be used as one: empty, cut short, text, or not Lightning's."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds pickled Python objects beyond tensors and plain containers."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu", weights_only: bool = True):
    """``torch.load`` of tensors and plain containers only: a checkpoint can run no code.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        UntrustedCheckpointError: the file holds other objects; none of them was built.
        CheckpointError: the file is no checkpoint torch can read (empty, cut short, text, other
            bytes); the message says which, in one line.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler refuses a GLOBAL (a Python object to build: possibly code); any
        # other refusal ("Unsupported operand 107") means the bytes are no pickle torch.save wrote.
        if "GLOBAL" in str(err):
            raise untrusted(path, err) from None
        raise unreadable(path, err) from None
    except MemoryError:
        raise
    except Exception as err:  # torch.load of arbitrary bytes: EOFError, KeyError, RuntimeError, OSError...
        raise unreadable(path, err) from None


def read_checkpoint(path: str | os.PathLike, map_location="cpu", weights_only: bool = True) -> dict:
    """A checkpoint that Lightning wrote (``load_checkpoint``, then its structure checked).

    Raises:
        CheckpointError: as ``load_checkpoint``, or the file is a PyTorch file of another kind.
    """
    checkpoint = load_checkpoint(path, map_location, weights_only)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and "pytorch-lightning_version" in checkpoint):
        held = (f"keys {', '.join(sorted(map(str, checkpoint))[:5])}{', ...' if len(checkpoint) > 5 else ''}"
                if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}")
        raise CheckpointError(
            f"{path} is a PyTorch file but no Lightning checkpoint: it lacks 'state_dict' and "
            f"'pytorch-lightning_version' (it holds {held}); give a checkpoint written by svflow-ode fit"
        )
    return checkpoint


def unreadable(path, err: BaseException) -> CheckpointError:
    """The error for a file that ``torch.load`` fails on with ``err``: what the file is, in one line."""
    # Not torch's preamble suggesting weights_only=False: the line that says what it stumbled on.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    preamble = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reason = next((line for line in lines if not line.startswith(preamble)), lines[0] if lines else "")
    return CheckpointError(
        f"{path} is not a readable checkpoint: {_what_is(Path(path))} "
        f"(torch.load: {type(err).__name__}{': ' + reason[:120] if reason else ''}); "
        f"use another checkpoint, e.g. an earlier one of the same run"
    )


def _what_is(path: Path) -> str:
    """What the bytes of a file that torch cannot load look like."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(max(0, size - 65_557))  # a zip archive ends with its directory's end record (22 bytes + comment)
        tail = f.read()
    if head.startswith(b"PK\x03\x04"):  # torch.save's format: a zip archive
        if b"PK\x05\x06" not in tail:
            return f"a zip archive cut short ({size} bytes, its end is missing): a copy or write that did not finish"
        return f"a zip archive ({size} bytes) that holds no checkpoint torch can read"
    if _looks_like_text(head):
        return f"a text file ({size} bytes, beginning {head.decode('utf-8', 'ignore')[:24]!r}), not a checkpoint"
    return (f"neither a zip archive nor a pickle that torch.save writes ({size} bytes, beginning "
            f"{head[:8].hex(' ')})")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: err.start].decode("utf-8")
    return all(c.isprintable() or c.isspace() for c in text)


def untrusted(path, err: pickle.UnpicklingError) -> UntrustedCheckpointError:
    """The error for ``torch.load(path, weights_only=True)``'s refusal ``err``, in one line."""
    # Of torch's long message keep the line naming the offending global ("... GLOBAL posix.system
    # ..."); the rest suggests loading with weights_only=False, exactly what not to do with it.
    reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])
    return UntrustedCheckpointError(
        f"refused to load {path}: it holds Python objects other than tensors and plain containers "
        f"({reason}), and building them could run arbitrary code; nothing in it was executed"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint whole or not at all; reads them as plain data only.

    A checkpoint goes to a temporary file in its own directory, is flushed to disk, and is renamed
    over the target (``os.replace``: atomic on POSIX). A process killed mid-write leaves the
    previous file intact, plus a stray ``.<name>.*.tmp`` that nothing reads. Lightning's writer
    stages the file in the system's temporary directory and moves it, which across file systems is
    a copy that a kill can cut short. Remote paths (``s3://``...) keep Lightning's writer.
    ``--ckpt_path`` resumes load with ``weights_only=True`` unless a caller asks otherwise.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from the group
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The rename itself lives in the directory: flush it too, or a power cut can undo it.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        if weights_only is None and "://" not in str(path):
            return load_checkpoint(path, map_location)
        return super().load_checkpoint(path, map_location, weights_only)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_compatible(checkpoint: dict, module: torch.nn.Module) -> None:
    """Raise ``ValueError`` if ``checkpoint``'s weights cannot fill ``module``, naming why.

    The message lists the configuration entries that differ between the checkpoint's
    hyperparameters and the module's (when both have them), then the tensors that are missing,
    unexpected or of another shape: one readable line instead of PyTorch's size-mismatch wall.
    Only tensors of another shape raise here (no loading mode accepts them); missing and unexpected
    ones are left to ``load_state_dict``, which knows whether loading is strict.
    """
    saved, own = checkpoint["state_dict"], module.state_dict()
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    reshaped = [k for k in sorted(own.keys() & saved.keys())
                if torch.is_tensor(saved[k]) and torch.is_tensor(own[k]) and saved[k].shape != own[k].shape]
    if not reshaped:
        return
    problems = [f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(own[k].shape)} here" for k in reshaped[:3]]
    problems += [f"{len(missing)} tensors missing (e.g. {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
    differ = differences(checkpoint.get("hyper_parameters", {}), dict(getattr(module, "hparams", {})))
    config = f"configuration entries differ: {'; '.join(differ)}. " if differ else ""
    raise ValueError(
        f"the checkpoint was written by a model of another shape: {config}Tensors: {'; '.join(problems)}. "
        f"Load it into a model built with the checkpoint's configuration"
    )


def differences(saved, own, prefix: str = "", skip: frozenset[str] = frozenset()) -> list[str]:
    """``key: saved (checkpoint) vs own (here)`` for each entry of both nested configs that differs.

    Keys are dotted paths below ``prefix``; those in ``skip`` (and everything below them) are not
    compared. A tuple equals the list of the same items (a YAML or torch round trip makes one the other).
    """
    if prefix in skip:
        return []
    if not (isinstance(saved, dict) and isinstance(own, dict)):
        return [] if _plain(saved) == _plain(own) else [f"{prefix}: {saved!r} (checkpoint) vs {own!r} (here)"]
    keys = sorted(saved.keys() & own.keys())
    return [line for k in keys for line in differences(saved[k], own[k], f"{prefix}.{k}" if prefix else k, skip)]


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
