"""Barriers: workers waiting after a round, group merges waiting for their members.

A worker's sync waits on an :class:`asyncio.Event` of the scheduler's event loop
until the policy's ``barrier(clocks, rank)`` lets it go on (:meth:`Barrier.release`).
The wait has two stages of ``daskdl.sync-timeout`` each: after the first, the workers
waited for count as silent and are dropped (the caller's ``on_silent``); after the
second the caller aborts the run, so that a failing worker never leaves the others
blocked.  Under a group policy (BSP, SSP, EASGD, DiLoCo) the contributions of one
round wait in :attr:`Barrier.pending` until every member's arrived or was rejected.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Awaitable, Callable, Iterable

from ..policies import Contribution, Policy


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    if event.is_set():  # the last arrival of a merge: released already
        return True
    try:
        if hasattr(asyncio, "timeout"):  # Python >= 3.11: no task per wait (wait_for's)
            async with asyncio.timeout(timeout):
                await event.wait()
        else:
            await asyncio.wait_for(event.wait(), timeout)
        return True
    except (TimeoutError, asyncio.TimeoutError):
        return False


class Barrier:
    """The waiting workers and pending group merges of one run.

    Attributes
    ----------
    waiting : dict
        ``rank -> asyncio.Event`` set when the rank may go on.
    pending : dict
        Group merges: ``clock -> rank -> Contribution`` arrived for that round.
    skipped : dict
        Group merges: ``clock -> ranks`` whose update for that round was rejected.
    """

    def __init__(self):
        self.waiting: dict[int, asyncio.Event] = {}
        self._queue: list[tuple[int, int, asyncio.Event]] = []  # (clock, rank, event)
        self.pending: dict[int, dict[int, Contribution]] = {}
        self.skipped: dict[int, set] = {}

    def add(self, clock: int, contribution: Contribution) -> None:
        """A rank's contribution to the group merge of round ``clock``."""
        self.pending.setdefault(clock, {})[contribution.rank] = contribution

    def skip(self, clock: int, rank: int) -> None:
        """The rank's update for round ``clock`` was rejected: the group merge goes on
        without it."""
        self.skipped.setdefault(clock, set()).add(rank)

    def forget(self, rank: int) -> list[int]:
        """Drop a lost rank's pending contributions; return the rounds to re-check."""
        for group in self.pending.values():
            group.pop(rank, None)
        return sorted(self.pending)

    def complete(self, clock: int, members: Iterable[int]) -> list[Contribution] | None:
        """The contributions of round ``clock``, taken out, once every member's arrived
        or was rejected; ``None`` while some are missing (or nobody is left)."""
        members = set(members)
        arrived = set(self.pending.get(clock, {})) | self.skipped.get(clock, set())
        if not members or not arrived >= members:
            return None
        self.skipped.pop(clock, None)
        return sorted(self.pending.pop(clock, {}).values(), key=lambda c: c.rank)

    def is_waiting(self, rank: int) -> bool:
        return rank in self.waiting

    def enter(self, rank: int, clock: int) -> asyncio.Event:
        """Register ``rank``, now at ``clock``, as waiting (before :meth:`release` and
        :meth:`wait`)."""
        event = self.waiting[rank] = asyncio.Event()
        heapq.heappush(self._queue, (clock, rank, event))
        return event

    def release(self, policy: Policy, clocks: dict[int, int]) -> list[tuple[int, int]]:
        """Open the barrier of the waiting ranks the policy lets go on; return
        ``(rank, clock)`` of the ranks released.

        Waiting ranks are asked slowest first, and the first one that may not go on
        ends the pass (barriers are monotone in the rank's own clock, see
        :class:`~daskdl.policies.Policy`): O(log N) per arrival plus the ranks
        released, not O(N) policy calls.
        """
        released = []
        q = self._queue
        while q:
            clock, rank, event = q[0]
            if event.is_set() or self.waiting.get(rank) is not event or rank not in clocks:
                heapq.heappop(q)  # released, timed out or dropped meanwhile
                continue
            if not policy.barrier(clocks, rank):
                break
            heapq.heappop(q)
            released.append((rank, clocks[rank]))
            event.set()
        return released

    async def wait(self, rank: int, event: asyncio.Event, timeout: float,
                   on_silent: Callable[[], Awaitable[None]]) -> bool:
        """Wait for ``event`` in two stages of ``timeout``; ``on_silent`` runs between
        them.  Return False when the second stage timed out too."""
        try:
            if await _wait(event, timeout):
                return True
            await on_silent()
            return event.is_set() or await _wait(event, timeout)
        finally:
            self.waiting.pop(rank, None)

    async def join(self, rank: int, timeout: float) -> bool:
        """Wait with the sync of ``rank`` that waits already (a copy of it was sent
        again); True at once when none waits."""
        event = self.waiting.get(rank)
        return True if event is None else await _wait(event, timeout)

    def open_all(self) -> None:
        """Let every waiting rank go on (the run froze or aborted)."""
        for event in self.waiting.values():
            event.set()
        self._queue.clear()

    def clear(self) -> None:
        """Forget pending merges (freeze, regroup)."""
        self.pending.clear()
        self.skipped.clear()
