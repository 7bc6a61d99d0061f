"""The worker side of training: one replica per trainer on every worker.

:class:`Replica` is a ``WorkerPlugin``.  It holds the compiled step function
(compiled once per worker and batch shape, reused by every round), the local train
state (params, optimizer state) and runs rounds.  A round reads as::

    read -> compute -> contribution -> sync -> apply

1. **read**: the round's samples, from the chunks the task received (or read from
   the store by :class:`~daskdl.sources.ChunkReader`), in the plan's order,
   reshaped to ``(steps, batch_size, ...)``;
2. **compute**: the steps in one compiled ``lax.scan``;
3. **contribution**: the local params, or the change over the round, as the
   policy's ``sends`` says;
4. **sync**: a :class:`~daskdl.protocol.SyncRequest` to the scheduler plugin,
   authenticated with the run secret this plugin was given (never in a task);
5. **apply**: continue from the parameters the :class:`~daskdl.protocol.SyncReply`
   gives, keeping the local optimizer state.

A round's update is sent even when it is not finite: the scheduler plugin
rejects it before it touches the global parameters and the replica starts again
from those, with a fresh optimizer state (``TrainingDiverged`` after
``daskdl.max-rejections`` in a row).  A round answered ``replan`` (the workers
changed while it ran) is discarded: the replica puts back its state from before
the round and raises :class:`~daskdl.errors.RoundDiscarded`, which ``fit`` expects.

Rounds are submitted ahead without depending on each other (no scheduler round
trip between two rounds): :class:`RoundOrder` runs them in clock order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from distributed import get_worker, rejoin, secede
from distributed.comm.core import CommClosedError
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.metrics import context_meter
from distributed.protocol.serialize import to_serialize
from distributed.utils import sync

from . import protocol, shm
from .errors import DaskDLError, RoundDiscarded, SyncAborted, TrainingDiverged
from .exchange import _nbytes, asking, watched
from .packing import Packing, packed, worth_packing
from .plan import chunk_permutation, round_permutation
from .protocol import RoundSpec, Status, SyncReply, SyncRequest
from .sources import ChunkReader
from .step import DeviceMesh, init_state, make_train_steps, set_step_count
from .model import takes_key
from .tree import aligned_empty, flatten, unflatten

logger = logging.getLogger("daskdl")


def replica_name(run: str) -> str:
    return f"daskdl-replica-{run}"


class RoundOrder:
    """Runs a worker's rounds in clock order.

    A later round that is ready first (its data arrived sooner) leaves the worker's
    thread pool (``secede``) until the earlier ones ran.  Rounds of a newer
    generation (or fit) wait until the older ones still running have finished.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.key = None  # (fit, generation) of the rounds being run
        self.expected = 0  # the clock of the next round this worker must run
        self.busy = 0  # rounds between their turn and their end
        self.pull = False  # the first round of a new key must fetch the global params
        self.failed = False
        self.closed = False

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _seceded_wait(self, until, timeout: float, fail=None) -> None:
        """Wait (seceded, so the thread pool stays free) until ``until()``."""
        secede()
        deadline = time.monotonic() + timeout
        try:
            with self.cond:
                while not until():
                    if fail is not None:
                        fail(deadline)
                    elif self.closed or time.monotonic() > deadline:
                        return
                    self.cond.wait(0.1)
        finally:
            rejoin()

    def wait_turn(self, spec: RoundSpec, where: str) -> bool:
        """Block until it is ``spec``'s turn.  True for the first round to run of a
        new fit or generation (it must fetch the global parameters)."""
        key = (spec.fit, spec.gen)
        if self.key != key:
            if self.key is not None and key < self.key:
                raise RoundDiscarded(f"round of an earlier generation {key} on {where}")
            if self.busy:  # rounds of the last generation may still be finishing
                self._seceded_wait(lambda: not self.busy, spec.timeout)
            self.key, self.expected, self.failed = key, spec.first_clock, False
            self.pull = True
        if spec.clock < self.expected:
            raise SyncAborted(f"round with clock {spec.clock} ran twice on {where}")

        def fail(deadline):
            if self.key != key:
                raise RoundDiscarded(f"{spec.where} on {where}: the workers changed")
            if self.failed or self.closed or time.monotonic() > deadline:
                raise SyncAborted(f"{spec.where} on {where} gave up waiting for the rounds "
                                  "before it")

        if spec.clock != self.expected:
            self._seceded_wait(lambda: self.expected == spec.clock, spec.timeout, fail)
        with self.cond:
            self.busy += 1
            pull, self.pull = self.pull, False
        return pull

    def done(self, clock: int, ok: bool) -> None:
        with self.cond:
            self.busy -= 1
            if ok:
                self.expected = clock + 1
            else:
                self.failed = True
            self.cond.notify_all()


