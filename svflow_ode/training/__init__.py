"""Training SVFlow language models with Lightning: the module, data, callbacks and the CLI."""

from .callbacks import SigtermCheckpoint, TokenThroughput
from .checkpoints import AtomicCheckpointIO
from .data import IGNORE, CharDataModule, LMDataModule
from .guard import FiniteGuard, NonFiniteTrainingError
from .module import LitSVFlow
from .tasks import AssociativeRecallDataModule, DyckDataModule
from .tokens import TokenDataModule
from .toy import GaussianMixtureDataModule

__all__ = [
    "IGNORE", "AssociativeRecallDataModule", "AtomicCheckpointIO", "CharDataModule", "DyckDataModule", "FiniteGuard",
    "GaussianMixtureDataModule", "LMDataModule", "LitSVFlow", "NonFiniteTrainingError", "SigtermCheckpoint",
    "TokenDataModule", "TokenThroughput",
]
