"""Worker set-up for JAX: one core per worker, no small MALLOC_TRIM_THRESHOLD_."""

import os

import dask
import pytest
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.workerenv import WorkerEnvironment

CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CPUS) < 2, reason="pinning is only observable with 2+ cores")
def test_daskdl_workers_are_pinned_to_distinct_cores(client2):
    client2.register_plugin(WorkerEnvironment())
    env = ddl.worker_environment(client2)
    assert len(env) == 2
    pinned = [e["pinned"] for e in env.values()]
    assert sorted(pinned) == CPUS[:2]
    for e in env.values():
        assert e["affinity"] == [e["pinned"]]  # every thread of the worker, on one core
        assert e["malloc_trim_threshold"] is None  # started under cluster_config()


def test_malloc_fix_and_pin_opt_out_on_a_plain_dask_cluster():
    # a cluster started the plain Dask way carries MALLOC_TRIM_THRESHOLD_=65536
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        with dask.config.set({"daskdl.worker.pin-cpu": False}):
            client.register_plugin(WorkerEnvironment())
        (env,) = ddl.worker_environment(client).values()
        assert env["malloc_trim_threshold"] == "65536"
        assert env["malloc_fixed"] is True
        assert env["pinned"] is None and env["affinity"] == CPUS  # opted out

        with dask.config.set({"daskdl.worker.fix-malloc-trim": False}):
            client.register_plugin(WorkerEnvironment())
        (env,) = ddl.worker_environment(client).values()
        assert env["malloc_fixed"] is False
        if len(CPUS) > 1:
            assert env["affinity"] == [env["pinned"]]


def test_cluster_config_unsets_the_nanny_variable():
    from daskdl.workerenv import MALLOC_KEY, cluster_config

    assert dask.config.get(MALLOC_KEY) == 65536
    with cluster_config():
        assert dask.config.get(MALLOC_KEY) is None
    with dask.config.set({"daskdl.worker.fix-malloc-trim": False}), cluster_config():
        assert dask.config.get(MALLOC_KEY) == 65536


def _callback_ms(dask_worker):
    return {k: dask_worker.periodic_callbacks[k].callback_time for k in ("tick", "profile")}


def test_cluster_config_quiets_the_workers_it_starts(client2):
    # client2 is a LocalCluster started under cluster_config(): its worker processes
    # run Dask's periodic work at daskdl.cluster-config's intervals
    for ms in client2.run(_callback_ms).values():
        assert ms == {"tick": 500, "profile": 100}
    monitor = client2.run(dask.config.get, "distributed.admin.system-monitor.interval")
    assert set(monitor.values()) == {"2s"}
    tick = client2.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.periodic_callbacks["tick"].callback_time)
    assert tick == 500


def test_cluster_config_can_be_emptied_and_is_checked():
    from daskdl.workerenv import cluster_config, cluster_settings

    default_tick = dask.config.get("distributed.admin.tick.interval")
    with dask.config.set({"daskdl.cluster-config": {}}), cluster_config():
        assert dask.config.get("distributed.admin.tick.interval") == default_tick  # Dask's own
    with dask.config.set({"daskdl.cluster-config": {"distributed.admin.tick.interval": "1s"}}):
        assert cluster_settings() == {"distributed.admin.tick.interval": "1s"}
        with cluster_config():
            assert dask.config.get("distributed.admin.tick.interval") == "1s"
    with dask.config.set({"daskdl.cluster-config": ["distributed.admin.tick.interval"]}):
        with pytest.raises(ValueError, match="daskdl.cluster-config must map Dask config keys"):
            with cluster_config():
                pass
