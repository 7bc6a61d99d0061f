"""The scheduler side of training: global parameters, clocks, barriers.

:class:`TrainingPlugin` is a ``SchedulerPlugin`` registered once per scheduler
(name ``"daskdl"``).  It keeps one :class:`RunState` per training run and
serves these handlers (called by replicas and by the client)::

    daskdl_start(run, params, policy, members, timeout, ...)   start or restart a run
    daskdl_sync(run, rank, clock, params, samples, version, loss, compute, gen, opt_state)
                                                     a worker's end of round
    daskdl_params(run, rank)                         global params and version (and a
                                                     rank's state restored from a checkpoint)
    daskdl_freeze(run) / daskdl_regroup(run, members, clock)
                                                     end a generation / start the next
    daskdl_checkpoint_meta(run, clock, meta)         what the client adds to a checkpoint
    daskdl_checkpoint_flush(run)                     wait for queued checkpoint writes
    daskdl_abort(run, reason)                        fail every waiting worker
    daskdl_info(run)                                 clocks, version, history, metrics
    daskdl_end(run)                                  end the run (kept for dashboards)

Waiting in a barrier is an ``await`` on the scheduler's event loop, with a
timeout (``daskdl.sync-timeout``) after which the workers waited for count as
lost, so a failing worker can never leave the others blocked.  Workers that
leave the cluster, or that Dask pauses for memory, are dropped from the barriers
at once.  Large merges run in a thread, off the event loop.

Like ``distributed.Variable``, the parameters travel through the scheduler:
each synchronisation sends every worker's parameters to the scheduler and the
merged ones back.  That is cheap for small and medium models (a few MB);
for large models use a larger ``every`` so that syncs are rarer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import numpy as np

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import Serialized, merge_and_deserialize, to_serialize

from . import config
from .errors import DaskDLError
from .policies import Contribution, Merged, Policy, SyncInfo
from .tree import check_like

logger = logging.getLogger("daskdl")

PLUGIN_NAME = "daskdl"
_INLINE_MERGE_BYTES = 16 * 2**20


def _load(obj):
    """Payloads wrapped in ``to_serialize`` arrive as ``Serialized`` over TCP."""
    if isinstance(obj, Serialized):
        return merge_and_deserialize(obj.header, obj.frames)
    return obj


class RunState:
    """Everything the scheduler knows about one training run.

    Membership changes by *generations*: ranks ``0..W-1`` of a generation are fixed;
    a worker that leaves is dropped from the barriers at once (``lost``), and the
    client then freezes the generation (:meth:`TrainingPlugin.freeze`: rounds not yet
    merged are discarded) and starts the next one (:meth:`TrainingPlugin.regroup`)
    with the workers present.  Global parameters, version and policy state carry on.
    """

    def __init__(self, run: str, leaves: list, policy: Policy, members: dict, timeout: float,
                 clock: int = 0, version: int = 0, policy_state=None):
        self.run = run
        self.leaves = leaves
        self.version = version
        self.policy = policy
        self.policy_state = policy.init(leaves) if policy_state is None else policy_state
        self.gen = 0
        self.frozen = False
        self.members = dict(members)  # rank -> worker address
        self.clocks = {rank: clock for rank in members}  # rounds each rank has sent
        self.done = {rank: clock for rank in members}  # rounds each rank has had merged
        self.lost: dict[int, dict] = {}  # rank -> {address, done, reason} (this generation)
        self.timeout = timeout
        self.pending: dict[int, dict[int, Contribution]] = {}  # group merges: clock -> rank ->
        self.skipped: dict[int, set] = {}  # group merges: clock -> ranks whose update was rejected
        self.waiting: dict[int, asyncio.Event] = {}  # rank -> event set when it may go on
        self.replies: dict[int, list] = {}  # rank -> leaves it continues from (EASGD)
        self.restore: dict[int, dict] = {}  # rank -> {opt_state, params} from a checkpoint
        self.aborted: str | None = None
        self.diverged = False  # aborted because one worker's updates kept being rejected
        self.history: collections.deque = collections.deque(maxlen=100_000)
        self.merge_seconds = 0.0
        self.rejected = 0
        self.strikes: dict[int, int] = {}  # rank -> rejected updates in a row
        self.max_rejections = int(config.get("max-rejections"))
        self.loss: float | None = None  # sample-weighted loss of the last merge
        self.divergence_at = -1e9  # when divergence was last computed (monotonic)
        self.started = time.time()
        self.ended: float | None = None
        self.stats = {rank: _rank_stats(addr) for rank, addr in self.members.items()}
        self.checkpoints = None  # a CheckpointWriter, when the run writes checkpoints
        self.ckpt_meta: dict[int, dict] = {}  # clock -> what the client adds to a checkpoint
        self.ckpt_opt: dict[int, dict] = {}  # clock -> rank -> flat optimizer state

    def metrics(self) -> dict:
        """Aggregates for dashboards and Prometheus: plain numbers, cheap to compute."""
        now = self.ended or time.time()
        top = max(self.clocks.values(), default=0)
        samples = sum(s["samples"] for s in self.stats.values())
        per_rank = {}
        for rank, s in self.stats.items():
            d = dict(s)
            d["clock"] = self.clocks.get(rank, s["clock"])
            d["staleness"] = top - d["clock"]
            d["active"] = self.members.get(rank) == s["address"]
            per_rank[rank] = d
        ck = self.checkpoints
        return {
            "run": self.run, "policy": self.policy.name, "every": self.policy.every,
            "active": self.ended is None and self.aborted is None,
            "aborted": self.aborted, "started": self.started, "ended": self.ended,
            "workers": len(self.members), "generation": self.gen, "version": self.version,
            "samples": samples, "samples_per_s": samples / max(now - self.started, 1e-9),
            "loss": self.loss, "rejected": self.rejected,
            "merge_seconds": self.merge_seconds, "ranks": per_rank,
            "checkpoints": 0 if ck is None else ck.written,
            "checkpoint_blocked_s": 0.0 if ck is None else ck.blocked_s,
            "checkpoint_write_s": 0.0 if ck is None else ck.write_s,
            "checkpoints_skipped": 0 if ck is None else ck.skipped,
        }

    def info(self) -> dict:
        return {
            "run": self.run,
            "version": self.version,
            "policy": self.policy.name,
            "every": self.policy.every,
            "generation": self.gen,
            "members": dict(self.members),
            "clocks": dict(self.clocks),
            "done": dict(self.done),
            "lost": {r: dict(v) for r, v in self.lost.items()},
            "aborted": self.aborted,
            "history": list(self.history),
            "merge_seconds": self.merge_seconds,
            "rejected": self.rejected,
            "metrics": self.metrics(),
        }


def _rank_stats(address: str) -> dict:
    return {"address": address, "clock": 0, "rounds": 0, "samples": 0, "compute_s": 0.0,
            "wait_s": 0.0, "bytes_in": 0, "bytes_out": 0, "loss": None, "divergence": None,
            "rejected": 0}


def _norm_of_difference(a: list, b: list) -> float:
    """``||a - b||`` over all floating leaves (for display: sums in the leaves' dtype)."""
    total = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.inexact):
            d = (x - y).ravel()
            total += float(np.vdot(d, d).real)
    return float(np.sqrt(total))


