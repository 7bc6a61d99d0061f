"""Sharded synchronisation: the parameters split into shards, each owned by a worker.

With ``sync="sharded"`` the scheduler plugin never holds parameter bytes.  Each
generation's members own one shard each: shard ``j`` is, for every leaf of the
flat parameter list, the ``j``-th of ``n`` contiguous pieces of the raveled leaf
(:class:`ShardMap`; pieces differ by at most one element, so every owner holds
``1/n`` of the model).  A round (see :mod:`daskdl.replica`):

1. a worker sends piece ``j`` of its contribution to owner ``j`` (reduce-scatter),
   worker to worker, and at the same time tells the scheduler plugin it arrived (a
   few numbers);
2. the plugin's barrier decides as on the scheduler path and logs each merge as a
   :class:`MergeEntry` (which contributions, in which order, the new version);
3. a worker released gathers the shards of that version from their owners
   (all-gather); an owner applies the logged merges it has not applied yet, in
   version order, with the policy's own ``merge`` over its shard
   (:meth:`Owner.catch_up`, once a piece still on its way came): a list of
   flat arrays, so elementwise policies run unchanged and give the same bits as on
   the scheduler path.

Everything here is plain Python and numpy (no Dask): the worker handlers in
:mod:`daskdl.replica` call it.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Sequence

import numpy as np

from .errors import DaskDLError
from .policies import Contribution, Merged, Policy, SyncInfo
from .protocol import ProtocolError
from .tree import aligned_empty

SYNC_MODES = ("auto", "scheduler", "sharded")
# sync="auto" shards models of at least this many bytes: from 2 MB sharded was never
# slower than the scheduler path with 2 or 4 workers (docs/benchmarks.md, "Where
# sync='auto' cuts over"); at 1 MB with 4 workers it was
AUTO_SHARDED_BYTES = 2 * 2**20


def check_sync(sync) -> str:
    """``sync`` if it is one of :data:`SYNC_MODES`; ValueError otherwise."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(map(repr, SYNC_MODES))}, got "
                         f"{sync!r}: 'scheduler' sends every parameter through the scheduler "
                         "plugin, 'sharded' exchanges shards between workers, 'auto' picks "
                         f"'sharded' for models of {AUTO_SHARDED_BYTES // 2**20} MiB or more")
    return sync


def choose_sync(sync: str, nbytes: int) -> str:
    """The mode ``sync`` means for a model of ``nbytes`` bytes ("auto" decided)."""
    if check_sync(sync) != "auto":
        return sync
    return "sharded" if nbytes >= AUTO_SHARDED_BYTES else "scheduler"


class Spec(NamedTuple):
    """Shape and dtype of one leaf (what the scheduler keeps instead of its bytes)."""

    shape: tuple
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def specs_of(leaves: Sequence) -> list[Spec]:
    return [Spec(tuple(np.shape(x)), np.asarray(x).dtype) for x in leaves]


