"""The schedule of one ``fit``: which rounds, in which order, and what is left.

Pure, like :mod:`daskdl.plan` (nothing here knows about Dask).  ``plan.py`` says
which samples each rank trains on in an epoch; this module strings epochs
together:

* a schedule is a list of :class:`Entry` — an epoch's plan, or what is left of an
  epoch after the workers changed — where round ``k`` of an entry has the global
  clock ``entry.start + k``;
* :class:`RoundQueues` hands out each rank's rounds in clock order, keeping at
  most ``ahead`` of them in flight per rank;
* :func:`checkpoint_clocks` says after which clocks a checkpoint is cut;
* :func:`leftover` says what is left of a schedule once every rank has had its
  first ``done[rank]`` rounds merged (after a worker left or joined, or on resume).

Invariant of :class:`RoundQueues` (the hang it prevents: a rank with no round in
flight while the others wait for it in a barrier): after :meth:`RoundQueues.take`,
every rank that still has queued rounds has at least one in flight.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Mapping, Sequence

from .plan import EpochPlan, Segment, make_plan, plan_from_json, plan_from_segments


@dataclass(frozen=True)
class Entry:
    """Rounds ``first .. plan.rounds - 1`` of ``plan``, counted towards epoch
    ``label``; round ``k`` has clock ``start + k``.  ``fresh``: an ordinary plan
    of its epoch (not a remainder)."""

    plan: EpochPlan
    label: int
    start: int
    first: int = 0
    fresh: bool = True

    @property
    def end(self) -> int:
        return self.start + self.plan.rounds


@dataclass(frozen=True)
class PlanArgs:
    """What every epoch plan of a fit depends on besides its epoch and workers."""

    chunks: tuple
    batch_size: int
    every: int
    seed: int


def fresh_entries(args: PlanArgs, n_workers: int, first_label: int, end_label: int,
                  clock: int, owners: Sequence[int] | None = None) -> list[Entry]:
    """Ordinary plans of epochs ``first_label .. end_label - 1`` from ``clock`` on."""
    out = []
    for e in range(first_label, end_label):
        plan = make_plan(args.chunks, n_workers, args.batch_size, args.every, args.seed, e,
                         owners)
        out.append(Entry(plan, e, clock))
        clock += plan.rounds
    return out


def resumed_entries(args: PlanArgs, meta: Mapping, n_workers: int, end_label: int,
                    owners: Sequence[int] | None = None) -> list[Entry]:
    """The schedule that continues from a checkpoint's data position ``meta``
    (``epoch``, ``round``, ``clock``, ``plan_epoch``, ``pieces``): the rest of the
    interrupted epoch — re-cut if the number of workers changed — then fresh epochs."""
    epoch, rnd, clock = int(meta["epoch"]), int(meta["round"]), int(meta["clock"])
    if meta.get("pieces") is None:
        return fresh_entries(args, n_workers, epoch, end_label, clock, owners)
    plan = plan_from_json(meta["pieces"], args.batch_size, args.every, args.seed,
                          int(meta["plan_epoch"]), args.chunks)
    if plan.n_workers == n_workers:
        first = [Entry(plan, epoch, clock - rnd, first=rnd, fresh=False)]
    else:
        segs = [s for r in range(plan.n_workers) for s in plan.remaining(r, rnd)]
        rest = plan_from_segments(segs, n_workers, args.batch_size, args.every, args.seed,
                                  plan.epoch, args.chunks)
        first = [Entry(rest, epoch, clock, fresh=False)] if rest.rounds else []
    nxt = first[-1].end if first else clock
    return first + fresh_entries(args, n_workers, epoch + 1, end_label, nxt, owners)


def checkpoint_clocks(entries: Sequence[Entry], every: int | None) -> dict[int, tuple]:
    """``{K: (entry index, round)}``: a checkpoint is cut when every rank has had its
    first ``K`` rounds merged.  ``every``: each ``every`` clocks and at the end of the
    schedule; ``None``: at the end of every epoch."""
    out = {}
    for i, en in enumerate(entries):
        last = i == len(entries) - 1
        for k in range(en.first + 1, en.plan.rounds + 1):
            K = en.start + k
            epoch_end = k == en.plan.rounds
            if (every and K % every == 0) or (epoch_end and (not every or last)):
                out[K] = (i, k)
    return out


def data_position(entries: Sequence[Entry], where: tuple) -> dict:
    """Where a checkpoint taken after round ``k`` of entry ``i`` (``where = (i, k)``)
    resumes: ``epoch``, ``round``, and the plan of an epoch under way."""
    i, k = where
    en = entries[i]
    if k < en.plan.rounds:
        return {"epoch": en.label, "round": k, "plan_epoch": en.plan.epoch,
                "pieces": en.plan.to_json()}
    return {"epoch": en.label + 1, "round": 0, "plan_epoch": en.label + 1, "pieces": None}


@dataclass(frozen=True)
class Leftover:
    """What :func:`leftover` found: samples left of the epoch under way (``pool``,
    counted towards ``label``), the first epoch not started (``next_label``), and the
    clock every rank continues from."""

    pool: list
    label: int | None
    next_label: int
    clock: int


def leftover(entries: Sequence[Entry], done: Mapping[int, int], default_clock: int,
             end_label: int) -> Leftover:
    """What is left of ``entries`` when rank ``r`` has had ``done[r]`` rounds merged
    (global clocks).  An entry no rank has started (and that is an ordinary plan of
    its epoch) is planned afresh later; an entry under way leaves its unmerged
    samples in the pool."""
    pool: list[Segment] = []
    label = rest_from = None
    for en in entries:
        R = en.plan.rounds
        d = {r: min(max(done.get(r, en.start) - en.start, en.first), R)
             for r in range(en.plan.n_workers)}
        if all(v >= R for v in d.values()):
            continue
        if any(v > en.first for v in d.values()) or not en.fresh:
            for r in range(en.plan.n_workers):
                pool.extend(en.plan.remaining(r, d[r]))
            label = en.label
        else:
            rest_from = en.label
            break
    nxt = label + 1 if label is not None else rest_from
    if nxt is None:
        nxt = max([e.label + 1 for e in entries], default=end_label)
    return Leftover(pool, label, nxt, max(done.values(), default=default_clock))


def merged_rounds(entries: Sequence[Entry], done: Mapping[int, int]):
    """``(rank, entry, round k)`` of every round of ``entries`` with a clock below
    ``done[rank]`` (merged by the plugin)."""
    for rank, d in done.items():
        for en in entries:
            if rank >= en.plan.n_workers:
                continue
            for k in range(en.first, en.plan.rounds):
                if en.start + k < d:
                    yield rank, en, k


def replan(entries: Sequence[Entry], done: Mapping[int, int], args: PlanArgs,
           n_workers: int, default_clock: int, end_label: int,
           owners: Sequence[int] | None = None) -> tuple[list[Entry], Leftover]:
    """The next generation's schedule for ``n_workers``: what is left of the epoch
    under way, cut into equal pieces, then fresh epochs."""
    left = leftover(entries, done, default_clock, end_label)
    out = []
    if left.pool:
        plan = plan_from_segments(left.pool, n_workers, args.batch_size, args.every,
                                  args.seed, left.label, args.chunks)
        if plan.rounds:
            out.append(Entry(plan, left.label, left.clock, fresh=False))
    start = out[-1].end if out else left.clock
    out += fresh_entries(args, n_workers, left.next_label, end_label, start, owners)
    return out, left


class RoundQueues:
    """Each rank's rounds ``(entry index, round, clock)`` in clock order, handed out as
    *tasks* of up to ``per_task`` consecutive rounds, with at most ``ahead`` tasks in
    flight per rank.

    ``take()`` gives the tasks to submit so that every rank has ``ahead`` in flight (or
    all it has left); ``due()`` says whether a top-up is worth a message: some rank
    with rounds left is down to ``low`` tasks in flight.  Call ``due()`` after
    accounting for *every* task that finished, not only the first one: a rank whose
    tasks all finished in one pass must be topped up in that pass (else it ends the
    pass with nothing in flight while the others wait for it).  A task may span an
    epoch boundary, so workers never idle between epochs.
    """

    def __init__(self, entries: Sequence[Entry], n_workers: int, ahead: int,
                 per_task: int = 1):
        self.ahead = max(1, int(ahead))
        self.per_task = max(1, int(per_task))
        self.low = self.ahead // 2
        self.queue = {r: collections.deque() for r in range(n_workers)}
        self.inflight = collections.Counter()  # rank -> tasks in flight
        self.outstanding = collections.Counter()  # label -> rounds queued or in flight
        for i, en in enumerate(entries):
            for k in range(en.first, en.plan.rounds):
                for rank in range(n_workers):
                    self.queue[rank].append((i, k, en.start + k))
                self.outstanding[en.label] += n_workers

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queue.values())

    def empty(self) -> bool:
        return not any(self.queue.values())

    def take(self) -> list[tuple[int, list]]:
        """``(rank, [(entry index, round, clock), ...])`` tasks to submit now, counted
        as in flight."""
        out = []
        for rank, q in self.queue.items():
            while self.inflight[rank] < self.ahead and q:
                rounds = [q.popleft() for _ in range(min(self.per_task, len(q)))]
                out.append((rank, rounds))
                self.inflight[rank] += 1
        return out

    def finished(self, rank: int, labels: Sequence[int]) -> None:
        """A task of ``rank`` finished; ``labels``: the epoch of each of its rounds."""
        self.inflight[rank] -= 1
        for label in labels:
            self.outstanding[label] -= 1

    def due(self) -> bool:
        """True when some rank with rounds left has ``low`` or fewer tasks in flight."""
        return any(q and self.inflight[r] <= self.low for r, q in self.queue.items())

    def starved(self) -> list[int]:
        """Ranks with rounds left and no task in flight (must be empty after ``take``)."""
        return [r for r, q in self.queue.items() if q and self.inflight[r] <= 0]
