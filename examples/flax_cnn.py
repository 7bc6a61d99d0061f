"""A Flax linen CNN with BatchNorm and Dropout on scikit-learn's digits, 2 workers.

    python examples/flax_cnn.py            # about 0.98-0.99 test accuracy
    python examples/flax_cnn.py --small    # a few epochs (CI)

BatchNorm's running statistics are the model *state* (``Trainer(state=...)``):
``loss_fn(params, state, batch, key)`` returns ``(loss, new_state)``; daskdl
averages the workers' statistics at every sync.  Dropout takes its randomness from
``key``, which daskdl derives for every step from (seed, rank, round, step).

The model lives in a module the workers can import: run as a script, this file
imports itself as ``flax_cnn`` (workers started from this directory find it), so
nothing is pickled from ``__main__``.

Prints one line per epoch and, last, ``test accuracy: 0.9xx``.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class CNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm, a dense layer with Dropout."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape((-1, 8, 8, 1))
        for features in (16, 32):
            x = nn.Conv(features, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(64)(x)))
        return nn.Dense(10)(x)


MODEL = CNN()


def init(seed: int = 0):
    """``(params, batch_stats)`` of a fresh model."""
    variables = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 64)), train=False)
    return variables["params"], variables["batch_stats"]


def loss_fn(params, state, batch, key):
    logits, updates = MODEL.apply({"params": params, "batch_stats": state}, batch["x"],
                                  train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, updates["batch_stats"]


def accuracy(params, state, batch):
    logits = MODEL.apply({"params": params, "batch_stats": state}, batch["x"], train=False)
    return {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


def digits_split():
    from sklearn.datasets import load_digits

    import daskdl as ddl

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return ddl.Dataset.from_arrays(x=x, y=d.target.astype(np.int32)).split(0.8, seed=0)


def run(make_trainer, metric, epochs: int) -> None:
    """Train ``make_trainer(client, total_steps)`` on two local workers; print each
    epoch and, last, the test accuracy (shared with ``equinox_cnn.py``)."""
    from dask.distributed import Client, LocalCluster

    import daskdl as ddl
    from daskdl.workerenv import cluster_config

    train, test = digits_split()
    # optimizer step counters count global steps: decay over the whole run
    total = epochs * ddl.steps_per_epoch(train, n_workers=2, batch_size=32)
    with cluster_config():
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client, make_trainer(client, total) as trainer:
        for rec in trainer.fit(train, epochs=epochs, verbose=False):
            rate = rec["samples"] / rec["seconds"]
            print(f"epoch {rec['epoch']:2d}  loss {rec['loss']:.4f}  {rate:8.0f} samples/s")
        result = trainer.evaluate(test, metric)
    print(f"test accuracy: {result['accuracy']:.3f}")


def main(small: bool = False):
    import daskdl as ddl

    def make_trainer(client, total_steps):
        params, stats = init()
        opt = optax.adamw(optax.cosine_decay_schedule(3e-3, total_steps), weight_decay=1e-4)
        return ddl.Trainer(loss_fn, params, opt, state=stats, policy=ddl.BSP(every=4),
                           batch_size=32, client=client, seed=0)

    run(make_trainer, accuracy, epochs=2 if small else 12)


if __name__ == "__main__":
    import flax_cnn  # this file as an importable module (see the docstring)

    flax_cnn.main(small="--small" in sys.argv)
