"""The shard plan: which samples each worker trains on, epoch by epoch.

An epoch's plan is a pure function of ``(chunk sizes, number of workers,
batch_size, every, seed, epoch, owners)``:

1. chunks are ordered locality first: each worker's own chunks (``owners``,
   e.g. where a persisted chunk lives), shuffled, then chunks nobody holds,
   shuffled and dealt to the lightest worker;
2. that order is cut into ``n_workers`` contiguous pieces of exactly
   ``L = n // n_workers`` samples, so every worker takes the same number of
   steps (``L // batch_size``) and a bulk-synchronous barrier never waits for a
   worker that has run out of data;
3. inside a chunk, samples are taken in a permutation drawn from
   ``(seed, epoch, chunk)``, and each round's samples are shuffled again on the
   worker.

Invariant (exactly-once): in an epoch no sample is used twice, and the
samples left out number ``n - n_workers * steps * batch_size``, which is
smaller than ``n_workers * batch_size``.  The order changes every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import DatasetError


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of chunk ``chunk``'s sample permutation."""

    chunk: int
    start: int
    stop: int
    epoch: int = field(default=-1, compare=False)  # whose permutation of the chunk

    def __len__(self):
        return self.stop - self.start


@dataclass
class EpochPlan:
    """What each worker (by rank) trains on in one epoch."""

    epoch: int
    seed: int
    batch_size: int
    every: int
    chunk_sizes: tuple
    pieces: list = field(repr=False)  # per rank: list[Segment]
    steps: int = 0  # optimizer steps per worker in this epoch

    @property
    def n_workers(self) -> int:
        return len(self.pieces)

    @property
    def rounds(self) -> int:
        return math.ceil(self.steps / self.every)

    @property
    def samples(self) -> int:
        """Samples trained on in this epoch, all workers together."""
        return self.steps * self.batch_size * self.n_workers

    def round_steps(self, r: int) -> int:
        """Number of local steps in round ``r``."""
        return min(self.every, self.steps - r * self.every)

    def round_segments(self, rank: int, r: int) -> list[Segment]:
        """The segments worker ``rank`` trains on in round ``r``, in stream order."""
        if not 0 <= r < self.rounds:
            raise IndexError(f"round {r} out of range 0..{self.rounds - 1}")
        lo = r * self.every * self.batch_size
        hi = lo + self.round_steps(r) * self.batch_size
        out, pos = [], 0
        for seg in self.pieces[rank]:
            a, b = pos, pos + len(seg)
            pos = b
            if b <= lo:
                continue
            if a >= hi:
                break
            out.append(Segment(seg.chunk, seg.start + max(lo - a, 0),
                               seg.start + min(hi, b) - a, seg.epoch))
        return out

    def remaining(self, rank: int, from_round: int) -> list[Segment]:
        """Worker ``rank``'s segments from round ``from_round`` to the end of the epoch."""
        out: list[Segment] = []
        for r in range(max(from_round, 0), self.rounds):
            out.extend(self.round_segments(rank, r))
        return out

    def to_json(self) -> list:
        """The pieces as plain lists ``[chunk, start, stop, epoch]`` per rank."""
        return [[[s.chunk, s.start, s.stop, s.epoch] for s in piece] for piece in self.pieces]


