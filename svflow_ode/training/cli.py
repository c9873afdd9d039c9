"""The ``svflow-ode`` command: LightningCLI (fit, validate, test) over ``LitSVFlow`` and the data.

Examples::

    svflow-ode fit --config experiments/configs/base.yaml
    svflow-ode fit --config experiments/configs/base.yaml --config experiments/configs/rk4.yaml
    svflow-ode fit --help                      # every option, from the type hints and docstrings
    svflow-ode fit --model.model.help SVFlowLM # the model's options
"""

from __future__ import annotations

import glob
import importlib
import math
import os
import re
import sys
import traceback
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import Strategy

from .callbacks import SigtermCheckpoint
from .checkpoints import AtomicCheckpointIO, differences, read_checkpoint
from .data import LMDataModule
from .guard import FiniteGuard
from .module import LitSVFlow

__all__ = ["SVFlowCLI", "SVFlowParser", "OneLineErrors", "reserve_version", "run", "main"]

CONFIG_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)
TRACEBACK_VARIABLE = "SVFLOW_ODE_TRACEBACK"  # set: errors while building keep their traceback
# The model's sizes come from the data: these model entries are never the user's to set.
LINKS = {"data.vocab_size": "model.model.init_args.vocab_size", "data.context": "model.model.init_args.context"}


class OneLineErrors:
    """Argument and configuration errors as one line on stderr and exit status 2, without the usage wall.

    Mixed into a jsonargparse ``ArgumentParser``: ``prog: error: what was wrong``; jsonargparse's
    multi-line reports (a union's every alternative) are folded into that line.
    """

    def error(self, message: str, ex: Exception | None = None):
        # A parser that does not exit on errors is one jsonargparse is trying alternatives with: it
        # catches the exception itself. JSONARGPARSE_DEBUG asks for the exception, too.
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        line = one_line(message)
        hint = "" if line.startswith("configuration error") else f" (every option: {prog} --help)"
        sys.stderr.write(f"{prog}: error: {line}{hint}\n")
        self.exit(2)


