"""The ``svflow-ode`` command: LightningCLI (fit, validate, test) over ``LitSVFlow`` and the data.

Examples::

    svflow-ode fit --config experiments/configs/base.yaml
    svflow-ode fit --config experiments/configs/base.yaml --config experiments/configs/rk4.yaml
    svflow-ode fit --help                      # every option, from the type hints and docstrings
    svflow-ode fit --model.model.help SVFlowLM # the model's options
"""

from __future__ import annotations

import pickle

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy

from .checkpoints import AtomicCheckpointIO, untrusted
from .data import LMDataModule
from .guard import FiniteGuard
from .module import LitSVFlow

__all__ = ["SVFlowCLI", "run", "main"]

CONFIG_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)


class SVFlowCLI(LightningCLI):
    """LightningCLI that sizes the model from the data and reports configuration errors early.

    The model's ``vocab_size`` and ``max_len`` come from the data module's ``vocab_size`` and
    ``block_size``. A ``ValueError``, ``FileNotFoundError`` or Lightning misconfiguration while
    building the data, model or trainer (an unknown solver, a bad step count, a missing file,
    conflicting trainer flags) ends the command with a one-line message and exit code 2, before
    anything is trained or written; so does a ``--ckpt_path`` file that holds code rather than data.
    There is no ``predict``: text comes from ``svflow-ode-sample``.

    Whatever callbacks and plugins the configuration lists, the trainer gets a ``FiniteGuard``
    (``--finite_guard=false`` leaves it out) and writes checkpoints with ``AtomicCheckpointIO``
    (unless a plugin, or a strategy given as an object, brings its own checkpoint I/O).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab_size", "model.model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.model.init_args.max_len", apply_on="instantiate")
        parser.add_argument("--finite_guard", type=bool, default=True,
                            help="stop at the first non-finite loss or gradient and save the weights before it")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path's hyperparameters with weights_only=True: its refusal of a file
        # that holds code becomes a one-line configuration error. (A private LightningCLI step: the
        # hostile-checkpoint test in tests/test_reliability.py fails if it is renamed.)
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            self.parser.error(f"configuration error: {untrusted(self.config[self.config.subcommand].ckpt_path, err)}")

    def instantiate_trainer(self, **kwargs):
        # Added here, not as defaults in the configuration: a configuration that lists its own
        # callbacks or plugins replaces the defaults, and these must not vanish with them.
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks, plugins = _listed(trainer.get("callbacks")), _listed(trainer.get("plugins"))
        if self._get(self.config, "finite_guard") and not any(isinstance(c, FiniteGuard) for c in callbacks):
            callbacks.append(FiniteGuard())
        # A strategy object decides its own checkpoint I/O: Lightning refuses a second one.
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not isinstance(trainer.get("strategy"), Strategy):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(**{"callbacks": callbacks, "plugins": plugins, **kwargs})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except CONFIG_ERRORS as err:
            self.parser.error(f"configuration error: {_root_cause(err)}")


def _listed(value) -> list:
    """A trainer argument that takes one item or a list, as a new list."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _root_cause(err: BaseException) -> BaseException:
    """The innermost configuration error in ``err``'s chain (jsonargparse wraps the data's errors)."""
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return [e for e in chain if isinstance(e, CONFIG_ERRORS)][-1]


def run(args: list[str] | None = None) -> SVFlowCLI:
    """Run the command line with ``args`` (default ``sys.argv[1:]``); returns the finished CLI."""
    return SVFlowCLI(
        LitSVFlow, LMDataModule, subclass_mode_data=True, args=args, auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "svflow-ode"},
    )


def main() -> None:
    """The ``svflow-ode`` command."""
    run()


if __name__ == "__main__":
    main()
