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
from distributed import Client, default_client

from . import config, protocol, sources
from .dashboard import DashboardPlugin
from .data import Dataset
from .errors import DaskDLError, SyncAborted
from .fitloop import FitConfig, FitLoop, FitResult, FitStart
from .plan import make_plan
from .relay import relay_group_setting
from .shm import shared_memory_setting
from .policies import Policy, from_config
from .replica import Replica, evaluate_chunk, predict_chunk, replica_name
from .scheduler import TrainingPlugin
from .model import Bound, ModelError, Template, key_required, takes_key
from .step import check_metrics_output, init_state, make_train_steps
from .workerenv import WorkerEnvironment, cluster_config, core_slots, worker_info

logger = logging.getLogger("daskdl")


def _start_local_cluster() -> Client:
    from distributed import LocalCluster

    n = len(os.sched_getaffinity(0))
    with cluster_config():
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True)
    return Client(cluster, set_as_default=False)


def _client_or_local_cluster(client: Client | None) -> tuple[Client, bool]:
    """``client``, else the default client, else a new ``LocalCluster``'s (owned)."""
    if client is not None:
        return client, False
    try:
        return default_client(), False
    except ValueError:
        return _start_local_cluster(), True


def _check_arguments(loss_fn, params, optimizer, batch_size, min_workers,
                     checkpoint_every) -> None:
    """Errors that name the bad argument, before anything reaches the cluster."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(params, batch), got {loss_fn!r}")
    Template.of(params, copy=False)
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


def _close_client(client: Client) -> None:
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


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
        ``daskdl.sync-timeout`` from config.  Rounds run as tasks of
        ``daskdl.rounds-per-task`` consecutive rounds each (see "Scaling out" in the
        guide).  A worker that sends nothing for
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
    state : the model's non-trainable state, any pytree of arrays (Flax
        ``variables["batch_stats"]``, NNX ``BatchStat`` state); ``loss_fn(params,
        state, batch)`` then returns ``(loss, new_state)`` or ``(loss, new_state,
        metrics)``.  It is carried through the steps, never differentiated, sent with
        every contribution and, at every sync, replaced by the sample-weighted mean of
        the workers' states (integer leaves: the lowest rank's), whatever the policy.
        ``trainer.state`` is the global state; ``evaluate`` and ``predict`` pass it.
    shard_params : on a worker with several devices (GPUs, or forced host devices),
        shard params and optimizer state across them (FSDP-style) instead of
        replicating them; the batch is split across the devices either way.
    sync : how workers synchronise: ``"scheduler"`` (every update goes to the scheduler
        plugin, which merges and answers), ``"sharded"`` (the parameters are split
        into one shard per worker; workers send each shard of their update straight
        to its owner, owners merge under the policy and every worker gathers the
        merged shards: the scheduler coordinates and holds no parameter bytes), or
        ``"auto"`` (config ``daskdl.sync``; sharded for models of
        ``daskdl.shards.AUTO_SHARDED_BYTES`` or more).  See "Sharded sync" in the guide.
    overlap : sharded sync only: a worker starts round ``r + 1`` while round ``r``'s
        shards are exchanged, and applies round ``r``'s result one round late (its
        progress over round ``r + 1`` moved onto the merged parameters), as in
        overlapping local SGD; sound for policies whose merge keeps no state (BSP, SSP,
        Async, EASGD, DiLoCo with plain SGD outside: one more round of staleness), refused
        for an outer optimizer with momentum (it diverges).  The last round of each
        generation syncs in full.
    compression : sharded sync only: updates travel as deltas compressed to
        ``"bf16"`` or ``"int8"`` (one scale per block of 256 values), with error
        feedback (what rounding lost is added to the next delta); ``None`` sends them
        exact.

    Notes
    -----
    ``params`` may be any pytree, including an Equinox module: its floating-point
    arrays are trained, every other leaf is static (``eqx.partition(model,
    eqx.is_inexact_array)``), ``loss_fn`` gets the whole module and
    ``trainer.params`` is a module again.  Define such classes in a module file,
    not in ``__main__``.  A ``loss_fn`` with a parameter named ``key`` gets a
    ``jax.random`` key for every step (see :mod:`daskdl.step`).  Optimizer step
    counters count global steps: each worker's equals the steps a single process
    would have taken, so ``optax`` schedules' ``decay_steps`` is
    ``epochs * trainer.steps_per_epoch(dataset)``.

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
                 checkpoint=None, checkpoint_every: int | None = None, state=None,
                 shard_params: bool = False, checkpoint_key=None, sync: str | None = None,
                 compression: str | None = None, overlap: bool = False):
        _check_arguments(loss_fn, params, optimizer, batch_size, min_workers,
                         checkpoint_every)
        from .compression import check_kind
        from .shards import choose_sync

        self._template, self._leaves = Template.of(params)
        self.sync = choose_sync(config.get("sync", sync),
                                sum(np.asarray(x).nbytes for x in self._leaves))
        self.compression = check_kind(compression)
        if self.compression is not None and self.sync != "sharded":
            raise ValueError(f"compression={compression!r} needs sync='sharded' (updates "
                             "sent to the scheduler travel exact); pass both")
        self.overlap = bool(overlap)
        if self.overlap and self.sync != "sharded":
            raise ValueError("overlap=True needs sync='sharded' (a round's shards are "
                             "exchanged while the next one computes); pass both")
        self._template.check_portable()
        self._state_template, self._state = None, []
        if state is not None:
            self._state_template, self._state = Template.of(state, "state", allow_int=True)
            self._state_template.check_portable()
        self.shard_params = bool(shard_params)
        self._steps = 0  # global optimizer steps taken
        from .checkpoint import checkpoint_spec, trainer_checkpoint_key

        self.checkpoint = checkpoint_spec(checkpoint)
        self.checkpoint_key = trainer_checkpoint_key(checkpoint_key, self.checkpoint)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.min_workers = int(min_workers)
        policy = from_config(policy)
        if self.overlap and _stateful(policy):
            raise ValueError(
                f"overlap=True applies each merge one round late; with a merge that keeps "
                f"state, such as {policy.name}'s outer momentum, that diverges (measured on "
                "digits: 0.78 test accuracy instead of 0.97).  Use overlap with BSP, SSP, "
                "Async, EASGD or DiLoCo(outer=optax.sgd(lr)) without momentum, or drop "
                "overlap=True")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.policy = policy
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rounds_ahead = max(1, int(config.get("rounds-ahead", rounds_ahead)))
        self.rounds_per_task = _rounds_per_task(config.get("rounds-per-task"))
        self.task_seconds = config.get_seconds("task-seconds")
        if not self.task_seconds > 0:
            raise ValueError(f"daskdl.task-seconds must be a positive duration such as "
                             f"'0.5s', not {config.get('task-seconds')!r}")
        self.relay_group = relay_group_setting(config.get("relay-group"))
        self.shared_memory = shared_memory_setting(config.get("shared-memory"))
        self.sync_timeout = config.get_seconds("sync-timeout", sync_timeout)
        self.max_rejections = int(config.get("max-rejections"))
        self._faults = _faults_from_config()
        self.run = uuid.uuid4().hex[:10]
        self._secret = protocol.new_secret()  # authenticates this run's messages
        self.history: list[dict] = []
        self.rounds: list[dict] = []  # per-round metrics of every worker
        self.coverage: dict = {}  # epoch -> Counter(chunk -> samples trained)
        self.rejected_rounds: list[dict] = []  # rounds whose update the scheduler rejected
        self._epoch = 0
        self._clock = 0
        self._fits = 0
        self._placements: dict = {}

        self.client, self._owns_client = _client_or_local_cluster(client)
        self._finalizer = weakref.finalize(self, Trainer._cleanup, self.client, self.run,
                                           self._secret, self._owns_client)
        self._register()

    # -- lifecycle --------------------------------------------------------------------
    @staticmethod
    def _cleanup(client, run, secret, owns):
        try:
            if owns:
                _close_client(client)
            elif client.status == "running":
                client.unregister_worker_plugin(replica_name(run))
                client.sync(getattr(client.scheduler, protocol.END), run=run, secret=secret)
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
        """The global parameters: the pytree given at construction (an Equinox module
        stays one), with numpy leaves."""
        return self._template.build([np.array(x, copy=True) for x in self._leaves])

    @property
    def state(self):
        """The global model state (``None`` for a trainer without ``state``)."""
        if self._state_template is None:
            return None
        return self._state_template.build([np.array(x, copy=True) for x in self._state])

    @property
    def steps(self) -> int:
        """Global optimizer steps taken so far (what optax schedules have counted)."""
        return self._steps

    def steps_per_epoch(self, dataset: Dataset, n_workers: int | None = None) -> int:
        """Optimizer steps each worker takes per epoch of ``dataset`` with
        ``n_workers`` (default: the workers now present): ``epochs *`` this is the
        ``decay_steps`` of a schedule that decays over the whole training."""
        from .plan import steps_per_epoch

        return steps_per_epoch(dataset, n_workers or len(self._workers()[0]),
                               self.batch_size)

    def _call(self, op: str, **kwargs) -> dict:
        """Call a handler of this run on the scheduler plugin (with the run secret)."""
        c = self.client
        return c.sync(getattr(c.scheduler, op), run=self.run, secret=self._secret, **kwargs)

    def _fetch_params(self) -> None:
        reply = self._call(protocol.PARAMS, rank=None)
        if reply.get("status") == protocol.Status.OK.value and self.sync == "sharded":
            from .shards import specs_of

            members = {int(r): a for r, a in reply["members"].items()}
            self._leaves = self.client.sync(
                self._fetch_sharded, members, int(reply["fit"]), int(reply["gen"]),
                int(reply["version"]), reply["merges"], specs_of(self._leaves),
                reply.get("whole"))
            if reply.get("state") is not None:
                self._state = [np.array(x, copy=True) for x in protocol.load(reply["state"])]
            self._steps = int(reply.get("steps", self._steps))
        elif reply.get("status") == protocol.Status.OK.value:
            self._leaves = [np.array(x, copy=True) for x in protocol.load(reply["params"])]
            if reply.get("state") is not None:
                self._state = [np.array(x, copy=True) for x in protocol.load(reply["state"])]
            self._steps = int(reply.get("steps", self._steps))

    async def _fetch_sharded(self, members: dict, fit: int, gen: int, version: int,
                             merges: list, specs, whole: str | None = None) -> list:
        """The global parameters of a sharded run from their owners; when an owner left
        after the last merge (its shard of that version is gone with it), from a
        member that holds them whole (each assembles them after every round).
        ``whole``: the generation merged nothing yet (the workers changed after the
        last round and it never started): its owners hold no shards, that worker
        holds the version whole."""
        from .exchange import asking, fetch_full, fetch_global

        present = asking(self.client.scheduler)
        addresses = [members[r] for r in sorted(members)]
        if whole is not None:
            return await fetch_full(self.client.rpc, self.run, self._secret,
                                    [whole] + [a for a in addresses if a != whole], version,
                                    specs, present)
        try:
            return await fetch_global(self.client.rpc, self.run, self._secret, fit, gen,
                                      members, version, merges, specs, present)
        except (OSError, DaskDLError) as e:
            logger.info("daskdl: fetching the parameters from their shard owners failed "
                        "(%s); asking the members for a whole copy", e)
            return await fetch_full(self.client.rpc, self.run, self._secret, addresses,
                                    version, specs, present)

    def __repr__(self) -> str:
        return (f"<daskdl.Trainer run {self.run}: {self.policy.name}(every="
                f"{self.policy.every}), batch_size={self.batch_size}, "
                f"{len(self.history)} epochs trained>")

    # -- set-up ---------------------------------------------------------------------------
    def _workers(self) -> tuple:
        workers = worker_info(self.client)
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
        c.register_plugin(WorkerEnvironment(core_slots(worker_info(c))))
        c.register_plugin(Replica(self.run, self._secret, self.loss_fn, self.optimizer,
                                  self._template, self.seed, self._state_template,
                                  self.shard_params, policy=self.policy,
                                  sharded=self.sync == "sharded",
                                  error_feedback=bool(config.get("error-feedback")),
                                  shared_memory=self.shared_memory),
                          name=replica_name(self.run))

    def _batch_spec(self, dataset: Dataset, rows: int) -> dict:
        return {n: jax.ShapeDtypeStruct((rows,) + dataset[n].shape[1:], dataset[n].dtype)
                for n in dataset.names}

    def _check_step(self, dataset: Dataset) -> None:
        """Trace one whole step on the client with ``jax.eval_shape`` (nothing runs):
        the loss, its gradient, the optimizer update and the state's shapes, as the
        workers will compile it.  daskdl's own errors come without JAX's traceback."""
        steps = make_train_steps(self.loss_fn, self.optimizer, model=self._template,
                                 has_state=self._state_template is not None,
                                 wants_key=takes_key(self.loss_fn), seed=self.seed,
                                 jit=False)
        mstate = (None if self._state_template is None else
                  self._state_template.build([s.spec() for s in self._state_template.slots]))
        batches = {n: jax.ShapeDtypeStruct((1,) + v.shape, v.dtype)
                   for n, v in self._batch_spec(dataset, self.batch_size).items()}
        try:
            start = jax.eval_shape(lambda p, m: init_state(p, self.optimizer, m),
                                   self._template.specs(), mstate)
            jax.eval_shape(steps, start, batches, np.zeros(2, np.int32))
        except ModelError as e:
            raise ModelError(str(e)) from None

    def _place(self, dataset: Dataset, workers: tuple) -> sources.ChunkSource:
        """Where ``dataset``'s chunks are on ``workers`` (placed once, then reused)."""
        hit = self._placements.get(id(dataset))
        if hit is not None and hit.dataset is dataset and hit.workers == workers:
            return hit
        placed = sources.place(self.client, dataset, workers, self.seed)
        self._placements[id(dataset)] = placed
        return placed

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
                self._state = [np.array(x, copy=True) for x in ckpt["state"]]
                self._steps = int(meta.get("steps", self._steps))
                self._epoch = int(meta["epoch"])
                self.history[:] = [dict(h) for h in meta.get("history", [])]
                return []
        # validate cheaply on the client before anything runs on the cluster
        make_plan(dataset.chunks, max(1, self.min_workers), self.batch_size,
                  self.policy.every, self.seed, self._epoch)
        self._check_step(dataset)
        bar = _progress_bar(0, verbose)
        self._fits += 1
        start = FitStart(self._leaves, self._epoch, self._clock, self.history, self._fits,
                         state=list(ckpt["state"] if ckpt else self._state),
                         steps=int(ckpt["meta"].get("steps", 0)) if ckpt else self._steps)
        loop = FitLoop(self.client, self._fit_config(), start, dataset, epochs, callbacks,
                       bar, self._place, resume=ckpt)
        try:
            loop.run()
        except BaseException as exc:
            bar.close()
            root = self._fail(exc, [i["future"] for i in loop.pending.values()])
            self._finish_fit(loop.result)
            if root is exc:
                raise
            raise root from None
        bar.close()
        self._finish_fit(loop.result)
        return loop.result.records

    def _fit_config(self) -> FitConfig:
        return FitConfig(
            run=self.run, secret=self._secret, policy=self.policy, batch_size=self.batch_size,
            seed=self.seed, rounds_ahead=self.rounds_ahead, sync_timeout=self.sync_timeout,
            rounds_per_task=self.rounds_per_task, task_seconds=self.task_seconds,
            min_workers=self.min_workers, max_rejections=self.max_rejections,
            checkpoint=self.checkpoint, checkpoint_every=self.checkpoint_every,
            checkpoint_key=self.checkpoint_key,
            faults=self._faults, sharded=self.sync == "sharded", compression=self.compression,
            overlap=self.overlap, relay_group=self.relay_group)

    def _finish_fit(self, result: FitResult) -> None:
        """Apply what a fit did; fetch the global parameters; end the run on the
        scheduler (a run whose fit returned is not training)."""
        self._last_fit = result
        if result.leaves is not None:
            self._leaves = result.leaves
        self.history[:] = result.history
        self.rounds.extend(result.rounds)
        self.rejected_rounds.extend(result.rejected_rounds)
        for epoch, counts in result.coverage.items():
            self.coverage.setdefault(epoch, collections.Counter()).update(counts)
        self._epoch, self._clock = result.epoch, result.clock
        if result.source is not None:
            self._placements[id(result.source.dataset)] = result.source
        try:
            self._fetch_params()
        finally:
            self._call(protocol.END)

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
        n = len(self._leaves)  # the model state is stored after the parameters
        ckpt["params"], ckpt["state"] = ckpt["params"][:n], ckpt["params"][n:]
        if len(ckpt["state"]) != len(self._state) or any(
                a.shape != b.shape for a, b in zip(ckpt["state"], self._state)):
            raise ValueError(f"checkpoint {ckpt['name']} holds another model state than "
                             "the trainer's state= (or none); resume with the same state")
        if len(ckpt["params"]) != len(self._leaves) or any(
                a.shape != b.shape or a.dtype != b.dtype
                for a, b in zip(ckpt["params"], self._leaves)):
            raise ValueError(f"checkpoint {ckpt['name']} holds parameters of another model "
                             "(shapes or dtypes differ from the trainer's)")
        logger.info("daskdl: resuming from checkpoint %s (epoch %s, round %s)",
                    ckpt["name"], meta["epoch"], meta["round"])
        return ckpt

    def _fail(self, exc: BaseException, futures: list) -> BaseException:
        """Abort the run; return the error that caused it (not a follow-on SyncAborted)."""
        c = self.client
        try:
            self._call(protocol.ABORT, reason=f"the client stopped: {type(exc).__name__}")
        except Exception:
            pass
        root = exc
        if isinstance(exc, SyncAborted) and futures:
            deadline = time.monotonic() + min(30.0, self.sync_timeout)
            while not all(f.done() for f in futures) and time.monotonic() < deadline:
                time.sleep(0.05)
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
        """The global parameters (and model state) as flat leaves on every worker, once
        (a list: scatter takes dict keys as names); :class:`~daskdl.model.Bound`
        rebuilds the model there."""
        packed = (list(self._leaves), list(self._state))
        return self.client.scatter([packed], broadcast=True, hash=False)[0]

    def _bound(self, fn: Callable, what: str) -> Bound:
        """``fn`` taking the model (and state) rebuilt from flat leaves."""
        if not callable(fn):
            raise TypeError(f"{what} must be a function, got {fn!r}")
        if key_required(fn):
            raise ModelError(
                f"{what} has a parameter 'key', but evaluate and predict run without "
                f"random keys (no dropout).  Give it a default: def {what}(..., key=None); "
                "with key=None, Flax's deterministic=True / Equinox's inference=True.")
        return Bound(fn, self._template, self._state_template)

    def evaluate(self, dataset: Dataset, metric_fn: Callable) -> dict:
        """Sample-weighted means of ``metric_fn(params, batch)`` over ``dataset``
        (``metric_fn(params, state, batch)`` for a trainer with ``state``).

        ``metric_fn`` returns a dict of scalars, e.g. ``{"accuracy": acc}``; it runs
        jitted on the workers, chunk by chunk, with the global parameters.
        """
        if not isinstance(dataset, Dataset):
            raise TypeError(f"evaluate needs a daskdl.Dataset, got {type(dataset).__name__}")
        bs = int(config.get("eval-batch-size"))
        metric_fn = self._bound(metric_fn, "metric_fn")
        try:
            jax.eval_shape(lambda p, b: check_metrics_output(metric_fn(p, b)),
                           (self._leaves, self._state),
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
        """``apply_fn(params, x)`` over ``dataset`` with the global parameters, lazily
        (``apply_fn(params, state, x)`` for a trainer with ``state``).

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
        apply_fn = self._bound(apply_fn, "apply_fn")
        out = jax.eval_shape(apply_fn, (self._leaves, self._state),
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
        """The scheduler's view of this run: version, clocks, per-round history
        (``None`` when the scheduler no longer knows the run)."""
        reply = self.client.sync(getattr(self.client.scheduler, protocol.INFO), run=self.run)
        if not isinstance(reply, dict) or reply.get("status") == protocol.Status.REFUSED.value:
            return None
        return reply


def _stateful(policy: Policy) -> bool:
    """Whether ``policy.init`` makes array state (an outer optimizer's momentum)."""
    state = policy.init([np.zeros(2, np.float32)])
    return any(np.size(x) > 1 for x in jax.tree_util.tree_leaves(state))


def _progress_bar(total: int, verbose: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="round", desc="daskdl fit", disable=not verbose,
                leave=False)


def _rounds_per_task(value) -> int | None:
    """``daskdl.rounds-per-task``: a positive int, or ``"auto"`` (``None``)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise ValueError(f"daskdl.rounds-per-task must be 'auto' or a positive integer, "
                         f"not {value!r}")
    return n


def _faults_from_config() -> dict:
    """``{rank: (slowdown, NaN clocks | "all", lost relay reply clocks)}`` from config
    ``daskdl.testing`` (simulated stragglers, bad updates and failing relays for tests
    and benchmarks)."""
    def clocks(v):
        return v if v == "all" else frozenset(int(c) for c in v)

    slow = {int(k): float(v) for k, v in (config.get("testing.slowdown") or {}).items()}
    nan = {int(k): clocks(v) for k, v in (config.get("testing.send-nan") or {}).items()}
    lose = {int(k): clocks(v)
            for k, v in (config.get("testing.lose-relay-reply") or {}).items()}
    return {r: (slow.get(r, 1.0), nan.get(r, frozenset()), lose.get(r, frozenset()))
            for r in set(slow) | set(nan) | set(lose)}