class TrainingPlugin(SchedulerPlugin):
    """Scheduler plugin holding the global parameters of daskdl training runs."""

    name = PLUGIN_NAME
    idempotent = True
    keep_finished = 10

    def __init__(self):
        self.runs: dict[str, RunState] = {}
        self.finished: dict[str, RunState] = {}  # ended runs, newest last, no params
        self.scheduler = None

    async def start(self, scheduler):
        self.scheduler = scheduler
        scheduler.extensions[PLUGIN_NAME] = self
        scheduler.handlers.update({
            "daskdl_start": self.start_run,
            "daskdl_sync": self.sync,
            "daskdl_params": self.get_params,
            "daskdl_freeze": self.freeze,
            "daskdl_regroup": self.regroup,
            "daskdl_checkpoint_meta": self.checkpoint_meta,
            "daskdl_checkpoint_flush": self.checkpoint_flush,
            "daskdl_abort": self.abort,
            "daskdl_info": self.info,
            "daskdl_end": self.end_run,
        })

    # -- membership ----------------------------------------------------------------
    def _event(self, st: RunState, msg: dict) -> None:
        """Tell the client of run ``st`` (topic ``daskdl-<run>``) that membership changed."""
        if self.scheduler is not None:
            self.scheduler.log_event(f"daskdl-{st.run}", dict(msg, run=st.run))

    def remove_worker(self, scheduler, worker: str, **kwargs):
        todo = [(st, rank) for st in list(self.runs.values()) if st.aborted is None
                for rank, addr in st.members.items() if addr == worker]
        if todo:  # a coroutine only when there is something to do (the scheduler awaits it)
            return self._drop_all(todo, "it left the cluster")
        return None

    def log_event(self, topic: str, msg) -> None:
        """Dask pausing a worker (memory above ``distributed.worker.memory.pause``) takes it
        out of the barriers, as if it had left: a paused worker starts no new round, and
        the others would wait for it until ``daskdl.sync-timeout``.  When it runs again it
        joins like a new worker."""
        if not isinstance(msg, dict) or msg.get("action") != "worker-status-change":
            return
        if msg.get("status") == "paused":
            todo = [(st, rank) for st in list(self.runs.values()) if st.aborted is None
                    for rank, addr in st.members.items() if addr == topic]
            if todo:
                asyncio.ensure_future(self._drop_all(
                    todo, "Dask paused it: its memory is above distributed.worker.memory.pause"))
        elif msg.get("status") == "running" and msg.get("prev-status") == "paused":
            for st in list(self.runs.values()):
                if st.aborted is None:
                    self._event(st, {"action": "joined", "worker": topic})

    async def _drop_all(self, todo: list, reason: str) -> None:
        for st, rank in todo:
            await self._drop(st, rank, reason)

    def add_worker(self, scheduler, worker: str):
        for st in list(self.runs.values()):
            if st.aborted is None:
                self._event(st, {"action": "joined", "worker": worker})

    async def _drop(self, st: RunState, rank: int, reason: str) -> None:
        """Take ``rank`` out of the current generation: no barrier waits for it any more.

        A group merge that only waited for it runs now, with the contributions that
        arrived; its rounds not yet merged go back to the plan (the client re-plans).
        """
        addr = st.members.pop(rank, None)
        if addr is None:
            return
        st.clocks.pop(rank, None)
        st.lost[rank] = {"address": addr, "done": st.done.get(rank, 0), "reason": reason}
        logger.warning("daskdl run %s: worker %s (rank %d) dropped: %s; training goes on "
                       "with %d workers", st.run, addr, rank, reason, len(st.members))
        st.history.append({"kind": "lost", "rank": rank, "worker": addr, "time": time.time(),
                           "reason": reason})
        self._event(st, {"action": "lost", "worker": addr, "rank": rank, "reason": reason})
        for clock in sorted(st.pending):
            st.pending[clock].pop(rank, None)
            await self._merge_group(st, clock)
        self._release(st)

    async def _merge_group(self, st: RunState, clock: int) -> None:
        """Merge round ``clock`` of a group policy once every member has sent its update
        (or had it rejected)."""
        group = st.pending.get(clock, {})
        skipped = st.skipped.get(clock, set())
        if not st.members or not set(group) | skipped >= set(st.members):
            return
        contributions = sorted(st.pending.pop(clock, {}).values(), key=lambda c: c.rank)
        st.skipped.pop(clock, None)
        if contributions:
            await self._merge(st, contributions, clock)

    async def restart(self, scheduler):
        for st in self.runs.values():
            self._abort(st, "the cluster was restarted")

    async def close(self):
        for st in self.runs.values():
            self._abort(st, "the scheduler is closing")
            if st.checkpoints is not None:
                st.checkpoints.close()

    # -- handlers --------------------------------------------------------------------
    def start_run(self, run: str, params, policy, members: dict, timeout: float,
                  clock: int = 0, version: int = 0, policy_state=None, restore=None,
                  checkpoint=None, max_rejections: int | None = None) -> dict:
        """Start (or restart) a run.  ``restore`` maps rank -> ``{"opt_state": leaves,
        "params": leaves}`` read from a checkpoint, handed to each rank on its first
        parameter fetch; ``checkpoint`` is ``{"store": ..., "keep": n}``."""
        leaves = list(_load(params))
        policy = _load(policy)
        old = self.runs.get(run)
        if old is not None:  # the same trainer's next fit
            self._abort(old, "the run was restarted", log=False)
            if old.checkpoints is not None:
                old.checkpoints.close()
        members = {int(k): v for k, v in members.items()}
        st = RunState(run, leaves, policy, members, float(timeout), clock=int(clock),
                      version=int(version), policy_state=_load(policy_state))
        st.restore = {int(k): v for k, v in (_load(restore) or {}).items()}
        st.max_rejections = int(config.get("max-rejections", max_rejections))
        if checkpoint is not None:
            from .checkpoint import CheckpointWriter

            checkpoint = _load(checkpoint)
            st.checkpoints = CheckpointWriter(checkpoint["store"], keep=checkpoint["keep"],
                                              key=checkpoint.get("key"))
        self.runs[run] = st
        logger.info("daskdl run %s started with %d workers under %s(every=%d)",
                    run, len(members), policy.name, policy.every)
        return {"status": "OK"}

    def freeze(self, run: str) -> dict:
        """Stop the current generation: rounds not merged yet are answered ``replan``
        and discarded by their workers.  Returns, per rank of the generation (lost
        ones too), how many rounds were merged."""
        st = self.runs.get(run)
        if st is None:
            return {"status": "error", "reason": f"unknown training run {run!r}"}
        st.frozen = True
        st.pending.clear()
        st.skipped.clear()
        st.ckpt_opt.clear()
        for ev in st.waiting.values():
            ev.set()
        done = dict(st.done)
        return {"status": "OK", "done": done, "lost": {r: dict(v) for r, v in st.lost.items()},
                "members": dict(st.members), "aborted": st.aborted}

    def regroup(self, run: str, members: dict, clock: int) -> dict:
        """Start the next generation with ``members`` (rank -> address), every rank
        at ``clock``.  Each worker fetches the global parameters at its first round."""
        st = self.runs.get(run)
        if st is None:
            return {"status": "error", "reason": f"unknown training run {run!r}"}
        if st.aborted:
            return self._aborted(st)
        members = {int(k): v for k, v in members.items()}
        st.gen += 1
        st.frozen = False
        st.members = members
        st.clocks = {r: int(clock) for r in members}
        st.done = {r: int(clock) for r in members}
        st.lost = {}
        st.pending.clear()
        st.skipped.clear()
        st.replies.clear()
        st.strikes.clear()
        st.ckpt_opt.clear()
        st.ckpt_meta = {k: v for k, v in st.ckpt_meta.items() if k > clock}
        for r, a in members.items():
            if st.stats.get(r, {}).get("address") != a:
                st.stats[r] = _rank_stats(a)
        st.history.append({"kind": "regroup", "generation": st.gen, "clock": int(clock),
                           "members": dict(members), "time": time.time()})
        logger.info("daskdl run %s: generation %d with %d workers from clock %d",
                    run, st.gen, len(members), clock)
        return {"status": "OK", "generation": st.gen}

    def checkpoint_meta(self, run: str, clock: int, meta) -> dict:
        """What the client adds to the checkpoint taken when every rank has finished
        ``clock`` rounds (data position, plan); the plugin writes it with the state."""
        st = self.runs.get(run)
        if st is not None:
            st.ckpt_meta[int(clock)] = _load(meta)
        return {"status": "OK"}

    async def checkpoint_flush(self, run: str) -> dict:
        """Wait until the checkpoints queued so far are on disk (end of ``fit``)."""
        st = self.runs.get(run)
        if st is None or st.checkpoints is None:
            return {"status": "OK", "errors": []}
        await asyncio.get_running_loop().run_in_executor(None, st.checkpoints.wait)
        return {"status": "OK", "errors": list(st.checkpoints.errors)}

    async def sync(self, run: str, rank: int, clock: int, params, samples: int,
                   version: int, loss: float | None = None, compute: float = 0.0,
                   gen: int = 0, opt_state=None) -> dict:
        """A worker finished round ``clock``: merge per the policy, wait for its barrier,
        answer with the parameters it continues from.

        Replies: ``OK`` (with ``params`` or ``same``), ``rejected`` (the update was not
        finite or not shaped like the parameters: it was dropped, and the worker starts
        again from the global ``params``), ``replan`` (the generation changed: the
        round is discarded) or ``aborted``.
        """
        st = self.runs.get(run)
        if st is None:
            return {"status": "aborted", "reason": f"unknown training run {run!r}"}
        if st.aborted:
            return self._aborted(st)
        if st.frozen or gen != st.gen or rank not in st.members:
            return {"status": "replan"}
        leaves = _load(params)
        try:
            check_like(leaves, st.leaves, what=f"update of worker rank {rank}")
        except DaskDLError as e:
            return await self._reject(st, rank, clock, str(e))
        st.strikes.pop(rank, None)
        arrived = time.time()
        contribution = Contribution(rank, leaves, int(samples), int(version), loss)
        st.clocks[rank] = clock + 1
        if opt_state is not None:
            st.ckpt_opt.setdefault(clock + 1, {})[rank] = _load(opt_state)
        nbytes = sum(x.nbytes for x in leaves)
        st.history.append({"kind": "arrive", "rank": rank, "clock": clock, "time": arrived,
                           "loss": loss, "samples": samples, "compute": compute,
                           "version": version, "bytes": nbytes})
        stats = st.stats.setdefault(rank, _rank_stats(st.members.get(rank, "?")))
        stats["clock"] = clock + 1
        stats["rounds"] += 1
        stats["samples"] += int(samples)
        stats["compute_s"] += float(compute)
        stats["bytes_in"] += nbytes
        stats["loss"] = loss
        policy = st.policy
        if policy.group:
            st.pending.setdefault(clock, {})[rank] = contribution
            await self._merge_group(st, clock)
        else:
            await self._merge(st, [contribution], clock)
        if st.aborted:
            return self._aborted(st)

        event = st.waiting[rank] = asyncio.Event()
        self._release(st)
        try:
            await asyncio.wait_for(event.wait(), st.timeout)
        except asyncio.TimeoutError:
            behind = sorted(r for r, c in st.clocks.items() if c < st.clocks.get(rank, 0))
            for r in behind:  # a silent worker is treated as lost
                await self._drop(st, r, f"it sent nothing for {st.timeout:g}s while rank "
                                        f"{rank} waited after round {clock} under "
                                        f"{policy.name} (daskdl.sync-timeout)")
            if not event.is_set():
                try:
                    await asyncio.wait_for(event.wait(), st.timeout)
                except asyncio.TimeoutError:
                    self._abort(st, f"worker rank {rank} waited {2 * st.timeout:g}s after "
                                    f"round {clock}; raise daskdl.sync-timeout if rounds "
                                    "are that slow")
        finally:
            st.waiting.pop(rank, None)
        if st.aborted:
            return self._aborted(st)
        if st.done.get(rank, 0) <= clock or gen != st.gen:
            return {"status": "replan"}  # frozen before this round was merged
        waited = time.time() - arrived
        reply = {"status": "OK", "version": st.version, "waited": waited}
        stats["wait_s"] += waited
        new = st.replies.pop(rank, st.leaves)
        if all(a is b for a, b in zip(new, leaves)):
            reply["same"] = True  # the worker continues from what it sent: no bytes back
        else:
            reply["params"] = to_serialize(new)
            stats["bytes_out"] += sum(x.nbytes for x in new)
        return reply

    async def _reject(self, st: RunState, rank: int, clock: int, why: str) -> dict:
        """Drop a bad update; the worker starts again from the global parameters.

        A rejected update still counts as the rank's round, with nothing merged, so
        that barriers and group merges go on.  After ``daskdl.max-rejections`` in a
        row from one rank the run is aborted: the model itself diverges.
        """
        st.rejected += 1
        strikes = st.strikes[rank] = st.strikes.get(rank, 0) + 1
        stats = st.stats.setdefault(rank, _rank_stats(st.members.get(rank, "?")))
        stats["rejected"] = stats.get("rejected", 0) + 1
        st.history.append({"kind": "reject", "rank": rank, "clock": clock,
                           "time": time.time(), "reason": why})
        logger.warning("daskdl run %s: update of rank %d after round %d rejected: %s",
                       st.run, rank, clock, why)
        limit = st.max_rejections
        if strikes >= limit:
            self._abort(st, f"{limit} updates in a row from worker rank {rank} were rejected; "
                            f"the last: {why}")
            st.diverged = True
            return self._aborted(st)
        st.clocks[rank] = clock + 1
        st.done[rank] = clock + 1
        if st.policy.group:
            st.skipped.setdefault(clock, set()).add(rank)
            await self._merge_group(st, clock)
        self._release(st)
        return {"status": "rejected", "reason": why, "version": st.version,
                "params": to_serialize(st.leaves)}

    def _release(self, st: RunState) -> None:
        """Open the barrier of every waiting worker the policy lets go on."""
        if not st.clocks:
            return
        lo = min(st.clocks.values())
        for rank, event in list(st.waiting.items()):
            if not event.is_set() and rank in st.clocks and st.policy.barrier(st.clocks, rank):
                st.history.append({"kind": "release", "rank": rank, "clock": st.clocks[rank],
                                   "slowest": lo, "time": time.time()})
                event.set()

    async def _merge(self, st: RunState, contributions: list, clock: int) -> None:
        t0 = time.perf_counter()
        nbytes = sum(x.nbytes for c in contributions for x in c.leaves)
        info = SyncInfo(st.version, tuple(sorted(st.members)))
        try:
            if nbytes > _INLINE_MERGE_BYTES:  # large merges run off the event loop
                loop = asyncio.get_running_loop()
                merged = await loop.run_in_executor(
                    None, st.policy.merge, st.policy_state, st.leaves, contributions, info)
            else:
                merged = st.policy.merge(st.policy_state, st.leaves, contributions, info)
            merged = Merged(*merged)
            check_like(merged.params, st.leaves, what=f"merge result of {st.policy.name}")
            for r, rep in (merged.replies or {}).items():
                check_like(rep, st.leaves, what=f"{st.policy.name} reply to rank {r}")
        except Exception as e:  # a failing merge must never leave workers waiting
            self._abort(st, f"the {st.policy.name} merge of round {clock} failed: {e!r}")
            return
        st.merge_seconds += time.perf_counter() - t0
        if st.aborted or st.frozen:
            return
        st.leaves, st.policy_state = list(merged.params), merged.state
        st.replies.update(merged.replies or {})
        st.version += 1
        for c in contributions:
            st.done[c.rank] = max(st.done.get(c.rank, 0), clock + 1)
        # divergence of each contributor from the new global params (policies sending
        # deltas: the size of the delta, i.e. how far it moved from its starting point)
        # (at most once a second per run: it reads every byte of every contribution, on
        # the scheduler's event loop, and a dashboard needs no more)
        divergence = {}
        now = time.monotonic()
        if now - st.divergence_at >= 1.0:
            st.divergence_at = now
            for c in contributions:
                if st.policy.sends == "params":
                    same = all(a is b for a, b in zip(c.leaves, st.leaves))
                    divergence[c.rank] = 0.0 if same else _norm_of_difference(c.leaves,
                                                                              st.leaves)
                else:
                    divergence[c.rank] = _norm_of_difference(
                        c.leaves, [np.zeros_like(x) for x in c.leaves])
                if c.rank in st.stats:
                    st.stats[c.rank]["divergence"] = divergence[c.rank]
        weighted = [(c.loss, c.samples) for c in contributions if c.loss is not None]
        if weighted:
            st.loss = sum(lo * n for lo, n in weighted) / max(sum(n for _, n in weighted), 1)
        st.history.append({"kind": "merge", "clock": clock, "version": st.version,
                           "time": time.time(), "ranks": [c.rank for c in contributions],
                           "samples": sum(c.samples for c in contributions),
                           "loss": st.loss, "divergence": divergence})
        self._maybe_checkpoint(st)

    # -- checkpoints ---------------------------------------------------------------------
    def _maybe_checkpoint(self, st: RunState) -> None:
        """Snapshot the run when every rank has had round ``K - 1`` merged for a
        checkpoint clock ``K`` and sent its optimizer state; written in a thread."""
        if st.checkpoints is None or not st.ckpt_meta:
            return
        for clock in sorted(st.ckpt_meta):
            opts = st.ckpt_opt.get(clock, {})
            if not st.members or any(st.done.get(r, 0) < clock for r in st.members):
                break
            if not set(opts) >= set(st.members):
                break
            meta = st.ckpt_meta.pop(clock)
            st.ckpt_opt.pop(clock, None)
            import jax

            local = {r: st.replies[r] for r in st.members if r in st.replies}
            t0 = time.perf_counter()
            st.checkpoints.submit(
                clock=clock, version=st.version, params=st.leaves,
                policy_state=jax.tree_util.tree_leaves(st.policy_state),
                opt_states={r: opts[r] for r in st.members}, local_params=local,
                meta=dict(meta, clock=clock, version=st.version, policy=st.policy.name,
                          members=len(st.members), generation=st.gen))
            st.checkpoints.blocked_s += time.perf_counter() - t0
            st.history.append({"kind": "checkpoint", "clock": clock, "version": st.version,
                               "time": time.time()})

    def get_params(self, run: str, rank: int | None = None) -> dict:
        """Global parameters and version; for a rank restored from a checkpoint, also
        its optimizer state (and its own parameters under policies such as EASGD)."""
        st = self.runs.get(run)
        if st is None:
            return {"status": "error", "reason": f"unknown training run {run!r}"}
        out = {"status": "OK", "params": to_serialize(st.leaves), "version": st.version}
        restore = st.restore.pop(rank, None) if rank is not None else None
        if restore is not None:
            if restore.get("params") is not None:
                out["params"] = to_serialize(restore["params"])
            out["opt_state"] = to_serialize(restore["opt_state"])
        return out

    def abort(self, run: str, reason: str) -> dict:
        st = self.runs.get(run)
        if st is not None:
            self._abort(st, reason)
        return {"status": "OK"}

    def info(self, run: str) -> dict | None:
        st = self.runs.get(run)
        return None if st is None else st.info()

    def end_run(self, run: str, wait_checkpoints: bool = True) -> dict:
        st = self.runs.pop(run, None)
        written = None
        if st is not None:
            self._abort(st, "the run ended", log=False)
            if st.checkpoints is not None:
                written = st.checkpoints.close(wait=wait_checkpoints)
            st.ended = time.time()
            st.leaves, st.policy_state, st.replies, st.pending = [], None, {}, {}
            st.restore, st.ckpt_opt = {}, {}
            self.finished[run] = st  # kept (without parameters) for dashboards
            while len(self.finished) > self.keep_finished:
                self.finished.pop(next(iter(self.finished)))
        return {"status": "OK", "checkpoint_errors": written}

    def metrics(self) -> dict:
        """``{run: metrics}`` of every current and recently ended run (see
        :meth:`RunState.metrics`); what the dashboard page and Prometheus read."""
        out = {run: st.metrics() for run, st in self.finished.items()}
        out.update({run: st.metrics() for run, st in self.runs.items()})
        return out

    @staticmethod
    def _aborted(st: RunState) -> dict:
        return {"status": "aborted", "reason": st.aborted, "diverged": st.diverged}

    def _abort(self, st: RunState, reason: str, log: bool = True) -> None:
        if st.aborted is None:
            st.aborted = reason
            if log:
                logger.warning("daskdl run %s aborted: %s", st.run, reason)
        for ev in st.waiting.values():
            ev.set()


def get_plugin(scheduler) -> Any:
    """The :class:`TrainingPlugin` of a scheduler (for tests and diagnostics)."""
    return scheduler.extensions.get(PLUGIN_NAME)