class SVFlowParser(OneLineErrors, LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one line (``OneLineErrors``)."""


_NOISE = ("Does not validate against any of the", "Subtypes:", "Errors:", "Given value type:", "Given value:",
          "- Expected a <class 'NoneType'>")


def one_line(message) -> str:
    """``message`` in one line: jsonargparse's lines of bookkeeping dropped, the rest joined."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    kept = [line.lstrip("- ") for line in lines if not line.startswith(_NOISE)]
    return " ".join(kept or lines[:1])


class SVFlowCLI(LightningCLI):
    """LightningCLI that sizes the model from the data and reports configuration errors early.

    The model's ``vocab_size`` and ``context`` come from the data module's ``vocab_size`` and
    ``context`` (``links``; a subclass for another model names its own, as
    ``svflow_ode.training.flow_matching.FlowMatchingCLI`` does). A ``ValueError``,
    ``FileNotFoundError`` or Lightning misconfiguration while building the data, model or trainer
    (an unknown solver, a bad step count, a missing file, conflicting trainer flags) ends the
    command with a one-line message and exit code 2, before anything is trained or written; so
    does any other error while building them (a class failing on
    an argument it does not check: the message names the error and where it was raised, and
    ``SVFLOW_ODE_TRACEBACK=1`` re-raises it instead), an option value the parser refuses, and, for
    ``fit``, trainer settings that Lightning accepts but fails on mid-run (``max_steps`` 0 or -1
    without ``model.max_steps``, ``val_check_interval`` or ``accumulate_grad_batches`` 0).
    There is no ``predict``: text comes from ``svflow-ode-sample``.

    ``--ckpt_path`` is checked before anything is built (exit code 2, one line, when it fails): the
    file must be a Lightning checkpoint holding plain data only (a file that holds code is refused
    unbuilt; an empty, cut-short or foreign file is named as such), and the model configuration
    must equal the checkpoint's, since resuming keeps the checkpoint's: an override that differs is
    refused, naming each differing entry. ``--ckpt_path last`` is the newest ``last*.ckpt`` of any
    earlier run (where the configuration's ``ModelCheckpoint`` writes: its ``dirpath``, else the
    ``checkpoints`` folder of every run of the first logger); none is an error, not a fresh start.

    Each run gets its own directory: the version of each ``CSVLogger`` and ``TensorBoardLogger``
    (not pinned by the configuration) is reserved by creating ``version_<N>`` atomically, so runs
    started together never share one; a configuration error removes it again.

    Whatever callbacks and plugins the configuration lists, the trainer gets a ``FiniteGuard``
    (``--finite_guard=false`` leaves it out), a ``SigtermCheckpoint`` (SIGTERM saves ``last.ckpt``
    and exits with status 143) and writes checkpoints with ``AtomicCheckpointIO`` (unless a plugin,
    or a strategy given as an object, brings its own checkpoint I/O).
    """

    links: dict[str, str] = LINKS  # data entry -> model entry, set from the data once it is built

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser):
        for source, target in self.links.items():
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_argument("--finite_guard", type=bool, default=True,
                            help="stop at the first non-finite loss or gradient and save the weights before it")

    def parse_arguments(self, parser, args) -> None:
        # Here, before LightningCLI reads --ckpt_path's hyperparameters into the configuration (which
        # would make an override that differs from them vanish unnoticed) and before anything is built.
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        try:
            _check_seed(config.get("seed_everything"))
            if subcommand == "fit":
                _check_fit(config)
            if config.get("ckpt_path") is not None:
                config.ckpt_path = _checked_checkpoint(config, self.links)
        except CONFIG_ERRORS as err:
            parser.error(f"configuration error: {err}")

    def before_instantiate_classes(self) -> None:
        self._reserved, self._created = [], []  # logger arguments whose version we set; directories made
        if rank_zero_only.rank != 0 or os.environ.get("NODE_RANK", "0") != "0":
            return  # the other processes of a distributed run log into rank 0's directory
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("fast_dev_run"):
            return  # Lightning replaces the loggers: nothing is written
        for logger in _versioned_loggers(config.trainer.get("logger")):
            root = Path(logger.init_args.save_dir) / (logger.init_args.get("name") or "")
            try:
                logger.init_args.version, created = reserve_version(root)
            except OSError as err:
                _remove_empty(self._created)
                self.parser.error(f"configuration error: cannot make a run directory in {root}: {err}")
            self._reserved.append(logger.init_args)
            self._created += created

    def instantiate_classes(self) -> None:
        try:
            try:
                super().instantiate_classes()
            except Exception as err:  # beyond the checked errors: an argument a class fails on unchecked
                if os.environ.get(TRACEBACK_VARIABLE):
                    raise
                cause = _root_cause(err) if isinstance(err, CONFIG_ERRORS) else _located(err)
                self.parser.error(f"configuration error: {cause}")
        except BaseException:
            _remove_empty(self._created)  # a run that never started leaves no directory
            raise

    def instantiate_trainer(self, **kwargs):
        # The saved config.yaml gets the logger version back as it was given: rerunning it must
        # not write into this run's directory.
        for init_args in self._reserved:
            init_args.version = None
        # Added here, not as defaults in the configuration: a configuration that lists its own
        # callbacks or plugins replaces the defaults, and these must not vanish with them.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        callbacks, plugins = _listed(trainer.get("callbacks")), _listed(trainer.get("plugins"))
        if config.get("finite_guard") and not any(isinstance(c, FiniteGuard) for c in callbacks):
            callbacks.append(FiniteGuard())
        if not any(isinstance(c, SigtermCheckpoint) for c in callbacks):
            callbacks.append(SigtermCheckpoint())
        # A strategy object decides its own checkpoint I/O: Lightning refuses a second one.
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not isinstance(trainer.get("strategy"), Strategy):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(**{"callbacks": callbacks, "plugins": plugins, **kwargs})


