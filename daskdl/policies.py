"""Consistency policies: when a worker may go on, and what the global parameters become.

A policy is a :class:`Policy`, a ``NamedTuple`` of plain values and pure functions
in the manner of ``optax.GradientTransformation``.  All its state is a pytree
returned by ``init`` and kept by the scheduler plugin (and saved with it), never
in the object.  A policy is made of two halves:

**barrier** ``barrier(clocks, rank) -> bool``
    ``clocks`` maps each active worker's rank to the number of rounds it has
    finished; worker ``rank`` has just finished round ``clocks[rank] - 1``.  The
    worker may start its next round when this returns True.  It is asked again
    every time a clock changes, so it must depend on ``clocks`` only, and be monotone
    in the rank's own clock: if a rank at clock ``c`` may not go on, no rank at a larger
    clock may (the plugin asks waiting ranks slowest first and stops at the first
    no).  ``slowest(clocks)`` gives the smallest clock in O(1).

**merge** ``merge(state, global_leaves, contributions, info) -> Merged``
    What the global parameters become.  With ``group=True`` it is called once per
    round with the contributions of every active worker (sorted by rank, so the
    result does not depend on arrival order); with ``group=False`` it is called on
    each arrival with that one contribution.  ``Merged.replies`` may give a worker
    its own parameters to continue from (EASGD); every other worker continues from
    the global parameters current when its barrier opens.

A contribution carries the worker's parameters after its local steps
(``sends="params"``) or the change over the round (``sends="delta"``: local params
minus the params the round started from), as flat lists of numpy leaves.

With ``Trainer(sync="sharded")`` the same ``merge`` runs on each shard's owner (a
worker), once per shard: ``global_leaves`` and every contribution's ``leaves`` are
then one raveled piece of every leaf (1-D arrays, in leaf order), and ``state`` is
``init`` of those pieces.  An elementwise merge (every preset; any optax optimizer in
:func:`outer_step`) needs no change and gives the same bits as on the scheduler; a
merge that needs whole leaves or the whole model must run with ``sync="scheduler"``.

Everything here runs without a cluster::

    state = policy.init(leaves)
    merged = policy.merge(state, leaves, [Contribution(0, new_leaves, 128, 0)], SyncInfo(0, (0,)))
    policy.barrier({0: 3, 1: 2}, 0)

The presets are one-line compositions of the building blocks below:

=========================  ===========================  ===============================
preset                     barrier                      merge
=========================  ===========================  ===============================
``BSP(every)``             ``all_arrived``              ``average`` (group)
``SSP(every, staleness)``  ``bounded_staleness(s)``     ``apply_deltas()`` (on arrival)
``Async(every)``           ``no_wait``                  ``apply_deltas(1/(1+staleness))``
``EASGD(every, alpha)``    ``all_arrived``              ``elastic(alpha)`` (group)
``DiLoCo(every, outer)``   ``all_arrived``              ``outer_step(outer)`` (group)
=========================  ===========================  ===============================
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from . import config
from .tree import weighted_mean


class Contribution(NamedTuple):
    """What one worker sends at the end of a round."""

    rank: int
    leaves: Sequence[np.ndarray]  # params or delta, flat (see Policy.sends)
    samples: int  # samples trained on in this round
    version: int  # version of the global params the worker started the round from
    loss: float | None = None  # mean training loss of the round
    state: Sequence[np.ndarray] | None = None  # the model state after the round, flat


class SyncInfo(NamedTuple):
    """What the plugin tells a merge besides the contributions."""

    version: int  # version of the global params before this merge
    members: tuple  # ranks of the active workers


class Merged(NamedTuple):
    """The result of a merge."""

    params: list  # new global leaves (the input list itself when unchanged)
    state: Any
    replies: Mapping[int, list] | None = None  # rank -> leaves that worker continues from


class Policy(NamedTuple):
    """A consistency policy; see the module docstring for the protocol.

    Attributes
    ----------
    name : shown in logs and on the dashboard.
    every : local optimizer steps per round.
    init : ``init(global_leaves) -> state`` (a pytree).
    barrier : ``barrier(clocks, rank) -> bool``.
    merge : ``merge(state, global_leaves, contributions, info) -> Merged``.
    group : merge once per round over all active workers (True) or on each arrival.
    sends : ``"params"`` or ``"delta"``: what a worker's contribution holds.
    """

    name: str
    every: int
    init: Callable[[Sequence[np.ndarray]], Any]
    barrier: Callable[[Mapping[int, int], int], bool]
    merge: Callable[..., Merged]
    group: bool = True
    sends: str = "params"


# -- barriers -----------------------------------------------------------------------------
def slowest(clocks: Mapping[int, int]) -> int:
    """The smallest clock: ``clocks.slowest`` where the mapping keeps it (the scheduler
    plugin's does, in O(1)), else ``min(clocks.values())``."""
    lo = getattr(clocks, "slowest", None)
    return min(clocks.values()) if lo is None else lo


def all_arrived(clocks: Mapping[int, int], rank: int) -> bool:
    """Bulk-synchronous: go on when every active worker has finished this round."""
    return slowest(clocks) >= clocks[rank]


def bounded_staleness(staleness: int) -> Callable[[Mapping[int, int], int], bool]:
    """Stale-synchronous: go on while the slowest worker is at most ``staleness`` rounds behind."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")

    def barrier(clocks, rank):
        return slowest(clocks) >= clocks[rank] - staleness

    return barrier


def no_wait(clocks: Mapping[int, int], rank: int) -> bool:
    """Asynchronous: never wait."""
    return True


def no_state(leaves) -> tuple:
    """``init`` of a policy without state."""
    return ()


# -- merges ---------------------------------------------------------------------------------
def average(state, global_leaves, contributions, info) -> Merged:
    """Group merge: the sample-weighted mean of the workers' parameters."""
    return Merged(weighted_mean([c.leaves for c in contributions],
                                [c.samples for c in contributions]), state)


def apply_deltas(scale: Callable[[int], float] | None = None):
    """On-arrival merge: ``global += scale(staleness) * delta / n_workers``.

    ``staleness`` is the number of global versions since the worker last read the
    parameters.  Each delta counts ``1 / n_workers``: the plan gives every worker the
    same number of samples per round, so this is the sample-weighted share; a round
    of BSP applied this way gives the sample-weighted mean.
    """

    def merge(state, global_leaves, contributions, info):
        out = list(global_leaves)
        for c in contributions:
            s = 1.0 if scale is None else float(scale(info.version - c.version))
            w = s / len(info.members)
            out = [g + np.asarray(w, g.dtype) * d if np.issubdtype(g.dtype, np.floating) else g
                   for g, d in zip(out, c.leaves)]
        return Merged(out, state)

    return merge


def elastic(alpha: float):
    """Group merge of elastic averaging (EASGD).

    ``center += alpha * sum_i (local_i - center)``; worker i continues from
    ``local_i - alpha * (local_i - center)`` (the old center), keeping its own params.
    """

    def merge(state, center, contributions, info):
        new = []
        for j, c0 in enumerate(center):
            if not np.issubdtype(c0.dtype, np.floating):
                new.append(c0)
                continue
            acc = np.zeros_like(c0)
            for c in contributions:
                acc += c.leaves[j] - c0
            new.append(c0 + np.asarray(alpha, c0.dtype) * acc)
        replies = {}
        for c in contributions:
            replies[c.rank] = [
                loc - np.asarray(alpha, loc.dtype) * (loc - c0)
                if np.issubdtype(c0.dtype, np.floating) else loc
                for loc, c0 in zip(c.leaves, center)]
        return Merged(new, state, replies)

    return merge


def outer_step(outer):
    """Group merge of DiLoCo: an optax step of ``outer`` on the mean pseudo-gradient
    ``global - weighted_mean(local_i)``; ``outer=optax.sgd(1.0)`` gives the plain mean."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def step(global_leaves, mean, opt_state):
        grads = [g - m for g, m in zip(global_leaves, mean)]
        updates, opt_state = outer.update(grads, opt_state, global_leaves)
        return optax.apply_updates(global_leaves, updates), opt_state

    def init(leaves):
        return outer.init([jnp.asarray(x) for x in leaves])

    def merge(state, global_leaves, contributions, info):
        mean = weighted_mean([c.leaves for c in contributions],
                             [c.samples for c in contributions])
        new, state = step([jnp.asarray(x) for x in global_leaves],
                          [jnp.asarray(x) for x in mean], state)
        return Merged([np.array(x) for x in new], jax.tree_util.tree_map(np.asarray, state))

    return init, merge


def state_mean(contributions: Sequence[Contribution]) -> list | None:
    """The model state after a merge, whatever the policy: the sample-weighted mean of
    the contributions' states, integer leaves from the lowest rank (``None`` when the
    model has no state).

    Examples
    --------
    >>> c0 = Contribution(0, [], 10, 0, state=[np.array([1.0]), np.array(3)])
    >>> c1 = Contribution(1, [], 30, 0, state=[np.array([5.0]), np.array(7)])
    >>> [x.tolist() for x in state_mean([c1, c0])]
    [[4.0], 3]
    """
    have = sorted((c for c in contributions if c.state is not None), key=lambda c: c.rank)
    if not have:
        return None
    return weighted_mean([c.state for c in have], [c.samples for c in have])


# -- presets ----------------------------------------------------------------------------------
def _every(every) -> int:
    every = int(config.get("every", every))
    if every < 1:
        raise ValueError(f"every must be a positive number of local steps, got {every}")
    return every


def BSP(every: int | None = None) -> Policy:
    """Bulk-synchronous parallel.

    After ``every`` local steps every worker waits for all active workers; the global
    parameters become the sample-weighted mean of theirs, and every worker continues
    from it (keeping its own optimizer state).

    Examples
    --------
    >>> BSP(every=16).every
    16
    """
    return Policy("BSP", _every(every), no_state, all_arrived, average, group=True)


def SSP(every: int | None = None, staleness: int = 2) -> Policy:
    """Stale-synchronous parallel.

    A worker's change over a round is applied to the global parameters when it
    arrives (``1/n_workers`` of it); the worker goes on as soon as the slowest active
    worker is at most ``staleness`` rounds behind it, from the global parameters of
    that moment.  ``SSP(staleness=0)`` behaves as :func:`BSP`.
    """
    return Policy(f"SSP(s={staleness})", _every(every), no_state,
                  bounded_staleness(int(staleness)), apply_deltas(), group=False,
                  sends="delta")


def Async(every: int | None = None, staleness_scale: bool = True) -> Policy:
    """Asynchronous: no barrier; a worker's change is applied on arrival, scaled by
    ``1 / (1 + staleness)`` (versions since it last read) when ``staleness_scale``."""
    scale = (lambda s: 1.0 / (1.0 + s)) if staleness_scale else None
    return Policy("Async", _every(every), no_state, no_wait, apply_deltas(scale),
                  group=False, sends="delta")


def EASGD(every: int | None = None, alpha: float = 0.1) -> Policy:
    """Elastic averaging SGD.

    Bulk-synchronous rounds; ``center += alpha * sum(local - center)`` and each
    worker continues from ``local - alpha * (local - center)``: workers keep their own
    parameters, pulled towards the center.  ``trainer.params`` is the center.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return Policy(f"EASGD(alpha={alpha})", _every(every), no_state, all_arrived,
                  elastic(float(alpha)), group=True)


