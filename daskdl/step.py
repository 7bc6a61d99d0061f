"""Pure JAX pieces of training: the train state, K optimizer steps fused in one
compiled call (``lax.scan``), random keys, model state, evaluation and prediction
on one block.

**Random keys.**  A ``loss_fn`` with a parameter named ``key`` gets, at every step,
``fold_in(fold_in(fold_in(key(seed), rank), clock), i)``: ``seed`` the trainer's,
``rank`` the worker's rank in its generation, ``clock`` the round's global number
and ``i`` the step within the round (``jax.random.key``, threefry).  So keys differ
on every worker and step and repeat exactly when a run is repeated.

**Model state** (``TrainState.state``) is carried through the steps, never
differentiated: ``loss_fn(params, state, batch[, key])`` returns
``(loss, new_state)`` or ``(loss, new_state, metrics)``, and ``new_state`` must
keep the structure, shapes and dtypes of ``state``.

Nothing here knows about Dask.  ``make_train_steps(loss_fn, optimizer)``
returns one ``jax.jit`` function; calling it with batches of the same shapes
reuses the compiled program, so a replica compiles once per run (and once
more for a shorter last round of an epoch).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .model import ModelError


class TrainState(NamedTuple):
    """Local state of one replica: parameters, optimizer state, steps taken, and the
    model's non-trainable state (``None`` without)."""

    params: Any
    opt_state: Any
    step: jax.Array
    state: Any = None


def init_state(params, optimizer: optax.GradientTransformation, state=None,
               step: int = 0) -> TrainState:
    """A fresh :class:`TrainState` at ``step`` (optimizer step counters too)."""
    opt_state = optimizer.init(params)
    if step:
        opt_state = set_step_count(opt_state, step)
    return TrainState(params, opt_state, jnp.asarray(step, jnp.int32), state)


def split_loss_output(out) -> tuple[jax.Array, dict]:
    """Accept ``loss`` or ``(loss, metrics_dict)`` from a loss function; check it is a scalar."""
    if isinstance(out, tuple) and len(out) == 2 and not isinstance(out[1], dict):
        raise ModelError(
            f"loss_fn returned (loss, {type(out[1]).__name__}): its second value must be "
            "a dict of metrics, e.g. return loss, {'accuracy': acc}.  To carry model state "
            "(BatchNorm statistics), give it to the trainer and return it: "
            "Trainer(loss_fn, params, opt, state=variables['batch_stats']) with "
            "loss_fn(params, state, batch) -> (loss, new_state).  Other values (logits) "
            "cannot leave the step.")
    if isinstance(out, tuple) and len(out) == 2:
        loss, aux = out
    else:
        loss, aux = out, {}
    shape = jnp.shape(loss)
    if shape != ():
        raise ModelError(
            f"loss_fn must return a scalar (or (scalar, dict_of_metrics)), but it returned "
            f"an array of shape {shape}. Reduce it, e.g. return losses.mean()."
        )
    return loss, aux


def split_state_output(out, state) -> tuple[jax.Array, Any, dict]:
    """Accept ``(loss, new_state)`` or ``(loss, new_state, metrics)`` from a loss
    function with state; check ``new_state`` is shaped like ``state``."""
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ModelError(
            "with Trainer(state=...), loss_fn(params, state, batch) must return "
            "(loss, new_state) or (loss, new_state, metrics_dict), but it returned "
            f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of {len(out)}'}."
            " Wrong: return loss; right: return loss, new_state.")
    loss, new_state = split_loss_output(out[0])[0], out[1]
    aux = out[2] if len(out) == 3 else {}
    if not isinstance(aux, dict):
        raise ModelError(f"loss_fn's third value must be a dict of metrics, got "
                        f"{type(aux).__name__}")
    check_state_like(new_state, state)
    return loss, new_state, aux


