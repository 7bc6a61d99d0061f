"""Worker-to-worker exchange of parameter shards (``sync="sharded"``).

Each worker serves five handlers, registered once by the first replica and
dispatched by run to that run's :class:`Exchange` (the pattern of
``distributed.shuffle``: worker handlers, ``worker.rpc(address)`` between workers,
heavy work in a thread, a run id and the run secret on every message):

====================  ===========================================================
``daskdl_shard_put``  a contribution's piece for the shard this worker owns
``daskdl_shard_get``  the shard (or this rank's reply) after the merges given
``daskdl_shard_push`` a shard an owner merged ahead (group policies; see below)
``daskdl_shard_full`` every leaf of the global version this worker holds
``daskdl_shard_held`` which global version this worker holds (freeze, end of fit)
====================  ===========================================================

A message with a wrong secret, another generation, or pieces not shaped like the
shard is answered ``refused`` and changes nothing.  Merges and checks of shards
larger than :data:`INLINE_BYTES` run in the exchange's thread, never on the event
loop; smaller ones run on it (a thread hop costs more than they do), except a merge
that must wait for a piece still on its way.

Under a group policy an owner holding every member's piece of a round merges it
at once (:meth:`Owner.speculate`) and pushes the shard to the other members,
tagged with the merge it is; a member takes it instead of asking the owner when
the plugin's answer logs that very merge for that version, and asks otherwise.
When the piece that completes a round comes in a ``put``, the owner merges before
it answers and the answer carries that member's shard (no push for it: one message
less each way on the round's critical path).

The push is only ever a shortcut: lost, late or another merge, the ``get`` path
is taken, and the owner's shard follows the plugin's entries only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor


from . import protocol, shm
from .errors import DaskDLError
from .protocol import ProtocolError, Status, ok, refused
from .shards import MergeEntry, Owner, ShardMap, check_pieces, entries_field, same_merge

logger = logging.getLogger("daskdl")

PUT = "daskdl_shard_put"
GET = "daskdl_shard_get"
PUSH = "daskdl_shard_push"
FULL = "daskdl_shard_full"
HELD = "daskdl_shard_held"
HANDLERS = (PUT, GET, PUSH, FULL, HELD)
_METHODS = {PUT: "put", GET: "get", PUSH: "pushed", FULL: "full", HELD: "held_version"}
INLINE_BYTES = 4 * 2**20  # shards up to this size are checked and merged on the event loop
PUSH_WAIT_S = 0.05  # a member waits this long (plus 2 s per GB of shard) for a push
OWNER_CHECK_S = 1.0  # a call to another worker unanswered this long: is it still there?


def install(worker) -> None:
    """Register the shard handlers on ``worker`` (once; they find the run's replica)."""
    for name in HANDLERS:
        if name not in worker.handlers:
            worker.handlers[name] = _dispatch(worker, name)


def _dispatch(worker, name: str):
    async def handle(**msg):
        try:
            ex = protocol.replica_part(worker, msg, "exchange")
            return await getattr(ex, _METHODS[name])(**msg)
        except shm.ShmUnavailable as e:  # the sender sends it again over the comm
            return dict(refused(str(e)), shm=False)
        except (ProtocolError, DaskDLError) as e:
            return refused(str(e))
    handle.__name__ = name
    return handle


class Exchange:
    """One replica's side of sharded synchronisation: the shard it owns in the
    current generation, and the global parameters it last assembled."""

    def __init__(self, worker, policy, decode=None, run: str | None = None,
                 secret: str | None = None, shared_memory: bool = False):
        self.worker = worker
        # payloads for workers of this host through /dev/shm (see daskdl.shm)
        self.outbox = None
        if shared_memory and shm.available() and getattr(worker, "address", None):
            self.outbox = shm.Outbox(worker.address)
        self.shm_in = shm.Inbox(enabled=shared_memory)
        self.policy = policy
        self.decode = decode
        self.run, self._secret = run, secret  # for pushes (none without them)
        self.inbox: dict[int, tuple] = {}  # shard -> ((fit, gen), entry, pieces) pushed
        self.owner: Owner | None = None
        self.key = None  # (fit, generation) of the owner
        self.map: ShardMap | None = None
        self.members: tuple = ()
        self.held = (-1, None, None)  # (version, leaves, (fit, generation))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="daskdl-shards")
        self._changed: asyncio.Event | None = None
        self._arrived: asyncio.Event | None = None  # set (and replaced) when a piece comes
        # bytes sent, received, served (gets) and pushed (pushes and put answers); shards
        # taken from pushes and put answers; shards kept from the answers to this
        # worker's puts
        self.stats = {"sent": 0, "received": 0, "served": 0, "pushed": 0, "taken": 0,
                      "answered": 0}
        self.no_shm_replies: set = set()  # owners whose answers this worker cannot map
        self._tasks: set = set()  # merges ahead and pushes in flight (kept referenced)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.outbox is not None:
            self.outbox.close()
        self.shm_in.close()
        if self._tasks and self.worker.loop is not None:  # on the loop: this is another thread
            self.worker.loop.add_callback(self._cancel_tasks)
        if self._changed is not None:
            self.worker.loop.add_callback(self._changed.set)

    # -- the owner of a generation ----------------------------------------------------
    def set_owner(self, key: tuple, members: tuple, shard_map: ShardMap, owner: Owner) -> None:
        """This worker owns ``owner``'s shard from now on (called on the event loop)."""
        if self.owner is not None and self.owner is not owner:
            self.owner.retire()  # merges of the old generation waiting for pieces give up
        self.key, self.members, self.map, self.owner = key, members, shard_map, owner
        self.inbox.clear()
        # files of peers that left go; mappings are opened again as messages come
        if self.outbox is not None:
            self.outbox.keep(members)
        self.shm_in.close()
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()
        self._signal()

    def _signal(self) -> None:
        """Wake the merges waiting for pieces (on the event loop)."""
        if self._arrived is not None:
            self._arrived.set()
        self._arrived = asyncio.Event()

    def put_local(self, rank: int, clock: int, pieces: list, delta: bool,
                  meta: tuple | None = None) -> None:
        """This worker's own piece for the shard it owns (on the event loop)."""
        self.owner.put(rank, clock, pieces, delta, meta)
        self._signal()
        self._speculate(self.owner, clock)

    # -- merges ahead, pushed (group policies) ---------------------------------------------
    def _speculate(self, owner: Owner, clock: int) -> None:
        """Merge round ``clock`` ahead once every member's piece is here, and push the
        shard to the other members (on the event loop; large shards in the thread)."""
        if not self._merges_ahead(owner):
            return
        if owner.nbytes > INLINE_BYTES:
            async def ahead():
                self._push(owner, await self._merge_ahead(owner, clock))
            self._start(ahead())
        else:
            self._push(owner, owner.speculate(clock, range(len(self.members))))

    def _merges_ahead(self, owner: Owner) -> bool:
        """Whether ``owner`` (still this worker's) merges rounds ahead: a group policy,
        and a run to push for."""
        return self.policy.group and self.run is not None and owner is self.owner

    async def _merge_ahead(self, owner: Owner, clock: int):
        """:meth:`Owner.speculate` of round ``clock`` (awaited: in the thread for large
        shards); ``None`` when it cannot be merged yet or is no longer of use."""
        if not self._merges_ahead(owner):
            return None
        ranks = range(len(self.members))
        if owner.nbytes <= INLINE_BYTES:
            got = owner.speculate(clock, ranks)
        else:
            got = await self._thread(owner.speculate, clock, ranks)
        return got if owner is self.owner else None

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _start(self, coro) -> None:
        """Run ``coro`` on the event loop, referenced until done (cancelled at close)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _push(self, owner: Owner, got, answered: int | None = None) -> None:
        """Send each other member what a ``get`` of the merge ahead would answer it
        (but rank ``answered``: the answer to its put carries it)."""
        if got is None or owner is not self.owner:
            return
        entry = got[0]
        fit, gen = self.key
        for r, address in enumerate(self.members):
            if r != owner.j and r != answered:
                self._start(self._push_to(address, fit, gen, owner.j, entry,
                                          *_for_rank(got, r)))

    async def _push_to(self, address: str, fit: int, gen: int, j: int, entry, pieces,
                       center) -> None:
        def call(pieces, center):
            return getattr(self.worker.rpc(address), PUSH)(
                run=self.run, secret=self._secret, fit=fit, gen=gen, shard=j,
                entry=entry.to_msg(), pieces=pieces, center=center)

        try:
            await shm.send(self.outbox, address, "push", [pieces, center], call, _ser)
            self.stats["pushed"] += _nbytes(pieces) + _nbytes(center)
        except Exception as e:  # noqa: BLE001  (a shortcut only: the member will ask)
            logger.debug("daskdl: pushing shard %d to %s failed: %r", j, address, e)

    async def pushed(self, **msg) -> dict:
        """Handler: a shard another owner merged ahead (kept for :meth:`take`)."""
        key = (protocol.int_field(msg, "fit"), protocol.int_field(msg, "gen"))
        j = protocol.int_field(msg, "shard", 0, 1_000_000)
        self._keep(key, j, MergeEntry.from_msg(msg.get("entry")), msg.get("pieces"),
                   msg.get("center"), "pushed")
        return ok()

    def keep_answer(self, key: tuple, j: int, reply: dict, owner_address: str) -> None:
        """The shard ``j`` that its owner merged ahead and sent in its answer to this
        worker's put (kept for :meth:`take` as a push is).  An answer that cannot be
        read is dropped (the shard is then asked for); one in a file this worker
        cannot map makes later puts to that owner ask for answers over the comm."""
        try:
            if self._keep(key, j, MergeEntry.from_msg(reply.get("merged")),
                          reply.get("pieces"), reply.get("center"), "sent with the answer"):
                self.stats["answered"] += 1
        except shm.ShmUnavailable as e:
            self.no_shm_replies.add(owner_address)
            logger.debug("daskdl: shard %d from %s: %s", j, owner_address, e)
        except (ProtocolError, DaskDLError) as e:
            logger.debug("daskdl: shard %d from %s dropped: %s", j, owner_address, e)

    def _keep(self, key: tuple, j: int, entry: MergeEntry, pieces_obj, center_obj,
              how: str) -> bool:
        """Check and keep a shard merged ahead by its owner (ProtocolError if malformed);
        False when it is of no use here (another generation)."""
        if key != self.key or self.map is None:
            return False
        if not 0 <= j < len(self.members):
            raise ProtocolError(f"shard {j} {how}: there are {len(self.members)} shards")
        if j == self.owner.j:
            raise ProtocolError(f"shard {j} {how} to its own owner")
        if len(entry.contributions) > len(self.members):
            raise ProtocolError(f"shard {j} {how}: its merge lists "
                                f"{len(entry.contributions)} updates for "
                                f"{len(self.members)} workers")
        limit = self.map.nbytes(j) + 64 * 1024 + 64 * len(self.map.specs)
        got = []
        for obj in (pieces_obj, center_obj):
            if obj is None and got:  # no center
                got.append(None)
                continue
            pieces = self.load(obj, limit=limit, what=f"shard {j} {how}")
            check_pieces(pieces, self.map.piece_specs(j), f"shard {j} {how}", finite=False)
            got.append(pieces)
        self.inbox[j] = (key, entry, *got)
        self._signal()
        return True

    async def take(self, j: int, key: tuple, version: int, entries,
                   rank: int | None) -> tuple | None:
        """``(pieces, center)`` of shard ``j`` at ``version`` for ``rank``, pushed by
        its owner as the merge the plugin logged for that version (taken out), else
        ``None``: then ask the owner.  Waits a little for a push still on its way when
        the plugin's entry is a merge of every member's update (the case an owner
        merges ahead).  ``rank=None`` (an update rejected: start again from the global
        shard) takes nothing: a push holds what this rank continues from, which under
        EASGD is its own reply, not the global shard."""
        logged = next((e for e in entries if e.version == version), None)
        if rank is None or key != self.key or self.map is None or logged is None or \
                not self.policy.group or len(logged.contributions) != len(self.members):
            return None
        deadline = time.monotonic() + PUSH_WAIT_S + 2e-9 * self.map.nbytes(j)
        while True:
            got = self.inbox.get(j)
            if got is not None and (got[0] != key or got[1].version < version):
                del self.inbox[j]  # an older generation's or version's: never of use
                got = None
            if got is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._arrived is None:
                self._arrived = asyncio.Event()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return None
        if not same_merge(logged, got[1]):
            return None
        del self.inbox[j]
        self.stats["taken"] += 1
        return got[2], got[3]

    async def _owner(self, fit: int, gen: int, timeout: float) -> Owner:
        """The owner of generation ``(fit, gen)``, waiting for this worker to reach it."""
        deadline = time.monotonic() + timeout
        while self.key != (fit, gen):
            if self.key is not None and self.key > (fit, gen):
                raise ProtocolError(f"generation {(fit, gen)} is over on this worker")
            if self._changed is None:
                self._changed = asyncio.Event()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaskDLError(f"worker {self.worker.address} did not reach generation "
                                  f"{gen} of fit {fit} within {timeout:g}s")
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass
        return self.owner

    async def _thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- handlers --------------------------------------------------------------------
    async def put(self, **msg) -> dict:
        fit, gen = protocol.int_field(msg, "fit"), protocol.int_field(msg, "gen")
        rank, clock = protocol.int_field(msg, "rank", 0, 1_000_000), protocol.int_field(msg, "clock")
        delta = protocol.bool_field(msg, "delta", False)
        owner = await self._owner(fit, gen, protocol.float_field(msg, "timeout", 60.0, lo=0,
                                                                 hi=1e6))
        if protocol.int_field(msg, "shard", 0, 1_000_000) != owner.j:
            raise ProtocolError(f"this worker owns shard {owner.j}, not {msg.get('shard')}")
        limit = owner.nbytes
        try:
            pieces = self.load(msg.get("pieces"),
                               limit=limit + 64 * 1024 + 64 * len(owner.specs),
                               what=f"shard piece of rank {rank}")
            if owner.nbytes <= INLINE_BYTES:
                self._check(owner, pieces, rank)
            else:
                await self._thread(self._check, owner, pieces, rank)
        except ProtocolError as e:  # a merge that needs this piece fails instead of waiting
            owner.refuse(rank, clock, str(e))
            self._signal()
            raise
        meta = None
        if msg.get("samples") is not None:  # what the sender told the plugin
            meta = (protocol.int_field(msg, "samples", 0),
                    protocol.int_field(msg, "base", -1),
                    protocol.float_field(msg, "loss", None, allow_none=True))
        owner.put(rank, clock, pieces, delta, meta)
        self._signal()
        self.stats["received"] += protocol.payload_nbytes(msg.get("pieces")) or \
            _nbytes(pieces)
        got = await self._merge_ahead(owner, clock)
        if got is None:
            return ok()
        # this piece completed the round: the answer carries the sender's shard
        self._push(owner, got, answered=rank)
        return ok(**self._answer(got, rank, protocol.bool_field(msg, "shm_answer", False)))

    def _answer(self, got, rank: int, via_shm: bool) -> dict:
        """What a ``get`` of the merge ahead would answer ``rank``, for the answer to
        its put (references to this host's shared memory when ``via_shm``)."""
        pieces, center = _for_rank(got, rank)
        self.stats["pushed"] += _nbytes(pieces) + _nbytes(center)
        outbox = self.outbox if via_shm else None
        pieces, center = shm.reply(outbox, self.members[rank], [pieces, center], _ser)
        return {"merged": got[0].to_msg(), "pieces": pieces, "center": center}

    @property
    def shm_sent(self) -> int:
        """Payloads this worker has sent through shared memory."""
        return self.outbox.stats["sent"] if self.outbox is not None else 0

    def load(self, obj, limit: int | None = None, what: str = "payload"):
        """A payload as it arrived: serialized over the comm, or a reference to
        the sender's shared memory (copied out here)."""
        if shm.Inbox.is_ref(obj):
            return self.shm_in.load(obj, limit=limit, what=what)
        return protocol.load(obj, limit=limit, what=what)

    def _check(self, owner: Owner, pieces, rank: int) -> None:
        what = f"shard {owner.j} of the update of rank {rank}"
        if self.decode is None:
            check_pieces(pieces, owner.specs, what)
            return
        from .compression import Encoded, check_encoded

        if not isinstance(pieces, (list, tuple)) or len(pieces) != len(owner.specs):
            raise ProtocolError(f"{what} must be a list of {len(owner.specs)} pieces")
        for i, (p, s) in enumerate(zip(pieces, owner.specs)):
            if isinstance(p, Encoded):
                try:
                    check_encoded(p, s.shape, s.dtype)
                except ValueError as e:
                    raise ProtocolError(f"{what}: piece {i}: {e}") from None
            else:
                check_pieces([p], [s], f"{what}: piece {i}")

    async def get(self, **msg) -> dict:
        """The shard at (at least) ``version`` once the ``merges`` given are applied;
        ``rank``'s own reply where the policy gave one (with the global shard too)."""
        fit, gen = protocol.int_field(msg, "fit"), protocol.int_field(msg, "gen")
        version = protocol.int_field(msg, "version", -1)
        rank = protocol.opt_int_field(msg, "rank", 0, 1_000_000)
        entries = entries_field(msg.get("merges"))
        owner = await self._owner(fit, gen, protocol.float_field(msg, "timeout", 60.0, lo=0,
                                                                 hi=1e6))
        await self.catch_up(owner, entries, version, msg)
        if protocol.bool_field(msg, "pinned", False):
            got = owner.take_pinned(version)
            if got is None and owner.version == version:  # cut after the merge was applied
                got = owner.shard, owner.state, dict(owner.replies)
            if got is None:
                raise ProtocolError(f"shard {owner.j} has no pinned version {version} (it is at "
                                    f"version {owner.version}, pinned {sorted(owner.pinned)})")
            shard, state, replies = got
            return ok(pieces=_ser(shard), version=version, state=_ser(state),
                      replies=_ser(replies))
        pieces, at = owner.get(rank)
        self.stats["served"] += _nbytes(pieces)
        out = ok(pieces=_ser(pieces), version=at)
        if rank is not None and pieces is not owner.shard:
            out["center"] = _ser(owner.shard)
        return out

    async def catch_up(self, owner: Owner, entries: list, version: int, msg: dict) -> None:
        """Apply the merges up to ``version`` to ``owner``'s shard, once the pieces
        they need came (waiting up to the message's ``timeout`` for pieces still on
        their way: their senders told the plugin at the same time): on the event loop
        when the shard is small, else in the exchange's thread."""
        deadline = time.monotonic() + protocol.float_field(msg, "timeout", 60.0, lo=0,
                                                           hi=1e6)
        while owner.missing(entries, version):  # DaskDLError: refused, or never coming
            left = deadline - time.monotonic()
            if left <= 0:
                break  # catch_up says which piece never came
            if self._arrived is None:
                self._arrived = asyncio.Event()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                pass
        if owner.nbytes <= INLINE_BYTES:
            owner.catch_up(entries, version)
        else:
            await self._thread(owner.catch_up, entries, version)

    async def full(self, **msg) -> dict:
        """Every leaf of the global version this worker holds (``version``: at least)."""
        version = protocol.int_field(msg, "version", -1)
        held, leaves, _ = self.held
        if leaves is None or held < version:
            raise ProtocolError(f"this worker holds version {held}, not {version}")
        return ok(leaves=_ser(leaves), version=held)

    async def held_version(self, **msg) -> dict:
        version, _, key = self.held
        return ok(version=version, key=list(key) if key else None)


def _for_rank(got, rank: int) -> tuple:
    """``(pieces, center)`` a ``get`` of the merge ahead ``got = (entry, shard,
    replies)`` answers ``rank``: its reply and the shard where it has one (EASGD), else
    the shard alone."""
    _, shard, replies = got
    return (replies[rank], shard) if rank in replies else (shard, None)


def _ser(x):
    from distributed.protocol.serialize import to_serialize

    return to_serialize(x)


def _nbytes(pieces) -> int:
    n = 0
    for p in pieces or ():
        if hasattr(p, "nbytes") and not callable(p.nbytes):
            n += int(p.nbytes)
        else:
            from .compression import nbytes

            n += nbytes(p)
    return n


__all__ = ["Exchange", "install", "fetch_global", "fetch_full", "fetch_pinned", "watched",
           "asking", "HANDLERS", "PUT", "GET", "PUSH", "FULL", "HELD"]


async def watched(call, address: str, present=None):
    """``await call``, an RPC to the worker at ``address``; while it has not answered,
    every :data:`OWNER_CHECK_S` ``await present(address)`` and raise
    ``CommClosedError`` (an ``OSError``) once it says the worker is gone.

    Dask retries connecting to an address that refuses for
    ``distributed.comm.timeouts.connect`` (30 s): without this, a call to a worker
    killed a moment before waited that long to fail.  ``present`` ``None``: just
    ``await call``."""
    from distributed.comm.core import CommClosedError

    if present is None:
        return await call
    task = asyncio.ensure_future(call)
    while True:
        done, _ = await asyncio.wait([task], timeout=OWNER_CHECK_S)
        if done:
            return task.result()
        if not await present(address):
            task.cancel()
            raise CommClosedError(f"{address} left the cluster while a call to it waited")


def asking(scheduler_rpc):
    """A ``present`` for :func:`watched` that asks the scheduler (an rpc to it: a
    worker's ``worker.scheduler``, a client's ``client.scheduler``) whether a worker
    is still in the cluster; an unreachable scheduler answers yes (Dask's own timeouts
    decide then)."""
    async def present(address: str) -> bool:
        try:
            return address in await scheduler_rpc.ncores(workers=[address])
        except OSError:
            return True
    return present


async def _gather_from(rpc, members: dict, specs, version: int, what: str, present=None,
                       **msg) -> list:
    """``daskdl_shard_get`` from every owner (rank ``j`` owns shard ``j``), each call
    :func:`watched` with ``present``."""
    from .shards import ShardMap

    smap = ShardMap(specs, len(members))

    async def one(j):
        r = await watched(getattr(rpc(members[j]), GET)(version=version, **msg), members[j],
                          present)
        if r.get("status") != Status.OK.value:
            raise DaskDLError(f"{what}: the owner of shard {j} ({members[j]}) refused: "
                              f"{r.get('reason')}")
        return r

    replies = await asyncio.gather(*(one(j) for j in range(len(members))))
    return smap, replies


async def fetch_global(rpc, run: str, secret: str, fit: int, gen: int, members: dict,
                       version: int, merges: list, specs, present=None) -> list:
    """The global parameters of a sharded run at ``version``, gathered from the shard
    owners ``members`` (``{rank: address}``) by ``rpc`` (a Dask connection pool: the
    client's, or the scheduler's); ``present``: see :func:`watched`."""
    smap, replies = await _gather_from(rpc, members, specs, version, "fetching the params",
                                       present, run=run, secret=secret, fit=fit, gen=gen,
                                       rank=None, merges=merges)
    shards = []
    for j, r in enumerate(replies):
        pieces = protocol.load(r["pieces"], limit=smap.nbytes(j) + 64 * 1024 * len(specs))
        check_pieces(pieces, smap.piece_specs(j), f"shard {j}", finite=False)
        shards.append(pieces)
    return smap.assemble(shards)


async def fetch_full(rpc, run: str, secret: str, addresses, version: int, specs,
                     present=None) -> list:
    """The global parameters at ``version`` from the first of ``addresses`` that holds
    them whole (every member assembles them after each round): when an owner left
    after the last merge, its shard of that version lives on in the others' copies.
    ``DaskDLError`` when none of them holds that version."""
    from .shards import check_pieces

    why = []
    for address in addresses:
        try:
            r = await watched(getattr(rpc(address), FULL)(run=run, secret=secret,
                                                          version=version), address, present)
        except OSError as e:
            why.append(f"{address}: {e}")
            continue
        r = r if isinstance(r, dict) else {}
        if r.get("status") != Status.OK.value or int(r.get("version", -1)) != version:
            why.append(f"{address}: {r.get('reason') or 'holds version %s' % r.get('version')}")
            continue
        leaves = protocol.load(r["leaves"], limit=sum(s.nbytes for s in specs)
                               + 64 * 1024 * len(specs))
        check_pieces(leaves, specs, f"the parameters {address} holds", finite=False)
        return leaves
    raise DaskDLError(f"no worker holds version {version} of the parameters whole any more "
                      f"({'; '.join(why) or 'no workers'})")


async def fetch_pinned(rpc, run: str, secret: str, fit: int, gen: int, members: dict,
                       version: int, specs, merges: list, present=None) -> tuple:
    """What a checkpoint of a sharded run at ``version`` holds: ``(params,
    policy_state leaves, {rank: own params})``, from the shards the owners kept;
    ``present``: see :func:`watched`."""
    from .shards import join_states

    smap, replies = await _gather_from(rpc, members, specs, version, "checkpoint", present,
                                       run=run, secret=secret, fit=fit, gen=gen, rank=None,
                                       merges=merges, pinned=True)
    shards, states, replies_by_owner = [], [], []
    for j, r in enumerate(replies):
        pieces = protocol.load(r["pieces"])
        check_pieces(pieces, smap.piece_specs(j), f"shard {j}", finite=False)
        shards.append(pieces)
        states.append(protocol.load(r["state"]))
        replies_by_owner.append(protocol.load(r["replies"]) or {})
    import jax

    state = join_states(states, specs)
    local = {}
    ranks = set().union(*[set(x) for x in replies_by_owner]) if replies_by_owner else set()
    for rank in sorted(ranks):
        if all(rank in x for x in replies_by_owner):
            local[rank] = smap.assemble([x[rank] for x in replies_by_owner])
    return smap.assemble(shards), jax.tree_util.tree_leaves(state), local
