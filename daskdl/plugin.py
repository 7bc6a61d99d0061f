"""The scheduler side of training: global parameters, clocks, barriers.

:class:`TrainingPlugin` is a ``SchedulerPlugin`` registered once per scheduler
(name ``"daskdl"``).  It keeps one :class:`RunState` per training run and
serves these handlers (called by replicas and by the client)::

    daskdl_start(run, params, policy, members, timeout)   start or restart a run
    daskdl_sync(run, rank, clock, params, samples, version, loss)
                                                            a worker's end of round
    daskdl_params(run)                                      global params and version
    daskdl_abort(run, reason)                               fail every waiting worker
    daskdl_info(run)                                        clocks, version, history
    daskdl_end(run)                                         forget the run

Waiting in a barrier is an ``await`` on the scheduler's event loop, with a
timeout (``daskdl.sync-timeout``) after which the run is aborted, so a failing
worker can never leave the others blocked.  Merges run in a thread, off the
event loop.

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
    """Everything the scheduler knows about one training run."""

    def __init__(self, run: str, leaves: list, policy: Policy, members: dict, timeout: float):
        self.run = run
        self.leaves = leaves
        self.version = 0
        self.policy = policy
        self.policy_state = policy.init(leaves)
        self.members = dict(members)  # rank -> worker address
        self.clocks = {rank: 0 for rank in members}  # rounds each rank has finished
        self.timeout = timeout
        self.pending: dict[int, dict[int, Contribution]] = {}  # group merges: clock -> rank ->
        self.waiting: dict[int, asyncio.Event] = {}  # rank -> event set when it may go on
        self.replies: dict[int, list] = {}  # rank -> leaves it continues from (EASGD)
        self.aborted: str | None = None
        self.history: collections.deque = collections.deque(maxlen=100_000)
        self.merge_seconds = 0.0
        self.rejected = 0
        self.loss: float | None = None  # sample-weighted loss of the last merge
        self.started = time.time()
        self.ended: float | None = None
        self.stats = {rank: _rank_stats(addr) for rank, addr in self.members.items()}

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
            d["active"] = rank in self.members
            per_rank[rank] = d
        return {
            "run": self.run, "policy": self.policy.name, "every": self.policy.every,
            "active": self.ended is None and self.aborted is None,
            "aborted": self.aborted, "started": self.started, "ended": self.ended,
            "workers": len(self.members), "version": self.version, "samples": samples,
            "samples_per_s": samples / max(now - self.started, 1e-9),
            "loss": self.loss, "rejected": self.rejected,
            "merge_seconds": self.merge_seconds, "ranks": per_rank,
        }

    def info(self) -> dict:
        return {
            "run": self.run,
            "version": self.version,
            "policy": self.policy.name,
            "every": self.policy.every,
            "members": dict(self.members),
            "clocks": dict(self.clocks),
            "aborted": self.aborted,
            "history": list(self.history),
            "merge_seconds": self.merge_seconds,
            "rejected": self.rejected,
            "metrics": self.metrics(),
        }


def _rank_stats(address: str) -> dict:
    return {"address": address, "clock": 0, "rounds": 0, "samples": 0, "compute_s": 0.0,
            "wait_s": 0.0, "bytes_in": 0, "bytes_out": 0, "loss": None, "divergence": None}


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
            "daskdl_abort": self.abort,
            "daskdl_info": self.info,
            "daskdl_end": self.end_run,
        })

    # -- membership ----------------------------------------------------------------
    def remove_worker(self, scheduler, worker: str, **kwargs):
        for st in list(self.runs.values()):
            if worker in st.members.values() and st.aborted is None:
                rank = next(r for r, a in st.members.items() if a == worker)
                self._abort(st, f"worker {worker} (rank {rank}) left the cluster during "
                                "training; call fit again to continue from the last global "
                                "parameters")

    async def restart(self, scheduler):
        for st in self.runs.values():
            self._abort(st, "the cluster was restarted")

    async def close(self):
        for st in self.runs.values():
            self._abort(st, "the scheduler is closing")

    # -- handlers --------------------------------------------------------------------
    def start_run(self, run: str, params, policy, members: dict, timeout: float) -> dict:
        leaves = list(_load(params))
        policy = _load(policy)
        old = self.runs.get(run)
        if old is not None:
            self._abort(old, "the run was restarted")
        members = {int(k): v for k, v in members.items()}
        self.runs[run] = RunState(run, leaves, policy, members, float(timeout))
        logger.info("daskdl run %s started with %d workers under %s(every=%d)",
                    run, len(members), policy.name, policy.every)
        return {"status": "OK"}

    async def sync(self, run: str, rank: int, clock: int, params, samples: int,
                   version: int, loss: float | None = None, compute: float = 0.0) -> dict:
        """A worker finished round ``clock``: merge per the policy, wait for its barrier,
        answer with the parameters it continues from."""
        st = self.runs.get(run)
        if st is None:
            return {"status": "aborted", "reason": f"unknown training run {run!r}"}
        if st.aborted:
            return {"status": "aborted", "reason": st.aborted}
        leaves = _load(params)
        try:
            check_like(leaves, st.leaves, what=f"update of worker rank {rank}")
        except DaskDLError as e:
            st.rejected += 1
            self._abort(st, str(e))
            return {"status": "aborted", "reason": str(e)}
        arrived = time.time()
        contribution = Contribution(rank, leaves, int(samples), int(version), loss)
        st.clocks[rank] = clock + 1
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
            group = st.pending.setdefault(clock, {})
            group[rank] = contribution
            if len(group) == len(st.members):
                await self._merge(st, sorted(st.pending.pop(clock).values(),
                                             key=lambda c: c.rank), clock)
        else:
            await self._merge(st, [contribution], clock)
        if st.aborted:
            return {"status": "aborted", "reason": st.aborted}

        event = st.waiting[rank] = asyncio.Event()
        self._release(st)
        try:
            await asyncio.wait_for(event.wait(), st.timeout)
        except asyncio.TimeoutError:
            behind = sorted(r for r, c in st.clocks.items() if c < st.clocks[rank])
            self._abort(st, f"worker rank {rank} waited {st.timeout:g}s after round {clock} "
                            f"for worker ranks {behind} under {policy.name}; raise "
                            "daskdl.sync-timeout if rounds are that slow")
        finally:
            st.waiting.pop(rank, None)
        if st.aborted:
            return {"status": "aborted", "reason": st.aborted}
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

    def _release(self, st: RunState) -> None:
        """Open the barrier of every waiting worker the policy lets go on."""
        lo = min(st.clocks.values())
        for rank, event in list(st.waiting.items()):
            if not event.is_set() and st.policy.barrier(st.clocks, rank):
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
        if st.aborted:
            return
        st.leaves, st.policy_state = list(merged.params), merged.state
        st.replies.update(merged.replies or {})
        st.version += 1
        # divergence of each contributor from the new global params (policies sending
        # deltas: the size of the delta, i.e. how far it moved from its starting point)
        divergence = {}
        for c in contributions:
            ref = st.leaves if st.policy.sends == "params" else [np.zeros_like(x) for x in c.leaves]
            divergence[c.rank] = _norm_of_difference(c.leaves, ref)
            if c.rank in st.stats:
                st.stats[c.rank]["divergence"] = divergence[c.rank]
        weighted = [(c.loss, c.samples) for c in contributions if c.loss is not None]
        if weighted:
            st.loss = sum(lo * n for lo, n in weighted) / max(sum(n for _, n in weighted), 1)
        st.history.append({"kind": "merge", "clock": clock, "version": st.version,
                           "time": time.time(), "ranks": [c.rank for c in contributions],
                           "samples": sum(c.samples for c in contributions),
                           "loss": st.loss, "divergence": divergence})

    def get_params(self, run: str) -> dict:
        st = self.runs.get(run)
        if st is None:
            return {"status": "error", "reason": f"unknown training run {run!r}"}
        return {"status": "OK", "params": to_serialize(st.leaves), "version": st.version}

    def abort(self, run: str, reason: str) -> dict:
        st = self.runs.get(run)
        if st is not None:
            self._abort(st, reason)
        return {"status": "OK"}

    def info(self, run: str) -> dict | None:
        st = self.runs.get(run)
        return None if st is None else st.info()

    def end_run(self, run: str) -> dict:
        st = self.runs.pop(run, None)
        if st is not None:
            self._abort(st, "the run ended", log=False)
            st.ended = time.time()
            st.leaves, st.policy_state, st.replies, st.pending = [], None, {}, {}
            self.finished[run] = st  # kept (without parameters) for dashboards
            while len(self.finished) > self.keep_finished:
                self.finished.pop(next(iter(self.finished)))
        return {"status": "OK"}

    def metrics(self) -> dict:
        """``{run: metrics}`` of every current and recently ended run (see
        :meth:`RunState.metrics`); what the dashboard page and Prometheus read."""
        out = {run: st.metrics() for run, st in self.finished.items()}
        out.update({run: st.metrics() for run, st in self.runs.items()})
        return out

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
