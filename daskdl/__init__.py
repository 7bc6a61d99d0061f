"""daskdl: data-parallel deep learning with JAX on Dask clusters."""

from . import config as _config  # noqa: F401  (loads the daskdl defaults)
from .data import Dataset
from .errors import DaskDLError, DatasetError, SyncAborted, TrainingDiverged
from .plan import EpochPlan, make_plan
from .policies import BSP, Contribution, Policy
from .trainer import Trainer
from .workerenv import WorkerEnvironment, worker_environment

__all__ = [
    "BSP",
    "Contribution",
    "DaskDLError",
    "Dataset",
    "DatasetError",
    "EpochPlan",
    "Policy",
    "SyncAborted",
    "Trainer",
    "TrainingDiverged",
    "WorkerEnvironment",
    "make_plan",
    "worker_environment",
]

__version__ = "0.1.0"