class ShardMap:
    """Which piece of every leaf shard ``j`` holds, for ``n`` shards.

    >>> m = ShardMap([Spec((5,), np.dtype("float32")), Spec((2, 2), np.dtype("float32"))], 2)
    >>> [p.tolist() for p in m.pieces([np.arange(5.0), np.ones((2, 2))], 1)]
    [[3.0, 4.0], [1.0, 1.0]]
    """

    def __init__(self, specs: Sequence[Spec], n: int):
        if n < 1:
            raise ValueError("a shard map needs at least one shard")
        self.specs, self.n = list(specs), int(n)
        # bounds[i][j]: where piece j of leaf i starts (np.array_split's boundaries)
        self.bounds = []
        for s in self.specs:
            q, r = divmod(s.size, self.n)
            sizes = [q + 1] * r + [q] * (self.n - r)
            self.bounds.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        # asked for on every put, push and shard request: computed once
        self._piece_specs = [[Spec((int(b[j + 1] - b[j]),), s.dtype)
                              for s, b in zip(self.specs, self.bounds)] for j in range(self.n)]
        self._nbytes = [sum(s.nbytes for s in ps) for ps in self._piece_specs]

    def piece_specs(self, j: int) -> list[Spec]:
        return list(self._piece_specs[j])

    def pieces(self, leaves: Sequence, j: int) -> list[np.ndarray]:
        """Shard ``j`` of ``leaves``: views of the raveled leaves (no copy when
        contiguous)."""
        return [np.ravel(np.asarray(x))[b[j]:b[j + 1]] for x, b in zip(leaves, self.bounds)]

    def assemble(self, shards: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """The leaves from their ``n`` shards (in shard order)."""
        out = []
        for i, s in enumerate(self.specs):
            flat = aligned_empty(s.size, s.dtype)
            for j in range(self.n):
                flat[self.bounds[i][j]:self.bounds[i][j + 1]] = shards[j][i]
            out.append(flat.reshape(s.shape))
        return out

    def nbytes(self, j: int) -> int:
        return self._nbytes[j]


def check_pieces(pieces, specs: Sequence[Spec], what: str, finite: bool = True) -> None:
    """ProtocolError unless ``pieces`` are numpy arrays shaped and typed as ``specs``
    (and finite, when ``finite``)."""
    if not isinstance(pieces, (list, tuple)) or len(pieces) != len(specs):
        raise ProtocolError(f"{what} must be a list of {len(specs)} arrays")
    for i, (p, s) in enumerate(zip(pieces, specs)):
        if not isinstance(p, np.ndarray) or p.shape != s.shape or p.dtype != s.dtype:
            got = f"{p.dtype}{list(p.shape)}" if isinstance(p, np.ndarray) else type(p).__name__
            raise ProtocolError(f"{what}: piece {i} is {got}, expected "
                                f"{s.dtype}{list(s.shape)}")
        if finite and _floating(p.dtype) and not np.isfinite(p).all():
            raise ProtocolError(f"{what}: piece {i} holds NaN or infinite values")


def _floating(dtype) -> bool:
    """Floating point, bfloat16 included (numpy's issubdtype says no to it)."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.inexact))


class MergeEntry(NamedTuple):
    """One merge the scheduler plugin decided: version ``version`` of the parameters
    is version ``version - 1`` merged with ``contributions`` (``(rank, clock, samples,
    version, loss)`` each, in the order the policy sees them) under ``members``.
    ``pin``: a checkpoint is cut at this version (owners keep it until fetched)."""

    version: int
    contributions: tuple
    members: tuple
    pin: bool = False

    def to_msg(self) -> list:
        return [self.version, [list(c) for c in self.contributions], list(self.members),
                self.pin]

    @classmethod
    def from_msg(cls, m) -> "MergeEntry":
        try:
            version, contributions, members, pin = m
            return cls(int(version),
                       tuple((int(r), int(c), int(s), int(v), None if loss is None
                              else float(loss)) for r, c, s, v, loss in contributions),
                       tuple(int(x) for x in members), bool(pin))
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"a merge entry could not be parsed ({e})") from None


def entries_field(v, limit: int = 100_000) -> list[MergeEntry]:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)) or len(v) > limit:
        raise ProtocolError(f"field 'merges' must be a list of at most {limit} entries")
    return [MergeEntry.from_msg(m) for m in v]


def split_state(state, specs: Sequence[Spec], shard_map: ShardMap, j: int):
    """Shard ``j`` of a policy state made by ``policy.init`` of the whole leaves.

    Optax-style states hold, in order, lists shaped like the parameters (momentum,
    second moments) and scalars (counts): the ``k``-th array leaf that is not a
    scalar mirrors parameter ``k mod len(specs)`` and is cut like it; scalars stay
    whole.  The inverse of :func:`join_states`."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(state)
    out, k = [], 0
    for x in leaves:
        a = np.asarray(x)
        if a.ndim == 0:
            out.append(a)
            continue
        i = k % len(specs)
        k += 1
        if a.size != specs[i].size:
            raise DaskDLError(f"the policy state's leaf {a.dtype}{list(a.shape)} does not "
                              f"mirror parameter {i} ({specs[i].dtype}{list(specs[i].shape)}); "
                              "a sharded policy state must be elementwise over the params")
        b = shard_map.bounds[i]
        out.append(np.ravel(a)[b[j]:b[j + 1]].copy())
    return jax.tree_util.tree_unflatten(treedef, out)


def join_states(states: Sequence, specs: Sequence[Spec]):
    """The whole policy state from its shards' (see :func:`split_state`)."""
    import jax

    flats = [jax.tree_util.tree_leaves(s) for s in states]
    treedef = jax.tree_util.tree_structure(states[0])
    out, k = [], 0
    for i, first in enumerate(flats[0]):
        first = np.asarray(first)
        if first.ndim == 0:
            out.append(first)
            continue
        spec = specs[k % len(specs)]
        k += 1
        out.append(np.concatenate([np.ravel(f[i]) for f in flats]).reshape(spec.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


class Owner:
    """The owner of shard ``j`` on a worker, for one generation of one run.

    It holds the shard of the global parameters at ``version``, its piece of the
    policy state, the pieces of contributions sent to it and not merged yet, and
    the policy's replies to each rank (EASGD).  Thread-safe: the worker's event loop
    stores pieces, merges run in a thread (or on the loop, for small shards).  A
    worker sends its pieces and tells the plugin it arrived at the same time, so a
    merge the plugin logged may reach an owner before one of its pieces: the
    exchange waits until :meth:`missing` is empty before :meth:`catch_up`.

    Under a group policy (BSP, EASGD, DiLoCo) the plugin merges every member's
    update of a round, in rank order: once an owner holds every member's piece of a
    round it computes that merge ahead (:meth:`speculate`) and the exchange pushes
    the result to the members, so they need not ask for it.  The plugin stays the
    authority: the merge ahead is kept apart and becomes the shard only when the
    plugin's own entry for that version is the same merge (:meth:`_apply`); a
    member takes a pushed shard only under the same condition.
    """

    def __init__(self, policy: Policy, gen: int, j: int, shard: list, version: int,
                 specs: Sequence[Spec], policy_state=None, decode=None):
        self.policy, self.gen, self.j = policy, gen, j
        self.shard, self.version = list(shard), int(version)
        self.specs = list(specs)  # of the pieces
        self.nbytes = sum(s.nbytes for s in self.specs)
        self.state = policy.init(self.shard) if policy_state is None else policy_state
        self.pending: dict[tuple, tuple] = {}  # (rank, clock) -> (pieces, delta?)
        self.meta: dict[tuple, tuple] = {}  # (rank, clock) -> (samples, version, loss)
        self.ahead: tuple | None = None  # (entry, shard, state, replies): see speculate
        self.refused: dict[tuple, str] = {}  # (rank, clock) -> why its piece was refused
        self.replies: dict[int, list] = {}  # rank -> pieces it continues from
        self.pinned: dict[int, tuple] = {}  # version -> (shard, state, replies)
        self.decode = decode  # decodes compressed pieces (daskdl.compression.decompress)
        self.lock = threading.Lock()
        self.retired = False
        self.merge_s = 0.0

    def __repr__(self) -> str:
        return f"<Owner of shard {self.j}, generation {self.gen}, version {self.version}>"

    def put(self, rank: int, clock: int, pieces: list, delta: bool,
            meta: tuple | None = None) -> None:
        """A contribution's piece (already checked); ``meta``: its ``(samples,
        version, loss)`` as the sender told the plugin (for :meth:`speculate`)."""
        with self.lock:
            if (rank, clock) in self.pending and self.ahead is not None and any(
                    (r, c) == (rank, clock) for r, c, *_ in self.ahead[0].contributions):
                self.ahead = None  # merged ahead from the piece this one replaces
            self.pending[(rank, clock)] = (pieces, delta)
            self.meta.pop((rank, clock), None)
            if meta is not None:
                self.meta[(rank, clock)] = meta

    def refuse(self, rank: int, clock: int, why: str) -> None:
        """The piece of ``rank`` after round ``clock`` was refused: a merge that needs
        it fails at once instead of waiting for it."""
        with self.lock:
            self.refused[(rank, clock)] = why

    def retire(self) -> None:
        """A new generation took over: merges still waiting for pieces give up."""
        with self.lock:
            self.retired = True

    def base(self, rank: int) -> list:
        """What ``rank`` started its round from on this shard."""
        return self.replies.get(rank, self.shard)

    def _todo(self, entries: Sequence[MergeEntry], upto: int) -> list[MergeEntry]:
        return sorted((e for e in entries if self.version < e.version <= upto),
                      key=lambda e: e.version)

    def missing(self, entries: Sequence[MergeEntry], upto: int) -> list[tuple]:
        """The ``(rank, clock)`` of the pieces the merges up to ``upto`` need and that
        are not here yet; DaskDLError when one of them was refused, or this owner
        retired while pieces are missing (they will never come)."""
        with self.lock:
            out = [(c[0], c[1]) for e in self._todo(entries, upto) for c in e.contributions
                   if (c[0], c[1]) not in self.pending]
            for key in out:
                if key in self.refused:
                    raise DaskDLError(f"shard {self.j}: the update of rank {key[0]} after "
                                      f"round {key[1]} was refused: {self.refused[key]}")
            if out and self.retired:
                raise DaskDLError(f"shard {self.j}: the update of rank {out[0][0]} after "
                                  f"round {out[0][1]} never came (a new generation started)")
            return out

    def catch_up(self, entries: Sequence[MergeEntry], upto: int) -> None:
        """Apply the merges of ``entries`` after :attr:`version`, up to ``upto``, in
        version order (see :meth:`missing` to wait for their pieces first).
        DaskDLError when a merge or a piece is missing, or a piece was refused."""
        with self.lock:
            for e in self._todo(entries, upto):
                if e.version != self.version + 1:
                    raise DaskDLError(f"shard {self.j} is at version {self.version}; merge "
                                      f"{e.version} cannot be applied before "
                                      f"{self.version + 1}")
                for r, c, *_ in e.contributions:
                    if (r, c) in self.refused:
                        raise DaskDLError(f"shard {self.j}: the update of rank {r} after "
                                          f"round {c} was refused: {self.refused[(r, c)]}")
                    if (r, c) not in self.pending:
                        raise DaskDLError(f"shard {self.j}: the update of rank {r} after "
                                          f"round {c} never came")
                self._apply(e)

    def _apply(self, e: MergeEntry) -> None:
        """Merge ``e`` (every piece here; the lock held): the merge computed ahead
        when it is the same one, else the policy's merge now."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and same_merge(ahead[0], e):
            shard, state, replies = ahead[1:]
        else:
            shard, state, replies = self._merged(e)
        for key in ((r, c) for r, c, *_ in e.contributions):
            self.pending.pop(key, None)
            self.meta.pop(key, None)
        if self.policy.group and e.contributions:
            # lockstep: a piece of an earlier round left out of its merge (its update
            # was rejected) is never merged later; drop it rather than keep it
            first = min(c for _, c, *_ in e.contributions)
            for d in (self.pending, self.meta, self.refused):
                for key in [k for k in d if k[1] < first]:
                    del d[key]
        self.shard, self.state = shard, state
        self.replies.update(replies)
        self.version = e.version
        if e.pin:
            self.pinned[e.version] = (self.shard, self.state, dict(self.replies))

    def _merged(self, e: MergeEntry) -> tuple:
        """``(shard, policy state, replies)`` after merge ``e`` of the pieces here,
        this owner unchanged (the lock held)."""
        import time

        t0 = time.perf_counter()
        contributions = []
        for rank, clock, samples, version, loss in e.contributions:
            pieces, delta = self.pending[(rank, clock)]
            if self.decode is not None:
                pieces = self.decode(pieces)
            if delta and self.policy.sends == "params":
                pieces = [b + d if _floating(b.dtype) else d
                          for b, d in zip(self.base(rank), pieces)]
            contributions.append(Contribution(rank, pieces, samples, version, loss))
        merged = Merged(*self.policy.merge(self.state, self.shard, contributions,
                                           SyncInfo(self.version, e.members)))
        check_shapes(merged.params, self.specs, f"merge result of {self.policy.name}")
        replies = {}
        for r, rep in (merged.replies or {}).items():
            check_shapes(rep, self.specs, f"{self.policy.name} reply to rank {r}")
            replies[int(r)] = list(rep)
        self.merge_s += time.perf_counter() - t0
        return list(merged.params), merged.state, replies

    def speculate(self, clock: int, members: Sequence[int]) -> tuple | None:
        """Under a group policy, the merge of round ``clock`` computed ahead once the
        pieces of every rank of ``members`` are here: ``(entry, shard, replies)``
        (what :meth:`get` will answer each rank: its reply where it has one, else the
        shard), or ``None``.  The entry is what the plugin logs when every member's
        update is merged (ranks in order, each with the samples, version and loss it
        told the plugin); the result becomes the shard only if the plugin's entry is
        the same (see :meth:`_apply`)."""
        if not self.policy.group:
            return None
        with self.lock:
            keys = [(r, clock) for r in sorted(members)]
            if self.retired or (self.ahead is not None and
                                self.ahead[0].version == self.version + 1):
                return None
            if any(k not in self.pending or k not in self.meta for k in keys):
                return None
            entry = MergeEntry(self.version + 1,
                               tuple((r, c, *self.meta[(r, c)]) for r, c in keys),
                               tuple(sorted(members)))
            try:
                shard, state, replies = self._merged(entry)
            except Exception:  # noqa: BLE001  (the merge the plugin asks for will say why)
                return None
            self.ahead = (entry, shard, state, replies)
            return entry, shard, {**self.replies, **replies}

    def get(self, rank: int | None) -> tuple[list, int]:
        """The pieces ``rank`` continues from (its reply, or the shard) and the
        version."""
        with self.lock:
            if rank is not None and rank in self.replies:
                return self.replies[rank], self.version
            return self.shard, self.version

    def take_pinned(self, version: int) -> tuple | None:
        """The shard, state and replies kept at ``version`` (older pins are dropped:
        their checkpoints were skipped)."""
        with self.lock:
            for v in [v for v in self.pinned if v < version]:
                del self.pinned[v]
            return self.pinned.pop(version, None)


def same_merge(a: MergeEntry, b: MergeEntry) -> bool:
    """Whether two merge entries merge the same contributions into the same version
    (a checkpoint pin aside)."""
    return (a.version == b.version and a.members == b.members
            and a.contributions == b.contributions)


def check_shapes(pieces, specs: Sequence[Spec], what: str) -> None:
    if len(pieces) != len(specs) or any(np.shape(p) != s.shape or np.asarray(p).dtype != s.dtype
                                        for p, s in zip(pieces, specs)):
        raise DaskDLError(f"{what} is not shaped like the shard it merges")


__all__ = ["SYNC_MODES", "AUTO_SHARDED_BYTES", "check_sync", "choose_sync", "Spec",
           "specs_of", "ShardMap", "check_pieces", "MergeEntry", "entries_field",
           "split_state", "join_states", "Owner", "same_merge"]

