"""Pure JAX pieces of training: the train state, K optimizer steps fused in one
compiled call (``lax.scan``), evaluation and prediction on one block.

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


class TrainState(NamedTuple):
    """Local state of one replica: parameters, optimizer state, steps taken."""

    params: Any
    opt_state: Any
    step: jax.Array


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` at step 0."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def split_loss_output(out) -> tuple[jax.Array, dict]:
    """Accept ``loss`` or ``(loss, metrics_dict)`` from a loss function; check it is a scalar."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        loss, aux = out
    else:
        loss, aux = out, {}
    shape = jnp.shape(loss)
    if shape != ():
        raise TypeError(
            f"loss_fn must return a scalar (or (scalar, dict_of_metrics)), but it returned "
            f"an array of shape {shape}. Reduce it, e.g. return losses.mean()."
        )
    return loss, aux


def make_train_steps(loss_fn: Callable, optimizer: optax.GradientTransformation,
                     on_trace: Callable[[], None] | None = None):
    """Return ``train_steps(state, batches) -> (state, (losses, metrics))``, jitted.

    ``on_trace`` is called each time JAX traces (and so compiles) the function: once
    per distinct batch shape.

    ``batches`` is a dict of arrays with a leading axis of K steps; the K steps run
    in one compiled ``lax.scan``.  ``losses`` has shape ``(K,)``.
    """

    def wrapped(params, batch):
        return split_loss_output(loss_fn(params, batch))

    grad_fn = jax.value_and_grad(wrapped, has_aux=True)

    def one_step(state: TrainState, batch):
        (loss, aux), grads = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), (loss, aux)

    @jax.jit
    def train_steps(state: TrainState, batches):
        if on_trace is not None:
            on_trace()  # runs while tracing only, never in the compiled program
        return jax.lax.scan(one_step, state, batches)

    return train_steps


def check_metrics_output(out) -> dict:
    """Check that a ``metric_fn`` returned a dict of scalars."""
    if not isinstance(out, dict):
        raise TypeError(
            f"metric_fn must return a dict of scalars, e.g. {{'accuracy': acc}}, "
            f"but it returned a {type(out).__name__}."
        )
    for k, v in out.items():
        if jnp.shape(v) != ():
            raise TypeError(
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
