"""Train an MLP on scikit-learn's digits with daskdl on a local 2-worker cluster.

    python examples/digits.py

Prints one line per epoch and, last, ``test accuracy: 0.9xx``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from dask.distributed import Client, LocalCluster
from sklearn.datasets import load_digits

import daskdl as ddl
from daskdl.workerenv import cluster_config


def init_mlp(key, sizes=(64, 128, 10)):
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (n_in, n_out)) * np.sqrt(2.0 / n_in),
                       "b": jnp.zeros(n_out)})
    return params


def apply_mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
    logits = apply_mlp(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def accuracy(params, batch):
    return {"accuracy": (apply_mlp(params, batch["x"]).argmax(-1) == batch["y"]).mean()}


def main():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    train, test = ddl.Dataset.from_arrays(x=x, y=y).split(0.8, seed=0)

    with cluster_config():  # workers without Dask's small MALLOC_TRIM_THRESHOLD_
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        trainer = ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                              policy=ddl.BSP(every=4), batch_size=32, client=client, seed=0)
        for rec in trainer.fit(train, epochs=20):
            print(f"epoch {rec['epoch']:2d}  loss {rec['loss']:.4f}  "
                  f"{rec['samples'] / rec['seconds']:8.0f} samples/s")
        acc = trainer.evaluate(test, accuracy)["accuracy"]
        trainer.close()
    print(f"test accuracy: {acc:.3f}")


if __name__ == "__main__":
    main()
