"""Who trains in a run: generations, ranks, clocks, and the workers that left.

Ranks ``0..W-1`` of a generation are fixed.  A worker that leaves the cluster, that
Dask pauses for memory, or that sends nothing for ``daskdl.sync-timeout`` while
others wait is *dropped*: taken out of the barriers at once and recorded in
``lost`` with a :class:`~daskdl.protocol.LeaveReason`.  The client then freezes the
generation (rounds not merged yet are discarded) and starts the next one with the
workers present (*regroup*).  Every change is published to the run's client as a
:class:`~daskdl.protocol.MemberEvent` on :func:`~daskdl.protocol.event_topic`.
"""

from __future__ import annotations

import collections

from .. import protocol
from ..protocol import LeaveReason, MemberEvent


class Membership:
    """The current generation of one run.

    Attributes
    ----------
    gen : int
        Generation number, 0 for the first.
    frozen : bool
        True between a freeze and the next regroup: no round is merged.
    members : dict
        ``rank -> worker address`` of the generation's workers still present.
    clocks : dict
        ``rank -> rounds`` the rank has sent (the clock of its next sync).
    done : dict
        ``rank -> rounds`` of the rank that were merged (lost ranks too).
    lost : dict
        ``rank -> {"address", "done", "reason", "detail"}`` of ranks dropped in this
        generation; ``reason`` is a :class:`~daskdl.protocol.LeaveReason` value.
    """

    def __init__(self, members: dict[int, str], clock: int):
        self.gen = 0
        self._begin(members, clock)

    def _begin(self, members: dict[int, str], clock: int) -> None:
        self.frozen = False
        self.start_clock = clock
        self.members = dict(members)
        self.clocks = Clocks({rank: clock for rank in members})
        self.done = {rank: clock for rank in members}
        self.lost: dict[int, dict] = {}

    def regroup(self, members: dict[int, str], clock: int) -> int:
        """Start the next generation: every rank of ``members`` at ``clock``."""
        self.gen += 1
        self._begin(members, clock)
        return self.gen

    def freeze(self) -> dict:
        """End the generation; return its ``done``, ``lost`` and ``members``."""
        self.frozen = True
        return {"done": dict(self.done), "lost": {r: dict(v) for r, v in self.lost.items()},
                "members": dict(self.members)}

    def current(self, gen: int, rank: int) -> bool:
        """Whether a round of generation ``gen`` from ``rank`` may still be merged."""
        return not self.frozen and gen == self.gen and rank in self.members

    def ranks_at(self, address: str) -> list[int]:
        """Ranks the worker at ``address`` holds in this generation."""
        return [rank for rank, a in self.members.items() if a == address]

    def drop(self, rank: int, reason: LeaveReason, detail: str) -> str | None:
        """Take ``rank`` out of the generation; return its address (``None`` if it was
        no member)."""
        address = self.members.pop(rank, None)
        if address is None:
            return None
        self.clocks.pop(rank, None)
        self.lost[rank] = {"address": address, "done": self.done.get(rank, 0),
                           "reason": reason.value, "detail": detail}
        return address


def publish(scheduler, run: str, event: MemberEvent) -> None:
    """Tell the client of ``run`` that membership changed (a scheduler event)."""
    if scheduler is not None:
        scheduler.log_event(protocol.event_topic(run), event.to_msg(run))


class Clocks(dict):
    """``rank -> rounds sent``, keeping ``slowest`` (the smallest clock) in O(1) per
    change: clocks move up by one at a time, so few distinct values exist at once."""

    def __init__(self, items=()):
        super().__init__(items)
        self._count = collections.Counter(self.values())

    @property
    def slowest(self) -> int:
        return min(self._count) if self._count else 0

    def __setitem__(self, rank, clock) -> None:
        old = self.get(rank)
        if old is not None:
            self._uncount(old)
        super().__setitem__(rank, clock)
        self._count[clock] += 1

    def _uncount(self, clock) -> None:
        self._count[clock] -= 1
        if not self._count[clock]:
            del self._count[clock]

    def pop(self, rank, *default):
        if rank in self:
            self._uncount(self[rank])
        return super().pop(rank, *default)
