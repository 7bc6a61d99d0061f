"""The client side of one ``Trainer.fit``: submitting rounds, following the
workers as they leave and join, checkpoints and resuming.

:class:`FitLoop` receives everything it needs (:class:`FitConfig`, the starting
point :class:`FitStart`, a function placing a dataset on workers) and fills a
:class:`FitResult` that the :class:`~daskdl.Trainer` applies; it never touches the
trainer.

Rounds are tasks ``daskdl-round-<run>-<epoch>-<round>-<rank>`` (``-g<n>`` appended
from the second generation on), restricted to their worker and prioritised by
their clock; which rounds, in which order, comes from :mod:`daskdl.schedule`, and
what a round reads from :mod:`daskdl.sources`.

When a worker leaves (the scheduler plugin drops it from every barrier at once
and tells this client on the topic ``daskdl-<run>``) or joins, the loop

1. *freezes* the generation: the plugin answers rounds not merged yet with
   ``replan`` (their workers discard them) and says how many rounds of each rank
   were merged;
2. computes what is left of the epoch from those counts, and cuts it into equal
   pieces for the workers present (:func:`daskdl.schedule.replan`);
3. starts the next generation: every worker continues from the global
   parameters (keeping its optimizer state); a new worker starts from them.

Chunks that lived only on a lost worker (data scattered from the client) are
scattered again.  Below ``min_workers`` the loop pauses until workers come back.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from distributed import Client
from distributed.protocol.serialize import to_serialize

from . import config, protocol, schedule
from .errors import DaskDLError, RoundDiscarded, SyncAborted
from .policies import all_arrived
from .protocol import Faults, LeaveReason, MemberEvent, RoundSpec
from .relay import group_size, relay_groups
from .replica import run_rounds
from .workerenv import worker_info

logger = logging.getLogger("daskdl")


@dataclass(frozen=True)
class FitConfig:
    """What a fit needs to know of its trainer (all plain values)."""

    run: str
    secret: str = field(repr=False)
    policy: object
    batch_size: int
    seed: int
    rounds_ahead: int
    sync_timeout: float
    min_workers: int
    max_rejections: int
    checkpoint: object = None
    checkpoint_every: int | None = None
    checkpoint_key: object = field(default=None, repr=False)  # a key handle (client side)
    faults: dict = field(default_factory=dict)  # rank -> (slowdown, NaN clocks, relay clocks)
    rounds_per_task: int | None = 1  # None: "auto", tasks of about task_seconds
    task_seconds: float = 0.5
    sharded: bool = False  # sync="sharded" (daskdl.shards)
    compression: str | None = None
    overlap: bool = False  # sharded: round r + 1 computes while round r syncs
    relay_group: object = "auto"  # daskdl.relay-group: "auto" or an int (1: no relays)

    @property
    def tasks_ahead(self) -> int:
        """Tasks in flight per worker: ``rounds_ahead`` rounds, at least two tasks (one
        running, the next queued on the worker)."""
        return max(2, -(-self.rounds_ahead // (self.rounds_per_task or AUTO_FIRST)))

    def faults_for(self, rank: int, clock: int) -> Faults | None:
        """Fault injection for a round (only under config ``daskdl.testing``)."""
        if rank not in self.faults:
            return None
        slowdown, nan_at, lose_at = self.faults[rank]
        return Faults(slowdown=slowdown, send_nan=nan_at == "all" or clock in nan_at,
                      lose_relay_reply=lose_at == "all" or clock in lose_at)


@dataclass
class FitStart:
    """Where a fit starts: global parameters, next epoch and clock, history so far."""

    leaves: list
    epoch: int
    clock: int
    history: list
    fit_id: int
    state: list = field(default_factory=list)  # the model state, flat ([] without)
    steps: int = 0  # global optimizer steps taken before this fit


@dataclass
class FitResult:
    """What a fit did; the trainer applies it (also after a failure)."""

    records: list = field(default_factory=list)  # one dict per epoch that ended
    rounds: list = field(default_factory=list)  # every round's metrics, in order
    coverage: dict = field(default_factory=dict)  # epoch -> Counter(chunk -> samples)
    rejected_rounds: list = field(default_factory=list)
    history: list = field(default_factory=list)  # the trainer's history after this fit
    epoch: int = 0
    clock: int = 0
    leaves: list | None = None  # parameters read from a checkpoint (resume)
    source: object = None  # where the dataset's chunks are at the end
    starved_passes: int = 0  # passes that ended with a rank starved of rounds (stays 0)


def epoch_record(label: int, rounds: list, seconds: float, regroups: int) -> dict:
    """The record of one epoch from its rounds' metrics."""
    samples = sum(r["samples"] for r in rounds)
    return {"epoch": label,
            "loss": sum(r["loss"] * r["samples"] for r in rounds) / max(samples, 1),
            "samples": samples, "seconds": seconds,
            "rounds": len({r["clock"] for r in rounds}), "regroups": regroups}


