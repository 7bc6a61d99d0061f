"""The public :class:`Trainer`: data-parallel training of a JAX model on Dask workers."""

from __future__ import annotations

import collections
import logging
import os
import time
import uuid
import weakref
from typing import Any, Callable, Sequence

import cloudpickle
import dask
import dask.array as da
import jax
import numpy as np
import optax
from dask.base import tokenize
from distributed import Client, Future, default_client
from distributed.client import _wait as _wait_futures

from . import config
from .dashboard import DashboardPlugin
from .data import Dataset
from .errors import DaskDLError, SyncAborted
from .plan import make_plan
from .plugin import TrainingPlugin, _load
from .policies import Policy, from_config
from .replica import Replica, evaluate_chunk, predict_chunk, replica_name
from .step import check_metrics_output, split_loss_output
from .tree import check_params, flatten, unflatten
from .workerenv import WorkerEnvironment, cluster_config, core_slots

logger = logging.getLogger("daskdl")


def _start_local_cluster() -> Client:
    from distributed import LocalCluster

    n = len(os.sched_getaffinity(0))
    with cluster_config():
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True)
    return Client(cluster, set_as_default=False)


def _close_client(client: Client) -> None:
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


class _Placement:
    """Where each chunk of a dataset comes from on the cluster (futures or tasks)."""

    def __init__(self, refs: list, owners: list, workers: tuple, zarr=None):
        self.refs = refs  # refs[chunk][name_index] -> Future or Delayed
        self.owners = owners  # rank holding each chunk, or -1
        self.workers = workers
        self.zarr = zarr  # a ZarrSource: training workers read chunks from the store


