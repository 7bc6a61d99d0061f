"""The worker side of training: one replica per trainer on every worker.

:class:`Replica` is a ``WorkerPlugin``.  It holds the compiled step function
(compiled once per worker, reused by every round), the local train state
(params, optimizer state) and runs rounds:

1. take the round's samples from the chunks the task received, in the plan's
   order, and reshape them to ``(steps, batch_size, ...)``;
2. run the steps in one compiled ``lax.scan``;
3. send the local params to the scheduler plugin (``daskdl_sync``), wait for the
   policy's answer, and continue from the parameters it returns, keeping the
   local optimizer state.

A round's update is sent even when it is not finite: the scheduler plugin
rejects it before it touches the global parameters and the replica starts again
from those, with a fresh optimizer state (``TrainingDiverged`` after
``daskdl.max-rejections`` in a row).  A round answered ``replan`` (the workers
changed while it ran) is discarded: the replica puts back its state from before
the round and raises :class:`~daskdl.errors.RoundDiscarded`, which ``fit`` expects.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from distributed import get_worker, rejoin, secede
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.metrics import context_meter
from distributed.protocol.serialize import to_serialize
from distributed.utils import sync

from .errors import RoundDiscarded, SyncAborted, TrainingDiverged
from .plan import Segment, chunk_permutation, round_permutation
from .step import init_state, make_train_steps
from .tree import flatten, unflatten


def replica_name(run: str) -> str:
    return f"daskdl-replica-{run}"


class Replica(WorkerPlugin):
    """Per-worker state of one training run (registered as a ``WorkerPlugin``)."""

    idempotent = False

    def __init__(self, run: str, loss_fn, optimizer, treedef, seed: int):
        self.run = run
        self.name = replica_name(run)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.treedef = treedef
        self.seed = seed
        self._reset()

    def _reset(self):
        self.worker = None
        self.train_steps = None
        self.state = None
        self.fit = None  # (fit, generation) of the rounds being run
        self.busy = 0  # rounds between their turn and their end
        self.version = -1
        self.compiles = 0
        self.expected = 0  # the clock of the next round this worker must run
        self.failed = False
        self.closed = False
        self.need_pull = True
        self.turn = threading.Condition()
        self._zarr_arrays: dict = {}
        self._prefetched: dict = {}
        self._pool = None

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("worker", "train_steps", "state", "turn", "_pool"):
            d[k] = None
        d["_zarr_arrays"], d["_prefetched"] = {}, {}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.turn = threading.Condition()

    def setup(self, worker):
        self.worker = worker

    def teardown(self, worker):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self.turn:
            self.closed = True
            self.turn.notify_all()

    # -- ordering of rounds -----------------------------------------------------------
    def _wait_turn(self, spec: dict) -> None:
        """Run rounds in clock order.

        Rounds are submitted ahead without depending on each other (no scheduler
        round trip between two rounds); the scheduler's priorities run them in
        order.  If a later round is ready first (its data arrived sooner), it
        leaves the worker's thread pool (``secede``) until the earlier ones ran.
        """
        key = (spec["fit"], spec.get("gen", 0))
        if self.fit != key:
            if self.fit is not None and key < self.fit:
                raise RoundDiscarded(f"round of an earlier generation {key} on "
                                     f"{self.worker.address}")
            self._wait_idle(spec)  # rounds of the last generation may still be finishing
            self.fit, self.expected, self.need_pull = key, spec["first_clock"], True
            self.failed = False
        clock = spec["clock"]
        if clock == self.expected:
            return
        if clock < self.expected:
            raise SyncAborted(f"round with clock {clock} ran twice on {self.worker.address}")
        secede()
        deadline = time.monotonic() + spec["timeout"]
        try:
            with self.turn:
                while self.expected != clock:
                    if self.fit != key:
                        raise RoundDiscarded(f"round {spec['round']} of epoch {spec['epoch']} "
                                             f"on {self.worker.address}: the workers changed")
                    if self.failed or self.closed or time.monotonic() > deadline:
                        raise SyncAborted(
                            f"round {spec['round']} of epoch {spec['epoch']} on "
                            f"{self.worker.address} gave up waiting for the rounds before it")
                    self.turn.wait(0.25)
        finally:
            rejoin()

    def _wait_idle(self, spec: dict) -> None:
        """Wait (seceded) until no round of an earlier generation is running here."""
        if not self.busy:
            return
        secede()
        deadline = time.monotonic() + spec["timeout"]
        try:
            with self.turn:
                while self.busy and time.monotonic() < deadline and not self.closed:
                    self.turn.wait(0.1)
        finally:
            rejoin()

    def _done(self, clock: int, ok: bool) -> None:
        with self.turn:
            if ok:
                self.expected = clock + 1
            else:
                self.failed = True
            self.turn.notify_all()

    # -- scheduler calls ------------------------------------------------------------
    def _call(self, op: str, **kwargs) -> dict:
        rpc = getattr(self.worker.scheduler, op)
        return sync(self.worker.loop, rpc, **kwargs)

    def _pull(self, rank: int) -> None:
        reply = self._call("daskdl_params", run=self.run, rank=rank)
        if reply.get("status") != "OK":
            raise SyncAborted(f"cannot fetch the global parameters: {reply.get('reason')}")
        self._set_params(reply["params"], reply["version"])
        if "opt_state" in reply:  # resuming from a checkpoint: this rank's optimizer state
            _, opt_def = flatten(self.state.opt_state)
            self.state = self.state._replace(
                opt_state=unflatten(opt_def, [jnp.array(x) for x in reply["opt_state"]]))

    def _set_params(self, leaves, version: int, fresh: bool = False) -> None:
        params = unflatten(self.treedef, [jnp.array(leaf) for leaf in leaves])
        if self.state is None or fresh:
            self.state = init_state(params, self.optimizer)
        else:
            self.state = self.state._replace(params=params)
        self.version = version

    # -- reading Zarr chunks on the worker, one round ahead -----------------------------
    def _read_chunks(self, spec: dict) -> list:
        """This round's chunks: prefetched during the last round, or read now."""
        src = spec["zarr"]
        arrays = self._zarr_arrays.get(src.token)
        if arrays is None:  # one source open at a time
            self._zarr_arrays = {src.token: src.open()}
            arrays = self._zarr_arrays[src.token]
        out = []
        for c in spec["chunks"]:
            fut = self._prefetched.pop((src.token, c), None)
            out.extend(fut.result() if fut is not None else src.read(c, arrays))
        for fut in self._prefetched.values():  # a plan changed under us: drop stale reads
            fut.cancel()
        self._prefetched.clear()
        return out

    def _prefetch_chunks(self, spec: dict, blocks: list) -> None:
        """Start reading the next round's chunks; keep those this round already has."""
        import concurrent.futures

        src = spec["zarr"]
        arrays = self._zarr_arrays[src.token]
        width = len(spec["names"])
        have = {c: tuple(blocks[i * width:(i + 1) * width]) for i, c in enumerate(spec["chunks"])}
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "daskdl-prefetch")
        for c in spec.get("next_chunks", []):
            if c in have:
                done = concurrent.futures.Future()
                done.set_result(have[c])
                self._prefetched[(src.token, c)] = done
            else:
                self._prefetched[(src.token, c)] = self._pool.submit(src.read, c, arrays)

    # -- a round ----------------------------------------------------------------------
    def gather_batches(self, spec: dict, blocks: tuple) -> dict:
        """The round's samples as arrays of shape ``(steps, batch_size, ...)``, by name.

        Each sample is copied once: from its chunk straight to its shuffled place.
        """
        names = spec["names"]
        by_chunk = {c: blocks[i * len(names):(i + 1) * len(names)]
                    for i, c in enumerate(spec["chunks"])}
        steps, bs = spec["steps"], spec["batch_size"]
        total = steps * bs
        dest = round_permutation(self.seed, spec["epoch"], spec["rank"], spec["round"], total)
        first = by_chunk[spec["chunks"][0]]
        out = [np.empty((total,) + np.shape(a)[1:], dtype=np.asarray(a).dtype) for a in first]
        pos = 0
        for seg in spec["segments"]:  # (chunk, start, stop[, epoch of the permutation])
            chunk, start, stop = seg[:3]
            data = by_chunk[chunk]
            perm_epoch = seg[3] if len(seg) > 3 and seg[3] >= 0 else spec["epoch"]
            rows = chunk_permutation(self.seed, perm_epoch, chunk, len(data[0]))[start:stop]
            where = dest[pos:pos + len(rows)]
            for o, a in zip(out, data):
                o[where] = np.asarray(a)[rows]
            pos += len(rows)
        if pos != total:
            raise RuntimeError(f"round has {pos} samples, expected {total}")
        return {n: o.reshape((steps, bs) + o.shape[1:]) for n, o in zip(names, out)}

    def run_round(self, spec: dict, blocks: tuple) -> dict:
        self._wait_turn(spec)
        with self.turn:
            self.busy += 1
        try:
            out = self._run_round(spec, blocks)
        except BaseException:
            self._done(spec["clock"], ok=False)
            raise
        finally:
            with self.turn:
                self.busy -= 1
                self.turn.notify_all()
        self._done(spec["clock"], ok=True)
        return out

    def _run_round(self, spec: dict, blocks: tuple) -> dict:
        started = time.time()
        t_start = time.perf_counter()
        if self.train_steps is None:
            self.train_steps = make_train_steps(self.loss_fn, self.optimizer)
        if self.state is None or self.need_pull:
            self._pull(spec["rank"])
            self.need_pull = False
        if "zarr" in spec:
            blocks = self._read_chunks(spec)
        with context_meter.meter("daskdl-data"):
            batches = self.gather_batches(spec, blocks)
        t_data = time.perf_counter()
        cache_before = self.train_steps._cache_size()
        state, (losses, aux) = self.train_steps(self.state, batches)  # dispatched, not done
        if "zarr" in spec:
            self._prefetch_chunks(spec, blocks)  # next round's reads overlap this compute
        losses = np.asarray(losses)  # waits for the computation
        self.compiles += self.train_steps._cache_size() - cache_before  # for tests
        t_compute = time.perf_counter()
        compiled = self.train_steps._cache_size() > cache_before
        if spec.get("slowdown", 1.0) > 1.0 and not compiled:
            # a simulated straggler (benchmarks, tests); compilation is not slowed down
            time.sleep((spec["slowdown"] - 1.0) * (t_compute - t_data))
            t_compute = time.perf_counter()
        # Non-finite updates are sent all the same: the scheduler plugin rejects them
        # before they touch the global parameters and answers with those to start again
        # from (and fails the run if one worker keeps sending them).
        if spec.get("sends", "params") == "delta":
            leaves = [np.asarray(x) for x in _deltas(state.params, self.state.params)]
        else:
            leaves, _ = flatten(state.params)
            leaves = [np.asarray(x) for x in leaves]
        if spec.get("send_nan"):  # fault injection for tests
            leaves = [np.full_like(x, np.nan) if np.issubdtype(x.dtype, np.inexact) else x
                      for x in leaves]
        opt_state = None
        if spec.get("checkpoint"):  # this rank's part of the checkpoint after this round
            opt_state = to_serialize([np.asarray(x) for x in flatten(state.opt_state)[0]])
        before, self.state = self.state, state
        samples = int(np.prod(losses.shape)) * spec["batch_size"]
        # Waiting in the barrier frees this worker's thread (secede), so that tasks other
        # workers need from this one (a chunk computed here) can run meanwhile: a
        # barrier must never wait on a task queued behind it.
        secede()
        try:
            # shows up in Dask's fine performance metrics (dashboard "Fine Performance
            # Metrics", prefix daskdl-round) as the activity "daskdl-sync"
            with context_meter.meter("daskdl-sync"):
                reply = self._call("daskdl_sync", run=self.run, rank=spec["rank"],
                                   clock=spec["clock"], params=to_serialize(leaves),
                                   samples=samples, version=self.version,
                                   loss=float(losses.mean()), compute=t_compute - t_data,
                                   gen=spec.get("gen", 0), opt_state=opt_state)
        finally:
            rejoin()
        status = reply.get("status")
        where = (self.worker.address, spec["epoch"], spec["round"])
        if status == "replan":  # the generation changed: this round is not counted
            if self.fit == (spec["fit"], spec.get("gen", 0)):
                self.state = before
            raise RoundDiscarded(f"round {spec['round']} of epoch {spec['epoch']} on "
                                 f"{self.worker.address} was discarded: the workers changed")
        if status == "aborted":
            self.state = None
            if reply.get("diverged"):
                raise TrainingDiverged(*where, detail=reply.get("reason", ""))
            raise SyncAborted(f"round {spec['round']} of epoch {spec['epoch']} on worker "
                              f"{self.worker.address} stopped: {reply.get('reason')}")
        rejected = status == "rejected"
        if rejected:  # start again from the global parameters, with a fresh optimizer
            self._set_params(reply["params"], reply["version"], fresh=True)
        elif reply.get("same"):
            self.version = reply["version"]
        else:
            self._set_params(reply["params"], reply["version"])
        t_end = time.perf_counter()
        metrics = {k: float(np.mean(v)) for k, v in aux.items()}
        return {
            "rank": spec["rank"], "epoch": spec["epoch"], "round": spec["round"],
            "clock": spec["clock"], "worker": self.worker.address,
            "loss": float(losses.mean()), "samples": samples, "metrics": metrics,
            "data_s": t_data - t_start, "compute_s": t_compute - t_data,
            "sync_s": t_end - t_compute, "wait_s": float(reply.get("waited", 0.0)),
            "version": reply["version"], "compiles": self.compiles,
            "started": started, "finished": time.time(),
            "rejected": reply.get("reason") if rejected else None,
        }


@jax.jit
def _deltas(new, old):
    return [a - b for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))]


def run_round(run: str, spec: dict, *blocks) -> dict:
    """The body of a ``daskdl-round-...`` task: one round of ``spec`` on this worker."""
    worker = get_worker()
    replica = worker.plugins.get(replica_name(run))
    if replica is None:
        raise SyncAborted(f"no replica of training run {run} on worker {worker.address}; "
                          "was the trainer closed?")
    return replica.run_round(spec, blocks)


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


__all__ = ["Replica", "run_round", "Segment"]
