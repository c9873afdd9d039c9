"""The ``svflow-ode`` command: LightningCLI (fit, validate, test) over ``LitSVFlow`` and the data.

Examples::

    svflow-ode fit --config experiments/configs/base.yaml
    svflow-ode fit --config experiments/configs/base.yaml --config experiments/configs/rk4.yaml
    svflow-ode fit --help                      # every option, from the type hints and docstrings
    svflow-ode fit --model.model.help SVFlowLM # the model's options
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from .data import LMDataModule
from .module import LitSVFlow

__all__ = ["SVFlowCLI", "run", "main"]

CONFIG_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)


class SVFlowCLI(LightningCLI):
    """LightningCLI that sizes the model from the data and reports configuration errors early.

    The model's ``vocab_size`` and ``max_len`` come from the data module's ``vocab_size`` and
    ``block_size``. A ``ValueError``, ``FileNotFoundError`` or Lightning misconfiguration while
    building the data, model or trainer (an unknown solver, a bad step count, a missing file,
    conflicting trainer flags) ends the command with a one-line message and exit code 2, before
    anything is trained or written. There is no ``predict``: text comes from ``svflow-ode-sample``.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab_size", "model.model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.model.init_args.max_len", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except CONFIG_ERRORS as err:
            self.parser.error(f"configuration error: {_root_cause(err)}")


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