class Replica(WorkerPlugin):
    """Per-worker state of one training run (registered as a ``WorkerPlugin``).

    ``secret`` authenticates this replica's messages to the scheduler plugin; it
    travels to the workers inside this plugin only, never in a task.
    """

    idempotent = False

    def __init__(self, run: str, secret: str, loss_fn, optimizer, template, seed: int,
                 state_template=None, shard_params: bool = False, policy=None,
                 sharded: bool = False, error_feedback: bool = True,
                 shared_memory: bool = True):
        self.run = run
        self.shared_memory = shared_memory  # sharded: same-host payloads via /dev/shm
        self.policy = policy  # sync="sharded": this worker merges the shard it owns
        self.sharded = sharded
        self.error_feedback = error_feedback  # compressed updates: keep what rounding lost
        self.name = replica_name(run)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.template = template  # a daskdl.model.Template: no PyTreeDef is pickled
        self.state_template = state_template  # the model state's, or None
        self.shard_params = shard_params
        self.seed = seed
        self._secret = secret
        self._reset()

    def __repr__(self) -> str:
        return f"<daskdl Replica of run {self.run}>"

    def _reset(self):
        self.worker = None
        self.train_steps = None
        self.state = None
        self.version = -1
        self.compiles = 0
        self.need_pull = True
        self.order = RoundOrder()
        self.reader = ChunkReader()
        self.mesh = None
        self.exchange = None
        self.overlapped = None  # (spec, future, state before, params sent) of a background sync
        self._pool = None
        self.relay = None  # relays its group's syncs when this worker is a relay
        self.packing = None  # the layout of the model's leaves in one buffer (False: none)
        self.timings: dict = {}
        self.feedback: dict = {}  # (shards, shard) -> ErrorFeedback (compressed updates)

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("worker", "train_steps", "state", "order", "reader", "mesh", "exchange",
                  "overlapped", "_pool", "relay", "packing"):
            d[k] = None
        d["feedback"] = {}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.order, self.reader = RoundOrder(), ChunkReader()

    def setup(self, worker):
        from . import relay

        self.worker = worker
        self.mesh = DeviceMesh.local(self.shard_params)
        quiet_round_failures()
        relay.install(worker)
        self.relay = relay.Relay(worker, self.run, self._secret)
        if self.sharded:
            from .compression import decompress
            from .exchange import Exchange, install

            install(worker)
            self.exchange = Exchange(worker, self.policy, decode=decompress, run=self.run,
                                     secret=self._secret, shared_memory=self.shared_memory)

    def teardown(self, worker):
        self.reader.close()
        self.order.close()
        if self.exchange is not None:
            self.exchange.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- scheduler calls ------------------------------------------------------------
    def _call(self, op: str, **kwargs) -> dict:
        rpc = getattr(self.worker.scheduler, op)
        return sync(self.worker.loop, rpc, **kwargs)

    def _pull(self, rank: int) -> None:
        """The global parameters (and, resuming, this rank's optimizer state)."""
        reply = self._call(protocol.PARAMS, run=self.run, secret=self._secret, rank=rank)
        if reply.get("status") != Status.OK.value:
            raise SyncAborted(f"cannot fetch the global parameters: {reply.get('reason')}")
        self._set_params(protocol.load(reply["params"]), reply["version"])
        self._set_model_state(reply.get("state"), reply.get("steps", -1))
        if reply.get("opt_state") is not None:
            _, opt_def = flatten(self.state.opt_state)
            leaves = [jnp.array(x) for x in protocol.load(reply["opt_state"])]
            self.state = self.state._replace(opt_state=unflatten(opt_def, leaves))

    def _pull_sharded(self, spec: RoundSpec, init) -> None:
        """Start a generation of a sharded run: the global parameters of the version
        it starts from (the fit's ``init``, this worker's own copy, or a copy from the
        worker the plugin names), and the owner of shard ``spec.rank``."""
        from .exchange import FULL
        from .shards import Owner, ShardMap, specs_of, split_state

        reply = self._call(protocol.PARAMS, run=self.run, secret=self._secret, rank=spec.rank)
        if reply.get("status") != Status.OK.value:
            raise SyncAborted(f"cannot start the generation: {reply.get('reason')}")
        version, source = int(reply["version"]), reply.get("source")
        ex = self.exchange
        held, leaves, _ = ex.held
        if leaves is not None and held == version:
            pass
        elif source is None and init is not None:
            leaves = [np.asarray(x) for x in init]
        elif source is not None:
            got = self._call_worker(source, FULL, version=version)
            leaves = protocol.load(got["leaves"])
        else:
            raise SyncAborted(f"{spec.where} on {self.worker.address}: no worker holds the "
                              f"parameters of version {version}")
        ex.held = (version, leaves, (spec.fit, spec.gen))
        self._set_params(leaves, version)
        self._set_model_state(reply.get("state"), reply.get("steps", -1))
        if reply.get("params") is not None:  # this rank's own params (EASGD, resumed)
            self._set_params(protocol.load(reply["params"]), version)
        if reply.get("opt_state") is not None:
            _, opt_def = flatten(self.state.opt_state)
            opt = [jnp.array(x) for x in protocol.load(reply["opt_state"])]
            self.state = self.state._replace(opt_state=unflatten(opt_def, opt))
        specs = specs_of(leaves)
        smap = ShardMap(specs, len(spec.members))
        policy_state = reply.get("policy_state")
        if policy_state is not None:
            policy_state = split_state(protocol.load(policy_state), specs, smap, spec.rank)
        owner = Owner(self.policy, spec.gen, spec.rank,
                      [np.array(p, copy=True) for p in smap.pieces(leaves, spec.rank)],
                      version, smap.piece_specs(spec.rank), policy_state, decode=ex.decode)

        async def own():
            ex.set_owner((spec.fit, spec.gen), spec.members, smap, owner)
        sync(self.worker.loop, own)
        self.feedback = {}

    def _call_worker(self, address: str, op: str, **kwargs) -> dict:
        async def call():
            return await _watched(self.worker, address, getattr(self.worker.rpc(address), op)(
                run=self.run, secret=self._secret, **kwargs))
        reply = sync(self.worker.loop, call)
        if reply.get("status") != Status.OK.value:
            raise RoundDiscarded(f"worker {address} refused {op}: {reply.get('reason')}")
        return reply

    def _set_params(self, leaves, version: int, fresh: bool = False) -> None:
        if packed(leaves):  # the global params as one buffer (this worker sent one)
            leaves = self.packing.unpack(leaves, "global parameters")
        # copied to the device now, so that the copy counts in sync, not in the next compute
        # (device_put aliases an aligned numpy buffer on the CPU: no copy at all); one
        # call for every leaf (measured: 0.20 ms instead of 0.37 ms for six leaves)
        params = jax.block_until_ready(self.template.trainable(jax.device_put(list(leaves))))
        if self.state is None or fresh:
            self.state = init_state(params, self.optimizer)
        else:
            self.state = self.state._replace(params=params)
        self.version = version

    def _set_model_state(self, leaves, steps: int = -1) -> None:
        """The model state the scheduler merged (``leaves``, possibly still serialized)
        and, with ``steps >= 0``, the global step count for the optimizer's schedules."""
        if leaves is not None and self.state_template is not None:
            leaves = protocol.load(leaves)
            self.state = self.state._replace(state=self.state_template.build(
                [jnp.array(x) for x in leaves]))
        if steps is not None and int(steps) >= 0:
            self.state = self.state._replace(
                opt_state=set_step_count(self.state.opt_state, int(steps)),
                step=jnp.asarray(int(steps), jnp.int32))

    def _traced(self) -> None:
        self.compiles += 1

    # -- a round ----------------------------------------------------------------------
    def run_round(self, spec: RoundSpec, blocks: tuple, init=None) -> dict:
        """Run one round in its turn; see the module docstring.  ``init``: the fit's
        starting parameters (sharded runs, first round of a rank)."""
        if self.order.wait_turn(spec, self.worker.address):
            self.need_pull = True  # a new fit or generation: pull at its first round
            self._drop_overlapped()
        ok = False
        try:
            if self.need_pull or self.state is None:
                if spec.sharded:
                    self._pull_sharded(spec, init)
                else:
                    self._pull(spec.rank)
                self.need_pull = False
            out = self._round(spec, blocks)
            ok = True
            return out
        finally:
            self.order.done(spec.clock, ok)

    def _round(self, spec: RoundSpec, blocks: tuple) -> dict:
        times = {"started": time.time(), "t0": time.perf_counter()}
        batches, blocks = self.read(spec, blocks)
        times["data"] = time.perf_counter()
        state, losses, aux = self.compute(spec, batches, blocks)
        times["compute"] = time.perf_counter()
        if self.overlapped is not None:  # the last round's sync ran during this compute
            state, losses, aux = self._catch_up(spec, state, losses, aux, batches, blocks)
        leaves = self.contribution(spec, state)
        before, self.state = self.state, state
        samples = int(np.prod(losses.shape)) * spec.batch_size
        args = (leaves, samples, float(losses.mean()), times["compute"] - times["data"], state)
        if spec.overlap and not spec.last:  # sync in the background; go on computing
            background = dataclasses.replace(spec, secede=False)
            future = self._sync_pool().submit(self.sync_sharded, background, *args)
            self.overlapped = (spec, future, before, state.params)
            reply = SyncReply(Status.OK, self.version)
        else:
            sync_fn = self.sync_sharded if spec.sharded else self.sync
            reply = sync_fn(spec, *args)
            self.apply(spec, reply, before)
        return self._result(spec, reply, losses, aux, samples, times)

    # -- overlap: round r + 1 computes while round r syncs -------------------------------
    def _sync_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="daskdl-sync")
        return self._pool

    def _catch_up(self, spec: RoundSpec, state, losses, aux, batches, blocks):
        """Apply the sync of the round before, one round late: the round just computed
        moves onto what that sync answered (``synced + (params now - params sent)``).
        A rejected update starts again from the global params and recomputes this
        round; a discarded or aborted one discards this round too."""
        prev_spec, future, before, sent = self.overlapped
        self.overlapped = None
        t0 = time.perf_counter()
        reply = future.result()
        self.timings = dict(self.timings, exposed_s=time.perf_counter() - t0)
        start = self.state  # this round started from what the round before ended with
        self.apply(prev_spec, reply, before)  # raises for replan / aborted
        if reply.status is Status.REJECTED:  # recompute from the fresh start
            return self.compute(spec, batches, blocks)
        moved = _moved(self.state.params, state.params, start.params)
        return state._replace(params=moved), losses, aux

    def _drop_overlapped(self) -> None:
        """A new fit or generation: an overlapped sync still running belongs to the old
        one (it is answered ``replan`` or was merged; either way it is over)."""
        if self.overlapped is not None:
            _, future, _, _ = self.overlapped
            self.overlapped = None
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001  (its outcome no longer matters)
                pass

    def read(self, spec: RoundSpec, blocks: tuple) -> tuple[dict, tuple]:
        """The round's samples as arrays of shape ``(steps, batch_size, ...)``, and
        the chunks' blocks they came from."""
        if spec.source is not None:
            blocks = self.reader.read(spec.source, spec.chunks)
        with context_meter.meter("daskdl-data"):
            return gather_batches(self.seed, spec, blocks), blocks

    def compute(self, spec: RoundSpec, batches: dict, blocks: tuple):
        """``spec.steps`` optimizer steps in one compiled call (compiled on first use
        of a batch shape); the next round's chunks are prefetched meanwhile."""
        if self.train_steps is None:
            self.train_steps = make_train_steps(
                self.loss_fn, self.optimizer, self._traced, model=self.template,
                has_state=self.state_template is not None,
                wants_key=takes_key(self.loss_fn), seed=self.seed,
                constrain=None if self.mesh is None else self.mesh.constrain)
        compiles = self.compiles
        t0 = time.perf_counter()
        current = self.state
        if self.mesh is not None:  # several devices: split the batch, place the state
            current = self.mesh.put_state(current)
            batches = self.mesh.put_batches(batches, spec.batch_size)
        where = np.array([spec.rank, spec.clock], np.int32)
        state, (losses, aux) = self.train_steps(current, batches, where)  # dispatched
        if spec.source is not None and spec.next_chunks:  # overlaps this compute
            self.reader.prefetch(spec.source, spec.chunks, blocks, spec.next_chunks)
        losses = np.asarray(losses)  # waits for the computation
        faults = spec.faults
        if faults is not None and faults.slowdown > 1.0 and self.compiles == compiles:
            # a simulated straggler (benchmarks, tests); compilation is not slowed down.
            # A floor on the measured time keeps a straggler a straggler when rounds
            # take a millisecond and scheduling noise would otherwise swamp the factor.
            elapsed = max(time.perf_counter() - t0, faults.SLOWDOWN_FLOOR_S)
            time.sleep((faults.slowdown - 1.0) * elapsed)
        return state, losses, aux

    def contribution(self, spec: RoundSpec, state) -> list:
        """What the policy merges: the local params, or their change over the round.
        Non-finite values are sent all the same (the plugin rejects them)."""
        if spec.sends == "delta" or spec.compression is not None:  # compressed: a delta
            leaves = [np.asarray(x) for x in _deltas(state.params, self.state.params)]
        else:
            leaves = [np.asarray(x) for x in flatten(state.params)[0]]
        if spec.faults is not None and spec.faults.send_nan:  # fault injection for tests
            leaves = [np.full_like(x, np.nan) if np.issubdtype(x.dtype, np.inexact) else x
                      for x in leaves]
        return leaves

    def sync(self, spec: RoundSpec, leaves: list, samples: int, loss: float,
             compute_s: float, state) -> SyncReply:
        """Send the contribution; wait for the policy's answer (seceded when
        ``spec.secede``: this worker's thread is then free for tasks other workers
        need from it)."""
        opt_state = None
        if spec.checkpoint:  # this rank's part of the checkpoint cut after this round
            opt_state = to_serialize([np.asarray(x) for x in flatten(state.opt_state)[0]])
        model_state = None
        if self.state_template is not None:  # sent with every contribution
            model_state = to_serialize(flatten(state.state)[0])
        if self.packing is None:  # many small leaves: one buffer (daskdl.packing)
            self.packing = Packing(leaves) if worth_packing(leaves) else False
        if self.packing:
            leaves = self.packing.pack(leaves)
        req = SyncRequest(run=self.run, rank=spec.rank, clock=spec.clock, gen=spec.gen,
                          samples=samples, version=self.version, params=to_serialize(leaves),
                          loss=loss, compute=compute_s, opt_state=opt_state,
                          state=model_state, steps=samples // spec.batch_size)
        if spec.secede:
            secede()
        try:
            # Dask's fine performance metrics: activity "daskdl-sync" under daskdl-round
            with context_meter.meter("daskdl-sync"):
                reply = self._relayed(spec, req) if spec.relay is not None else None
                if reply is None:  # direct, or its relay failed: to the scheduler
                    if spec.relay is not None:
                        req = dataclasses.replace(req, resent=True)
                    reply = self._call(protocol.SYNC, **req.to_msg(self._secret))
        finally:
            if spec.secede:
                rejoin()
        return SyncReply.from_msg(reply)

    def _relayed(self, spec: RoundSpec, req: SyncRequest) -> dict | None:
        """Send ``req`` through the group's relay (:mod:`daskdl.relay`); ``None`` when
        the relay could not deliver it (``req`` is then marked ``resent``)."""
        from distributed.core import send_recv

        from .relay import RELAY_CONNECT_S, RELAY_FAILED, RELAY_SYNC

        msg = dict(req.to_msg(self._secret), group=spec.group, fit=spec.fit)
        if spec.faults is not None and spec.faults.lose_relay_reply:  # tests only
            msg["lose_reply"] = True

        async def call():
            if spec.relay == self.worker.address:  # this worker is the relay
                return await self.worker.handlers[RELAY_SYNC](**msg)
            # a relay that left refuses connections: give up on it after a short
            # connect timeout (Dask retries a refused connect for comm.timeouts.connect)
            pool = self.worker.rpc
            comm = await pool.connect(spec.relay, timeout=RELAY_CONNECT_S)
            try:
                return await send_recv(comm=comm, op=RELAY_SYNC, **msg)
            finally:
                pool.reuse(spec.relay, comm)

        try:
            reply = sync(self.worker.loop, call)
        except (OSError, CommClosedError) as e:  # the relay left
            logger.info("daskdl run %s: relay %s unreachable (%s); rank %d syncs with the "
                        "scheduler", self.run, spec.relay, e, spec.rank)
            return None
        return None if reply.get("status") == RELAY_FAILED else reply

    def sync_sharded(self, spec: RoundSpec, *args) -> SyncReply:
        """Sharded: send shard ``j`` of the update to its owner, tell the plugin,
        then gather the merged shards of the version it answers (see
        :mod:`daskdl.shards`).  With ``spec.secede`` (chunks from a Dask graph) the
        round leaves the thread pool for all of it: an owner may be waiting for a
        chunk this worker must compute before it can take this round's pieces."""
        if not spec.secede:
            return self._sync_sharded(spec, *args)
        secede()
        try:
            return self._sync_sharded(spec, *args)
        finally:
            rejoin()

    def _sync_sharded(self, spec: RoundSpec, leaves: list, samples: int, loss: float,
                      compute_s: float, state) -> SyncReply:
        """One event-loop call for the whole exchange: the pieces go to their owners
        while the plugin hears of the arrival (an owner waits for a piece the merge
        needs and that is still on its way), then the merged shards are gathered."""
        ex = self.exchange
        smap, members = ex.map, spec.members
        finite = all(np.isfinite(x).all() for x in leaves if _inexact(x.dtype))
        delta = spec.sends == "delta" or spec.compression is not None
        parts, sent, raw = None, 0, 0
        if finite:
            parts = [smap.pieces(leaves, j) for j in range(len(members))]
            raw = sum(p.nbytes for j, ps in enumerate(parts) if j != spec.rank for p in ps)
            if spec.compression is not None:  # this worker's own piece stays exact
                parts = [p if j == spec.rank else
                         self._compressor(j, len(members), spec.compression).compress(p)
                         for j, p in enumerate(parts)]
            sent = sum(_nbytes(p) for j, p in enumerate(parts) if j != spec.rank)
        divergence = None
        if finite and delta:
            divergence = float(np.sqrt(sum(float(np.vdot(x, x)) for x in leaves
                                           if _inexact(x.dtype))))
        opt_state = None
        if spec.checkpoint:
            opt_state = to_serialize([np.asarray(x) for x in flatten(state.opt_state)[0]])
        model_state = None
        if self.state_template is not None:
            model_state = to_serialize(flatten(state.state)[0])
        last = self.timings
        merge_s = ex.owner.merge_s
        req = SyncRequest(run=self.run, rank=spec.rank, clock=spec.clock, gen=spec.gen,
                          samples=samples, version=self.version, params=None, loss=loss,
                          compute=compute_s, opt_state=opt_state, state=model_state,
                          steps=samples // spec.batch_size, finite=finite,
                          divergence=divergence, sent=sent,
                          transfer=last.get("transfer_s", 0.0), raw=raw,
                          received=last.get("bytes_received", 0),
                          merge=max(merge_s - last.get("owner_merge_s", merge_s), 0.0))
        msg = req.to_msg(self._secret)
        taken, answered = ex.stats["taken"], ex.stats["answered"]
        shm_sent = ex.shm_sent
        t_start = time.perf_counter()

        async def exchange():
            # the pieces and the arrival travel at once; the shards are asked for as soon
            # as the plugin answers (an owner waits for a piece still on its way, and
            # fails at once when it refused it)
            call = asyncio.ensure_future(getattr(self.worker.scheduler, protocol.SYNC)(**msg))
            # as the plugin hears them (a loss that is not finite arrives as None); this
            # worker's own piece last: its merge ahead must not hold up the others' pieces
            meta = (samples, self.version, loss if np.isfinite(loss) else None)
            order = sorted(range(len(parts or ())), key=lambda j: j == spec.rank)
            started = {j: asyncio.ensure_future(self._put(spec, j, parts[j], delta, meta))
                       for j in order}
            puts = asyncio.gather(*(started[j] for j in sorted(started)),
                                  return_exceptions=True)
            reply = SyncReply.from_msg(await call)
            t_reply = time.perf_counter()
            if reply.status not in (Status.OK, Status.REJECTED):
                # replan, aborted, refused: the pieces are not needed any more, and a
                # put to an owner that left sits in Dask's connect retries (30 s)
                puts.cancel()
                return reply, [], t_reply, None
            rank = None if reply.status is Status.REJECTED else spec.rank
            try:
                got = await self._gather(spec, reply.version, list(reply.merges), rank,
                                         started)
            except (OSError, DaskDLError) as e:  # an owner left or refused a piece
                got = e
            return reply, await puts, t_reply, got

        with context_meter.meter("daskdl-sync"):
            reply, puts, t_reply, got = sync(self.worker.loop, exchange)
        if reply.status not in (Status.OK, Status.REJECTED):  # replan, aborted, refused
            return reply
        for j, r in enumerate(puts):
            if isinstance(r, OSError):  # an owner left: the generation will change
                logger.info("daskdl: %s on %s: sending the update failed: %s", spec.where,
                            self.worker.address, r)
                return SyncReply(Status.REPLAN, reply.version)
            if isinstance(r, BaseException):
                raise r
            if r.get("status") != Status.OK.value:
                raise SyncAborted(f"{spec.where}: the owner of shard {j} refused the update: "
                                  f"{r.get('reason')}")
        if isinstance(got, BaseException):
            logger.info("daskdl: %s on %s: gathering the shards failed: %s", spec.where,
                        self.worker.address, got)
            return SyncReply(Status.REPLAN, reply.version)
        if not delta and reply.status is Status.OK and _own_pieces(got, parts):
            # one member under an averaging policy: it continues from its own state
            params, center, at, received = None, None, min(g[2] for g in got), 0
            ex.held = (at, leaves, (spec.fit, spec.gen))
        else:
            params, center, at, received = self._assemble(spec, got)
            ex.held = (at, center if center is not None else params, (spec.fit, spec.gen))
        t_end = time.perf_counter()
        self.timings = {"transfer_s": t_end - t_start - (reply.waited or 0.0),
                        "gather_s": t_end - t_reply, "merge_s": ex.owner.merge_s - merge_s,
                        "owner_merge_s": ex.owner.merge_s, "bytes_sent": sent,
                        "bytes_received": received, "compression": raw / sent if sent else 1.0,
                        "pushed": ex.stats["taken"] - taken,
                        "answered": ex.stats["answered"] - answered,
                        "shm": ex.shm_sent - shm_sent, "continued": params is None}
        return SyncReply(reply.status, at, params=params, waited=reply.waited,
                         reason=reply.reason, state=reply.state, steps=reply.steps)

    def _compressor(self, j: int, n: int, kind: str):
        from .compression import ErrorFeedback

        key = (n, j, kind)
        if key not in self.feedback:
            self.feedback[key] = ErrorFeedback(kind, feedback=self.error_feedback)
        return self.feedback[key]

    async def _put(self, spec: RoundSpec, j: int, pieces: list, delta: bool,
                   meta: tuple) -> dict:
        """Send ``pieces`` to the owner of shard ``j`` (this worker's own directly),
        with the ``(samples, version, loss)`` the plugin hears (merges ahead)."""
        from .exchange import PUT

        if j == spec.rank:
            self.exchange.put_local(spec.rank, spec.clock, pieces, delta, meta)
            return {"status": Status.OK.value}
        samples, base, loss = meta
        address = spec.members[j]
        ex = self.exchange
        shm_answer = ex.shm_in.enabled and address not in ex.no_shm_replies

        def call(payload):
            return _watched(self.worker, address, getattr(self.worker.rpc(address), PUT)(
                run=self.run, secret=self._secret, fit=spec.fit, gen=spec.gen,
                rank=spec.rank, clock=spec.clock, shard=j, delta=delta,
                pieces=payload, timeout=spec.timeout, samples=samples, base=base,
                loss=loss, shm_answer=shm_answer))

        reply = await shm.send(ex.outbox, address, "put", [pieces], call, to_serialize)
        if isinstance(reply, dict) and reply.get("merged") is not None and \
                reply.get("status") == Status.OK.value:  # the owner merged: its shard
            ex.keep_answer((spec.fit, spec.gen), j, reply, address)
        return reply

    async def _gather(self, spec: RoundSpec, version: int, merges: list, rank,
                      puts: dict) -> list:
        """The merged shards of ``version`` from their owners: ``(pieces, center,
        version)`` for each shard (on the event loop; see :meth:`_assemble`); a shard
        its owner pushed as the very merge the plugin logged is taken as it is.  An
        owner is asked only once this round's put to it (``puts``, shard -> task) is
        done: the owner cannot answer before it has the piece, and an owner the put
        found gone (an ``OSError``) is not asked at all (Dask would retry connecting
        to it for ``distributed.comm.timeouts.connect``, 30 s)."""
        from .exchange import GET

        ex = self.exchange
        entries = [_entry(m) for m in merges]

        async def get(j):
            if j == spec.rank:  # this worker's own shard
                await ex.catch_up(ex.owner, entries, version, {"timeout": spec.timeout})
                pieces, at = ex.owner.get(rank)
                center = ex.owner.shard if pieces is not ex.owner.shard else None
                return pieces, center, at
            pushed = await ex.take(j, (spec.fit, spec.gen), version, entries, rank)
            if pushed is not None:
                return pushed[0], pushed[1], version
            put = puts.get(j)
            if put is not None:
                await asyncio.wait([put])
                if isinstance(err := put.exception(), OSError):  # the owner left
                    raise err
            owner = spec.members[j]
            call = getattr(self.worker.rpc(owner), GET)(
                run=self.run, secret=self._secret, fit=spec.fit, gen=spec.gen,
                version=version, rank=rank, merges=merges, timeout=spec.timeout)
            r = await _watched(self.worker, owner, call)
            if r.get("status") != Status.OK.value:
                raise DaskDLError(f"the owner of shard {j} refused: {r.get('reason')}")
            pieces = protocol.load(r["pieces"])
            center = protocol.load(r["center"]) if r.get("center") is not None else None
            return pieces, center, int(r["version"])

        return await asyncio.gather(*(get(j) for j in range(len(spec.members))))

    def _assemble(self, spec: RoundSpec, got: list):
        """``(params to continue from, the global params when they differ (policy
        replies), version, bytes received)`` from the shards :meth:`_gather` got."""
        from .shards import check_pieces

        smap = self.exchange.map
        received = 0
        for j, (pieces, center, _) in enumerate(got):
            check_pieces(pieces, smap.piece_specs(j), f"shard {j}", finite=False)
            if j != spec.rank:
                received += sum(p.nbytes for p in pieces) + sum(
                    p.nbytes for p in (center or ()))
        params = smap.assemble([g[0] for g in got])
        center = None
        if any(g[1] is not None for g in got):
            center = smap.assemble([g[1] if g[1] is not None else g[0] for g in got])
        return params, center, min(g[2] for g in got), received

    def apply(self, spec: RoundSpec, reply: SyncReply, before) -> None:
        """Continue from what the reply says, or discard the round."""
        where = f"{spec.where} on worker {self.worker.address}"
        if reply.status is Status.REPLAN:  # the generation changed: not counted
            if self.order.key == (spec.fit, spec.gen):
                self.state = before
            raise RoundDiscarded(f"{where} was discarded: the workers changed")
        if reply.status in (Status.ABORTED, Status.REFUSED):
            self.state = None
            if reply.diverged:
                raise TrainingDiverged(self.worker.address, spec.epoch, spec.round,
                                       detail=reply.reason)
            raise SyncAborted(f"{where} stopped: {reply.reason}")
        if reply.status is Status.REJECTED:  # start again from the global params
            self._set_params(reply.params, reply.version, fresh=True)
            self._set_model_state(reply.state, reply.steps)
        elif reply.params is None:  # continue from what it sent
            self.version = reply.version
        else:
            self._set_params(reply.params, reply.version)
        if reply.status is Status.OK:
            self._set_model_state(reply.state)

    def _result(self, spec: RoundSpec, reply: SyncReply, losses, aux, samples: int,
                times: dict) -> dict:
        t0, t_data, t_compute = times["t0"], times["data"], times["compute"]
        return {
            "rank": spec.rank, "epoch": spec.epoch, "round": spec.round,
            "clock": spec.clock, "worker": self.worker.address,
            "loss": float(losses.mean()), "samples": samples,
            "metrics": {k: float(np.mean(v)) for k, v in aux.items()},
            "data_s": t_data - t0, "compute_s": t_compute - t_data,
            "sync_s": time.perf_counter() - t_compute, "wait_s": reply.waited,
            "version": reply.version, "compiles": self.compiles,
            "started": times["started"], "finished": time.time(),
            "rejected": reply.reason if reply.status is Status.REJECTED else None,
            "overlapped": spec.overlap and not spec.last,
            **({k: v for k, v in self.timings.items() if k not in ("gather_s", "owner_merge_s")}
               if spec.sharded else {}),
        }


def gather_batches(seed: int, spec: RoundSpec, blocks: tuple) -> dict:
    """The round's samples as arrays of shape ``(steps, batch_size, ...)``, by name.

    ``blocks`` hold one array per name for each of ``spec.chunks``; each sample is
    copied once, from its chunk straight to its shuffled place.
    """
    width = len(spec.names)
    by_chunk = {c: blocks[i * width:(i + 1) * width] for i, c in enumerate(spec.chunks)}
    total = spec.steps * spec.batch_size
    dest = round_permutation(seed, spec.epoch, spec.rank, spec.round, total)
    first = by_chunk[spec.chunks[0]]
    out = [aligned_empty((total,) + np.shape(a)[1:], np.asarray(a).dtype) for a in first]
    pos = 0
    for chunk, start, stop, perm_epoch in spec.segments:
        data = by_chunk[chunk]
        perm_epoch = perm_epoch if perm_epoch >= 0 else spec.epoch
        rows = chunk_permutation(seed, perm_epoch, chunk, len(data[0]))[start:stop]
        where = dest[pos:pos + len(rows)]
        for o, a in zip(out, data):
            o[where] = np.asarray(a)[rows]
        pos += len(rows)
    if pos != total:
        raise RuntimeError(f"round has {pos} samples, expected {total}")
    return {n: o.reshape((spec.steps, spec.batch_size) + o.shape[1:])
            for n, o in zip(spec.names, out)}


@jax.jit
def _moved(synced, now, start):
    """``synced + (now - start)``, leaf by leaf (overlap: one round's progress moved onto
    what the sync of the round before answered)."""
    return jax.tree_util.tree_map(lambda a, b, c: a + (b - c), synced, now, start)


@jax.jit
def _deltas(new, old):
    return [a - b for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))]


