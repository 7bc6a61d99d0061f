"""Consistency policies: when a worker may go on, and what the global parameters become.

A policy is a :class:`Policy`, a ``NamedTuple`` of plain values and pure
functions in the manner of ``optax.GradientTransformation``; all its state is
a pytree returned by ``init`` and kept by the scheduler plugin, never in the
object itself.  It is testable without a cluster::

    state = policy.init(global_leaves)
    new_global, state = policy.merge(state, global_leaves, contributions)

``contributions`` is a list of :class:`Contribution` sorted by worker rank, so
a merge is deterministic whatever order the workers arrived in.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import config
from .tree import weighted_mean


class Contribution(NamedTuple):
    """What one worker sends at the end of a round."""

    rank: int
    params: Sequence[np.ndarray]  # flat leaves
    samples: int  # samples trained on in this round
    version: int  # version of the global params the worker started from


class Policy(NamedTuple):
    """A consistency policy.

    Attributes
    ----------
    name : shown in logs and on the dashboard.
    every : local optimizer steps per round.
    init : ``init(global_leaves) -> state``.
    merge : ``merge(state, global_leaves, contributions) -> (new_global_leaves, state)``;
        with ``synchronous`` it is called once per round with every active worker's
        contribution.
    synchronous : workers wait until every active worker has finished the round.
    """

    name: str
    every: int
    init: Callable[[Sequence[np.ndarray]], Any]
    merge: Callable[[Any, Sequence[np.ndarray], Sequence[Contribution]], tuple]
    synchronous: bool = True


def _every(every) -> int:
    every = int(config.get("every", every))
    if every < 1:
        raise ValueError(f"every must be a positive number of local steps, got {every}")
    return every


def average(state, global_leaves, contributions):
    """Merge: the sample-weighted mean of the workers' parameters."""
    return weighted_mean([c.params for c in contributions],
                         [c.samples for c in contributions]), state


def BSP(every: int | None = None) -> Policy:
    """Bulk-synchronous parallel: after ``every`` local steps, every worker waits for
    all active workers; the global parameters become the sample-weighted mean of
    theirs, and every worker continues from it (keeping its own optimizer state).

    Parameters
    ----------
    every : local steps per round; ``None`` reads ``daskdl.every`` from config.

    Examples
    --------
    >>> policy = BSP(every=16)
    >>> policy.every
    16
    """
    return Policy("BSP", _every(every), lambda leaves: (), average, True)
