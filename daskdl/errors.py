"""Public exceptions of daskdl; each message says what to do."""

from __future__ import annotations


class DaskDLError(Exception):
    """Base class of the errors daskdl raises itself."""


class TrainingDiverged(DaskDLError, FloatingPointError):
    """The loss or the parameters became NaN or infinite on a worker.

    ``trainer.params`` keeps the last finite global parameters.  Lower the
    learning rate, clip gradients (``optax.clip_by_global_norm``) or check the
    input data for NaNs.

    Attributes
    ----------
    worker, epoch, round : where it happened.
    """

    def __init__(self, worker: str, epoch: int, round: int, detail: str = ""):
        self.worker = worker
        self.epoch = epoch
        self.round = round
        self.detail = detail
        msg = (
            f"training diverged on worker {worker} in epoch {epoch}, round {round}"
            f"{': ' + detail if detail else ''}. The global parameters were kept at "
            "their last finite version (trainer.params). Lower the learning rate, "
            "clip gradients with optax.clip_by_global_norm, or check the data for NaNs."
        )
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self.worker, self.epoch, self.round, self.detail))


class SyncAborted(DaskDLError, RuntimeError):
    """A round was stopped because its training run was aborted (another round failed,
    a barrier timed out, or the run was cancelled)."""


class DatasetError(DaskDLError, ValueError):
    """A dataset is malformed: lengths, dtypes, chunks or names do not fit."""


class RoundDiscarded(DaskDLError):
    """A round was trained but not merged because the workers changed while it ran;
    its samples are trained again under the new plan.  Internal: ``fit`` handles it."""
