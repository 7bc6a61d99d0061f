"""Shared fixtures: real process-based LocalClusters, started once per session.

Workers are processes with one thread each (pinned to a core by daskdl), so the
test process itself is never pinned.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from daskdl.workerenv import cluster_config  # noqa: E402

import cloudpickle  # noqa: E402
import sys  # noqa: E402

# the model functions below travel to the workers by value, not by import
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cluster(n):
    with cluster_config():
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    return cluster


@pytest.fixture(scope="session")
def client2():
    """A 2-worker process cluster shared by the tests (2 cores here)."""
    cluster = _cluster(2)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def client1():
    cluster = _cluster(1)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


# -- a small model and data used across tests ------------------------------------------
def init_mlp(key, sizes=(64, 32, 10)):
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


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
