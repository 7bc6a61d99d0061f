"""Many worker processes on few cores: every round is merged in order and no worker is
ever left without a round in flight while the others wait for it (the fit never stalls)."""

import jax
import optax
import pytest
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.workerenv import cluster_config

from .conftest import init_mlp, loss_fn


@pytest.mark.timeout(240)
def test_six_workers_on_two_cores_every_round_merged_across_epoch_boundaries(digits):
    x, y = digits
    with cluster_config():
        cluster = LocalCluster(n_workers=6, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    client = Client(cluster, set_as_default=False)
    try:
        ds = ddl.Dataset.from_arrays(x=x[:1536], y=y[:1536], chunk_size=128)
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                         policy=ddl.BSP(every=1), batch_size=8, client=client, seed=1,
                         sync_timeout=60) as tr:
            tr.fit(ds, epochs=4, verbose=False)
            info = tr.info()
            result = tr._last_fit
        rounds_per_epoch = 1536 // 6 // 8
        clocks = rounds_per_epoch * 4
        assert len(tr.history) == 4 and len(tr.rounds) == clocks * 6
        assert info["generation"] == 0 and not info["lost"]  # nobody timed out
        merges = [h["clock"] for h in info["history"] if h["kind"] == "merge"]
        assert merges == list(range(clocks))  # every round merged once, in order
        assert all(len(h["ranks"]) == 6 for h in info["history"] if h["kind"] == "merge")
        assert result.starved_passes == 0
    finally:
        client.close()
        cluster.close()