def _listed(value) -> list:
    """A trainer argument that takes one item or a list, as a new list."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _root_cause(err: BaseException) -> str:
    """What went wrong at the bottom of ``err``'s chain, in one line (jsonargparse wraps the classes' errors).

    The walk follows ``raise ... from`` and implicit chaining, but stops where a ``raise ... from
    None`` cut the chain: the error there was written to replace the ones below it. The innermost
    configuration error is the answer, unless it only wraps, repeating its message, an error of
    another kind (a class failing on an argument it does not check): then that error and where it
    was raised.
    """
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else None if err.__suppress_context__ else err.__context__
    innermost, config = chain[-1], [e for e in chain if isinstance(e, CONFIG_ERRORS)][-1]
    if not isinstance(innermost, CONFIG_ERRORS) and str(innermost) in str(config):
        return _located(innermost)
    return one_line(config)


def _located(err: BaseException) -> str:
    """``Type: message (file.py:line in function)``, the innermost frame of ``err``'s traceback, and how to see it."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return (f"{type(err).__name__}: {one_line(err)}{where} while building from the configuration; "
            f"{TRACEBACK_VARIABLE}=1 shows the traceback")


def _check_seed(seed) -> None:
    # numpy's seeds, which Lightning's seed_everything sets too, are 32-bit unsigned.
    if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything must lie in [0, 2**32), got {seed}")


def _check_fit(config) -> None:
    """``ValueError`` for trainer settings that Lightning accepts but ``fit`` fails on (or trains nothing with)."""
    trainer = config.trainer
    # Lightning takes these and divides by them mid-run (ZeroDivisionError after the run began).
    interval, accumulate = trainer.get("val_check_interval"), trainer.get("accumulate_grad_batches")
    numeric = isinstance(interval, (int, float)) and not isinstance(interval, bool)  # else a time: Lightning's
    if numeric and not (interval >= 1 if isinstance(interval, int) else 0 < interval <= 1):
        raise ValueError(f"trainer.val_check_interval must be a positive number of steps or a fraction in (0, 1], "
                         f"got {interval}")
    if accumulate is not None and accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    if trainer.get("max_epochs") == 0:
        raise ValueError("trainer.max_epochs=0 trains nothing: leave it unset (trainer.max_steps ends the run)")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise ValueError(f"trainer.gradient_clip_val must be finite and >= 0 (0: no clipping), got {clip}")
    _check_training_length(config)


def _check_training_length(config) -> None:
    """``ValueError`` if ``trainer.max_steps`` trains nothing or leaves the schedule without a length."""
    trainer = config.trainer
    steps = trainer.get("max_steps")
    if trainer.get("fast_dev_run") or steps is None or steps >= 1:
        return
    if steps == 0:
        raise ValueError("trainer.max_steps=0 trains nothing: give a positive number of optimizer steps")
    if steps < -1:
        raise ValueError(f"trainer.max_steps must be a positive number of optimizer steps (or -1), got {steps}")
    if not config.model.get("max_steps"):  # -1: no limit (the training batches never run out)
        raise ValueError("trainer.max_steps=-1 (no limit) leaves the learning-rate schedule without a length: "
                         "give a positive trainer.max_steps, or model.max_steps")


def _checked_checkpoint(config, links: dict[str, str]) -> str:
    """``config.ckpt_path``, ``last`` resolved to a file, once the file and its configuration are checked
    (except the model entries that ``links`` sets from the data).

    Raises:
        FileNotFoundError: no such file, or no last checkpoint to resume from.
        CheckpointError: the file is no usable checkpoint, or holds code (``read_checkpoint``).
        ValueError: the checkpoint was trained with a model configuration other than ``config``'s.
    """
    path = str(config.ckpt_path)
    if path in ("best", "hpc") or "://" in path or path.startswith("registry:"):
        return path  # Lightning's to resolve, once the trainer exists
    if path == "last":
        path = str(_last_checkpoint(config.trainer))
    checkpoint = read_checkpoint(path, weights_only=config.get("weights_only") is not False)
    saved = dict(checkpoint.get("hyper_parameters") or {})
    saved.pop("_instantiator", None)
    differ = differences(saved, config.model.as_dict(), prefix="model", skip=frozenset(links.values()))
    if differ:
        raise ValueError(
            f"{path} was trained with another model configuration: {'; '.join(differ)}. Resuming keeps the "
            f"checkpoint's configuration: drop these overrides, or start a new run without --ckpt_path"
        )
    return path


