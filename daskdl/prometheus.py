"""``daskdl_*`` metrics on the scheduler's Prometheus endpoint (``/metrics``).

One collector per process, registered once in ``prometheus_client.REGISTRY``
(the registry Dask's ``/metrics`` serves) by :class:`daskdl.dashboard.DashboardPlugin`.
It reads the training plugin's ``metrics()`` of the scheduler(s) it was given
(a value that is not a finite number is left out, never the whole page);
where several schedulers run in one process (tests), it reports the scheduler
whose ``/metrics`` is being served.

Metrics of a run carry the labels ``run`` and ``policy``; per-worker metrics
also ``rank`` and ``worker`` (its address):

==========================================  =======  ==========================================
name                                        type     meaning
==========================================  =======  ==========================================
``daskdl_run_active``                       gauge    1 while the run trains, 0 once it ended
``daskdl_run_workers``                      gauge    workers in the run
``daskdl_run_version``                      gauge    merges done (version of the global params)
``daskdl_run_samples_total``                counter  samples trained on, all workers
``daskdl_run_samples_per_second``           gauge    samples/s since the run started
``daskdl_run_loss``                         gauge    sample-weighted loss of the last merge
``daskdl_run_rejected_updates_total``       counter  updates refused (NaN/Inf, wrong shape/dtype)
``daskdl_run_generation``                   gauge    re-plans so far (workers left or joined)
``daskdl_run_checkpoints_total``            counter  checkpoints written
``daskdl_run_merge_seconds_total``          counter  time the scheduler spent merging
``daskdl_run_sync_messages_total``          counter  scheduler messages carrying syncs (one
                                                     per direct sync or relayed batch)
``daskdl_run_relayed_syncs_total``          counter  syncs that came in a relay's batch
``daskdl_worker_clock``                     gauge    rounds the worker finished
``daskdl_worker_staleness``                 gauge    rounds behind the fastest worker
``daskdl_worker_rounds_total``              counter  rounds synchronised
``daskdl_worker_samples_total``             counter  samples the worker trained on
``daskdl_worker_compute_seconds_total``     counter  time computing rounds
``daskdl_worker_wait_seconds_total``        counter  time waiting in barriers
``daskdl_worker_sent_bytes_total``          counter  bytes sent to the scheduler (sharded:
                                                     to the shard owners)
``daskdl_worker_received_bytes_total``      counter  bytes received from the scheduler
                                                     (sharded: from the shard owners)
``daskdl_worker_transfer_seconds_total``    counter  sharded: sending and gathering shards
``daskdl_worker_shard_merge_seconds_total`` counter  sharded: the worker's shard owner merging
``daskdl_worker_compression_ratio``         gauge    sharded: uncompressed / sent bytes
``daskdl_worker_loss``                      gauge    the worker's loss in its last round
``daskdl_worker_divergence``                gauge    ``||theta_i - theta_global||`` at its
                                                     last sync
==========================================  =======  ==========================================
"""

from __future__ import annotations

import math
import threading
import weakref

from .protocol import EXTENSION

NAMESPACE = "daskdl"

def _table(text: str) -> list:
    """``(name, type, help, key in metrics())`` from lines ``name type key help``; type
    "counter" gets ``_total`` from prometheus_client."""
    rows = []
    for line in text.strip().splitlines():
        name, kind, key, help_ = line.split(maxsplit=3)
        rows.append((name, kind, help_, key))
    return rows


