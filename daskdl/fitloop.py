"""The client side of one ``Trainer.fit``: submitting rounds, following the
workers as they leave and join, checkpoints and resuming.

Rounds are tasks ``daskdl-round-<run>-<epoch>-<round>-<rank>`` (``-g<n>`` appended
from the second generation on), restricted to their worker and prioritised by
their clock.  The schedule is a list of :class:`Entry` (one epoch's plan, or
what is left of one when the workers changed).

When a worker leaves (the scheduler plugin drops it from every barrier at once
and tells this client on the topic ``daskdl-<run>``) or joins, the loop

1. *freezes* the generation: the plugin answers rounds not merged yet with
   ``replan`` (their workers discard them) and says how many rounds of each rank
   were merged;
2. computes what is left of the epoch from those counts, and cuts it into equal
   pieces for the workers present (:func:`~daskdl.plan.plan_from_segments`);
   later epochs get ordinary plans for the new number of workers;
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
from dataclasses import dataclass

import dask
import numpy as np
from distributed import Future

from . import config
from .errors import DaskDLError, RoundDiscarded, SyncAborted
from .plan import EpochPlan, Segment, make_plan, plan_from_json, plan_from_segments
from .replica import run_round

logger = logging.getLogger("daskdl")


@dataclass
class Entry:
    """A stretch of the schedule: rounds ``first .. plan.rounds - 1`` of ``plan``,
    counted towards epoch ``label``; round ``k`` has clock ``start + k``."""

    plan: EpochPlan
    label: int
    start: int
    first: int = 0
    fresh: bool = True  # an ordinary plan of its epoch (not a remainder)

    @property
    def end(self) -> int:
        return self.start + self.plan.rounds


class FitLoop:
    """One call of :meth:`daskdl.Trainer.fit` (internal)."""

    def __init__(self, trainer, dataset, epochs: int, callbacks: list, bar, resume):
        self.t = trainer
        self.c = trainer.client
        self.dataset = dataset
        self.callbacks = callbacks
        self.bar = bar
        self.changed = threading.Event()
        self.gen = 0
        self.excluded: set = set()
        self.pending: dict = {}  # key -> round info
        self.unreported: dict = {}  # key -> round info (finished, metrics on the worker)
        self.epoch_rounds: dict = collections.defaultdict(list)
        self.outstanding = collections.Counter()  # label -> rounds queued or running
        self.coverage = trainer.coverage
        self.results: list = []
        self.closed_labels: set = set()
        self.reported: set = set()  # (generation, rank, clock) of rounds whose metrics came
        self.regroups = 0
        self.samples_seen = 0
        self.t_fit = time.perf_counter()
        self.t_epoch = time.perf_counter()
        self.meta_sent: set = set()
        self.ckpt_clocks: dict = {}
        self.resume = resume  # a checkpoint dict, or None
        self.topic = f"daskdl-{trainer.run}"
        trainer._fits += 1
        self.fit_id = trainer._fits

        if resume is not None:
            meta = resume["meta"]
            self.fit_start = int(meta["fit_start"])
        else:
            self.fit_start = trainer._epoch
        self.end_epoch = self.fit_start + int(epochs)

    # -- membership ------------------------------------------------------------------
    def _on_event(self, event) -> None:
        _, msg = event
        if msg.get("action") == "lost" and "sent nothing" in str(msg.get("reason", "")):
            self.excluded.add(msg.get("worker"))
        self.changed.set()

    def live_workers(self) -> tuple:
        from .trainer import _worker_info

        info = _worker_info(self.c)
        logger.debug("daskdl: workers %s, excluded %s",
                     {a: w.get("status") for a, w in info.items()}, self.excluded)
        # a worker that just registered is still "init" when the plugin hears of it;
        # paused (out of memory) and closing workers are left out
        return tuple(sorted(a for a, w in info.items()
                            if a not in self.excluded and w.get("status", "running")
                            in ("running", "init")))

    def wait_for_workers(self) -> tuple:
        """The workers to train on; waits (with a message) while there are fewer than
        ``min_workers``."""
        need = self.t.min_workers
        limit = config.get_seconds("min-workers-wait")
        t0 = time.monotonic()
        warned = False
        while True:
            members = self.live_workers()
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

    # -- schedule --------------------------------------------------------------------
    def fresh_entries(self, first_label: int, clock: int) -> list:
        out = []
        for e in range(first_label, self.end_epoch):
            plan = make_plan(self.dataset.chunks, len(self.members), self.t.batch_size,
                             self.t.policy.every, self.t.seed, e, self.placement.owners)
            out.append(Entry(plan, e, clock))
            clock += plan.rounds
        return out

    def build_queues(self) -> None:
        """Per-rank queues of this generation's rounds, and the checkpoint clocks."""
        self.queue = {r: collections.deque() for r in range(len(self.members))}
        self.inflight = collections.Counter()
        self.outstanding = collections.Counter()
        self.ckpt_clocks = {}
        every_ckpt = self.t.checkpoint_every
        for i, en in enumerate(self.entries):
            for k in range(en.first, en.plan.rounds):
                for rank in range(len(self.members)):
                    self.queue[rank].append((i, k, en.start + k))
                self.outstanding[en.label] += len(self.members)
            if self.t.checkpoint is not None:
                last = i == len(self.entries) - 1
                for k in range(en.first + 1, en.plan.rounds + 1):
                    K = en.start + k
                    epoch_end = k == en.plan.rounds
                    if (every_ckpt and K % every_ckpt == 0) or (
                            epoch_end and (not every_ckpt or last)):
                        self.ckpt_clocks[K] = (i, k)
        total = sum(len(q) for q in self.queue.values())
        self.bar.total = self.bar.n + total
        self.bar.refresh()

    def checkpoint_meta(self, K: int) -> dict:
        i, k = self.ckpt_clocks[K]
        en = self.entries[i]
        t = self.t
        meta = {"seed": t.seed, "batch_size": t.batch_size, "every": t.policy.every,
                "chunks": list(self.dataset.chunks), "fit_start": self.fit_start,
                "end_epoch": self.end_epoch, "n_workers": len(self.members),
                "history": [dict(h) for h in t.history]}
        if k < en.plan.rounds:
            meta.update(epoch=en.label, round=k, plan_epoch=en.plan.epoch,
                        pieces=en.plan.to_json())
        else:
            meta.update(epoch=en.label + 1, round=0, plan_epoch=en.label + 1, pieces=None)
        return meta

    def resumed_entries(self, ckpt: dict) -> list:
        meta = ckpt["meta"]
        epoch, rnd, clock = int(meta["epoch"]), int(meta["round"]), int(meta["clock"])
        t = self.t
        if meta.get("pieces") is None:
            return self.fresh_entries(epoch, clock)
        plan = plan_from_json(meta["pieces"], t.batch_size, t.policy.every, t.seed,
                              int(meta["plan_epoch"]), self.dataset.chunks)
        if plan.n_workers == len(self.members):
            first = [Entry(plan, epoch, clock - rnd, first=rnd, fresh=False)]
        else:  # a different number of workers: re-cut what is left of the epoch
            segs = [s for r in range(plan.n_workers) for s in plan.remaining(r, rnd)]
            rest = plan_from_segments(segs, len(self.members), t.batch_size, t.policy.every,
                                      t.seed, plan.epoch, self.dataset.chunks)
            first = [Entry(rest, epoch, clock, fresh=False)] if rest.rounds else []
        nxt = first[-1].end if first else clock
        return first + self.fresh_entries(epoch + 1, nxt)

    # -- rounds ----------------------------------------------------------------------
    def round_task(self, i: int, rank: int, k: int, clock: int):
        """The ``daskdl-round-...`` task of worker ``rank`` (a Delayed).

        Chunks reach the task in one of three ways: Zarr-backed data is read by the
        worker itself (the spec names the chunks of this round and of the next, which
        the worker prefetches while it computes); chunks already in worker memory are
        dependencies; other lazy chunks are computed on the worker just before the
        round before this one (so a worker holds at most two rounds of them).
        """
        t = self.t
        en = self.entries[i]
        plan = en.plan
        segs = plan.round_segments(rank, k)
        chunks = list(dict.fromkeys(s.chunk for s in segs))
        addr = self.members[rank]
        nan_at = t._send_nan.get(rank, ())
        spec = {"epoch": en.label, "round": k, "rank": rank, "clock": clock,
                "steps": plan.round_steps(k), "batch_size": t.batch_size,
                "segments": [(s.chunk, s.start, s.stop, s.epoch) for s in segs],
                "chunks": chunks, "names": self.dataset.names, "fit": self.fit_id,
                "gen": self.gen, "first_clock": self.first_clock, "timeout": t.sync_timeout,
                "sends": t.policy.sends, "slowdown": float(t._slowdown.get(rank, 1.0)),
                "checkpoint": (clock + 1) in self.ckpt_clocks,
                "send_nan": nan_at == "all" or clock in nan_at}
        blocks: list = []
        placement = self.placement
        if placement.zarr is not None:
            spec["zarr"] = placement.zarr
            if k + 1 < plan.rounds:
                nxt = plan.round_segments(rank, k + 1)
            elif i + 1 < len(self.entries) and self.entries[i + 1].plan.rounds:
                nxt = self.entries[i + 1].plan.round_segments(rank, self.entries[i + 1].first)
            else:
                nxt = []
            spec["next_chunks"] = list(dict.fromkeys(s.chunk for s in nxt))
        else:
            blocks = [ref for ch in chunks for ref in placement.refs[ch]]
            lazy = [j for j, b in enumerate(blocks) if not isinstance(b, Future)]
            if lazy:  # computed on the worker that trains on them, one round ahead
                futs = self.c.compute([blocks[j] for j in lazy], workers=[addr],
                                      priority=-clock + 1.5)
                for j, f in zip(lazy, futs):
                    blocks[j] = f
        suffix = f"-g{self.gen}" if self.gen else ""
        with dask.annotate(workers=[addr], allow_other_workers=False, priority=-clock):
            d = dask.delayed(run_round, pure=False)(
                t.run, spec, *blocks,
                dask_key_name=f"daskdl-round-{t.run}-{en.label}-{k}-{rank}{suffix}")
        return d, {"gen": self.gen, "rank": rank, "label": en.label, "round": k,
                   "clock": clock, "segments": segs}

    def top_up(self) -> None:
        """Submit rounds so that every worker has ``rounds_ahead`` waiting or running.

        Called when some worker is down to half of that: all workers are topped up
        in one graph (one message to the scheduler), each round restricted to its
        worker and prioritised by its clock.  Rounds do not depend on each other,
        so the next one starts on the worker without a scheduler round trip.
        """
        new = []
        for rank in range(len(self.members)):
            while self.inflight[rank] < self.t.rounds_ahead and self.queue[rank]:
                i, k, clock = self.queue[rank].popleft()
                K = clock + 1
                if K in self.ckpt_clocks and K not in self.meta_sent:
                    self.meta_sent.add(K)
                    self.c.sync(self.c.scheduler.daskdl_checkpoint_meta, run=self.t.run,
                                clock=K, meta=self.checkpoint_meta(K))
                new.append(self.round_task(i, rank, k, clock))
                self.inflight[rank] += 1
        if not new:
            return
        futs = self.c.compute([d for d, _ in new], optimize_graph=False)
        for (_, info), fut in zip(new, futs):
            info["future"] = fut
            self.pending[fut.key] = info

    # -- the loop --------------------------------------------------------------------
    def start(self) -> None:
        t, c = self.t, self.c
        self.members = self.wait_for_workers()
        self.placement = t._place(self.dataset, self.members)
        restore = None
        if self.resume is not None:
            ck = self.resume
            meta = ck["meta"]
            t._leaves = [np.array(x, copy=True) for x in ck["params"]]
            t._epoch, t._clock = int(meta["epoch"]), int(meta["clock"])
            t.history[:] = [dict(h) for h in meta.get("history", [])]
            self.entries = self.resumed_entries(ck)
            import jax

            template = t.policy.init(t._leaves)
            treedef = jax.tree_util.tree_structure(template)
            policy_state = (jax.tree_util.tree_unflatten(treedef, ck["policy_state"])
                            if ck["policy_state"] or treedef.num_leaves == 0 else None)
            restore = {}
            for r in range(len(self.members)):
                if r in ck["opt_states"]:
                    restore[r] = {"opt_state": ck["opt_states"][r],
                                  "params": ck["local_params"].get(r)}
            version = int(meta.get("version", 0))
        else:
            self.entries = self.fresh_entries(t._epoch, t._clock)
            policy_state, version = None, 0
        self.first_clock = self.entries[0].start + self.entries[0].first if self.entries else 0
        self.first_label = self.entries[0].label if self.entries else self.end_epoch
        from distributed.protocol.serialize import to_serialize

        ckpt = None
        if t.checkpoint is not None:
            from .checkpoint import sendable_checkpoint_key

            ckpt = to_serialize({"store": t.checkpoint, "keep": int(config.get("checkpoint-keep")),
                                 "key": sendable_checkpoint_key(t.checkpoint_key, self.dataset)})
        c.sync(c.scheduler.daskdl_start, run=t.run, params=to_serialize(t._leaves),
               policy=to_serialize(t.policy),
               members={str(r): a for r, a in enumerate(self.members)},
               timeout=t.sync_timeout, clock=self.first_clock, version=version,
               policy_state=to_serialize(policy_state), restore=to_serialize(restore),
               checkpoint=ckpt, max_rejections=t.max_rejections)
        c.subscribe_topic(self.topic, self._on_event)
        self.build_queues()

    def run(self) -> list:
        self.start()
        try:
            self.top_up()
            while True:
                if self.changed.is_set():
                    self.regroup()
                    self.top_up()
                    continue
                if not self.pending:
                    if not any(self.queue.values()):
                        break
                    self.top_up()
                    continue
                futures = [i["future"] for i in self.pending.values()]
                if not any(f.done() for f in futures):
                    self.c.sync(_first_done, futures, 0.5)
                topped = False
                for key in [k for k, i in self.pending.items() if i["future"].done()]:
                    info = self.pending.pop(key)
                    if self.handle(info) and not topped:
                        if self.inflight[info["rank"]] <= self.t.rounds_ahead // 2:
                            self.top_up()
                            topped = True
                            if self.callbacks:  # otherwise metrics come once per epoch
                                self.report()
                self.close_epochs()
            self.report()
            self.close_epochs()
            if self.entries:
                self.t._clock = max(self.t._clock, self.entries[-1].end)
            if self.t.checkpoint is not None:
                self.c.sync(self.c.scheduler.daskdl_checkpoint_flush, run=self.t.run)
        finally:
            try:
                self.c.unsubscribe_topic(self.topic)
            except Exception:
                pass
        return self.results

    def handle(self, info: dict) -> bool:
        """A round's future is done; True if it finished (and counts)."""
        fut = info["future"]
        if info["gen"] != self.gen:
            return False
        if fut.status == "finished":
            self.inflight[info["rank"]] -= 1
            self.outstanding[info["label"]] -= 1
            self.unreported[fut.key] = info
            self.bar.update(1)
            return True
        if fut.status == "cancelled":
            return False
        if fut.status != "error":  # lost: its worker left with the task or its result
            self.changed.set()
            return False
        try:
            exc = fut.exception(timeout=10)
        except TimeoutError:  # it went back to waiting meanwhile (its worker left)
            self.changed.set()
            return False
        from distributed.scheduler import KilledWorker

        if isinstance(exc, (RoundDiscarded, KilledWorker)) or (
                isinstance(exc, SyncAborted) and self.changed.is_set()):
            self.changed.set()  # the workers changed: re-plan
            return False
        raise exc

    def report(self) -> None:
        """Fetch finished rounds' metrics in one call; progress bar and callbacks."""
        if not self.unreported:
            return
        infos = list(self.unreported.values())
        self.unreported.clear()
        got = self._gather(infos)
        by_round = {(i["rank"], i["clock"]): i for i in infos}
        for r in sorted(got, key=lambda r: (r["clock"], r["rank"])):
            info = by_round[(r["rank"], r["clock"])]
            self.reported.add((info["gen"], r["rank"], r["clock"]))
            if r.get("rejected"):
                self.t.rejected_rounds.append(r)
            else:
                self._cover(info["segments"])
                self.epoch_rounds[info["label"]].append(r)
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

    def _cover(self, segments) -> None:
        for s in segments:
            cov = self.coverage.setdefault(s.epoch, collections.Counter())
            cov[s.chunk] += len(s)

    def close_epochs(self) -> None:
        """Emit the record of every epoch with no rounds left to run (in order)."""
        for label in range(self.first_label, self.end_epoch):
            if label in self.closed_labels:
                continue
            if self.outstanding[label] > 0:
                break
            self.report()
            rounds = self.epoch_rounds.pop(label, [])
            self.closed_labels.add(label)
            self.results.append(self.t._end_epoch(label, rounds, self.t_epoch,
                                                  regroups=self.regroups))
            self.t_epoch = time.perf_counter()

    # -- membership changes ------------------------------------------------------------
    def regroup(self) -> None:
        """The workers changed: re-plan what is left and start the next generation."""
        t, c = self.t, self.c
        self.changed.clear()
        self.regroups += 1
        frozen = c.sync(c.scheduler.daskdl_freeze, run=t.run)
        if frozen.get("aborted"):
            raise SyncAborted(f"training run stopped: {frozen['aborted']}")
        done = {int(r): int(v) for r, v in frozen["done"].items()}
        for r, v in frozen.get("lost", {}).items():
            done[int(r)] = int(v["done"])
        # rounds still queued or running are discarded (their workers are told 'replan')
        c.cancel([i["future"] for i in self.pending.values()])
        self.pending.clear()
        self.report()
        # rounds that were merged but whose results are gone (their worker left, or
        # the future was cancelled just now): they count as trained
        for rank, d in done.items():
            for en in self.entries:
                if rank >= en.plan.n_workers:
                    continue
                for k in range(en.first, en.plan.rounds):
                    clock = en.start + k
                    if clock < d and (self.gen, rank, clock) not in self.reported:
                        self._cover(en.plan.round_segments(rank, k))
        # what is left of the epoch(s) under way, and the rest of the schedule
        pool: list[Segment] = []
        label = None
        rest_from = None
        for en in self.entries:
            R = en.plan.rounds
            d = {r: min(max(done.get(r, en.start) - en.start, en.first), R)
                 for r in range(en.plan.n_workers)}
            if all(v >= R for v in d.values()):
                continue  # finished
            touched = any(v > en.first for v in d.values()) or not en.fresh
            if touched:
                for r in range(en.plan.n_workers):
                    pool.extend(en.plan.remaining(r, d[r]))
                label = en.label
            else:
                rest_from = en.label if rest_from is None else rest_from
                break
        clock = max(done.values(), default=self.first_clock)
        self.members = self.wait_for_workers()
        self.placement = t._repair_placement(self.dataset, self.placement, self.members)
        entries = []
        if pool:
            plan = plan_from_segments(pool, len(self.members), t.batch_size, t.policy.every,
                                      t.seed, label, self.dataset.chunks)
            if plan.rounds:
                entries.append(Entry(plan, label, clock, fresh=False))
            else:
                logger.warning("daskdl: %d samples left of epoch %d are too few for %d "
                               "workers with batch_size=%d; they are skipped", len(pool),
                               label, len(self.members), t.batch_size)
        nxt_label = (label + 1) if label is not None else rest_from
        if nxt_label is None:
            nxt_label = max([e.label + 1 for e in self.entries], default=self.end_epoch)
        entries += self.fresh_entries(nxt_label, entries[-1].end if entries else clock)
        self.entries = entries
        reply = c.sync(c.scheduler.daskdl_regroup, run=t.run,
                       members={str(r): a for r, a in enumerate(self.members)}, clock=clock)
        if reply.get("status") != "OK":
            raise SyncAborted(f"training run stopped: {reply.get('reason')}")
        self.gen = reply["generation"]
        self.first_clock = clock
        self.meta_sent = {K for K in self.meta_sent if K <= clock}
        logger.warning("daskdl: the workers changed; training goes on with %d workers from "
                       "epoch %s (generation %d)", len(self.members),
                       entries[0].label if entries else "-", self.gen)
        self.build_queues()


async def _first_done(futures: list, timeout: float) -> None:
    """Return when one of ``futures`` is done (finished, failed, cancelled) or after
    ``timeout`` seconds, so that the loop also wakes up for membership changes."""
    import asyncio

    waits = [asyncio.ensure_future(f._state.wait()) for f in futures]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