def check_state_like(new, old) -> None:
    """``TypeError`` naming the leaf unless ``new`` has ``old``'s structure, shapes, dtypes."""
    old_paths = jax.tree_util.tree_flatten_with_path(old)[0]
    new_paths = jax.tree_util.tree_flatten_with_path(new)[0]
    if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(old):
        raise ModelError(
            "loss_fn's new_state has another structure than the state it was given: "
            f"{[jax.tree_util.keystr(p) for p, _ in new_paths][:8]} vs "
            f"{[jax.tree_util.keystr(p) for p, _ in old_paths][:8]}. Return the state "
            "updated in place, e.g. updates['batch_stats'] from "
            "model.apply(..., mutable=['batch_stats']).")
    for (path, a), (_, b) in zip(new_paths, old_paths):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise ModelError(
                f"loss_fn's new_state leaf {jax.tree_util.keystr(path)} is "
                f"{jnp.result_type(a)}{list(jnp.shape(a))} but the state was "
                f"{jnp.result_type(b)}{list(jnp.shape(b))}: the state must keep its "
                "shapes and dtypes (cast it back, e.g. new.astype(old.dtype)).")


def step_key(seed: int, rank, clock, i):
    """The random key of step ``i`` of round ``clock`` on ``rank`` (see the module
    docstring)."""
    k = jax.random.fold_in(jax.random.key(seed), rank)
    return jax.random.fold_in(jax.random.fold_in(k, clock), i)


def _objective(loss_fn, model, has_state: bool, wants_key: bool):
    """``f(params, state, batch, key) -> (loss, (new_state, metrics))`` around the
    user's ``loss_fn`` (``model`` rebuilds the whole model from the trainable part)."""

    def f(params, state, batch, key):
        p = params if model is None else model.combine(params)
        kw = {"key": key} if wants_key else {}
        if not has_state:
            loss, aux = split_loss_output(loss_fn(p, batch, **kw))
            return loss, (state, aux)
        loss, new, aux = split_state_output(loss_fn(p, state, batch, **kw), state)
        return loss, (jax.lax.stop_gradient(new), aux)

    return f


def make_train_steps(loss_fn: Callable, optimizer: optax.GradientTransformation,
                     on_trace: Callable[[], None] | None = None, *, model=None,
                     has_state: bool = False, wants_key: bool = False, seed: int = 0,
                     constrain: Callable | None = None, jit: bool = True):
    """Return ``train_steps(state, batches, where=None) -> (state, (losses, metrics))``,
    jitted.

    ``on_trace`` is called each time JAX traces (and so compiles) the function: once
    per distinct batch shape.

    ``batches`` is a dict of arrays with a leading axis of K steps; the K steps run
    in one compiled ``lax.scan``.  ``losses`` has shape ``(K,)``.  ``where`` is
    ``int32[2]`` ``(rank, clock)`` for the random keys (``wants_key``).  ``model``
    is a :class:`~daskdl.model.Template` (``params`` then holds its trainable part);
    ``has_state``: ``loss_fn(params, state, batch)``, ``state.state`` carried;
    ``constrain(state) -> state`` keeps a sharding on the carried state (a mesh).
    """
    grad_fn = jax.value_and_grad(_objective(loss_fn, model, has_state, wants_key),
                                 has_aux=True)

    def train_steps(state: TrainState, batches, where=None):
        if on_trace is not None:
            on_trace()  # runs while tracing only, never in the compiled program

        def one_step(st: TrainState, xs):
            batch, i = xs
            key = step_key(seed, where[0], where[1], i) if wants_key else None
            (loss, (new, aux)), grads = grad_fn(st.params, st.state, batch, key)
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
            params = optax.apply_updates(st.params, updates)
            st = TrainState(params, opt_state, st.step + 1, new)
            return (st if constrain is None else constrain(st)), (loss, aux)

        k = jax.tree_util.tree_leaves(batches)[0].shape[0]
        return jax.lax.scan(one_step, state, (batches, jnp.arange(k, dtype=jnp.int32)))

    return jax.jit(train_steps) if jit else train_steps


def set_step_count(opt_state, step: int):
    """``opt_state`` with every integer scalar leaf named ``count`` (optax's step
    counters: ``ScaleByAdamState.count``, ``ScaleByScheduleState.count``, ...) set
    to ``step``: a worker that joins, or restarts from the global parameters, steps
    its schedules from the global step count."""

    def fix(path, x):
        last = path[-1] if path else None
        name = getattr(last, "name", getattr(last, "key", None))
        if name == "count" and jnp.ndim(x) == 0 and jnp.issubdtype(jnp.result_type(x),
                                                                   jnp.integer):
            return jnp.asarray(step, jnp.result_type(x))
        return x

    return jax.tree_util.tree_map_with_path(fix, opt_state)


