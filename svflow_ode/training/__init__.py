"""Training SVFlow language models with Lightning: the module, data, callbacks and the CLI."""

from .callbacks import LinearInit, TokenThroughput
from .data import IGNORE, CharDataModule, LMDataModule
from .module import LitSVFlow
from .tasks import AssociativeRecallDataModule, DyckDataModule
from .toy import GaussianMixtureDataModule

__all__ = [
    "IGNORE", "AssociativeRecallDataModule", "CharDataModule", "DyckDataModule", "GaussianMixtureDataModule",
    "LMDataModule", "LinearInit", "LitSVFlow", "TokenThroughput",
]