def DiLoCo(every: int | None = None, outer=None) -> Policy:
    """DiLoCo: bulk-synchronous rounds and an outer optax optimizer.

    The pseudo-gradient ``global - mean(local)`` goes through ``outer`` (default
    ``optax.sgd(0.7, momentum=0.9, nesterov=True)``); workers restart from the new
    global parameters.  ``DiLoCo(outer=optax.sgd(1.0))`` equals :func:`BSP`.
    """
    import optax

    outer = optax.sgd(0.7, momentum=0.9, nesterov=True) if outer is None else outer
    init, merge = outer_step(outer)
    return Policy("DiLoCo", _every(every), init, all_arrived, merge, group=True)


def from_config(spec: Any = None) -> Policy:
    """A policy from a config entry, as the Active Memory Manager loads its policies.

    ``spec`` is a :class:`Policy` (returned as is), a dict such as
    ``{"class": "daskdl.SSP", "staleness": 2}``, or ``None`` to read
    ``daskdl.policy`` from ``dask.config`` (``BSP()`` when unset).  ``class`` is a
    dotted path to a function or class returning a Policy.
    """
    if spec is None:
        spec = config.get("policy")
        if spec is None:
            return BSP()
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, Mapping) or "class" not in spec:
        raise TypeError(
            f"a policy must be a daskdl policy such as daskdl.BSP(every=16) or a config "
            f"entry such as {{'class': 'daskdl.SSP', 'staleness': 2}}; got {spec!r}")
    kwargs = {k.replace("-", "_"): v for k, v in spec.items() if k != "class"}
    path = spec["class"]
    if callable(path):
        factory = path
    else:
        module, _, name = str(path).rpartition(".")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"cannot load the policy class {path!r}: {e}") from None
    policy = factory(**kwargs)
    if not isinstance(policy, Policy):
        raise TypeError(f"{path} returned {type(policy).__name__}, not a daskdl Policy")
    return policy