async def _watched(worker, address: str, call):
    """``await call``, an RPC from ``worker`` to the worker at ``address``, failing
    once the scheduler says that worker left (:func:`daskdl.exchange.watched`): a
    round whose owner was killed after taking its piece re-plans in about
    :data:`~daskdl.exchange.OWNER_CHECK_S` instead of Dask's 30 s connect retries."""
    return await watched(call, address, asking(worker.scheduler))


class _QuietRounds(logging.Filter):
    """Drops Dask's ``Compute Failed`` blocks of round tasks: the client raises one
    clear error for a failed ``fit``, and the rounds that stopped after it would
    each log a traceback on their worker otherwise (kept at debug level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Compute Failed") and record.args and \
                protocol.ROUND_PREFIX in str(record.args[0]):
            logging.getLogger("daskdl").debug("round %s failed", record.args[0])
            return False
        return True


_QUIET = _QuietRounds()


def quiet_round_failures() -> None:
    """Install :class:`_QuietRounds` on this worker's ``distributed.worker`` logger."""
    log = logging.getLogger("distributed.worker")
    if _QUIET not in log.filters:
        log.addFilter(_QUIET)


def _inexact(dtype) -> bool:
    """Floating point, bfloat16 included (numpy's issubdtype says no to it)."""
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _own_pieces(got: list, parts) -> bool:
    """Whether every merged shard :meth:`Replica._gather` got is this worker's own
    piece, the very arrays it sent (nothing to assemble or copy)."""
    return parts is not None and all(
        g[1] is None and len(g[0]) == len(parts[j]) and
        all(a is b for a, b in zip(g[0], parts[j])) for j, g in enumerate(got))


