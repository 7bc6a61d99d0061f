"""Relayed syncs: one scheduler message per group of workers and round.

Under a policy whose workers go in lockstep (a group merge behind an
``all_arrived`` barrier: BSP, EASGD, DiLoCo) every worker of a round reaches its
sync at about the same time, and each sync costs the scheduler one Dask RPC.  With
relays, the workers of a generation are cut into groups (in host order, about
``sqrt(N)`` each, config ``daskdl.relay-group``); each member sends its sync to its
group's *relay* (the group's first worker, handler ``daskdl_relay_sync``), which sends
the whole group's syncs as one ``daskdl_sync_group`` message to the scheduler plugin
and hands each member its own answer.  The plugin checks and counts every sync of a
batch exactly as it would a direct ``daskdl_sync`` (same validation, barrier and
merge; the merged parameters travel once per batch), so results do not change: only
the number of scheduler messages, N/group per round instead of N.

By default (``relay-group: auto``) runs of at least ``RELAY_MIN_WORKERS`` workers and
models up to ``RELAY_MAX_BYTES`` use groups of ``ceil(sqrt(N))``.  Measured on one
2-core machine (``benchmarks/coordination.py --relay-group auto 1``, BSP every=1,
medians of 3): the scheduler's CPU per worker-round fell from 0.33 to 0.26 ms with 16
workers (same rounds/s) and from 0.34 to 0.30 ms with 32 (32 processes on 2 cores:
the extra hop cost 16 % of rounds/s); with 8 workers (measured before updates were
packed) it did not fall and the hop cost rounds/s.

Failures:

* a member that does not reach the relay within ``RELAY_WAIT_S`` of the first
  arrival of its round is left out of that batch; the others go on without it (and
  it is relayed alone when it comes), so the scheduler's barrier sees every
  arrival and its timeouts and drops work as without relays;
* a relay that cannot be reached (it left: the member gives up connecting after
  ``RELAY_CONNECT_S``, not Dask's 30 s connect timeout) or that fails after taking a
  sync: the member sends the same sync straight to the scheduler, marked ``resent``;
  a sync the plugin already counted is answered again without being counted twice.

Messages to a relay carry the run secret (checked there, as the scheduler does);
the relay sends the group's syncs without their secrets, under its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from urllib.parse import urlparse

from . import protocol
from .errors import DaskDLError
from .protocol import ProtocolError, refused

logger = logging.getLogger("daskdl")

RELAY_SYNC = "daskdl_relay_sync"  # worker handler: a group member's sync
RELAY_FAILED = "relay-failed"  # its status when the relay could not deliver it
RELAY_WAIT_S = 1.0  # how long a relay waits for a member after the first of its round
RELAY_CONNECT_S = 2.0  # a member gives up connecting to its relay after this (it left)
RELAY_MAX_BYTES = 4 << 20  # "auto": models larger than this sync directly (bytes hop once more)
RELAY_MIN_WORKERS = 16  # "auto": fewer workers sync directly (measured: no gain at 8)


def relay_groups(workers: tuple, size: int) -> dict[int, tuple[str, tuple]]:
    """``rank -> (relay address, ranks of its group)`` for ``workers`` (addresses by
    rank) in groups of at most ``size``, workers of one host together; ``{}`` when
    ``size < 2`` (every worker syncs directly)."""
    if size < 2 or len(workers) < 2:
        return {}
    order = sorted(range(len(workers)), key=lambda r: (urlparse(workers[r]).hostname or "", r))
    n, n_groups = len(order), -(-len(order) // size)
    cut = [-(-g * n // n_groups) for g in range(n_groups + 1)]  # sizes equal +-1, larger first
    out = {}
    for g in range(n_groups):  # in host order
        ranks = tuple(order[cut[g]:cut[g + 1]])
        for r in ranks if len(ranks) > 1 else ():  # alone: straight to the scheduler
            out[r] = (workers[ranks[0]], ranks)
    return out


def group_size(setting, n_workers: int, model_bytes: int, lockstep: bool) -> int:
    """The relay group size for config ``daskdl.relay-group`` (``"auto"``, or an int;
    1 turns relays off).  ``auto``: ``ceil(sqrt(N))`` for at least
    ``RELAY_MIN_WORKERS`` workers and models up to ``RELAY_MAX_BYTES``; relays only
    ever serve policies whose workers go in lockstep."""
    if not lockstep:
        return 1
    if setting in (None, "auto"):
        if n_workers < RELAY_MIN_WORKERS or model_bytes > RELAY_MAX_BYTES:
            return 1
        return math.ceil(math.sqrt(n_workers))
    return int(setting)


def relay_group_setting(value):
    """Check config ``daskdl.relay-group``: ``"auto"`` or an int >= 1."""
    if value in (None, "auto"):
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, str)) or \
            not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"daskdl.relay-group must be 'auto' or a positive integer (1: no "
                         f"relays, every worker syncs with the scheduler), not {value!r}")
    return int(value)


@dataclass
class _Batch:
    """The syncs of one round of one group, gathering at the relay."""

    expected: set
    msgs: dict = field(default_factory=dict)  # rank -> sync message (without secret)
    waiters: dict = field(default_factory=dict)  # rank -> asyncio.Future of its reply
    timer: asyncio.TimerHandle | None = None


class Relay:
    """The relay side of one replica (runs on its worker's event loop)."""

    def __init__(self, worker, run: str, secret: str):
        self.worker = worker
        self.run = run
        self._secret = secret
        self.batches: dict[tuple, _Batch] = {}  # (fit, gen, clock) -> batch gathering
        self.forwarded: dict[tuple, set] = {}  # (fit, gen, clock) -> ranks sent already

    async def submit(self, msg: dict, group: tuple, key: tuple) -> dict:
        """Relay ``msg`` (a sync of rank ``msg['rank']``, without secret) with the rest
        of ``group``'s syncs of round ``key = (fit, gen, clock)``; return its reply."""
        rank = msg["rank"]
        self._prune(key)
        batch = self.batches.get(key)
        if batch is None:
            left = set(group) - self.forwarded.get(key, set())
            if rank not in left:
                raise ProtocolError(f"rank {rank} sent round {key[2]} to the relay twice")
            batch = self.batches[key] = _Batch(left)
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(RELAY_WAIT_S, self._send, key)
        if rank not in batch.expected or rank in batch.msgs:
            raise ProtocolError(f"rank {rank} is not expected at this relay for round "
                                f"{key[2]}, or sent it twice")
        future = asyncio.get_running_loop().create_future()
        batch.msgs[rank], batch.waiters[rank] = msg, future
        if set(batch.msgs) >= batch.expected:
            self._send(key)
        return await future

    def _prune(self, key: tuple) -> None:
        """Forget what was forwarded for earlier generations and rounds long past."""
        fit, gen, clock = key
        for k in [k for k in self.forwarded if k[:2] != (fit, gen) or k[2] < clock - 8]:
            del self.forwarded[k]

    def _send(self, key: tuple) -> None:
        batch = self.batches.pop(key, None)  # sent once: a second call finds none
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self.forwarded.setdefault(key, set()).update(batch.msgs)
        asyncio.ensure_future(self._forward(batch))

    async def _forward(self, batch: _Batch) -> None:
        from distributed.protocol.serialize import to_serialize

        syncs = []
        for m in batch.msgs.values():
            m = dict(m)
            for name in ("params", "opt_state", "state"):
                if m.get(name) is not None:
                    m[name] = to_serialize(protocol.load(m[name]))
            syncs.append(m)
        try:
            reply = await getattr(self.worker.scheduler, protocol.SYNC_GROUP)(
                run=self.run, secret=self._secret, syncs=syncs)
            if reply.get("status") != protocol.Status.OK.value:
                raise DaskDLError(f"the scheduler refused the relayed syncs: "
                                  f"{reply.get('reason')}")
            replies = reply["replies"]
            shared = reply.get("params")
            for m, r in zip(batch.msgs.values(), replies):
                if r.get("shared"):
                    r = dict(r, params=shared)
                future = batch.waiters[m["rank"]]
                if not future.done():
                    future.set_result(r)
        except Exception as e:  # noqa: BLE001  (every member must hear back: it resends)
            logger.info("daskdl run %s: relayed syncs failed (%s); their workers send them "
                        "to the scheduler", self.run, e)
            for future in batch.waiters.values():
                if not future.done():
                    future.set_exception(RelayFailed(str(e)))


class RelayFailed(Exception):
    """The relay could not deliver a sync: its worker sends it to the scheduler."""


def install(worker) -> None:
    """Register the relay handler on ``worker`` (once; it finds the run's replica)."""
    if RELAY_SYNC not in worker.handlers:
        worker.handlers[RELAY_SYNC] = _dispatch(worker)


def _dispatch(worker):
    async def handle(**msg):
        try:
            relay = protocol.replica_part(worker, msg, "relay")
            group = tuple(protocol.int_field({"r": r}, "r", 0, 1_000_000)
                          for r in msg.get("group") or ())
            key = (protocol.int_field(msg, "fit"), protocol.int_field(msg, "gen"),
                   protocol.int_field(msg, "clock"))
            lose = protocol.bool_field(msg, "lose_reply", False)  # fault injection (tests)
            sync = {k: v for k, v in msg.items()
                    if k not in ("secret", "group", "fit", "lose_reply")}
            sync["rank"] = protocol.int_field(msg, "rank", 0, 1_000_000)
            if sync["rank"] not in group:
                raise ProtocolError(f"rank {sync['rank']} is not in the relay group {group}")
            try:
                reply = await relay.submit(sync, group, key)
                if lose:
                    raise RelayFailed("the reply was lost (daskdl.testing.lose-relay-reply)")
            except RelayFailed as e:
                return {"status": RELAY_FAILED, "reason": str(e)}
            return _serializable(reply)
        except (ProtocolError, DaskDLError) as e:
            return refused(str(e))
    handle.__name__ = RELAY_SYNC
    return handle


def _serializable(reply: dict) -> dict:
    """A reply as it goes on to a member: arrays wrapped for Dask's serialization."""
    from distributed.protocol.serialize import Serialized, Serialize, to_serialize

    out = dict(reply)
    for name in ("params", "state"):
        v = out.get(name)
        if v is not None and not isinstance(v, (Serialized, Serialize)):
            out[name] = to_serialize(v)
    return out