class Members:
    """The workers a fit trains on, and the membership events of its run."""

    def __init__(self, client: Client, min_workers: int, bar):
        self.client = client
        self.min_workers = min_workers
        self.bar = bar
        self.changed = threading.Event()
        self.excluded: set = set()  # workers dropped for sending nothing

    def on_event(self, event) -> None:
        """Handler of the run's event topic (runs in the client's event loop)."""
        try:
            ev = MemberEvent.from_msg(event[1])
        except (ValueError, TypeError, KeyError):
            return
        if ev.action == "lost" and ev.reason is LeaveReason.TIMED_OUT:
            self.excluded.add(ev.worker)
        self.changed.set()

    def live(self) -> tuple:
        """Running workers, sorted; a worker that just registered is still ``init``
        when the plugin hears of it; paused and closing workers are left out."""
        info = worker_info(self.client)
        return tuple(sorted(a for a, w in info.items() if a not in self.excluded
                            and w.get("status", "running") in ("running", "init")))

    def wait(self) -> tuple:
        """The workers to train on; waits (with a message) while there are fewer than
        ``min_workers``, and fails after ``daskdl.min-workers-wait``."""
        need, limit = self.min_workers, config.get_seconds("min-workers-wait")
        t0, warned = time.monotonic(), False
        while True:
            members = self.live()
            if len(members) >= need:
                if warned:
                    logger.warning("daskdl: %d workers present, training goes on", len(members))
                    self.bar.set_description("daskdl fit")
                return members
            if not warned:
                logger.warning("daskdl: training paused: %d of min_workers=%d workers present; "
                               "waiting up to %gs for more (daskdl.min-workers-wait)",
                               len(members), need, limit)
                self.bar.set_description(f"waiting for workers ({len(members)}/{need})")
                warned = True
            if time.monotonic() - t0 > limit:
                raise DaskDLError(
                    f"training paused with {len(members)} of min_workers={need} workers and "
                    f"none came back within {limit:g}s (daskdl.min-workers-wait); start "
                    "workers (cluster.scale(n)) or lower Trainer(min_workers=...), then call "
                    "fit(..., resume=True) or fit again")
            self.changed.wait(0.5)
            self.changed.clear()


AUTO_FIRST = 4  # rounds per task before a round's time is known ("auto")
AUTO_MAX = 64  # most rounds per task under "auto"


