"""daskdl: data-parallel deep learning with JAX on Dask clusters."""

from . import config as _config  # noqa: F401  (loads the daskdl defaults)
from .encryption import (
    ChunkAuthenticationError,
    KeyRef,
    MetadataAuthenticationError,
    WrongKeyError,
)
from .dashboard import DashboardPlugin
from .data import Dataset
from .errors import DaskDLError, DatasetError, SyncAborted, TrainingDiverged
from .plan import EpochPlan, make_plan, steps_per_epoch
from .policies import (
    BSP,
    DiLoCo,
    EASGD,
    SSP,
    Async,
    Contribution,
    Merged,
    Policy,
    SyncInfo,
    all_arrived,
    apply_deltas,
    average,
    bounded_staleness,
    elastic,
    no_state,
    no_wait,
    outer_step,
)
from .trainer import Trainer
from .workerenv import WorkerEnvironment, worker_environment

__all__ = [
    "Async",
    "BSP",
    "ChunkAuthenticationError",
    "KeyRef",
    "MetadataAuthenticationError",
    "WrongKeyError",
    "DiLoCo",
    "EASGD",
    "Merged",
    "SSP",
    "SyncInfo",
    "all_arrived",
    "apply_deltas",
    "average",
    "bounded_staleness",
    "elastic",
    "no_state",
    "no_wait",
    "outer_step",
    "Contribution",
    "DaskDLError",
    "DashboardPlugin",
    "Dataset",
    "DatasetError",
    "EpochPlan",
    "Policy",
    "SyncAborted",
    "Trainer",
    "TrainingDiverged",
    "WorkerEnvironment",
    "make_plan",
    "steps_per_epoch",
    "worker_environment",
]

__version__ = "0.1.0"