class Trainer:
    """Train a JAX model data-parallel on the workers of a Dask cluster.

    Parameters
    ----------
    loss_fn : ``loss_fn(params, batch) -> scalar`` or ``(scalar, dict_of_metrics)``;
        ``batch`` is a dict of arrays named as in the dataset.  Pure JAX.
    params : initial parameters, any pytree of numpy or JAX arrays.
    optimizer : an ``optax.GradientTransformation``; each worker keeps its own state.
    policy : the consistency policy: a :class:`~daskdl.Policy` such as
        ``daskdl.SSP(every=16, staleness=2)``, a config entry such as
        ``{"class": "daskdl.SSP", "staleness": 2}``, or ``None`` for config
        ``daskdl.policy`` (``BSP()`` when unset).
    batch_size : samples per optimizer step *on each worker*.
    client : a ``distributed.Client``; ``None`` takes the current default client,
        or starts a ``LocalCluster`` with one single-threaded worker process per
        core, closed with the trainer.
    seed : the shard plan, shuffles and chunk placement depend only on it (same
        seed and same number of workers give bit-identical parameters).
    rounds_ahead, sync_timeout : ``None`` reads ``daskdl.rounds-ahead`` and
        ``daskdl.sync-timeout`` from config.  A worker that sends nothing for
        ``sync_timeout`` while others wait for it counts as lost.
    min_workers : below this many workers, ``fit`` pauses (with a message) until
        workers come back, and fails after ``daskdl.min-workers-wait``.
    checkpoint : a directory (or Zarr store) for checkpoints: global parameters,
        policy state, every worker's optimizer state and the data position, as
        versioned Zarr groups written atomically by the scheduler in the background
        (see :mod:`daskdl.checkpoint`); ``fit(..., resume=True)`` continues from
        the newest readable one.
    checkpoint_every : rounds between checkpoints (and one at the end of ``fit``);
        ``None``: at the end of every epoch.
    checkpoint_key : encrypt and authenticate checkpoints with this key (32 bytes, a
        passphrase, or a key reference such as ``"env:NAME"``; see
        :mod:`daskdl.encryption`); ``None`` uses the key of the encrypted share
        being trained on, if any.

    Examples
    --------
    >>> trainer = Trainer(loss_fn, params, optax.adam(1e-3), batch_size=64)  # doctest: +SKIP
    >>> history = trainer.fit(train, epochs=3)                                # doctest: +SKIP
    >>> trainer.evaluate(test, accuracy)                                       # doctest: +SKIP
    {'accuracy': 0.97...}
    """

    def __init__(self, loss_fn: Callable, params, optimizer: optax.GradientTransformation,
                 policy: Policy | None = None, batch_size: int = 64,
                 client: Client | None = None, seed: int = 0,
                 rounds_ahead: int | None = None, sync_timeout=None, min_workers: int = 1,
                 checkpoint=None, checkpoint_every: int | None = None, checkpoint_key=None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a function loss_fn(params, batch), got {loss_fn!r}")
        check_params(params)
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(
                f"optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
                f"got {type(optimizer).__name__}"
            )
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(min_workers, (int, np.integer)) or min_workers < 1:
            raise ValueError(f"min_workers must be a positive integer, got {min_workers!r}")
        if checkpoint_every is not None and (
                not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1):
            raise ValueError("checkpoint_every must be a positive number of rounds or None, "
                             f"got {checkpoint_every!r}")
        from .checkpoint import checkpoint_spec, trainer_checkpoint_key

        self.checkpoint = checkpoint_spec(checkpoint)
        self.checkpoint_key = trainer_checkpoint_key(checkpoint_key, self.checkpoint)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.min_workers = int(min_workers)
        policy = from_config(policy)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.policy = policy
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rounds_ahead = max(1, int(config.get("rounds-ahead", rounds_ahead)))
        self.sync_timeout = config.get_seconds("sync-timeout", sync_timeout)
        self.max_rejections = int(config.get("max-rejections"))
        # simulated stragglers for benchmarks and tests: {rank: factor}
        self._slowdown = {int(k): float(v)
                          for k, v in (config.get("testing.slowdown") or {}).items()}
        self._send_nan = {int(k): (v if v == "all" else {int(c) for c in v})
                          for k, v in (config.get("testing.send-nan") or {}).items()}
        self._leaves, self._treedef = flatten(params)
        self._leaves = [np.array(x, copy=True) for x in self._leaves]
        self.run = uuid.uuid4().hex[:10]
        self.history: list[dict] = []
        self.rounds: list[dict] = []  # per-round metrics of every worker
        self.coverage: dict = {}  # epoch -> Counter(chunk -> samples trained)
        self.rejected_rounds: list[dict] = []  # rounds whose update the scheduler rejected
        self._epoch = 0
        self._clock = 0
        self._fits = 0
        self._placements: dict = {}

        self._owns_client = False
        if client is None:
            try:
                client = default_client()
            except ValueError:
                client = _start_local_cluster()
                self._owns_client = True
        self.client = client
        self._finalizer = weakref.finalize(self, Trainer._cleanup, client, self.run,
                                           self._owns_client)
        self._register()

    # -- lifecycle --------------------------------------------------------------------
    @staticmethod
    def _cleanup(client, run, owns):
        try:
            if owns:
                _close_client(client)
            elif client.status == "running":
                client.unregister_worker_plugin(replica_name(run))
                client.sync(client.scheduler.daskdl_end, run=run)
        except Exception:  # closing must never raise at interpreter exit
            pass

    def close(self) -> None:
        """Forget the run on the cluster; close the cluster if this trainer started it."""
        self._placements.clear()
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- parameters --------------------------------------------------------------------
    @property
    def params(self):
        """The global parameters: the pytree given at construction, with numpy leaves."""
        return unflatten(self._treedef, [np.array(x, copy=True) for x in self._leaves])

    def _fetch_params(self) -> None:
        reply = self.client.sync(self.client.scheduler.daskdl_params, run=self.run)
        if reply.get("status") == "OK":
            self._leaves = [np.array(x, copy=True) for x in _load(reply["params"])]

    # -- set-up ---------------------------------------------------------------------------
    def _workers(self) -> tuple:
        workers = _worker_info(self.client)
        if not workers:
            raise DaskDLError("the cluster has no workers; start some (cluster.scale(2)) "
                              "or wait for them with client.wait_for_workers(2)")
        return tuple(sorted(workers)), workers

    def _register(self) -> None:
        """Install daskdl on the cluster: scheduler plugin, worker set-up, this run's replica.

        Worker plugins also reach workers that join later.
        """
        c = self.client
        c.register_plugin(TrainingPlugin(), name=TrainingPlugin.name)
        c.register_plugin(DashboardPlugin())
        c.register_plugin(WorkerEnvironment(core_slots(_worker_info(c))))
        c.register_plugin(Replica(self.run, self.loss_fn, self.optimizer, self._treedef,
                                  self.seed), name=replica_name(self.run))

    def _batch_spec(self, dataset: Dataset, rows: int) -> dict:
        return {n: jax.ShapeDtypeStruct((rows,) + dataset[n].shape[1:], dataset[n].dtype)
                for n in dataset.names}

    def _check_loss(self, dataset: Dataset) -> None:
        params = self.params
        try:
            jax.eval_shape(lambda p, b: split_loss_output(self.loss_fn(p, b)), params,
                           self._batch_spec(dataset, self.batch_size))
        except TypeError as e:
            if "loss_fn must return" in str(e):
                raise TypeError(str(e)) from None
            raise

    def _place(self, dataset: Dataset, workers: tuple) -> _Placement:
        key = id(dataset)
        hit = self._placements.get(key)
        if hit is not None and hit[0] is dataset and hit[1].workers == workers:
            return hit[1]
        names = dataset.names
        nchunks = dataset.nchunks
        if dataset.in_memory:
            order = np.random.default_rng([self.seed, 0x91AC]).permutation(nchunks)
            owners = [-1] * nchunks
            for pos, c in enumerate(order):
                owners[int(c)] = pos % len(workers)
            refs: list = [None] * nchunks
            for rank, addr in enumerate(workers):
                mine = [c for c in range(nchunks) if owners[c] == rank]
                if not mine:
                    continue
                blocks = [dataset.block(c)[n] for c in mine for n in names]
                futs = self.client.scatter(blocks, workers=[addr], hash=False)
                for i, c in enumerate(mine):
                    refs[c] = futs[i * len(names):(i + 1) * len(names)]
        else:
            per_name = [dataset[n].to_delayed(optimize_graph=False).reshape(-1) for n in names]
            refs = [[per_name[j][c] for j in range(len(names))] for c in range(nchunks)]
            keys = [d.key for d in per_name[0]]
            where = self.client.run_on_scheduler(_locations, keys)
            rank_of = {a: r for r, a in enumerate(workers)}
            owners = [rank_of.get(where.get(k), -1) for k in keys]
        placement = _Placement(refs, owners, workers, dataset._zarr)
        self._placements[key] = (dataset, placement)
        return placement

    # -- training ---------------------------------------------------------------------------
    def fit(self, dataset: Dataset, epochs: int = 1, verbose: bool = True,
            callbacks: Sequence[Callable[[dict], Any]] = (), resume: bool = False) -> list[dict]:
        """Train for ``epochs`` passes over ``dataset``.

        Parameters
        ----------
        dataset : the training data.
        epochs : passes over it.  With ``resume=True`` they count from the start of
            the interrupted ``fit`` call, so the same call both starts a run and
            finishes it after a crash (e.g. in a batch job that is resubmitted).
        verbose : show a progress bar (``tqdm.auto``: a widget in Jupyter, text in a
            terminal) counting rounds, with epoch, round, loss and samples/s (updated
            per epoch, or as rounds finish when there are callbacks).
        callbacks : functions called on the client with each round's metrics (a dict:
            ``rank, epoch, round, clock, worker, loss, samples, metrics, data_s,
            compute_s, sync_s, wait_s, version``), in batches as rounds finish.
        resume : continue from the newest readable checkpoint of
            ``Trainer(checkpoint=...)`` (parameters, policy and optimizer states, data
            position).  Without a checkpoint there it starts from the beginning.
            Under BSP with the same seed, data and number of workers, the result is
            bit-identical to a run that was never interrupted.

        Workers may leave and join during ``fit``: a worker that leaves is dropped
        from every barrier at once and what it had left of the epoch is trained by
        the others; a worker that joins gets the global parameters and a share of
        the data from the next round.  Below ``min_workers`` training pauses.

        Every epoch each sample is used at most once, and all but fewer than
        ``n_workers * batch_size`` samples are used (see :mod:`daskdl.plan`);
        ``trainer.coverage[epoch]`` counts the samples trained per chunk.

        Returns
        -------
        list of dict, one per epoch: ``epoch``, ``loss`` (sample-weighted mean of the
        training loss), ``samples``, ``seconds``, ``rounds``, ``regroups``.  Also
        appended to ``trainer.history``.

        Raises
        ------
        TrainingDiverged : one worker's updates were NaN/Inf ``daskdl.max-rejections``
            times in a row; ``trainer.params`` keeps the last finite global parameters.
        """
        from .fitloop import FitLoop

        if not isinstance(dataset, Dataset):
            raise TypeError(f"fit needs a daskdl.Dataset (Dataset.from_arrays(x=X, y=y)), "
                            f"got {type(dataset).__name__}")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        callbacks = [callbacks] if callable(callbacks) else list(callbacks)
        if not all(callable(cb) for cb in callbacks):
            raise TypeError("callbacks must be functions taking a round's metrics dict")
        ckpt = self._load_checkpoint(dataset) if resume else None
        if resume and ckpt is not None:
            meta = ckpt["meta"]
            if int(meta["fit_start"]) + epochs <= int(meta["epoch"]):
                logger.info("daskdl: the checkpoint is already at epoch %s; nothing to do",
                            meta["epoch"])
                self._leaves = [np.array(x, copy=True) for x in ckpt["params"]]
                self._epoch = int(meta["epoch"])
                self.history[:] = [dict(h) for h in meta.get("history", [])]
                return []
        # validate cheaply on the client before anything runs on the cluster
        make_plan(dataset.chunks, max(1, self.min_workers), self.batch_size,
                  self.policy.every, self.seed, self._epoch)
        self._check_loss(dataset)
        bar = _progress_bar(0, verbose)
        loop = FitLoop(self, dataset, epochs, callbacks, bar, ckpt)
        try:
            results = loop.run()
        except BaseException as exc:
            bar.close()
            root = self._fail(exc, [i["future"] for i in loop.pending.values()])
            self._fetch_params()
            if root is exc:
                raise
            raise root from None
        bar.close()
        self._fetch_params()
        return results

    def _load_checkpoint(self, dataset: Dataset):
        from .checkpoint import checkpoint_key, load_latest

        if self.checkpoint is None:
            raise ValueError("fit(resume=True) needs Trainer(checkpoint='path/to/dir') to "
                             "know where the checkpoints are")
        ckpt = load_latest(self.checkpoint, key=checkpoint_key(self.checkpoint_key, dataset))
        if ckpt is None:
            logger.info("daskdl: no checkpoint under %s; starting from the beginning",
                        self.checkpoint)
            return None
        meta = ckpt["meta"]
        for what, mine, theirs in (("seed", self.seed, meta["seed"]),
                                   ("batch_size", self.batch_size, meta["batch_size"]),
                                   ("every", self.policy.every, meta["every"])):
            if mine != theirs:
                raise ValueError(f"checkpoint {ckpt['name']} was written with {what}="
                                 f"{theirs}, this trainer has {what}={mine}; create the "
                                 f"Trainer with {what}={theirs} to resume it")
        if list(dataset.chunks) != list(meta["chunks"]):
            raise ValueError(f"checkpoint {ckpt['name']} was written for a dataset with "
                             f"chunks {tuple(meta['chunks'])[:8]}..., this one has "
                             f"{tuple(dataset.chunks)[:8]}...; resume with the same dataset")
        if len(ckpt["params"]) != len(self._leaves) or any(
                a.shape != b.shape or a.dtype != b.dtype
                for a, b in zip(ckpt["params"], self._leaves)):
            raise ValueError(f"checkpoint {ckpt['name']} holds parameters of another model "
                             "(shapes or dtypes differ from the trainer's)")
        logger.info("daskdl: resuming from checkpoint %s (epoch %s, round %s)",
                    ckpt["name"], meta["epoch"], meta["round"])
        return ckpt

    def _repair_placement(self, dataset: Dataset, placement: _Placement,
                          workers: tuple) -> _Placement:
        """Placement after the workers changed: chunks scattered from the client that
        were only on a worker that left are scattered again; owners recomputed."""
        if placement.zarr is not None or not placement.refs:
            return _Placement(placement.refs, [-1] * len(placement.owners), workers,
                              placement.zarr)
        first = [refs[0] for refs in placement.refs]
        if not all(isinstance(f, Future) for f in first):
            return _Placement(placement.refs, [-1] * len(placement.owners), workers)
        keys = [f.key for refs in placement.refs for f in refs]
        where = self.client.run_on_scheduler(_locations, keys)
        rank_of = {a: r for r, a in enumerate(workers)}
        names = dataset.names
        refs = [list(r) for r in placement.refs]
        owners = []
        loads = collections.Counter()
        for c, rr in enumerate(refs):
            locs = {where.get(f.key) for f in rr}
            owner = rank_of.get(next(iter(locs))) if len(locs) == 1 else None
            owners.append(-1 if owner is None else owner)
            if owner is not None:
                loads[owner] += dataset.chunks[c]
        lost = [c for c, rr in enumerate(refs) if any(where.get(f.key) is None for f in rr)]
        if lost and not dataset.in_memory:
            owners = [-1 if c in lost else o for c, o in enumerate(owners)]
        elif lost:
            logger.warning("daskdl: %d chunks were only on workers that left; scattering "
                           "them again", len(lost))
            for c in lost:
                rank = min(range(len(workers)), key=lambda r: loads[r])
                blocks = [dataset.block(c)[n] for n in names]
                refs[c] = self.client.scatter(blocks, workers=[workers[rank]], hash=False)
                owners[c] = rank
                loads[rank] += dataset.chunks[c]
        placement = _Placement(refs, owners, workers)
        self._placements[id(dataset)] = (dataset, placement)
        return placement

    def _end_epoch(self, epoch: int, rounds: list, t_start: float, regroups: int = 0) -> dict:
        rounds.sort(key=lambda r: (r["clock"], r["rank"]))
        self.rounds.extend(rounds)
        samples = sum(r["samples"] for r in rounds)
        rec = {"epoch": epoch,
               "loss": sum(r["loss"] * r["samples"] for r in rounds) / max(samples, 1),
               "samples": samples, "seconds": time.perf_counter() - t_start,
               "rounds": len({r["clock"] for r in rounds}), "regroups": regroups}
        self.history.append(rec)
        self._epoch = epoch + 1
        if rounds:
            self._clock = max(r["clock"] for r in rounds) + 1
        logger.info("epoch %d: loss %.4f, %d samples, %.2fs", epoch, rec["loss"],
                    rec["samples"], rec["seconds"])
        return rec

    def _fail(self, exc: BaseException, futures: list) -> BaseException:
        """Abort the run; return the error that caused it (not a follow-on SyncAborted)."""
        c = self.client
        try:
            c.sync(c.scheduler.daskdl_abort, run=self.run, reason=f"the client stopped: {exc!r}")
        except Exception:
            pass
        root = exc
        if isinstance(exc, SyncAborted) and futures:
            try:
                c.sync(_wait_futures, futures, timeout=min(30.0, self.sync_timeout))
            except Exception:
                pass
            for f in futures:
                if f.status == "error":
                    e = f.exception()
                    if not isinstance(e, SyncAborted):
                        root = e
                        break
        c.cancel(futures)
        return root

    # -- evaluation ---------------------------------------------------------------------------
    def _params_future(self):
        """The global parameters on every worker, once (a list: scatter takes dict keys
        as names)."""
        return self.client.scatter([self.params], broadcast=True, hash=False)[0]

    def evaluate(self, dataset: Dataset, metric_fn: Callable) -> dict:
        """Sample-weighted means of ``metric_fn(params, batch)`` over ``dataset``.

        ``metric_fn`` returns a dict of scalars, e.g. ``{"accuracy": acc}``; it runs
        jitted on the workers, chunk by chunk, with the global parameters.
        """
        if not isinstance(dataset, Dataset):
            raise TypeError(f"evaluate needs a daskdl.Dataset, got {type(dataset).__name__}")
        bs = int(config.get("eval-batch-size"))
        try:
            jax.eval_shape(lambda p, b: check_metrics_output(metric_fn(p, b)), self.params,
                           self._batch_spec(dataset, min(bs, max(dataset.chunks))))
        except TypeError as e:
            if "metric_fn" in str(e):
                raise TypeError(str(e)) from None
            raise
        workers, _ = self._workers()
        placement = self._place(dataset, workers)
        pfut = self._params_future()
        token = tokenize(cloudpickle.dumps(metric_fn))
        tasks = [dask.delayed(evaluate_chunk, pure=False)(metric_fn, token, pfut, bs,
                                                          dataset.names, *refs)
                 for refs in placement.refs]
        outs = self.client.gather(self.client.compute(tasks))
        total = sum(n for _, n in outs)
        keys = outs[0][0].keys()
        return {k: float(sum(m[k] * n for m, n in outs) / total) for k in keys}

    def predict(self, dataset: Dataset, apply_fn: Callable, x: str | None = None) -> da.Array:
        """``apply_fn(params, x)`` over ``dataset`` with the global parameters, lazily.

        Parameters
        ----------
        apply_fn : ``apply_fn(params, x) -> array`` with one output row per input row.
        x : name of the input array; default ``"x"`` if present, else the first array.

        Returns
        -------
        dask.array.Array chunked like the dataset along axis 0.  It refers to data
        on the trainer's cluster: compute it with that client
        (``trainer.client.compute(arr)``, or ``arr.compute()`` when it is the default).
        """
        if not isinstance(dataset, Dataset):
            raise TypeError(f"predict needs a daskdl.Dataset, got {type(dataset).__name__}")
        x = x or ("x" if "x" in dataset.names else dataset.names[0])
        arr = dataset[x]
        out = jax.eval_shape(apply_fn, self.params,
                             jax.ShapeDtypeStruct((2,) + arr.shape[1:], arr.dtype))
        if not hasattr(out, "shape") or len(out.shape) < 1 or out.shape[0] != 2:
            raise TypeError("apply_fn(params, x) must return one array with one row per "
                            f"input row; for 2 rows it returned {out}")
        workers, _ = self._workers()
        placement = self._place(dataset, workers)
        j = dataset.names.index(x)
        pfut = self._params_future()
        token = tokenize(cloudpickle.dumps(apply_fn))
        bs = int(config.get("eval-batch-size"))
        parts = []
        for refs, n in zip(placement.refs, dataset.chunks):
            d = dask.delayed(predict_chunk, pure=False)(apply_fn, token, pfut, bs, refs[j])
            parts.append(da.from_delayed(d, shape=(n,) + tuple(out.shape[1:]), dtype=out.dtype))
        return da.concatenate(parts, axis=0)

    # -- diagnostics -------------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        from html import escape

        try:
            n = len(self.client.scheduler_info()["workers"])
            link = self.client.dashboard_link
        except Exception:  # a closed client
            n, link = 0, None
        last = self.history[-1] if self.history else None
        progress = (f"{len(self.history)} epochs, last loss {last['loss']:.4f}, "
                    f"{last['samples'] / last['seconds']:.0f} samples/s" if last else
                    "not trained yet")
        dash = f'<a href="{escape(link)}" target="_blank">{escape(link)}</a>' if link else "-"
        return (f"<div><strong>daskdl.Trainer</strong> run {self.run}<table>"
                f"<tr><td>policy</td><td>{escape(self.policy.name)}, every {self.policy.every}"
                f"</td></tr><tr><td>batch size</td><td>{self.batch_size} per worker</td></tr>"
                f"<tr><td>workers</td><td>{n}</td></tr><tr><td>progress</td><td>{progress}"
                f"</td></tr><tr><td>dashboard</td><td>{dash}</td></tr></table></div>")


    def info(self) -> dict | None:
        """The scheduler's view of this run: version, clocks, per-round history."""
        return self.client.sync(self.client.scheduler.daskdl_info, run=self.run)


def _progress_bar(total: int, verbose: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="round", desc="daskdl fit", disable=not verbose,
                leave=False)


def _locations(keys, dask_scheduler=None) -> dict:
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        if ts is not None and ts.who_has:
            out[k] = sorted(ws.address for ws in ts.who_has)[0]
    return out


def _worker_info(client: Client) -> dict:
    """Address -> info of every worker (recent ``distributed`` lists only some by default)."""
    import inspect

    if "n_workers" in inspect.signature(Client.scheduler_info).parameters:
        return client.scheduler_info(n_workers=-1)["workers"]
    return client.scheduler_info()["workers"]