class FitLoop:
    """One call of :meth:`daskdl.Trainer.fit` (see the module docstring)."""

    def __init__(self, client: Client, cfg: FitConfig, start: FitStart, dataset,
                 epochs: int, callbacks: list, bar, place: Callable, resume=None):
        self.c = client
        self.cfg = cfg
        self.start_at = start
        self.dataset = dataset
        self.callbacks = callbacks
        self.bar = bar
        self.place = place  # place(dataset, workers) -> ChunkSource
        self.resume = resume  # a checkpoint dict, or None
        self.members = Members(client, cfg.min_workers, bar)
        self.args = schedule.PlanArgs(tuple(dataset.chunks), cfg.batch_size,
                                      cfg.policy.every, cfg.seed)
        self.result = FitResult(history=[dict(h) for h in start.history],
                                epoch=start.epoch, clock=start.clock)
        self.gen = 0
        self.pending: dict = {}  # key -> round info (submitted, not handled)
        self.unreported: dict = {}  # key -> round info (finished, metrics on the worker)
        self.epoch_rounds: dict = collections.defaultdict(list)
        self.closed_labels: set = set()
        self.reported: set = set()  # (generation, rank, clock) of rounds whose metrics came
        self.covered: dict = {}  # (generation, rank, clock) -> segments counted as trained
        self.meta_sent: set = set()
        self.regroups = self.samples_seen = 0
        self.wake = threading.Event()  # set when a round's future is done
        self.per_task = cfg.rounds_per_task or AUTO_FIRST
        self.finished_at: dict = {}  # (generation, rank) -> when its last task finished
        self.round_s: dict = {}  # rank -> estimated wall seconds per round
        self.t_fit = self.t_epoch = time.perf_counter()
        self.t_fit_wall = time.time()
        self.epoch_end = None  # when the last epoch closed ended, on the workers' clocks
        fit_start = int(resume["meta"]["fit_start"]) if resume is not None else start.epoch
        self.fit_start, self.end_epoch = fit_start, fit_start + int(epochs)

    # -- scheduler calls --------------------------------------------------------------
    def call(self, op: str, **kwargs) -> dict:
        """Call a handler of the run (with its secret); a refusal is an error."""
        reply = self.c.sync(getattr(self.c.scheduler, op), run=self.cfg.run,
                            secret=self.cfg.secret, **kwargs)
        if reply.get("status") == protocol.Status.REFUSED.value:
            raise DaskDLError(f"the scheduler refused {op}: {reply.get('reason')}")
        return reply

    # -- set-up -----------------------------------------------------------------------
    def start(self) -> None:
        """Place the data, make the schedule, start the run on the scheduler."""
        self.workers = self.members.wait()
        self.source = self.result.source = self.place(self.dataset, self.workers)
        policy_state, version, restore = None, 0, None
        if self.resume is not None:
            self.entries, policy_state, version, restore = self._resume_from(self.resume)
        else:
            self.entries = schedule.fresh_entries(
                self.args, len(self.workers), self.result.epoch, self.end_epoch,
                self.result.clock, self.source.owners)
        first = self.entries[0] if self.entries else None
        self.first_clock = first.start + first.first if first else self.result.clock
        self.first_label = first.label if first else self.end_epoch
        self.build_queues()
        ckpt = None
        if self.cfg.checkpoint is not None:
            from .checkpoint import sendable_checkpoint_key

            ckpt = to_serialize({"store": self.cfg.checkpoint,
                                 "keep": int(config.get("checkpoint-keep")),
                                 "key": sendable_checkpoint_key(self.cfg.checkpoint_key,
                                                                self.dataset)})
        params = dict(params=to_serialize(self.start_leaves))
        self.init = None  # sharded: the starting params, on every worker (not the scheduler)
        if self.cfg.sharded:
            leaves = self.start_leaves
            params = dict(specs=[[list(np.shape(x)), np.asarray(x).dtype.name] for x in leaves],
                          fit=self.start_at.fit_id)
            try:
                self.init = self.c.scatter(list(leaves), broadcast=True, direct=True,
                                           hash=False)
            except (OSError, ValueError):  # the client cannot reach the workers
                self.init = self.c.scatter(list(leaves), broadcast=True, hash=False)
        self.call(protocol.START, **params,
                  policy=to_serialize(self.cfg.policy), members=self._members_msg(),
                  timeout=self.cfg.sync_timeout, clock=self.first_clock, version=version,
                  policy_state=to_serialize(policy_state), restore=to_serialize(restore),
                  checkpoint=ckpt, max_rejections=self.cfg.max_rejections,
                  max_samples=self._max_samples(), checkpoint_clocks=sorted(self.ckpt_clocks),
                  state=to_serialize(self.start_at.state), steps=self.start_at.steps)
        self.c.subscribe_topic(protocol.event_topic(self.cfg.run), self.members.on_event)

    def _members_msg(self) -> dict:
        return {str(r): a for r, a in enumerate(self.workers)}

    def _max_samples(self) -> int:
        return int(self.cfg.policy.every) * self.cfg.batch_size

    def _resume_from(self, ck: dict) -> tuple:
        """Schedule, policy state, version and per-rank restore from a checkpoint."""
        import jax

        meta = ck["meta"]
        res = self.result
        res.leaves = [np.array(x, copy=True) for x in ck["params"]]
        res.epoch, res.clock = int(meta["epoch"]), int(meta["clock"])
        res.history = [dict(h) for h in meta.get("history", [])]
        entries = schedule.resumed_entries(self.args, meta, len(self.workers),
                                           self.end_epoch, self.source.owners)
        treedef = jax.tree_util.tree_structure(self.cfg.policy.init(res.leaves))
        policy_state = (jax.tree_util.tree_unflatten(treedef, ck["policy_state"])
                        if ck["policy_state"] or treedef.num_leaves == 0 else None)
        restore = {r: {"opt_state": ck["opt_states"][r],
                       "params": ck["local_params"].get(r)}
                   for r in range(len(self.workers)) if r in ck["opt_states"]}
        return entries, policy_state, int(meta.get("version", 0)), restore

    @property
    def start_leaves(self) -> list:
        return self.result.leaves if self.result.leaves is not None else self.start_at.leaves

    def build_queues(self) -> None:
        """Per-rank queues of this generation's rounds, and the checkpoint clocks."""
        self.queues = schedule.RoundQueues(self.entries, len(self.workers),
                                           self.cfg.tasks_ahead, self.per_task)
        self.relays = relay_groups(self.workers, self.relay_size())
        # each rank's last round of the generation (an overlapped sync must end there)
        self.last_clock = {r: q[-1][2] for r, q in self.queues.queue.items() if q}
        self.ckpt_clocks = ({} if self.cfg.checkpoint is None else
                            schedule.checkpoint_clocks(self.entries, self.cfg.checkpoint_every))
        self.bar.total = self.bar.n + self.queues.queued
        self.bar.refresh()

    def relay_size(self) -> int:
        """Workers per relay group this generation (:mod:`daskdl.relay`; 1: none)."""
        policy = self.cfg.policy
        lockstep = policy.group and policy.barrier is all_arrived and not self.cfg.sharded
        nbytes = sum(np.asarray(x).nbytes for x in self.start_leaves)
        return group_size(self.cfg.relay_group, len(self.workers), nbytes, lockstep)

    def checkpoint_meta(self, K: int) -> dict:
        """What the plugin writes with the checkpoint cut at clock ``K``."""
        cfg = self.cfg
        meta = {"seed": cfg.seed, "batch_size": cfg.batch_size, "every": cfg.policy.every,
                "chunks": list(self.dataset.chunks), "fit_start": self.fit_start,
                "end_epoch": self.end_epoch, "n_workers": len(self.workers),
                "history": [dict(h) for h in self.result.history]}
        meta.update(schedule.data_position(self.entries, self.ckpt_clocks[K]))
        return meta

    # -- rounds ----------------------------------------------------------------------
    def round_spec(self, i: int, rank: int, k: int, clock: int, segs: list) -> RoundSpec:
        """What round ``k`` of entry ``i`` (its ``segs``) is for worker ``rank``."""
        en = self.entries[i]
        plan = en.plan
        reader = self.source.reader
        return RoundSpec(
            run=self.cfg.run, fit=self.start_at.fit_id, gen=self.gen, epoch=en.label,
            round=k, rank=rank, clock=clock, first_clock=self.first_clock,
            steps=plan.round_steps(k), batch_size=self.cfg.batch_size,
            segments=tuple((s.chunk, s.start, s.stop, s.epoch) for s in segs),
            chunks=tuple(dict.fromkeys(s.chunk for s in segs)),
            names=tuple(self.dataset.names), timeout=self.cfg.sync_timeout,
            sends=self.cfg.policy.sends, checkpoint=(clock + 1) in self.ckpt_clocks,
            source=reader, next_chunks=self._next_chunks(i, rank, k) if reader else (),
            faults=self.cfg.faults_for(rank, clock), secede=self.source.kind == "graph",
            members=tuple(self.workers) if self.cfg.sharded else (),
            compression=self.cfg.compression, overlap=self.cfg.overlap,
            last=clock == self.last_clock.get(rank),
            relay=self.relays[rank][0] if rank in self.relays else None,
            group=self.relays[rank][1] if rank in self.relays else ())

    def round_task(self, rank: int, rounds: list):
        """The task running ``rounds`` (``(entry, round, clock)``, consecutive) of worker
        ``rank`` (the arguments of ``Client.submit``), and its info.  Its key names its
        first round: ``daskdl-round-<run>-<epoch>-<round>-<rank>``."""
        segments = {clock: self.entries[i].plan.round_segments(rank, k)
                    for i, k, clock in rounds}
        specs = protocol.RoundBatch(self.round_spec(i, rank, k, clock, segments[clock])
                                    for i, k, clock in rounds)
        chunks = tuple(dict.fromkeys(c for sp in specs for c in sp.chunks))
        addr, first = self.workers[rank], specs[0]
        blocks = self.source.round_inputs(self.c, chunks, addr, first.clock)
        suffix = f"-g{self.gen}" if self.gen else ""
        key = (f"{protocol.ROUND_PREFIX}-{self.cfg.run}-{first.epoch}-{first.round}-{rank}"
               f"{suffix}")
        kwargs = {}
        if self.cfg.sharded and self.gen == 0:  # the fit's params, already on every worker
            kwargs["init"] = self.init  # (used by whichever round of the rank runs first)
        # Client.submit, not dask.delayed + compute: no tokenising of the specs and no
        # graph optimisation, a third of the client's CPU per task (docs/benchmarks.md)
        task = ((run_rounds, specs, chunks if blocks else (), *blocks),
                dict(kwargs, key=key, workers=[addr], allow_other_workers=False,
                     priority=-first.clock))
        return task, {"gen": self.gen, "rank": rank, "segments": segments,
                      "labels": [sp.epoch for sp in specs]}

    def _next_chunks(self, i: int, rank: int, k: int) -> tuple:
        """Chunks of ``rank``'s next round (prefetched by a worker reading Zarr)."""
        plan = self.entries[i].plan
        if k + 1 < plan.rounds:
            nxt = plan.round_segments(rank, k + 1)
        elif i + 1 < len(self.entries) and self.entries[i + 1].plan.rounds:
            nxt = self.entries[i + 1].plan.round_segments(rank, self.entries[i + 1].first)
        else:
            nxt = []
        return tuple(dict.fromkeys(s.chunk for s in nxt))

    def top_up(self) -> None:
        """Submit rounds so that every worker has ``rounds_ahead`` waiting or running:
        one ``Client.submit`` per task (the client's batched stream carries those of one
        pass to the scheduler together), each restricted to its worker and prioritised
        by its clock.  Rounds do not depend on each other, so the next one starts on the
        worker without a scheduler round trip."""
        new = []
        for rank, rounds in self.queues.take():
            for _, _, clock in rounds:
                K = clock + 1
                if K in self.ckpt_clocks and K not in self.meta_sent:
                    self.meta_sent.add(K)
                    self.call(protocol.CHECKPOINT_META, clock=K, meta=self.checkpoint_meta(K))
            new.append(self.round_task(rank, rounds))
        if not new:
            return
        futs = [self.c.submit(*args, **kw) for (args, kw), _ in new]
        for (_, info), fut in zip(new, futs):
            info["future"] = fut
            self.pending[fut.key] = info
            fut.add_done_callback(self._wake)

    def _wake(self, future) -> None:
        self.wake.set()

    # -- the loop --------------------------------------------------------------------
    def run(self) -> FitResult:
        """Train until the schedule is done; returns :attr:`result`."""
        self.start()
        try:
            self.top_up()
            while self.step():
                pass
            self.report()
            self.close_epochs()
            if self.entries:
                self.result.clock = max(self.result.clock, self.entries[-1].end)
            if self.cfg.checkpoint is not None:
                self.call(protocol.CHECKPOINT_FLUSH)
        finally:
            try:
                self.c.unsubscribe_topic(protocol.event_topic(self.cfg.run))
            except Exception:
                pass
        return self.result

    def step(self) -> bool:
        """One pass: wait for rounds to finish, account for all of them, then top up
        every worker that is down to half its window.  False when all is done."""
        if self.members.changed.is_set():
            self.regroup()
            self.top_up()
            return True
        if not self.pending:
            if self.queues.empty():
                return False
            self.top_up()
            return True
        futures = [i["future"] for i in self.pending.values()]
        self.wake.clear()
        if not any(f.done() for f in futures):
            self.wake.wait(0.5)  # at least twice a second, for membership changes
        finished = 0
        for key in [k for k, i in self.pending.items() if i["future"].done()]:
            finished += self.handle(self.pending.pop(key))
        # after *every* finished round is accounted for: a rank whose rounds all
        # finished in this pass is topped up now (else it would wait for ever)
        if finished and self.queues.due():
            self.top_up()
            if self.callbacks:  # otherwise metrics come once per epoch
                self.report()
        if self.queues.starved() and not self.members.changed.is_set():
            self.result.starved_passes += 1
        self.close_epochs()
        return True

    def adapt(self, info: dict) -> None:
        """Under ``rounds-per-task: auto``, size the next tasks to last about
        ``daskdl.task-seconds``: the time between two finished tasks of a rank (its
        window keeps a next task queued on the worker) over their rounds estimates a
        round's wall time.  A task's cost on the scheduler and the client does not
        depend on its rounds, so short rounds go in long tasks.  With callbacks, tasks
        keep ``AUTO_FIRST`` rounds: a callback sees rounds as their tasks finish, and a
        callback that acts during training (stops it, scales the cluster) expects to be
        called soon after each round."""
        if self.cfg.rounds_per_task is not None or self.callbacks:
            return
        now, rank = time.perf_counter(), info["rank"]
        prev = self.finished_at.get((info["gen"], rank))
        self.finished_at[(info["gen"], rank)] = now
        if prev is None:  # the rank's first task of a generation (compiles, starts)
            return
        per_round = (now - prev) / max(1, len(info["labels"]))
        old = self.round_s.get(rank)
        self.round_s[rank] = per_round if old is None else 0.5 * (old + per_round)
        typical = float(np.median(list(self.round_s.values())))
        self.per_task = int(min(AUTO_MAX, max(1, round(self.cfg.task_seconds / typical))))
        self.queues.per_task = self.per_task

    def handle(self, info: dict) -> bool:
        """A round's future is done; True if it finished (and counts)."""
        fut = info["future"]
        if info["gen"] != self.gen or fut.status == "cancelled":
            return False
        if fut.status == "finished":
            self.queues.finished(info["rank"], info["labels"])
            self.adapt(info)
            self.unreported[fut.key] = info
            self.bar.update(len(info["labels"]))
            return True
        if fut.status != "error":  # lost: its worker left with the task or its result
            self.members.changed.set()
            return False
        try:
            exc = fut.exception(timeout=10)
        except TimeoutError:  # it went back to waiting meanwhile (its worker left)
            self.members.changed.set()
            return False
        from distributed.scheduler import KilledWorker

        if isinstance(exc, (RoundDiscarded, KilledWorker)) or (
                isinstance(exc, SyncAborted) and self.members.changed.is_set()):
            self.members.changed.set()  # the workers changed: re-plan
            return False
        raise exc

    def report(self) -> None:
        """Fetch finished rounds' metrics in one call; progress bar and callbacks."""
        if not self.unreported:
            return
        infos = list(self.unreported.values())
        self.unreported.clear()
        got = [r for task in self._gather(infos) for r in task]
        task_of = {(i["rank"], clock): i for i in infos for clock in i["segments"]}
        for r in sorted(got, key=lambda r: (r["clock"], r["rank"])):
            info = task_of[(r["rank"], r["clock"])]
            self.reported.add((info["gen"], r["rank"], r["clock"]))
            if r.get("rejected"):
                self.result.rejected_rounds.append(r)
            else:
                self._cover(info["segments"][r["clock"]])
                self.covered[(info["gen"], r["rank"], r["clock"])] = info["segments"][r["clock"]]
                self.epoch_rounds[r["epoch"]].append(r)
            self.samples_seen += r["samples"]
            for cb in self.callbacks:
                cb(r)
        if got:
            last = max(got, key=lambda r: r["clock"])
            self.bar.set_postfix(
                epoch=last["epoch"], round=last["round"], loss=f"{last['loss']:.4f}",
                samples_s=f"{self.samples_seen / (time.perf_counter() - self.t_fit):.0f}",
                refresh=False)

    def _gather(self, infos: list) -> list:
        """Results of finished rounds, never waiting for one that is gone.

        A result kept by a worker that has left is lost (Dask marks its task for
        recomputation, which a round restricted to that worker never gets): such rounds
        are skipped here and accounted for from the plugin's counts when re-planning.
        """
        ready = [i["future"] for i in infos if i["future"].status == "finished"]
        try:
            return self.c.sync(self.c._gather, ready, errors="skip", callback_timeout=30)
        except TimeoutError:
            got = []
            for f in ready:
                if f.status == "finished":
                    try:
                        got.extend(self.c.sync(self.c._gather, [f], errors="skip",
                                               callback_timeout=2))
                    except TimeoutError:
                        pass
            return got

    def _cover(self, segments, sign: int = 1) -> None:
        for s in segments:
            cov = self.result.coverage.setdefault(s.epoch, collections.Counter())
            cov[s.chunk] += sign * len(s)

    def close_epochs(self) -> None:
        """Emit the record of every epoch with no rounds left to run (in order)."""
        for label in range(self.first_label, self.end_epoch):
            if label in self.closed_labels:
                continue
            if self.queues.outstanding[label] > 0:
                break
            self.report()
            rounds = sorted(self.epoch_rounds.pop(label, []),
                            key=lambda r: (r["clock"], r["rank"]))
            self.closed_labels.add(label)
            rec = epoch_record(label, rounds, self._epoch_seconds(rounds), self.regroups)
            res = self.result
            res.rounds.extend(rounds)
            res.records.append(rec)
            res.history.append(rec)
            res.epoch = label + 1
            if rounds:
                res.clock = max(r["clock"] for r in rounds) + 1
            logger.info("epoch %d: loss %.4f, %d samples, %.2fs", label, rec["loss"],
                        rec["samples"], rec["seconds"])

    def _epoch_seconds(self, rounds: list) -> float:
        """An epoch's wall seconds: from the end of the epoch before (the start of the
        fit for its first) to the end of its last round, as the workers' clocks say.

        Rounds run as tasks of many rounds, so the client hears of an epoch's end up to
        a task later; timing epochs by when they are closed here would make equal
        epochs alternate between long and short (the first ones' start-up left aside,
        the durations still add up to the fit's).  Falls back to the client's clock
        when the rounds' times are missing or disagree with it (clocks of other hosts
        off by more than an epoch)."""
        now, wall = time.perf_counter(), time.time()
        client_s = now - self.t_epoch
        self.t_epoch = now
        end = max((r["finished"] for r in rounds if "finished" in r), default=None)
        begin = self.epoch_end if self.epoch_end is not None else self.t_fit_wall
        if end is not None and begin < end <= wall + 1.0:
            self.epoch_end = end
            return end - begin
        self.epoch_end = wall if end is None else min(end, wall)
        return client_s

    # -- membership changes ------------------------------------------------------------
    def regroup(self) -> None:
        """The workers changed: re-plan what is left and start the next generation."""
        self.members.changed.clear()
        self.regroups += 1
        frozen = self.call(protocol.FREEZE)
        if frozen.get("aborted"):
            raise SyncAborted(f"training run stopped: {frozen['aborted']}")
        done = {int(r): int(v) for r, v in frozen["done"].items()}
        done.update({int(r): int(v["done"]) for r, v in frozen.get("lost", {}).items()})
        # rounds still queued or running are discarded (their workers are told 'replan')
        self.c.cancel([i["future"] for i in self.pending.values()])
        self.pending.clear()
        self.report()
        # sharded: merges no worker left holds were rolled back; their rounds are re-planned
        for (gen, rank, clock), segs in list(self.covered.items()):
            if gen == self.gen and clock >= done.get(rank, clock + 1):
                self._cover(segs, -1)
                del self.covered[(gen, rank, clock)]
        self.covered = {k: v for k, v in self.covered.items() if k[0] == self.gen}
        # rounds merged whose results are gone (their worker left, or the future was
        # cancelled just now) count as trained
        for rank, en, k in schedule.merged_rounds(self.entries, done):
            if (self.gen, rank, en.start + k) not in self.reported:
                self._cover(en.plan.round_segments(rank, k))
        self.workers = self.members.wait()
        self.source = self.result.source = self.source.repair(self.c, self.workers)
        self.entries, left = schedule.replan(
            self.entries, done, self.args, len(self.workers), self.first_clock,
            self.end_epoch, self.source.owners)
        if left.pool and not (self.entries and not self.entries[0].fresh):
            logger.warning("daskdl: %d samples left of epoch %d are too few for %d "
                           "workers with batch_size=%d; they are skipped", len(left.pool),
                           left.label, len(self.workers), self.cfg.batch_size)
        self.build_queues()
        reply = self.call(protocol.REGROUP, members=self._members_msg(), clock=left.clock,
                          checkpoint_clocks=sorted(self.ckpt_clocks))
        if reply.get("status") != protocol.Status.OK.value:
            raise SyncAborted(f"training run stopped: {reply.get('reason')}")
        self.gen = int(reply["generation"])
        self.first_clock = left.clock
        self.meta_sent = {K for K in self.meta_sent if K <= left.clock}
        logger.warning("daskdl: the workers changed; training goes on with %d workers from "
                       "epoch %s (generation %d)", len(self.workers),
                       self.entries[0].label if self.entries else "-", self.gen)

