"""Checkpoint files: written whole or not at all, read as plain data only, checked against the model."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "UntrustedCheckpointError", "load_checkpoint", "untrusted", "check_compatible"]


class UntrustedCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects beyond tensors and plain containers."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` of tensors and plain containers only: a checkpoint can run no code.

    Raises:
        UntrustedCheckpointError: the file holds other objects; none of them was built.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise untrusted(path, err) from None


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
            if not Path(path).is_file():
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
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
    differ = _differences(checkpoint.get("hyper_parameters", {}), dict(getattr(module, "hparams", {})))
    config = f"configuration entries differ: {'; '.join(differ)}. " if differ else ""
    raise ValueError(
        f"the checkpoint was written by a model of another shape: {config}Tensors: {'; '.join(problems)}. "
        f"Load it into a model built with the checkpoint's configuration"
    )


def _differences(saved, own, prefix: str = "") -> list[str]:
    """``key: saved (checkpoint) vs own (here)`` for each entry of both nested configs that differs."""
    if not (isinstance(saved, dict) and isinstance(own, dict)):
        return [] if saved == own else [f"{prefix}: {saved!r} (checkpoint) vs {own!r} (here)"]
    keys = sorted(saved.keys() & own.keys())
    return [line for k in keys for line in _differences(saved[k], own[k], f"{prefix}.{k}" if prefix else k)]