def make_plan(chunk_sizes: Sequence[int], n_workers: int, batch_size: int,
              every: int, seed: int, epoch: int,
              owners: Sequence[int] | None = None) -> EpochPlan:
    """Build the plan of one epoch; see the module docstring for the rules.

    Parameters
    ----------
    chunk_sizes : samples in each chunk along axis 0.
    n_workers : number of workers (ranks ``0 .. n_workers - 1``).
    batch_size : samples per optimizer step on each worker.
    every : local steps per round.
    seed, epoch : the plan is a pure function of these (and the rest).
    owners : optional rank holding each chunk (``-1`` for none): locality first.
    """
    chunk_sizes = tuple(int(c) for c in chunk_sizes)
    n = sum(chunk_sizes)
    if n_workers < 1:
        raise ValueError("a plan needs at least one worker")
    if n == 0:
        raise DatasetError("the dataset has zero samples; there is nothing to train on.")
    share = n // n_workers
    if batch_size > share:
        raise DatasetError(
            f"batch_size={batch_size} is larger than each worker's share of the data "
            f"({n} samples / {n_workers} workers = {share}). batch_size is per worker: "
            f"use batch_size <= {share}, fewer workers, or more data."
        )
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if owners is None:
        owners = [-1] * len(chunk_sizes)
    per_rank: list[list[int]] = [[] for _ in range(n_workers)]
    for c, o in enumerate(owners):
        if 0 <= o < n_workers:
            per_rank[o].append(c)
    for lst in per_rank:
        rng.shuffle(lst)
    loads = [sum(chunk_sizes[c] for c in lst) for lst in per_rank]
    free = [c for c, o in enumerate(owners) if not 0 <= o < n_workers]
    rng.shuffle(free)
    for c in free:
        w = int(np.argmin(loads))
        per_rank[w].append(c)
        loads[w] += chunk_sizes[c]
    order = [c for lst in per_rank for c in lst]

    pieces: list[list[Segment]] = [[] for _ in range(n_workers)]
    rank, room = 0, share
    for c in order:
        start, size = 0, chunk_sizes[c]
        while start < size and rank < n_workers:
            take = min(room, size - start)
            if take:
                pieces[rank].append(Segment(c, start, start + take, epoch))
            start += take
            room -= take
            if room == 0:
                rank, room = rank + 1, share
    return EpochPlan(epoch=epoch, seed=seed, batch_size=batch_size, every=every,
                     chunk_sizes=chunk_sizes, pieces=pieces, steps=share // batch_size)


def steps_per_epoch(dataset, n_workers: int, batch_size: int) -> int:
    """Optimizer steps each worker takes per epoch of ``dataset`` (a
    :class:`~daskdl.Dataset` or its chunk sizes) with ``n_workers`` workers and
    ``batch_size`` samples per step on each: ``(n // n_workers) // batch_size``.

    daskdl's optimizer step counters count global steps (a joining worker starts
    from the global count), so a schedule decaying over a whole ``fit`` uses
    ``decay_steps = epochs * steps_per_epoch(...)``.

    Examples
    --------
    >>> steps_per_epoch([100, 100, 37], n_workers=2, batch_size=16)
    7
    """
    chunks = getattr(dataset, "chunks", dataset)
    return (sum(int(c) for c in chunks) // int(n_workers)) // int(batch_size)


def chunk_permutation(seed: int, epoch: int, chunk: int, size: int) -> np.ndarray:
    """The order in which chunk ``chunk``'s samples are taken in ``epoch``."""
    return np.random.default_rng([seed, epoch, chunk]).permutation(size)


def round_permutation(seed: int, epoch: int, rank: int, r: int, size: int) -> np.ndarray:
    """The shuffle of one round's samples on worker ``rank``."""
    return np.random.default_rng([seed, epoch, rank, r, 0xB47C]).permutation(size)


def plan_from_segments(segments: Sequence[Segment], n_workers: int, batch_size: int,
                       every: int, seed: int, epoch: int,
                       chunk_sizes: Sequence[int] = ()) -> EpochPlan:
    """A plan over given segments (what is left of an epoch when the workers change).

    The segments, in order, are cut into ``n_workers`` pieces of equal length, a
    multiple of ``batch_size`` steps; fewer than ``n_workers * batch_size`` samples
    may be left out, as in :func:`make_plan`.  Each segment keeps its epoch (the
    permutation it is drawn from).
    """
    if n_workers < 1:
        raise ValueError("a plan needs at least one worker")
    total = sum(len(s) for s in segments)
    share = total // n_workers
    steps = share // batch_size
    share = steps * batch_size
    pieces: list[list[Segment]] = [[] for _ in range(n_workers)]
    rank, room = 0, share
    for seg in segments if share else ():
        start = seg.start
        while start < seg.stop and rank < n_workers:
            take = min(room, seg.stop - start)
            if take:
                pieces[rank].append(Segment(seg.chunk, start, start + take, seg.epoch))
            start += take
            room -= take
            if room == 0:
                rank, room = rank + 1, share
    return EpochPlan(epoch=epoch, seed=seed, batch_size=batch_size, every=every,
                     chunk_sizes=tuple(chunk_sizes), pieces=pieces, steps=steps)


def plan_from_json(pieces: list, batch_size: int, every: int, seed: int, epoch: int,
                   chunk_sizes: Sequence[int] = ()) -> EpochPlan:
    """The inverse of :meth:`EpochPlan.to_json` (a plan read back from a checkpoint)."""
    segs = [[Segment(int(c), int(a), int(b), int(e)) for c, a, b, e in piece]
            for piece in pieces]
    share = sum(len(s) for s in segs[0]) if segs else 0
    return EpochPlan(epoch=epoch, seed=seed, batch_size=batch_size, every=every,
                     chunk_sizes=tuple(chunk_sizes), pieces=segs, steps=share // batch_size)