def _last_checkpoint(trainer) -> Path:
    """The newest ``last*.ckpt`` where ``trainer``'s configuration writes checkpoints, in any earlier run."""
    places = _checkpoint_dirs(trainer)
    found = [file for place in places for folder in glob.glob(place) for file in Path(folder).glob("last*.ckpt")]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no last checkpoint in {' or '.join(places)}, so nothing to resume; "
            f"start without --ckpt_path, or give a checkpoint file"
        )
    return max(found, key=lambda file: file.stat().st_mtime_ns)


def _checkpoint_dirs(trainer) -> list[str]:
    """Where the configured ``ModelCheckpoint``s write, as glob patterns over every run of the first logger."""
    root = Path(trainer.get("default_root_dir") or ".")
    checkpoints = [c for c in _listed(trainer.get("callbacks")) if _is_a(c, ModelCheckpoint)]
    places = [str(c.init_args.dirpath) for c in checkpoints if c.init_args.get("dirpath")]
    if len(places) == len(checkpoints) > 0:
        return places
    # As ModelCheckpoint without a dirpath: <save_dir>/<name>/<version>/checkpoints of the first
    # logger (there SigtermCheckpoint writes too), or <default_root_dir>/checkpoints without one.
    logger = trainer.get("logger")
    if logger is False:
        return [*places, str(root / "checkpoints")]
    first = _listed(logger)[0] if _listed(logger) and logger is not True else None
    if first is None:  # Lightning's default logger
        return [*places, str(root / "lightning_logs" / "*" / "checkpoints")]
    if isinstance(first, Namespace):
        first = instantiate_class((), first.as_dict())  # writes nothing: loggers start on first use
    return [*places, str(Path(first.save_dir or root) / str(first.name) / "*" / "checkpoints")]


def _is_a(entry, cls: type | tuple[type, ...]) -> bool:
    """Whether a configuration entry (``class_path`` and ``init_args``) builds a ``cls``."""
    if not (isinstance(entry, Namespace) and isinstance(entry.get("class_path"), str)):
        return isinstance(entry, cls)
    module, _, name = entry.class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, cls)


def _versioned_loggers(logger) -> list[Namespace]:
    """The configured loggers that would pick their own ``version_<N>`` directory by listing their root."""
    entries = [] if isinstance(logger, bool) else _listed(logger)
    return [entry for entry in entries if _is_a(entry, (CSVLogger, TensorBoardLogger)) and isinstance(entry, Namespace)
            and entry.init_args.get("save_dir") is not None and entry.init_args.get("version") is None]


def reserve_version(root: str | os.PathLike) -> tuple[int, list[Path]]:
    """Create ``root/version_<N>`` for the next free ``N`` and return ``N``, with the directories made.

    ``mkdir`` either creates the directory or fails because it exists, atomically, so two processes
    can never both get the same ``N`` (the loggers' own choice, the next number after those listed,
    gives both the same one if they list before either writes). The directories made, ``root``'s
    parents included, are listed so that a run that never starts can remove them.
    """
    root = Path(root)
    created = [p for p in reversed([root, *root.parents]) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
        except FileExistsError:
            version += 1
            continue
        return version, [*created, root / f"version_{version}"]


def _remove_empty(directories: list[Path]) -> None:
    """Remove those of ``directories`` that are still empty, innermost first."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:  # not empty (another run's, or written to), or gone
            pass


def run(args: list[str] | None = None, **kwargs) -> SVFlowCLI:
    """Run the command line with ``args`` (default ``sys.argv[1:]``); returns the finished CLI.

    ``kwargs`` go to ``SVFlowCLI`` (e.g. ``run=False``: build the model, data and trainer only).
    """
    return SVFlowCLI(
        LitSVFlow, LMDataModule, subclass_mode_data=True, args=args, auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "svflow-ode"}, parser_class=SVFlowParser,
        **kwargs,
    )


def main() -> None:
    """The ``svflow-ode`` command. Exit status: 0 done, 1 a failure while training (its traceback),
    2 a configuration or checkpoint error (one line), 143 stopped by SIGTERM (state saved)."""
    run()


if __name__ == "__main__":
    main()
