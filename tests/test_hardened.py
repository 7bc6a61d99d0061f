"""A hardened deployment: ``run_on_scheduler`` blocked (``distributed.scheduler.
blocked-handlers``), training on a persisted Dask-graph dataset still works: daskdl
locates chunks through its own read-only handler."""

import dask
import dask.array as da
import jax
import numpy as np
import optax
import pytest
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.workerenv import cluster_config

from .conftest import accuracy, init_mlp, loss_fn


def test_training_on_a_dask_graph_with_run_on_scheduler_blocked(digits):
    x, y = digits
    with dask.config.set({"distributed.scheduler.blocked-handlers": ["run_function"]}):
        with cluster_config():
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")
        with cluster, Client(cluster, set_as_default=False) as client:
            with pytest.raises(Exception, match="run_function"):
                client.run_on_scheduler(lambda: 1)  # blocked indeed
            arrays = {"x": da.from_array(x[:1600], chunks=200),
                      "y": da.from_array(y[:1600], chunks=200)}
            ds = ddl.Dataset({k: client.persist(v) for k, v in arrays.items()})
            with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                             policy=ddl.BSP(every=4), batch_size=32, client=client) as tr:
                tr.fit(ds, epochs=4, verbose=False)
                acc = tr.evaluate(ds, accuracy)["accuracy"]
    assert np.isfinite(acc) and acc > 0.8  # it trained (4 short epochs)
