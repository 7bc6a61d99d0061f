"""Worker set-up for JAX on CPU cores: one core per worker, and a sane malloc.

Two facts measured on CPU workers drive this module:

* XLA's thread flags do not stop a jaxlib CPU client from spreading work over
  every core; CPU affinity set on the worker process does.  With one thread
  per worker, :class:`WorkerEnvironment` pins every thread of each worker
  process to one core (workers of one host take different cores), so that n
  workers on n cores do not fight.
* ``distributed`` starts nanny-spawned workers with
  ``MALLOC_TRIM_THRESHOLD_=65536``, which makes XLA about 1.6-2.5x slower (every
  freed buffer goes back to the OS and faults in again).  Workers that daskdl
  starts do not carry it; in workers started by anyone else,
  :class:`WorkerEnvironment` raises the trim and mmap thresholds at run time
  with glibc's ``mallopt`` and logs a warning with the permanent fix::

      dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
      # before creating the cluster, or in the YAML/env of dask-worker / dask-jobqueue

Both are on by default and can be turned off with the config keys
``daskdl.worker.pin-cpu`` and ``daskdl.worker.fix-malloc-trim``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

import dask.config
from distributed.diagnostics.plugin import WorkerPlugin

from . import config

logger = logging.getLogger("daskdl")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_SMALL_TRIM = 16 * 2**20
MALLOC_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
MALLOC_FIX = f'dask.config.set({{"{MALLOC_KEY}": None}})'
# the cores this process may use before daskdl pinned it (first import, in a worker)
_BOOT_AFFINITY = sorted(os.sched_getaffinity(0))


def cluster_settings() -> dict:
    """The ``distributed`` settings daskdl gives the clusters it starts.

    ``daskdl.cluster-config`` (a mapping of Dask config keys to values), checked.  By
    default it makes Dask's periodic work on every process quieter: the event-loop
    tick every 500 ms (not 20 ms), the system monitor every 2 s (not 0.5 s) and the
    workers' statistical profiler sampling every 100 ms (not 10 ms); on a machine
    whose cores all run workers that is +4-6 % samples/s (``docs/benchmarks.md``).
    ``{}`` keeps Dask's defaults.
    """
    settings = config.get("cluster-config")
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise ValueError(
            "config daskdl.cluster-config must map Dask config keys to values, e.g. "
            "{'distributed.admin.tick.interval': '500ms'} (or {} for Dask's defaults); "
            f"got {settings!r}")
    return dict(settings)


@contextlib.contextmanager
def cluster_config():
    """Config under which daskdl creates clusters.

    ``daskdl.cluster-config`` (see :func:`cluster_settings`) and, with
    ``daskdl.worker.fix-malloc-trim``, no small ``MALLOC_TRIM_THRESHOLD_``.  The
    nannies a ``LocalCluster`` creates inside it keep both for the workers they
    start (and restart); use it around your own ``LocalCluster(...)`` too::

        with cluster_config():
            cluster = LocalCluster(n_workers=2, threads_per_worker=1)
    """
    settings = cluster_settings()
    if config.get("worker.fix-malloc-trim"):
        settings[MALLOC_KEY] = None
    with dask.config.set(settings):
        yield


def pin_process(cpu: int) -> None:
    """Pin every thread of this process to ``cpu`` (Linux); new threads inherit it."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


def raise_malloc_thresholds() -> bool:
    """Undo a small ``MALLOC_TRIM_THRESHOLD_`` at run time; returns whether mallopt took it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 256 * 2**20) == 1
        ok &= libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


class WorkerEnvironment(WorkerPlugin):
    """Prepares each worker for single-threaded JAX; see the module docstring.

    Parameters
    ----------
    cores : worker address -> core index, computed on the client for the workers
        present at registration; workers that join later take ``int(name)`` when
        their name is a number (as in ``LocalCluster``) and are left unpinned
        otherwise.
    pin_cpu, fix_malloc : ``None`` reads the ``daskdl.worker.*`` config on the client.
    """

    idempotent = False
    name = "daskdl-worker-environment"

    def __init__(self, cores: dict | None = None, pin_cpu: bool | None = None,
                 fix_malloc: bool | None = None):
        self.cores = dict(cores or {})
        self.pin_cpu = bool(config.get("worker.pin-cpu", pin_cpu))
        self.fix_malloc = bool(config.get("worker.fix-malloc-trim", fix_malloc))

    def setup(self, worker):
        report = {"pinned": None, "malloc_trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                  "malloc_fixed": False}
        if self.pin_cpu and worker.state.nthreads == 1:
            allowed = _BOOT_AFFINITY
            slot = self.cores.get(worker.address)
            if slot is None and str(worker.name).isdigit():
                slot = int(worker.name)
            if slot is not None and len(allowed) > 1:
                cpu = allowed[slot % len(allowed)]
                pin_process(cpu)
                report["pinned"] = cpu
        trim = report["malloc_trim_threshold"]
        if self.fix_malloc and trim is not None and trim.isdigit() and int(trim) < _SMALL_TRIM:
            report["malloc_fixed"] = raise_malloc_thresholds()
            logger.warning(
                "worker %s runs with MALLOC_TRIM_THRESHOLD_=%s, which slows XLA; daskdl raised "
                "it with mallopt for this process. To start workers without it, run %s before "
                "creating the cluster.", worker.address, trim, MALLOC_FIX)
        worker.daskdl_environment = report


def core_slots(workers: dict) -> dict:
    """Worker address -> slot index, counting the single-threaded workers of each host."""
    by_host: dict = {}
    out = {}
    for addr in sorted(workers):
        host = workers[addr].get("host") or addr.rsplit(":", 1)[0]
        name = workers[addr].get("name")
        slot = by_host.get(host, 0)
        by_host[host] = slot + 1
        out[addr] = int(name) if str(name).isdigit() else slot
    return out


def worker_environment(client) -> dict:
    """What :class:`WorkerEnvironment` did on each worker: pinned core, malloc fix.

    Returns ``{address: {"pinned": cpu or None, "malloc_trim_threshold": str or None,
    "malloc_fixed": bool, "affinity": [cpus]}}``.
    """

    def _report(dask_worker):
        rep = dict(getattr(dask_worker, "daskdl_environment", {}) or {})
        rep["affinity"] = sorted(os.sched_getaffinity(0))
        return rep

    return client.run(_report)


def worker_info(client) -> dict:
    """Address -> info of every worker of ``client``'s cluster (recent ``distributed``
    lists only some by default)."""
    import inspect

    from distributed import Client

    if "n_workers" in inspect.signature(Client.scheduler_info).parameters:
        return client.scheduler_info(n_workers=-1)["workers"]
    return client.scheduler_info()["workers"]