RUN_METRICS = _table("""
run_active                 gauge   active        1 while the run trains, 0 once it ended or aborted
run_workers                gauge   workers       Workers in the run
run_version                gauge   version       Merges done: version of the global parameters
run_samples                counter samples       Samples trained on by all workers
run_samples_per_second     gauge   samples_per_s Samples per second since the run started
run_loss                   gauge   loss          Sample-weighted training loss of the last merge
run_rejected_updates       counter rejected      Worker updates refused (NaN/Inf, wrong shape, dtype or tree structure)
run_generation             gauge   generation    Re-plans so far: workers left or joined
run_checkpoints            counter checkpoints   Checkpoints written
run_merge_seconds          counter merge_seconds Seconds the scheduler spent merging
run_sync_messages          counter sync_messages Scheduler messages carrying syncs: one per direct sync or relayed batch
run_relayed_syncs          counter relayed_syncs Syncs that reached the scheduler in a relay's batch of its group's syncs
""")
WORKER_METRICS = _table("""
worker_clock               gauge   clock         Rounds the worker finished
worker_staleness           gauge   staleness     Rounds the worker is behind the fastest one
worker_rounds              counter rounds        Rounds the worker synchronised
worker_samples             counter samples       Samples the worker trained on
worker_compute_seconds     counter compute_s     Seconds the worker spent computing rounds
worker_wait_seconds        counter wait_s        Seconds the worker waited in barriers
worker_sent_bytes          counter bytes_in      Bytes of parameters sent to the scheduler (sharded sync: to the shard owners)
worker_received_bytes      counter bytes_out     Bytes of parameters received from the scheduler (sharded sync: from the shard owners)
worker_transfer_seconds    counter transfer_s    Sharded sync: seconds sending updates to and gathering shards from their owners
worker_shard_merge_seconds counter shard_merge_s Sharded sync: seconds the worker's shard owner spent merging
worker_compression_ratio   gauge   compression   Sharded sync: uncompressed bytes over bytes sent
worker_loss                gauge   loss          Training loss of the worker's last round
worker_divergence          gauge   divergence    Norm of the difference between the worker's and the global parameters at its last sync
""")


def _number(x) -> float | None:
    """``x`` as a finite float, else ``None`` (the value is skipped, not the page)."""
    if isinstance(x, bool):
        return float(x)
    try:
        x = float(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _add(families: list, table: list, labels: list, values: dict) -> None:
    for fam, (_, _, _, key) in zip(families, table):
        x = _number(values.get(key))
        if x is not None:
            fam.add_metric(labels, x)


class DaskDLCollector:
    """A ``prometheus_client`` collector of the ``daskdl_*`` metrics.

    It knows the schedulers it was given (weakly) and reports the one whose
    ``/metrics`` page is being served, else every running one.
    """

    def __init__(self):
        self.schedulers: weakref.WeakSet = weakref.WeakSet()

    def _targets(self) -> list:
        live = [s for s in list(self.schedulers)
                if str(getattr(s, "status", "running")).split(".")[-1] not in ("closed",
                                                                               "closing")]
        # the scheduler Dask's own collectors read for this request (set by its handler)
        from distributed.http.scheduler.prometheus.core import PrometheusHandler

        serving = [getattr(c, "server", None) for c in PrometheusHandler._collectors or ()]
        if serving and serving[0] in live:
            return [serving[0]]
        return live

    def collect(self):
        """Yield one metric family per ``daskdl_*`` metric (called per scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        runs = [kinds[t](f"{NAMESPACE}_{n}", h, labels=["run", "policy"])
                for n, t, h, _ in RUN_METRICS]
        workers = [kinds[t](f"{NAMESPACE}_{n}", h, labels=["run", "policy", "rank", "worker"])
                   for n, t, h, _ in WORKER_METRICS]
        for scheduler in self._targets():
            plugin = getattr(scheduler, "extensions", {}).get(EXTENSION)
            if plugin is None:
                continue
            for run, m in plugin.metrics().items():
                labels = [str(run), str(m.get("policy", ""))]
                _add(runs, RUN_METRICS, labels, m)
                for rank, s in sorted((m.get("ranks") or {}).items(), key=lambda x: str(x[0])):
                    wl = labels + [str(rank), str(s.get("address", ""))]
                    _add(workers, WORKER_METRICS, wl, s)
        yield from runs
        yield from workers

    def describe(self):
        """No metrics up front: registering needs no scheduler."""
        return []


_lock = threading.Lock()
_collector: DaskDLCollector | None = None


def register_collector(scheduler, registry=None) -> bool:
    """Report ``scheduler``'s daskdl metrics on ``/metrics``; idempotent.

    The process-wide collector is registered in ``registry`` (default
    ``prometheus_client.REGISTRY``, the one Dask serves) on the first call only.
    Returns ``False`` where ``prometheus_client`` is not installed
    (``pip install prometheus-client`` adds the metrics).
    """
    global _collector
    try:
        import prometheus_client
    except ImportError:
        return False
    with _lock:
        if _collector is None:
            _collector = DaskDLCollector()
            (registry or prometheus_client.REGISTRY).register(_collector)
        _collector.schedulers.add(scheduler)
    return True


def unregister_scheduler(scheduler) -> None:
    """Stop reporting ``scheduler`` (the collector stays registered)."""
    if _collector is not None and scheduler is not None:
        _collector.schedulers.discard(scheduler)