def step_counts(opt_state) -> list[int]:
    """The values of the ``count`` leaves of ``opt_state`` (see :func:`set_step_count`)."""
    out = []

    def get(path, x):
        last = path[-1] if path else None
        if getattr(last, "name", getattr(last, "key", None)) == "count":
            out.append(int(x))
        return x

    jax.tree_util.tree_map_with_path(get, opt_state)
    return out


# -- several devices in one worker ---------------------------------------------------
class DeviceMesh:
    """The devices of one worker as a 1-D ``Mesh`` (axis ``"data"``).

    Batches are split across the devices (axis 1 of ``(steps, batch, ...)``); params
    and optimizer state are replicated, or with ``shard_params`` sharded FSDP-style:
    each array along its largest axis that the device count divides (replicated when
    none does).  XLA inserts the all-gathers and reduce-scatters; the carried state
    keeps its sharding through the steps (:meth:`constrain`).  A contribution is
    gathered to the host once per round (``np.asarray``).
    """

    def __init__(self, devices, shard_params: bool = False):
        from jax.sharding import Mesh

        self.devices = list(devices)
        self.n = len(self.devices)
        self.shard_params = shard_params
        self.mesh = Mesh(np.array(self.devices), ("data",))

    @classmethod
    def local(cls, shard_params: bool = False) -> "DeviceMesh | None":
        """The mesh of this process's devices, ``None`` with one device."""
        devices = jax.local_devices()
        return cls(devices, shard_params) if len(devices) > 1 else None

    def _spec(self, x):
        from jax.sharding import PartitionSpec as P

        shape = jnp.shape(x)
        if self.shard_params and shape:
            axes = [a for a in np.argsort(shape)[::-1] if shape[a] % self.n == 0]
            if axes:
                parts = [None] * len(shape)
                parts[int(axes[0])] = "data"
                return P(*parts)
        return P()

    def state_shardings(self, state: TrainState):
        from jax.sharding import NamedSharding

        return jax.tree_util.tree_map(lambda x: NamedSharding(self.mesh, self._spec(x)),
                                      state)

    def constrain(self, state: TrainState) -> TrainState:
        """``state`` with its shardings kept (inside the compiled steps)."""
        return jax.lax.with_sharding_constraint(state, self.state_shardings(state))

    def put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.state_shardings(state))

    def put_batches(self, batches: dict, batch_size: int) -> dict:
        """Split the batch axis across the devices (``batch_size`` must be a multiple
        of the device count, else the batches are replicated)."""
        from jax.sharding import NamedSharding, PartitionSpec as P

        spec = P(None, "data") if batch_size % self.n == 0 else P()
        return {k: jax.device_put(v, NamedSharding(self.mesh, spec))
                for k, v in batches.items()}


def check_metrics_output(out) -> dict:
    """Check that a ``metric_fn`` returned a dict of scalars."""
    if not isinstance(out, dict):
        raise ModelError(
            f"metric_fn must return a dict of scalars, e.g. {{'accuracy': acc}}, "
            f"but it returned a {type(out).__name__}."
        )
    for k, v in out.items():
        if jnp.shape(v) != ():
            raise ModelError(
                f"metric_fn's value {k!r} has shape {jnp.shape(v)}; every value must be a "
                "scalar (take .mean() over the batch)."
            )
    return out


def make_metric(metric_fn: Callable):
    """Jitted ``metric_fn`` with its output checked."""
    return jax.jit(lambda params, batch: check_metrics_output(metric_fn(params, batch)))


def batch_slices(n: int, batch_size: int):
    """``slice`` objects cutting ``n`` rows into batches of ``batch_size`` (last one shorter)."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def evaluate_block(metric, params, block: dict, batch_size: int) -> tuple[dict, int]:
    """Sample-weighted means of ``metric`` over one block (dict of arrays)."""
    n = len(next(iter(block.values())))
    sums: dict = {}
    for sl in batch_slices(n, batch_size):
        out = metric(params, {k: v[sl] for k, v in block.items()})
        m = sl.stop - sl.start
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * m
    return {k: v / n for k, v in sums.items()} if n else {}, n


def predict_block(apply, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``apply(params, x)`` on one block, in batches; returns a numpy array."""
    outs = [np.asarray(apply(params, x[sl])) for sl in batch_slices(len(x), batch_size)]
    return np.concatenate(outs) if outs else np.asarray(apply(params, x))