def _entry(m):
    from .shards import MergeEntry

    return MergeEntry.from_msg(m)


def run_rounds(specs, chunks: tuple, *blocks, init=None) -> list[dict]:
    """The body of a ``daskdl-round-...`` task: consecutive rounds ``specs`` (a
    :class:`~daskdl.protocol.RoundBatch` or a sequence of specs) of one rank on this
    worker.  ``blocks`` hold one array per name for each of ``chunks``
    (none when the worker reads the store itself).  Returns each round's metrics."""
    worker = get_worker()
    specs = tuple(specs)
    run = specs[0].run
    replica = worker.plugins.get(replica_name(run))
    if replica is None:
        raise SyncAborted(f"no replica of training run {run} on worker "
                          f"{worker.address}; was the trainer closed?")
    width = len(specs[0].names)
    by_chunk = {c: blocks[i * width:(i + 1) * width] for i, c in enumerate(chunks)}
    return [replica.run_round(spec, tuple(a for c in spec.chunks for a in by_chunk.get(c, ())),
                              init=init) for spec in specs]


# -- evaluation and prediction on workers ------------------------------------------------
_JIT_CACHE: dict = {}


def _cached(kind: str, token: str, fn):
    key = (kind, token)
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 64:
            _JIT_CACHE.clear()
        if kind == "metric":
            from .step import make_metric
            _JIT_CACHE[key] = make_metric(fn)
        else:
            _JIT_CACHE[key] = jax.jit(fn)
    return _JIT_CACHE[key]


def evaluate_chunk(metric_fn, token: str, params, batch_size: int, names: tuple, *blocks):
    from .step import evaluate_block

    metric = _cached("metric", token, metric_fn)
    return evaluate_block(metric, params, dict(zip(names, blocks)), batch_size)


def predict_chunk(apply_fn, token: str, params, batch_size: int, x):
    from .step import predict_block

    return predict_block(_cached("apply", token, apply_fn), params, np.asarray(x), batch_size)


__all__ = ["Replica", "RoundOrder", "gather_batches", "run_rounds"]
