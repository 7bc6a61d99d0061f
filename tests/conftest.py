"""Shared fixtures: real process-based LocalClusters, started once per session.

Workers are processes with one thread each (pinned to a core by daskdl), so the
test process itself is never pinned.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# JAX's persistent compilation cache, for this session only (the way
# daskdl.hpc.worker_env gives jobqueue workers one): the many trainers and worker
# processes of the suite compile the same few models; set before JAX is imported
# here, in the workers and in the examples' subprocesses, which inherit it
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="daskdl-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _JAX_CACHE, True)

import numpy as np  # noqa: E402
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


def _session_client(n):
    cluster = _cluster(n)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def client2():
    """A 2-worker process cluster shared by the tests (2 cores here)."""
    yield from _session_client(2)


@pytest.fixture(scope="session")
def client1():
    """A 1-worker process cluster shared by the tests."""
    yield from _session_client(1)


# -- a small model and data used across tests: the digits example's, smaller ------------
from examples import digits as _digits  # noqa: E402
from examples.digits import accuracy, apply_mlp, loss_fn  # noqa: E402,F401

cloudpickle.register_pickle_by_value(_digits)


def init_mlp(key, sizes=(64, 32, 10)):
    return _digits.init_mlp(key, sizes)


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def pytest_collection_modifyitems(session, config, items):
    """Run the in-process ``gen_cluster`` tests first: they check that no subprocess
    is alive, and the session clusters' worker processes are, once started."""
    import inspect

    def uses_gen_cluster(item):
        """gen_cluster wraps an ``async def`` test in a plain function."""
        fn = getattr(item, "function", None)
        inner = inspect.unwrap(fn) if fn is not None else None
        return inner is not fn and inspect.iscoroutinefunction(inner)

    items.sort(key=lambda item: 0 if uses_gen_cluster(item) else 1)


@pytest.fixture(autouse=True)
def _restore_malloc_env():
    """A nanny sets its pre-spawn environment (Dask's MALLOC_TRIM_THRESHOLD_=65536) in
    *this* process's os.environ for good; later nannies' workers would inherit it."""
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    yield
    if before is None:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    else:
        os.environ["MALLOC_TRIM_THRESHOLD_"] = before
