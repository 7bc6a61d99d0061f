"""The scheduler plugin: handlers that validate a message, then act on a run.

Every handler takes its message as keyword arguments (as Dask's RPC sends them),
looks the run up through :meth:`TrainingPlugin._run` (which checks the secret),
parses the rest with :mod:`daskdl.protocol`'s checks and only then changes state.
A message that does not parse is answered :func:`~daskdl.protocol.refused`, with
nothing changed and no traceback logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
import time

import jax

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import to_serialize

from .. import config, protocol
from ..checkpoint import CheckpointCut
from ..errors import DaskDLError
from ..policies import Contribution, Merged, SyncInfo, state_mean
from ..protocol import (LeaveReason, MemberEvent, ProtocolError, Status, StartRequest,
                        SyncReply, SyncRequest, ok, refused)
from ..shards import MergeEntry
from ..tree import check_like
from .membership import publish
from .run import RunState
from .stats import divergences

logger = logging.getLogger("daskdl")

INLINE_MERGE_BYTES = 16 * 2**20  # larger merges run in a thread, off the event loop
OPT_STATE_FACTOR = 4  # an optimizer state is at most this many times the params' bytes


@contextlib.contextmanager
def parsing(what: str):
    """Turn an unexpected exception while parsing ``what`` into a ProtocolError (one
    warning line, no traceback)."""
    try:
        yield
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001  (malformed input must never escape a handler)
        logger.warning("daskdl: %s could not be parsed: %s", what, type(e).__name__)
        raise ProtocolError(f"{what} could not be parsed ({type(e).__name__})") from None


def handler(fn):
    """Answer ``refused`` for a :class:`~daskdl.protocol.ProtocolError` raised by
    ``fn`` (logged at debug level)."""
    def answer(e: ProtocolError) -> dict:
        logger.debug("daskdl: %s refused: %s", fn.__name__, e)
        return refused(str(e))

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(self, **msg):
            try:
                return await fn(self, **msg)
            except ProtocolError as e:
                return answer(e)
    else:
        @functools.wraps(fn)
        def wrapper(self, **msg):
            try:
                return fn(self, **msg)
            except ProtocolError as e:
                return answer(e)
    return wrapper


def _aborted(st: RunState) -> dict:
    return SyncReply(Status.ABORTED, st.version, reason=st.aborted or "",
                     diverged=st.diverged).to_msg()


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class TrainingPlugin(SchedulerPlugin):
    """Scheduler plugin holding the global parameters of daskdl training runs.

    Attributes
    ----------
    runs : dict
        ``run -> RunState`` of the runs started and not ended.
    finished : dict
        Ended runs, newest last, without parameters (for dashboards), at most
        ``keep_finished``.
    """

    name = protocol.EXTENSION
    idempotent = True
    keep_finished = 10

    def __init__(self):
        self.runs: dict[str, RunState] = {}
        self.finished: dict[str, RunState] = {}
        self.scheduler = None

    async def start(self, scheduler):
        self.scheduler = scheduler
        scheduler.extensions[protocol.EXTENSION] = self
        scheduler.handlers.update({
            protocol.START: self.start_run,
            protocol.SYNC: self.sync,
            protocol.SYNC_GROUP: self.sync_group,
            protocol.PARAMS: self.get_params,
            protocol.FREEZE: self.freeze,
            protocol.REGROUP: self.regroup,
            protocol.CHECKPOINT_META: self.checkpoint_meta,
            protocol.CHECKPOINT_FLUSH: self.checkpoint_flush,
            protocol.ABORT: self.abort,
            protocol.INFO: self.info,
            protocol.END: self.end_run,
            protocol.LOCATIONS: self.locations,
        })

    def metrics(self) -> dict:
        """``{run: metrics}`` of every current and recently ended run (see
        :meth:`RunState.metrics`); what the dashboard page and Prometheus read."""
        out = {run: st.metrics() for run, st in self.finished.items()}
        out.update({run: st.metrics() for run, st in self.runs.items()})
        return out

    def _run(self, msg: dict, finished: bool = False) -> RunState:
        """The run ``msg`` names, once its ``secret`` matched (ended runs too with
        ``finished``); ProtocolError for an unknown run or a wrong secret."""
        run = protocol.run_id(msg)
        st = self.runs.get(run) or (self.finished.get(run) if finished else None)
        if st is None:
            raise ProtocolError(f"unknown training run {run!r}")
        if not protocol.same_secret(msg.get("secret"), st.secret):
            raise ProtocolError(f"wrong secret for training run {run!r}")
        return st

    # -- cluster events ------------------------------------------------------------------
    def _training_at(self, address: str) -> list[tuple[RunState, int]]:
        return [(st, rank) for st in list(self.runs.values()) if st.training
                for rank in st.membership.ranks_at(address)]

    def remove_worker(self, scheduler, worker: str, **kwargs):
        todo = self._training_at(worker)
        if todo:  # a coroutine only when there is something to do (the scheduler awaits it)
            return self._drop_all(todo, LeaveReason.LEFT, "it left the cluster")
        return None

    def log_event(self, topic: str, msg) -> None:
        """Dask pausing a worker (memory above ``distributed.worker.memory.pause``) takes
        it out of the barriers, as if it had left: a paused worker starts no new round,
        and the others would wait for it until ``daskdl.sync-timeout``.  When it runs
        again it joins like a new worker."""
        if not isinstance(msg, dict) or msg.get("action") != "worker-status-change":
            return
        if msg.get("status") == "paused":
            todo = self._training_at(topic)
            if todo:
                asyncio.ensure_future(self._drop_all(
                    todo, LeaveReason.PAUSED,
                    "Dask paused it: its memory is above distributed.worker.memory.pause"))
        elif msg.get("status") == "running" and msg.get("prev-status") == "paused":
            self.add_worker(self.scheduler, topic)

    def add_worker(self, scheduler, worker: str):
        for st in list(self.runs.values()):
            if st.training:
                publish(self.scheduler, st.run, MemberEvent("joined", worker))

    async def restart(self, scheduler):
        for st in self.runs.values():
            st.abort("the cluster was restarted")

    async def close(self):
        for st in self.runs.values():
            st.abort("the scheduler is closing")
            if st.cut is not None:
                st.cut.close()

    # -- membership ------------------------------------------------------------------------
    async def _drop_all(self, todo: list, reason: LeaveReason, detail: str) -> None:
        for st, rank in todo:
            await self._drop(st, rank, reason, detail)

    async def _drop(self, st: RunState, rank: int, reason: LeaveReason, detail: str) -> None:
        """Take ``rank`` out of the current generation: no barrier waits for it any more.

        A group merge that only waited for it runs now, with the contributions that
        arrived; its rounds not yet merged go back to the plan (the client re-plans).
        """
        address = st.membership.drop(rank, reason, detail)
        if address is None:
            return
        if not st.ending:
            logger.warning("daskdl run %s: worker %s (rank %d) dropped: %s; training goes "
                           "on with %d workers", st.run, address, rank, detail,
                           len(st.members))
        st.stats.event("lost", rank=rank, worker=address, reason=detail)
        publish(self.scheduler, st.run, MemberEvent("lost", address, rank, reason, detail))
        for clock in st.barrier.forget(rank):
            await self._merge_group(st, clock)
        st.release()

    # -- handlers: run life cycle ----------------------------------------------------------
    @handler
    def start_run(self, **msg) -> dict:
        """``daskdl_start(run, secret, params, policy, members, timeout, clock=0,
        version=0, policy_state=None, restore=None, checkpoint=None,
        max_rejections=None, max_samples=None, checkpoint_clocks=())``: start a run, or
        restart it (the same trainer's next fit: same secret).  ``restore`` maps rank ->
        ``{"opt_state", "params"}`` handed to each rank on its first parameter fetch;
        ``checkpoint`` is ``{"store", "keep"}``."""
        run, secret = protocol.run_id(msg), protocol.secret_field(msg)
        old = self.runs.get(run) or self.finished.get(run)
        if old is not None and not protocol.same_secret(secret, old.secret):
            raise ProtocolError(f"training run {run!r} exists with another secret")
        with parsing("daskdl_start"):
            req = StartRequest.from_msg(msg)
        if old is None:
            self._make_room()
        else:
            self._retire(old, "the run was restarted", wait=True)
        self.runs[run] = self._new_run(req, secret)
        logger.info("daskdl run %s started with %d workers under %s(every=%d)",
                    run, len(req.members), req.policy.name, req.policy.every)
        return ok()

    @staticmethod
    def _new_run(req: StartRequest, secret: str) -> RunState:
        if req.sharded:  # the params stay on the workers: keep their specs only
            st = RunState(req.run, secret, [], req.policy, req.members, req.timeout,
                          clock=req.clock, version=req.version, policy_state=())
            st.specs, st.nbytes = list(req.specs), sum(s.nbytes for s in req.specs)
            st.owner_state, st.policy_state = req.policy_state, None
        else:
            st = RunState(req.run, secret, req.params, req.policy, req.members, req.timeout,
                          clock=req.clock, version=req.version, policy_state=req.policy_state)
        st.fit = req.fit
        st.restore = dict(req.restore)
        st.set_state(req.state, req.steps, req.clock)
        st.max_rejections = int(config.get("max-rejections", req.max_rejections))
        if req.max_samples is not None:
            st.max_samples = req.max_samples
        if req.checkpoint is not None:
            st.cut = CheckpointCut.open(req.checkpoint, req.checkpoint_clocks)
        return st

    def _retire(self, st: RunState, reason: str, wait: bool = False) -> None:
        """Stop ``st`` and forget it (a restart, or room for a new run); ``wait`` for
        its queued checkpoint writes (a restart: the last fit's state must be written)."""
        st.ending = True
        st.abort(reason, log=False)
        if st.cut is not None:
            st.cut.close(wait=wait)
        self.runs.pop(st.run, None)
        self.finished.pop(st.run, None)

    def _make_room(self) -> None:
        """Keep at most ``daskdl.max-runs`` runs: drop ended runs, then aborted ones,
        oldest first; ProtocolError (and nothing dropped) when that is not enough."""
        limit = int(config.get("max-runs"))
        spare = list(self.finished.values()) + sorted(
            (st for st in self.runs.values() if st.aborted is not None),
            key=lambda st: st.started)
        over = len(self.runs) + len(self.finished) + 1 - limit
        if over > len(spare):
            raise ProtocolError(f"{len(self.runs)} training runs are going on on this "
                                f"scheduler (daskdl.max-runs = {limit}): end one, or raise "
                                "daskdl.max-runs")
        for st in spare[:max(over, 0)]:
            self._retire(st, "too many runs on this scheduler (daskdl.max-runs)")

    @handler
    def abort(self, **msg) -> dict:
        """``daskdl_abort(run, secret, reason)``: fail every waiting worker."""
        st = self._run(msg)
        reason = protocol.str_field(msg, "reason", 4096)
        st.abort(reason)
        return ok()

    @handler
    async def end_run(self, **msg) -> dict:
        """``daskdl_end(run, secret, wait_checkpoints=True)``: end the run, keep it
        without parameters for dashboards (and its secret, so that the same trainer may
        start it again).  Replies ``checkpoint_errors``: the writes that failed."""
        st = self._run(msg, finished=True)
        wait = protocol.bool_field(msg, "wait_checkpoints", True)
        if st.ended is not None or st.run not in self.runs:
            return ok(checkpoint_errors=None)
        st.ending = True
        if st.barrier.waiting:  # nobody should wait once fit returned; free them if so
            st.abort("the run ended", log=False)
        errors = None if st.cut is None else await _in_thread(st.cut.close, wait)
        st.strip()
        if self.runs.get(st.run) is st:
            del self.runs[st.run]
            self.finished[st.run] = st
            while len(self.finished) > self.keep_finished:
                self.finished.pop(next(iter(self.finished)))
        return ok(checkpoint_errors=errors)

    @handler
    def info(self, **msg) -> dict:
        """``daskdl_info(run)``: clocks, membership, history, metrics (read only; no
        secret), for a running or ended run."""
        run = protocol.run_id(msg)
        st = self.runs.get(run) or self.finished.get(run)
        if st is None:
            raise ProtocolError(f"unknown training run {run!r}")
        return ok(**st.info())

    @handler
    def locations(self, **msg) -> dict:
        """``daskdl_locations(keys)``: ``where = {key: address}`` of a worker holding
        each key that is in memory (read only; keys not held are left out)."""
        keys = protocol.keys_field(msg)
        tasks = self.scheduler.tasks if self.scheduler is not None else {}
        where = {}
        for key in keys:
            ts = tasks.get(key)
            if ts is not None and ts.who_has:
                where[key] = next(iter(ts.who_has)).address
        return ok(where=where)

    # -- handlers: generations ---------------------------------------------------------------
    @handler
    async def freeze(self, **msg) -> dict:
        """``daskdl_freeze(run, secret)``: stop the current generation; rounds not merged
        yet are answered ``replan`` and discarded by their workers.  Replies ``done``
        (rank -> rounds merged, lost ranks too), ``lost``, ``members``, ``aborted``.

        Sharded, the next generation starts from the newest version a worker still
        present holds whole; merges after it are forgotten and their rounds count as
        not merged."""
        st = self._run(msg)
        st.barrier.clear()
        if st.cut is not None:
            st.cut.opt.clear()
        st.membership.frozen = True
        st.barrier.open_all()
        if st.sharded and st.aborted is None:
            await self._restart_point(st)
        frozen = st.membership.freeze()
        return ok(aborted=st.aborted, **frozen)

    async def _restart_point(self, st: RunState) -> None:
        """Where a sharded run's next generation starts: the newest version a present
        member holds (``st.source``), rolling back the merges after it."""
        from ..exchange import HELD

        members = dict(st.members)

        async def held(addr):
            try:
                r = await asyncio.wait_for(
                    getattr(self.scheduler.rpc(addr), HELD)(run=st.run, secret=st.secret), 30)
                return int(r["version"]) if r.get("status") == Status.OK.value else -1
            except Exception:  # noqa: BLE001  (a worker that cannot answer holds nothing)
                return -1

        versions = await asyncio.gather(*(held(a) for a in members.values()))
        best = max(zip(versions, members.values()), default=(-1, None))
        version = min(best[0], st.version)
        if version < st.start_version or best[1] is None:
            logger.warning("daskdl run %s: no worker still present holds the parameters of "
                           "this generation; training goes on from where the fit started",
                           st.run)
            st.source, version = None, st.start_version
        else:
            st.source = best[1]
        if version < st.version:
            st.roll_back(version)

    @handler
    def regroup(self, **msg) -> dict:
        """``daskdl_regroup(run, secret, members, clock, checkpoint_clocks=())``: start
        the next generation, every rank of ``members`` at ``clock``.  Each worker
        fetches the global parameters at its first round.  Replies ``generation``."""
        st = self._run(msg)
        members = protocol.members_field(msg)
        clock = protocol.int_field(msg, "clock")
        planned = protocol.clocks_field(msg, "checkpoint_clocks")
        if st.aborted:
            return _aborted(st)
        gen = st.membership.regroup(members, clock)
        st.steps_at = {c: n for c, n in st.steps_at.items() if c <= clock} or {clock: 0}
        st.barrier.clear()
        st.replies.clear()
        st.strikes.clear()
        if st.cut is not None:
            st.cut.replan(planned, after=clock)
        if st.sharded:  # new owners: every member starts from st.source's version
            st.start_version, st.log, st.done_floor = st.version, [], {}
            st.reported = {r: st.version for r in members}
        st.stats.regrouped(gen, clock, members)
        logger.info("daskdl run %s: generation %d with %d workers from clock %d",
                    st.run, gen, len(members), clock)
        return ok(generation=gen, source=st.source if st.sharded else None)

    @handler
    def get_params(self, **msg) -> dict:
        """``daskdl_params(run, secret, rank=None)``: the global parameters and their
        ``version``; for a rank restored from a checkpoint, also its ``opt_state`` (and
        its own ``params`` under policies such as EASGD), once."""
        st = self._run(msg)
        rank = None if msg.get("rank") is None else protocol.int_field(msg, "rank", 0, 1_000_000)
        if st.sharded:
            return self._sharded_params(st, rank)
        out = ok(params=st.params_msg(), version=st.version,
                 state=to_serialize(st.state) if st.state else None,
                 steps=st.global_steps(max(st.steps_at) if rank is None
                                       else st.membership.clocks.get(rank, 0)))
        restore = st.restore.pop(rank, None) if rank is not None else None
        if restore is not None:
            if restore.get("params") is not None:
                out["params"] = to_serialize(restore["params"])
            out["opt_state"] = to_serialize(restore["opt_state"])
        return out

    def _sharded_params(self, st: RunState, rank: int | None) -> dict:
        """``daskdl_params`` of a sharded run: no bytes of params.  A rank learns the
        version its generation starts from and where to fetch it (``source``; ``None``:
        the fit's init data), the policy state its shard starts with (resume), and its
        restored optimizer state.  ``rank=None`` (the client after a fit): the current
        version, the members (shard owners) and the merges they may not have applied;
        ``whole``, when this generation has merged nothing yet: the worker that holds
        that version whole."""
        out = ok(version=st.start_version if rank is not None else st.version,
                 state=to_serialize(st.state) if st.state else None,
                 steps=st.global_steps(max(st.steps_at) if rank is None
                                       else st.membership.clocks.get(rank, 0)),
                 source=st.source, fit=st.fit, gen=st.gen,
                 members={str(r): a for r, a in st.members.items()},
                 merges=st.merges_msg())
        if rank is not None and st.owner_state is not None:
            out["policy_state"] = to_serialize(st.owner_state)
            st.owner_state_sent.add(rank)
            if st.owner_state_sent >= set(st.members):  # every owner has its piece
                st.owner_state, st.owner_state_sent = None, set()
        if rank is None and st.version == st.start_version:
            # nothing merged in this generation (it may never have started: the workers
            # changed after the last round): its owners may hold no shards yet, and the
            # version is held whole by the member it starts from
            out["whole"] = st.source
        restore = st.restore.pop(rank, None) if rank is not None else None
        if restore is not None:
            if restore.get("params") is not None:
                out["params"] = to_serialize(restore["params"])
            out["opt_state"] = to_serialize(restore["opt_state"])
        return out

    # -- handlers: checkpoints ---------------------------------------------------------------
    @handler
    def checkpoint_meta(self, **msg) -> dict:
        """``daskdl_checkpoint_meta(run, secret, clock, meta)``: what the client adds to
        the checkpoint at ``clock`` (data position, plan); only for a planned clock."""
        st = self._run(msg)
        clock = protocol.int_field(msg, "clock")
        if st.cut is None or not st.cut.wants(clock):
            raise ProtocolError(f"no checkpoint is planned at clock {clock}")
        with parsing("checkpoint meta"):
            meta = protocol.load(msg.get("meta"), limit=64 * 2**20, what="meta")
        if not isinstance(meta, dict):
            raise ProtocolError("field 'meta' must be a dict")
        st.cut.set_meta(clock, meta)
        self._checkpoint(st)
        return ok()

    @handler
    async def checkpoint_flush(self, **msg) -> dict:
        """``daskdl_checkpoint_flush(run, secret)``: wait until the checkpoints queued so
        far are written.  Replies ``errors``."""
        st = self._run(msg)
        if st.cut is None:
            return ok(errors=[])
        await _in_thread(st.cut.writer.wait)
        return ok(errors=list(st.cut.writer.errors))

    def _checkpoint(self, st: RunState) -> None:
        """Submit every complete checkpoint cut of ``st``."""
        if st.cut is None or not st.cut.meta or st.aborted:
            return
        m = st.membership
        if st.sharded:
            return self._checkpoint_sharded(st)
        # the model state is written after the parameters, in the same group
        for clock in st.cut.take(m.members, m.done, st.version, st.leaves + st.state,
                                 jax.tree_util.tree_leaves(st.policy_state), st.replies,
                                 {"policy": st.policy.name, "members": len(m.members),
                                  "generation": m.gen, "state_leaves": len(st.state),
                                  "steps": st.global_steps(min(st.cut.meta))}):
            st.stats.event("checkpoint", clock=clock, version=st.version)

    def _checkpoint_sharded(self, st: RunState) -> None:
        """Submit the complete cuts of a sharded run: the owners keep the version (the
        log entry is pinned) until the writer's thread fetches its shards from them."""
        from ..exchange import fetch_pinned

        m = st.membership
        loop = asyncio.get_running_loop()
        version, members, state = st.version, dict(m.members), list(st.state)
        pinned = {"done": False, "merges": [], "ready": threading.Event()}
        workers = self.scheduler.workers

        async def present(address: str) -> bool:  # an owner killed meanwhile: fail fast
            return address in workers

        def fetch():
            pinned["ready"].wait(60)
            coro = fetch_pinned(self.scheduler.rpc, st.run, st.secret, st.fit, m.gen,
                                members, version, st.specs, pinned["merges"], present)
            params, pol, local = asyncio.run_coroutine_threadsafe(coro, loop).result(
                timeout=10 * st.timeout)
            return params + state, pol, local

        for clock in st.cut.take(m.members, m.done, version, fetch, [], {},
                                 {"policy": st.policy.name, "members": len(m.members),
                                  "generation": m.gen, "state_leaves": len(st.state),
                                  "steps": st.global_steps(min(st.cut.meta)),
                                  "sync": "sharded"}):
            st.stats.event("checkpoint", clock=clock, version=version)
            if not pinned["done"] and st.log and st.log[-1].version == version:
                st.log[-1] = st.log[-1]._replace(pin=True)
                pinned["done"] = True
        pinned["merges"] = st.merges_msg()  # with the pin: owners that lag apply it
        pinned["ready"].set()

    # -- handlers: rounds ----------------------------------------------------------------------
    @handler
    async def sync(self, **msg) -> dict:
        """``daskdl_sync(**SyncRequest(...).to_msg(secret))``: a worker finished round
        ``clock``.  Merge per the policy, wait for the barrier, answer a
        :class:`~daskdl.protocol.SyncReply`: ``OK`` (``params`` ``None``: continue
        from what you sent), ``rejected`` (the update was not finite or not shaped like
        the parameters: dropped; start again from the global ``params``), ``replan``
        (the generation changed: the round is discarded) or ``aborted``."""
        st = self._run(msg)
        st.stats.messages["direct"] += 1
        return await self._sync(st, msg)

    @handler
    async def sync_group(self, **msg) -> dict:
        """``daskdl_sync_group(run, secret, syncs)``: a relay's batch of the syncs of
        its group's workers for one round (:mod:`daskdl.relay`), each a
        ``daskdl_sync`` message without secret.  Each is checked, counted and waits
        in the barrier exactly as a direct sync would; the reply holds one answer per
        sync, in order (``refused`` for a malformed one), with parameters that are the
        same for several answers sent once (``params``; those answers say
        ``shared``)."""
        st = self._run(msg)
        syncs = msg.get("syncs")
        if not isinstance(syncs, (list, tuple)) or not syncs or \
                len(syncs) > len(st.members) or not all(isinstance(m, dict) for m in syncs):
            raise ProtocolError("syncs must be a non-empty list of at most one sync message "
                                "per member")
        if len({m.get("rank") for m in syncs}) != len(syncs):
            raise ProtocolError("a relayed batch holds one sync per rank")
        st.stats.messages["batches"] += 1
        st.stats.messages["relayed"] += len(syncs)

        async def one(m: dict) -> dict:
            try:
                return await self._sync(st, dict(m, run=st.run))
            except ProtocolError as e:
                logger.debug("daskdl: relayed sync refused: %s", e)
                return refused(str(e))

        replies = await asyncio.gather(*(one(m) for m in syncs))
        shared = None
        for r in replies:  # parameters that several answers hold travel once
            p = r.get("params")
            if p is not None and (shared is None or p is shared):
                shared = p
                r["params"], r["shared"] = None, True
        return ok(replies=list(replies), params=shared)

    async def _sync(self, st: RunState, msg: dict) -> dict:
        """One sync (direct or relayed) of run ``st``; ProtocolError for a malformed one."""
        with parsing("daskdl_sync"):
            req = SyncRequest.from_msg(msg)
        if st.aborted:
            return _aborted(st)
        if not st.membership.current(req.gen, req.rank):
            return SyncReply(Status.REPLAN, st.version).to_msg()
        if st.sharded:
            return await self._sync_sharded(st, req)
        if req.resent and st.membership.clocks.get(req.rank) == req.clock + 1:
            return await self._answer_again(st, req)
        leaves, opt_state, buf = self._accept(st, req)
        state = self._model_state(st, req)
        st.count_steps(req.clock, req.steps)
        try:
            what = f"update of worker rank {req.rank}"
            if st.nbytes > INLINE_MERGE_BYTES:  # finiteness reads every byte: in a thread
                await _in_thread(st.check_update, leaves, buf, what)
                if st.aborted:
                    return _aborted(st)
                if not st.membership.current(req.gen, req.rank):
                    return SyncReply(Status.REPLAN, st.version).to_msg()
                if st.membership.clocks.get(req.rank) != req.clock or \
                        st.barrier.is_waiting(req.rank):
                    raise ProtocolError(f"rank {req.rank} sent round {req.clock} twice")
            else:
                st.check_update(leaves, buf, what)
            if state is not None:
                check_like(state, st.state, what=f"model state of worker rank {req.rank}")
        except ProtocolError:
            raise
        except DaskDLError as e:
            return await self._reject(st, req.rank, req.clock, str(e))
        arrived = time.time()
        await self._arrive(st, req, leaves, opt_state, state)
        if st.aborted:
            return _aborted(st)
        await self._wait_barrier(st, req)
        return self._answer(st, req, leaves, time.time() - arrived, buf is not None)

    async def _answer_again(self, st: RunState, req: SyncRequest) -> dict:
        """A sync its relay delivered before failing, sent again by its worker: counted
        once already, it waits with its first copy (still in the barrier) or for its
        barrier again, and gets its answer."""
        with parsing("daskdl_sync params"):
            leaves, buf = st.load_update(req.params, f"update of rank {req.rank}")
        arrived = time.time()
        if st.barrier.is_waiting(req.rank):
            await st.barrier.join(req.rank, 2 * st.timeout)
        else:
            await self._wait_barrier(st, req)
        return self._answer(st, req, leaves, time.time() - arrived, buf is not None)

    async def _wait_barrier(self, st: RunState, req: SyncRequest) -> None:
        """Wait until the policy lets ``req.rank`` go on; abort the run after twice
        ``daskdl.sync-timeout`` (the ranks it waited for count as lost after once)."""
        event = st.barrier.enter(req.rank, st.membership.clocks.get(req.rank, req.clock + 1))
        st.release()
        if not await st.barrier.wait(req.rank, event, st.timeout,
                                     lambda: self._drop_silent(st, req)):
            st.abort(f"worker rank {req.rank} waited {2 * st.timeout:g}s after round "
                     f"{req.clock}; raise daskdl.sync-timeout if rounds are that slow")

    async def _sync_sharded(self, st: RunState, req: SyncRequest) -> dict:
        """``daskdl_sync`` of a sharded run: the update went to the shard owners; the
        plugin counts the arrival, runs the barrier and logs the merges (the owners
        apply them).  The reply holds the version to gather and the merges since the
        floor."""
        if req.params is not None:
            raise ProtocolError("a sharded run's daskdl_sync carries no params")
        _, opt_state, _ = self._accept(st, req)
        state = self._model_state(st, req)
        st.count_steps(req.clock, req.steps)
        if not req.finite:
            return await self._reject(st, req.rank, req.clock,
                                      "the update holds NaN or infinite values (checked on "
                                      "its worker before it was sent)")
        if state is not None:
            try:
                check_like(state, st.state, what=f"model state of worker rank {req.rank}")
            except DaskDLError as e:
                return await self._reject(st, req.rank, req.clock, str(e))
        st.reported[req.rank] = req.version
        arrived = time.time()
        await self._arrive(st, req, None, opt_state, state)
        if st.aborted:
            return _aborted(st)
        await self._wait_barrier(st, req)
        if st.aborted:
            return _aborted(st)
        if st.membership.done.get(req.rank, 0) <= req.clock or req.gen != st.gen:
            return SyncReply(Status.REPLAN, st.version).to_msg()
        waited = time.time() - arrived
        st.stats.replied(req.rank, waited, 0)
        return SyncReply(Status.OK, st.version, waited=waited, state=st.state or None,
                         steps=st.global_steps(req.clock + 1),
                         merges=tuple(st.merges_msg())).to_msg()

    def _accept(self, st: RunState, req: SyncRequest) -> tuple[list, list | None, object]:
        """The update, optimizer state and packed buffer (or ``None``) of ``req`` once
        its round, size and samples are those the run expects (ProtocolError
        otherwise; nothing changed)."""
        if st.barrier.is_waiting(req.rank):
            raise ProtocolError(f"rank {req.rank} already waits after a round")
        at = st.membership.clocks[req.rank]
        if req.clock != at:
            raise ProtocolError(f"rank {req.rank} is at clock {at}, not {req.clock}")
        if req.samples > st.max_samples:
            raise ProtocolError(f"{req.samples} samples in one round is more than the "
                                f"{st.max_samples} a round holds")
        leaves = buf = None
        if not st.sharded:
            with parsing("daskdl_sync params"):
                leaves, buf = st.load_update(req.params, f"update of rank {req.rank}")
        if req.opt_state is None or st.cut is None or not st.cut.wants(req.clock + 1):
            return leaves, None, buf
        with parsing("daskdl_sync opt_state"):
            return leaves, protocol.leaves_field(req.opt_state, OPT_STATE_FACTOR * st.nbytes,
                                                 f"optimizer state of rank {req.rank}"), buf

    @staticmethod
    def _model_state(st: RunState, req: SyncRequest) -> list | None:
        """The model state sent with ``req``, its size checked before it is loaded
        (``None`` when the run has none); ProtocolError when it is missing."""
        if not st.state:
            return None
        if req.state is None:
            raise ProtocolError(f"rank {req.rank} sent no model state; the run has one")
        with parsing("daskdl_sync state"):
            return protocol.leaves_field(req.state, st.state_nbytes,
                                         f"model state of rank {req.rank}")

    async def _arrive(self, st: RunState, req: SyncRequest, leaves: list, opt_state,
                      state: list | None = None) -> None:
        """Count a valid update: clocks, stats, optimizer state, and its merge."""
        st.strikes.pop(req.rank, None)
        st.membership.clocks[req.rank] = req.clock + 1
        if opt_state is not None:
            st.cut.keep_opt_state(req.clock + 1, req.rank, opt_state)
        st.stats.arrived(req.rank, st.members[req.rank], req.clock, req.samples, req.version,
                         req.loss, req.compute,
                         req.sent if leaves is None else sum(x.nbytes for x in leaves))
        if leaves is None:
            st.stats.shard_traffic(req.rank, req.raw, req.received, req.transfer, req.merge)
            if req.divergence is not None and req.rank in st.stats.ranks:
                st.stats.ranks[req.rank]["divergence"] = req.divergence
        contribution = Contribution(req.rank, leaves, req.samples, req.version, req.loss,
                                    state)
        if st.policy.group:
            st.barrier.add(req.clock, contribution)
            await self._merge_group(st, req.clock)
        else:
            await self._merge(st, [contribution], req.clock)

    async def _drop_silent(self, st: RunState, req: SyncRequest) -> None:
        """``req.rank`` waited ``daskdl.sync-timeout``: the ranks behind it are lost."""
        mine = st.membership.clocks.get(req.rank, 0)
        for r in sorted(r for r, c in st.membership.clocks.items() if c < mine):
            await self._drop(st, r, LeaveReason.TIMED_OUT,
                             f"it sent nothing for {st.timeout:g}s while rank {req.rank} "
                             f"waited after round {req.clock} under {st.policy.name} "
                             "(daskdl.sync-timeout)")

    def _answer(self, st: RunState, req: SyncRequest, leaves: list, waited: float,
                packed: bool = False) -> dict:
        """The reply to a sync that went through its barrier (the global params packed
        in one buffer when the update came ``packed``)."""
        if st.aborted:
            return _aborted(st)
        if st.membership.done.get(req.rank, 0) <= req.clock or req.gen != st.gen:
            return SyncReply(Status.REPLAN, st.version).to_msg()  # frozen before merged
        new = st.replies.pop(req.rank, st.leaves)
        same = len(new) == len(leaves) and all(a is b for a, b in zip(new, leaves))
        st.stats.replied(req.rank, waited, 0 if same else sum(x.nbytes for x in new))
        if not same and new is st.leaves:
            new = st.params_as(packed)  # serialized once for every rank of this version
        return SyncReply(Status.OK, st.version, params=None if same else new,
                         waited=waited, state=st.state or None,
                         steps=st.global_steps(req.clock + 1)).to_msg()

    async def _reject(self, st: RunState, rank: int, clock: int, why: str) -> dict:
        """Drop a bad update; the worker starts again from the global parameters.

        A rejected update still counts as the rank's round, with nothing merged, so
        that barriers and group merges go on.  After ``daskdl.max-rejections`` in a
        row from one rank the run is aborted: the model itself diverges.
        """
        strikes = st.strikes[rank] = st.strikes.get(rank, 0) + 1
        st.stats.rejected_update(rank, st.members[rank], clock, why)
        logger.warning("daskdl run %s: update of rank %d after round %d rejected: %s",
                       st.run, rank, clock, why)
        if strikes >= st.max_rejections:
            st.abort(f"{st.max_rejections} updates in a row from worker rank {rank} were "
                     f"rejected; the last: {why}")
            st.diverged = True
            return _aborted(st)
        st.membership.clocks[rank] = st.membership.done[rank] = clock + 1
        if st.policy.group:
            st.barrier.skip(clock, rank)
            await self._merge_group(st, clock)
        st.release()
        return SyncReply(Status.REJECTED, st.version,
                         params=None if st.sharded else st.params_msg(), reason=why,
                         state=st.state or None, steps=st.global_steps(clock + 1),
                         merges=tuple(st.merges_msg()) if st.sharded else ()).to_msg()

    # -- merges --------------------------------------------------------------------------------
    async def _merge_group(self, st: RunState, clock: int) -> None:
        """Merge round ``clock`` of a group policy once every member has sent its update
        (or had it rejected)."""
        contributions = st.barrier.complete(clock, st.members)
        if contributions:
            await self._merge(st, contributions, clock)

    async def _merge(self, st: RunState, contributions: list, clock: int) -> None:
        """Merge ``contributions`` into the global parameters (in a thread above
        ``INLINE_MERGE_BYTES``); a failing merge aborts the run."""
        t0 = time.perf_counter()
        if st.sharded:  # the owners merge; the plugin logs what and in which order
            if st.aborted or st.membership.frozen:
                return
            st.version += 1
            st.log.append(MergeEntry(
                st.version, tuple((c.rank, clock, c.samples, c.version, c.loss)
                                  for c in contributions), tuple(sorted(st.members))))
            st.state = state_mean(contributions) or st.state
            for c in contributions:
                st.membership.done[c.rank] = max(st.membership.done.get(c.rank, 0), clock + 1)
            st.stats.merged(contributions, clock, st.version, time.perf_counter() - t0)
            self._checkpoint(st)
            return
        try:
            merged = await self._merged(st, contributions)
        except Exception as e:  # noqa: BLE001  (a failing merge must never leave workers waiting)
            st.abort(f"the {st.policy.name} merge of round {clock} failed: {e!r}")
            return
        if st.aborted or st.membership.frozen:
            return
        st.leaves, st.policy_state = list(merged.params), merged.state
        st.state = state_mean(contributions) or st.state  # whatever the policy
        st.replies.update(merged.replies or {})
        st.version += 1
        for c in contributions:
            st.membership.done[c.rank] = max(st.membership.done.get(c.rank, 0), clock + 1)
        seconds = time.perf_counter() - t0
        divergence = None
        if st.stats.divergence_due():  # reads every byte: off the event loop when large
            args = (contributions, st.leaves, st.policy.sends)
            divergence = (await _in_thread(divergences, *args) if _large(contributions)
                          else divergences(*args))
        st.stats.merged(contributions, clock, st.version, seconds, divergence)
        self._checkpoint(st)

    @staticmethod
    async def _merged(st: RunState, contributions: list) -> Merged:
        """Run the policy's merge and check its result is shaped like the parameters."""
        args = (st.policy_state, st.leaves, contributions,
                SyncInfo(st.version, tuple(sorted(st.members))))
        if _large(contributions):
            merged = Merged(*await _in_thread(st.policy.merge, *args))
        else:
            merged = Merged(*st.policy.merge(*args))
        check_like(merged.params, st.leaves, what=f"merge result of {st.policy.name}")
        for r, rep in (merged.replies or {}).items():
            check_like(rep, st.leaves, what=f"{st.policy.name} reply to rank {r}")
        return merged


def _large(contributions: list) -> bool:
    """Whether work over ``contributions`` runs in a thread, off the event loop."""
    return sum(x.nbytes for c in contributions for x in c.leaves) > INLINE_MERGE_BYTES


def get_plugin(scheduler) -> TrainingPlugin | None:
    """The :class:`TrainingPlugin` of a scheduler (for tests and diagnostics)."""
    return scheduler.extensions.get(protocol.EXTENSION)
