"""Parameter synchronisation: what a sync costs, against gloo's all-reduce and the wire.

    python benchmarks/sync.py [--sizes 3,40,160,400] [--workers 2,4] [--repeats 3]
                              [--rounds 20] [--modes scheduler,sharded,sharded-int8]
    python benchmarks/sync.py --quick          # 3 MB, 2 workers, 1 repeat: a smoke run
    pip install -e ".[bench]"                  # torch (CPU) for the gloo baseline

The model is an embedding table whose size is dialled: ``{"table": (V, 64),
"w": (64, 1)}`` float32, V chosen so that the parameters take ``--sizes`` MB
(decimal).  A batch is ``k = 8`` integer ids per sample and a float target; the loss
is the squared error of the mean-pooled embeddings times ``w``.  Plain SGD,
``BSP(every=4)``, batch 32 per worker: compute is small, the sync dominates.

For each size, number of workers N and mode, in one invocation:

* **daskdl**: a fresh cluster, as on a real one: a scheduler in its own process
  (``dask scheduler --port 0 --no-dashboard --scheduler-file F``) and N
  single-threaded worker processes (``dask worker --nthreads 1 --no-nanny``, XLA on
  one thread, this checkout's daskdl on ``PYTHONPATH``; the ``Trainer`` pins each to
  a core), with this process only the client (``Client(scheduler_file=F)``); a
  warm-up fit (start-up, compilation), then a measured fit of ``--rounds`` rounds per
  worker.  Modes are ``<sync>[-<compression>][-overlap]``: ``Trainer(sync=...,
  compression=..., overlap=True)``
  with ``sync`` one of ``scheduler`` (every parameter byte through the scheduler
  plugin), ``sharded`` (workers exchange shards directly: reduce-scatter + all-gather;
  the scheduler only coordinates) or ``auto``, and ``compression`` ``bf16`` or
  ``int8``; a ``-comm`` suffix (``sharded-comm``) sets ``daskdl.shared-memory: false``
  (pieces over Dask's comm even between workers of this host).  A ``Trainer`` without these arguments (TypeError) makes the mode "n/a";
  plain ``scheduler`` then runs as ``Trainer()`` does today, which is that path.
  Reported: sync ms per round (median over every worker's rounds of ``sync_s``) and
  its parts ``transfer_s``, ``merge_s``, ``wait_s`` when the rounds carry them;
  samples/s of the measured fit; the scheduler process's RSS growth (its peak during
  the fit minus its RSS just before, sampled every 20 ms with psutil); the client's
  copies of the parameters (the starting ones it scatters, the final ones it fetches)
  live in this process and are not counted there (this process's own growth is in
  the JSON as ``client_rss_growth_mb``); the largest worker's peak RSS; bytes sent
  per worker-round (``bytes_sent``).  Where the rounds carry no
  ``merge_s`` / ``bytes_sent`` on the scheduler path, the plugin's own figures stand
  in, marked ``*``: merge seconds per merge, and the bytes of each accepted update.
* **gloo**: ``torch.distributed`` with the gloo backend, N processes pinned to the
  cores as daskdl pins its workers, ``dist.all_reduce`` of a float32 tensor of the
  same bytes: median of 10 after 2 warm-up (each the slowest rank's time).
  ``ratio`` is daskdl's sync ms over gloo's.
* **loopback**: sending the same bytes once over a local TCP socket to another
  process (until its 1-byte acknowledgement): the floor any exchange starts from.

Each figure is the median of ``--repeats`` (the modes and gloo alternate within a
repeat).  Combinations whose estimated memory, ``(N + 2) * size`` on the scheduler
path plus ``N * 4 * size`` on the workers, exceeds ``--max-memory-gb`` (16) are
skipped.  Prints a table, the targets (sharded sync <= 1.5x gloo at >= 40 MB; the
scheduler's RSS growth <= 64 MB in sharded modes; int8 <= 0.3x the bytes of the
same mode uncompressed and, at 160 MB, <= 0.5x its sync time) and, last, one JSON
line with every figure (for docs).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import dask
import jax.numpy as jnp
import numpy as np
import optax
import psutil
from distributed import Client

import daskdl as ddl

DIM = 64  # embedding width
IDS = 8  # ids per sample (mean-pooled)
BATCH = 32
EVERY = 4
MB = 1e6  # sizes are decimal MB of float32 parameters
SCHEDULER_RSS_TARGET_MB = 64
TORCH_HINT = 'pip install torch==2.13.0  (the "bench" extra: pip install -e ".[bench]")'


# -- the model ---------------------------------------------------------------------------

def loss_fn(params, batch):
    """Squared error of the mean-pooled embeddings of ``ids`` times ``w``."""
    pooled = params["table"][batch["ids"]].mean(axis=1)  # (batch, DIM)
    pred = (pooled @ params["w"])[:, 0]
    return jnp.mean((pred - batch["y"]) ** 2)


def rows_for(size_mb: float) -> int:
    return max(1, int(size_mb * MB / 4) // DIM - 1)  # minus w's DIM floats


def make_params(size_mb: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    table = rng.random((rows_for(size_mb), DIM), dtype=np.float32)
    table -= 0.5
    table *= 0.02
    w = (rng.standard_normal((DIM, 1)) / np.sqrt(DIM)).astype(np.float32)
    return {"table": table, "w": w}


def make_data(n: int, rows: int, seed: int = 1) -> ddl.Dataset:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rows, size=(n, IDS), dtype=np.int32)
    y = rng.standard_normal(n).astype(np.float32)
    return ddl.Dataset.from_arrays(ids=ids, y=y, chunk_size=EVERY * BATCH)


def param_bytes(params: dict) -> int:
    return sum(v.nbytes for v in params.values())


# -- modes -------------------------------------------------------------------------------

def parse_mode(mode: str) -> dict:
    """``"sharded-int8"`` -> ``{"sync": "sharded", "compression": "int8"}``;
    ``"sharded-overlap"`` (or ``"sharded-int8-overlap"``) adds ``overlap=True``."""
    parts = mode.split("-")
    comm = parts[-1] == "comm"
    if comm:
        parts = parts[:-1]
    overlap = parts[-1] == "overlap"
    if overlap:
        parts = parts[:-1]
    sync, compression = parts[0], "-".join(parts[1:])
    if sync not in ("scheduler", "sharded", "auto") or compression not in ("", "bf16", "int8"):
        raise SystemExit(f"unknown mode {mode!r}: <scheduler|sharded|auto>[-bf16|-int8]"
                         "[-overlap][-comm]")
    kwargs = {"sync": sync}
    if compression:
        kwargs["compression"] = compression
    if overlap:
        kwargs["overlap"] = True
    if comm:  # config, not an argument: daskdl.shared-memory
        kwargs["shared_memory"] = False
    return kwargs


def estimated_gb(mode: str, size_mb: float, n: int) -> float:
    scheduler_path = parse_mode(mode)["sync"] != "sharded"  # "auto" counted as the worst
    return ((n + 2) * size_mb * scheduler_path + n * 4 * size_mb) / 1e3


class Unavailable(Exception):
    """This daskdl's ``Trainer`` does not take the mode's arguments."""


# -- memory ------------------------------------------------------------------------------

class PeakRSS:
    """Peak RSS of some processes, sampled by a thread every ``interval`` seconds."""

    def __init__(self, pids, interval: float = 0.02):
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak = {pid: 0 for pid in pids}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _sample(self) -> None:
        for pid, p in self.procs.items():
            try:
                self.peak[pid] = max(self.peak[pid], p.memory_info().rss)
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# -- the cluster: scheduler and workers in their own processes ---------------------------

def _env() -> dict:
    """The subprocesses' environment, as ``benchmarks/coordination.py`` starts them: XLA
    and OpenMP on one thread, and this checkout's daskdl first on ``PYTHONPATH``."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(ddl.__file__))  # the daskdl this process runs
    env.update(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root] + sys.path))
    # as daskdl's cluster_config(): no small malloc trim threshold (it slows XLA); workers
    # without a nanny get none from Dask, so only an inherited one is dropped
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return ""


class Cluster:
    """A scheduler process, ``n`` worker processes and a client of them in this process."""

    def __init__(self, n: int):
        self.dir = tempfile.mkdtemp(prefix="daskdl-sync-bench-")
        self.file = os.path.join(self.dir, "scheduler.json")
        self.sched = None
        self.workers: list = []
        self.client = None
        self._logs: list = []
        try:
            self._start(n)
        except BaseException:
            self.close()
            raise

    def _popen(self, args: list, log: str) -> subprocess.Popen:
        out = open(os.path.join(self.dir, log), "wb")
        self._logs.append(out)
        return subprocess.Popen([sys.executable, "-m", *args], env=_env(), stdout=out,
                                stderr=subprocess.STDOUT)

    def _start(self, n: int) -> None:
        self.sched = self._popen(["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--no-dashboard", "--scheduler-file",
                                  self.file], "scheduler.log")
        deadline = time.monotonic() + 60
        while not os.path.exists(self.file):  # written once the scheduler listens
            if self.sched.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the scheduler did not start: "
                                   + _log_tail(os.path.join(self.dir, "scheduler.log")))
            time.sleep(0.05)
        self.workers = [self._popen(
            ["distributed.cli.dask_worker", "--scheduler-file", self.file, "--host",
             "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
             "--memory-limit", "0"], f"worker-{i}.log") for i in range(n)]
        self.client = Client(scheduler_file=self.file, set_as_default=False, timeout=60)
        try:
            self.client.wait_for_workers(n, timeout=180)
        except Exception as e:
            dead = [i for i, w in enumerate(self.workers) if w.poll() is not None]
            tail = _log_tail(os.path.join(self.dir, f"worker-{dead[0]}.log")) if dead else ""
            raise RuntimeError(f"{n} workers did not join: {e} {tail}") from e

    @property
    def worker_pids(self) -> list:
        return [w.pid for w in self.workers]

    def close(self) -> None:
        """Close the client, then end every subprocess (killed if it lingers)."""
        if self.client is not None:
            try:
                self.client.close(timeout=10)
            except Exception:
                pass
            self.client = None
        procs = [p for p in self.workers + [self.sched] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()
        self._logs = []
        shutil.rmtree(self.dir, ignore_errors=True)


# -- daskdl ------------------------------------------------------------------------------

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure_trainer(cluster: Cluster, mode: str, params: dict, warm: ddl.Dataset,
                    data: ddl.Dataset) -> dict:
    """Warm-up fit, then a measured fit, of one trainer on ``cluster``."""
    client = cluster.client
    kwargs = parse_mode(mode)
    shared = kwargs.pop("shared_memory", "auto")
    note = None
    try:
        with dask.config.set({"daskdl.shared-memory": shared}):
            tr = ddl.Trainer(loss_fn, params, optax.sgd(0.05), policy=ddl.BSP(every=EVERY),
                             batch_size=BATCH, client=client, **kwargs)
    except TypeError as e:
        if kwargs != {"sync": "scheduler"}:
            raise Unavailable(str(e)) from e
        # today's Trainer has no sync=: its only path is the scheduler's
        tr = ddl.Trainer(loss_fn, params, optax.sgd(0.05), policy=ddl.BSP(every=EVERY),
                         batch_size=BATCH, client=client)
        note = "Trainer has no sync=: its default path"
    worker_pids = cluster.worker_pids
    sched, me = cluster.sched.pid, os.getpid()
    with tr:
        tr.fit(warm, epochs=1, verbose=False)  # start-up and compilation
        first = len(tr.rounds)
        gc.collect()
        before = psutil.Process(sched).memory_info().rss
        before_me = psutil.Process(me).memory_info().rss
        with PeakRSS([sched, me, *worker_pids]) as rss:
            t0 = time.perf_counter()
            hist = tr.fit(data, epochs=1, verbose=False)
            wall = time.perf_counter() - t0
        info = tr.info() or {}  # each fit is a new run state on the scheduler: this one's
        rounds = tr.rounds[first:]
    samples = sum(h["samples"] for h in hist)

    def ms(key):
        m = _median(r.get(key) for r in rounds)
        return None if m is None else 1e3 * m

    out = {"mode": mode, "note": note, "rounds": len(rounds), "merges": None,
           "sync_ms": ms("sync_s"), "transfer_ms": ms("transfer_s"), "merge_ms": ms("merge_s"),
           "wait_ms": ms("wait_s"), "compute_ms": ms("compute_s"),
           "samples_per_s": samples / sum(h["seconds"] for h in hist), "wall_s": wall,
           "sched_rss_growth_mb": (rss.peak[sched] - before) / MB,
           "client_rss_growth_mb": (rss.peak[me] - before_me) / MB,
           "worker_peak_rss_mb": max(rss.peak[p] for p in worker_pids) / MB,
           "worker_peak_rss_each_mb": [rss.peak[p] / MB for p in worker_pids],
           "bytes_sent_per_round": _median(r.get("bytes_sent") for r in rounds),
           "bytes_received_per_round": _median(r.get("bytes_received") for r in rounds),
           "merge_from_plugin": False, "bytes_from_plugin": False}
    if kwargs["sync"] == "sharded":  # the plugin neither merges nor receives the bytes
        return out
    # the scheduler path's rounds carry neither: the plugin's own figures stand in
    clocks = {r["clock"] for r in rounds}
    new = [h for h in info.get("history", []) if h.get("clock") in clocks]
    merges = out["merges"] = sum(h["kind"] == "merge" for h in new)
    if out["merge_ms"] is None and merges and "merge_seconds" in info:
        out["merge_ms"] = 1e3 * info["merge_seconds"] / merges
        out["merge_from_plugin"] = True
    if out["bytes_sent_per_round"] is None:
        arrived = [h["bytes"] for h in new if h["kind"] == "arrive" and "bytes" in h]
        if arrived:
            out["bytes_sent_per_round"] = statistics.median(arrived)
            out["bytes_from_plugin"] = True
    return out


def measure_daskdl(n: int, modes: list, params: dict, warm: ddl.Dataset, data: ddl.Dataset,
                   unavailable: dict) -> dict:
    """Each mode on a fresh cluster of ``n`` workers (one a mode found "n/a" left clean
    is used for the next).  Returns mode -> figures, or ``{"na": reason}``."""
    results: dict = {}
    cluster = None

    def close():
        nonlocal cluster
        if cluster is not None:
            cluster.close()
        cluster = None

    try:
        for mode in modes:
            if mode in unavailable:
                results[mode] = {"na": unavailable[mode]}
                continue
            try:
                if cluster is None:
                    cluster = Cluster(n)
                results[mode] = measure_trainer(cluster, mode, params, warm, data)
            except Unavailable as e:
                unavailable[mode] = f"n/a: {e}"
                results[mode] = {"na": unavailable[mode]}
                continue  # nothing ran: the cluster is still clean
            except Exception as e:  # one failed mode must not lose the others' figures
                results[mode] = {"na": f"failed: {type(e).__name__}: {e}"}
            close()
    finally:
        close()
    return results


# -- gloo --------------------------------------------------------------------------------

_GLOO_RANK = r"""
import json, os, sys, time
rank, world, port, nbytes, iters, core = (int(a) for a in sys.argv[1:7])
if core >= 0:
    os.sched_setaffinity(0, {core})
import torch
import torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world)
t = torch.ones(nbytes // 4, dtype=torch.float32)
times = []
for _ in range(iters + 2):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(t)
    times.append(time.perf_counter() - t0)
every = [None] * world
dist.all_gather_object(every, times)
if rank == 0:
    print(json.dumps([max(ts[i] for ts in every) for i in range(2, len(times))]))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_allreduce_ms(nbytes: int, n: int, iters: int = 10) -> float:
    """Median ms of ``dist.all_reduce`` of ``nbytes`` of float32 over ``n`` processes."""
    cores = sorted(os.sched_getaffinity(0))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen(
        [sys.executable, "-c", _GLOO_RANK, str(r), str(n), str(port), str(nbytes), str(iters),
         str(cores[r % len(cores)] if len(cores) > 1 else -1)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        err = next(e for p, (_, e) in zip(procs, outs) if p.returncode)
        raise RuntimeError(f"gloo all_reduce failed: {err.strip().splitlines()[-1:]}")
    return 1e3 * statistics.median(json.loads(outs[0][0]))


# -- loopback ----------------------------------------------------------------------------

_LOOPBACK_PEER = r"""
import socket, sys
port, nbytes, repeats = (int(a) for a in sys.argv[1:4])
s = socket.create_connection(("127.0.0.1", port))
view = memoryview(bytearray(nbytes))
for _ in range(repeats):
    got = 0
    while got < nbytes:
        n = s.recv_into(view[got:], min(nbytes - got, 1 << 22))
        if not n:
            sys.exit(1)
        got += n
    s.sendall(b"k")
s.close()
"""


def loopback_ms(payload: np.ndarray, repeats: int = 5) -> float:
    """Median ms to send ``payload``'s bytes once over local TCP to another process."""
    data = memoryview(payload).cast("B")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        peer = subprocess.Popen([sys.executable, "-c", _LOOPBACK_PEER,
                                 str(server.getsockname()[1]), str(data.nbytes),
                                 str(repeats + 1)])
        try:
            server.settimeout(60)
            conn, _ = server.accept()
            with conn:
                times = []
                for _ in range(repeats + 1):
                    t0 = time.perf_counter()
                    conn.sendall(data)
                    if conn.recv(1) != b"k":
                        raise RuntimeError("loopback peer closed early")
                    times.append(time.perf_counter() - t0)
            peer.wait(60)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
    return 1e3 * statistics.median(times[1:])


# -- report ------------------------------------------------------------------------------

FIELDS = ("sync_ms", "transfer_ms", "merge_ms", "wait_ms", "compute_ms", "gloo_ms", "ratio",
          "sched_rss_growth_mb", "client_rss_growth_mb", "worker_peak_rss_mb", "samples_per_s",
          "bytes_sent_per_round", "bytes_received_per_round", "wall_s")


def combine(runs: list) -> dict:
    """Medians over the repeats of one (size, workers, mode)."""
    ok = [r for r in runs if "na" not in r]
    if not ok:
        return {"na": runs[0]["na"] if runs else "not run"}
    out = {k: _median(r.get(k) for r in ok) for k in FIELDS}
    out.update(repeats=len(ok), note=ok[0].get("note"), merges=ok[0].get("merges"),
               merge_from_plugin=ok[0]["merge_from_plugin"],
               bytes_from_plugin=ok[0]["bytes_from_plugin"],
               runs=[{k: r.get(k) for k in ("sync_ms", "samples_per_s", "sched_rss_growth_mb",
                                             "client_rss_growth_mb", "worker_peak_rss_mb")}
                     for r in ok])
    if len(ok) < len(runs):
        out["failed"] = [r["na"] for r in runs if "na" in r]
    return out


def _fmt(x, spec: str = ".1f", star: bool = False) -> str:
    if x is None:
        return "-"
    return format(x, spec) + ("*" if star else "")


def print_table(rows: list) -> None:
    head = ("size_mb", "workers", "mode", "sync_ms", "transfer_ms", "merge_ms", "wait_ms",
            "gloo_ms", "ratio", "sched_rss_mb", "worker_rss_mb", "samples/s",
            "bytes_sent/round")
    widths = (7, 7, 14, 9, 11, 9, 8, 8, 6, 12, 13, 9, 16)
    print("sched_rss_mb: RSS growth of the scheduler, in its own process (as on a real "
          "cluster), during the measured fit;\n  the client's copies of the parameters (in "
          "this process) are not counted")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths)))
    for row in rows:
        lead = (f"{row['size_mb']:>7g} {row['workers']:>7d} {row['mode']:>14s}")
        if "na" in row:
            print(f"{lead} {row['na']}")
            continue
        cells = (_fmt(row["sync_ms"]), _fmt(row["transfer_ms"]),
                 _fmt(row["merge_ms"], star=row["merge_from_plugin"]), _fmt(row["wait_ms"]),
                 _fmt(row["gloo_ms"]), _fmt(row["ratio"], ".2f"),
                 _fmt(row["sched_rss_growth_mb"]), _fmt(row["worker_peak_rss_mb"], ".0f"),
                 _fmt(row["samples_per_s"], ".0f"),
                 _fmt(row["bytes_sent_per_round"], ".0f", star=row["bytes_from_plugin"]))
        print(lead + " " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths[3:])))
    if any(r.get("merge_from_plugin") or r.get("bytes_from_plugin") for r in rows):
        print("  * from the scheduler plugin (the rounds do not carry it): merge = merge "
              "seconds per merge; bytes = one accepted update, as the plugin counted it")


def check_targets(rows: list) -> list:
    """The targets, one verdict per (size, workers) they apply to."""
    by = {(r["size_mb"], r["workers"], r["mode"]): r for r in rows}
    found = []

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    for (size, n, mode), r in sorted(by.items()):
        if "na" in r:
            continue
        if mode == "sharded" and size >= 40:
            ratio = r["ratio"]
            found.append({"target": "sharded sync <= 1.5x gloo at >= 40 MB", "size_mb": size,
                          "workers": n, "value": ratio,
                          "verdict": verdict(None if ratio is None else ratio <= 1.5)})
        if mode.startswith("sharded"):
            g = r["sched_rss_growth_mb"]
            found.append({"target": f"scheduler RSS growth <= {SCHEDULER_RSS_TARGET_MB} MB "
                          f"({mode})", "size_mb": size, "workers": n, "value": g,
                          "verdict": verdict(g <= SCHEDULER_RSS_TARGET_MB)})
        if mode.endswith("-int8"):
            base = by.get((size, n, mode[:-len("-int8")]), {})
            sent, ref = r.get("bytes_sent_per_round"), base.get("bytes_sent_per_round")
            ratio = sent / ref if sent and ref else None
            found.append({"target": f"{mode} bytes <= 0.3x uncompressed", "size_mb": size,
                          "workers": n, "value": ratio,
                          "verdict": verdict(None if ratio is None else ratio <= 0.3)})
            if size == 160:
                s, ref = r.get("sync_ms"), base.get("sync_ms")
                ratio = s / ref if s and ref else None
                found.append({"target": f"{mode} sync <= 0.5x uncompressed at 160 MB",
                              "size_mb": size, "workers": n, "value": ratio,
                              "verdict": verdict(None if ratio is None else ratio <= 0.5)})
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="MB of float32 parameters (default 3,40,160,400)")
    p.add_argument("--workers", default=None, help="numbers of workers (default 2,4)")
    p.add_argument("--repeats", type=int, default=None, help="default 3")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per worker in the measured fit (default 20)")
    p.add_argument("--modes", default="scheduler,sharded,sharded-int8",
                   help="<scheduler|sharded|auto>[-bf16|-int8], comma-separated")
    p.add_argument("--max-memory-gb", type=float, default=16.0,
                   help="skip combinations estimated above this")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 MB, 2 workers, 1 repeat, 8 rounds")
    a = p.parse_args()
    quick = {"sizes": "3", "workers": "2", "repeats": 1, "rounds": 8}
    full = {"sizes": "3,40,160,400", "workers": "2,4", "repeats": 3, "rounds": 20}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    sizes = [float(s) for s in a.sizes.split(",")]
    workers = [int(n) for n in a.workers.split(",")]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        parse_mode(m)
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        print(f"gloo baseline skipped: torch is not installed; {TORCH_HINT}")
    load0 = os.getloadavg()
    print(f"{len(os.sched_getaffinity(0))} cores, {psutil.virtual_memory().total / 2**30:.0f} "
          f"GiB; load average {load0[0]:.2f}; modes {modes}; {a.rounds} rounds per worker, "
          f"BSP(every={EVERY}), batch {BATCH}", flush=True)

    runs: dict = {}  # (size, n, mode) -> [figures per repeat]
    gloo: dict = {}  # (size, n) -> [ms per repeat]
    loop: dict = {}  # size -> [ms per repeat]
    skipped = []
    unavailable: dict = {}
    for size in sizes:
        params = make_params(size)
        nbytes = param_bytes(params)
        rows = params["table"].shape[0]
        for n in workers:
            fits = [m for m in modes if estimated_gb(m, size, n) <= a.max_memory_gb]
            for m in modes:
                if m not in fits:
                    why = (f"skipped: estimated {estimated_gb(m, size, n):.1f} GB > "
                           f"{a.max_memory_gb:g} GB")
                    skipped.append({"size_mb": size, "workers": n, "mode": m, "why": why})
                    print(f"{size:g} MB, {n} workers, {m}: {why}", flush=True)
            per_round = EVERY * BATCH
            data = make_data(n * a.rounds * per_round, rows)
            warm = make_data(n * 2 * per_round, rows, seed=2)
            for rep in range(a.repeats):
                if fits:
                    got = measure_daskdl(n, fits, params, warm, data, unavailable)
                    for m, r in got.items():
                        runs.setdefault((size, n, m), []).append(r)
                        print(f"{size:g} MB, {n} workers, {m}, repeat {rep + 1}: " + (
                            r["na"] if "na" in r else
                            f"sync {r['sync_ms']:.1f} ms/round, wait {r['wait_ms']:.1f}, "
                            f"compute {r['compute_ms']:.1f}, {r['samples_per_s']:.0f} "
                            f"samples/s, scheduler process RSS +{r['sched_rss_growth_mb']:.1f} MB, "
                            f"worker peak {r['worker_peak_rss_mb']:.0f} MB"
                            + (f" ({r['note']})" if r["note"] else "")), flush=True)
                if have_torch:
                    try:
                        ms = gloo_allreduce_ms(nbytes, n)
                        gloo.setdefault((size, n), []).append(ms)
                        print(f"{size:g} MB, {n} workers, gloo all_reduce, repeat {rep + 1}: "
                              f"{ms:.1f} ms", flush=True)
                    except Exception as e:
                        print(f"{size:g} MB, {n} workers, gloo: {e}", flush=True)
                if n == workers[0]:
                    ms = loopback_ms(params["table"])
                    loop.setdefault(size, []).append(ms)
                    print(f"{size:g} MB, loopback TCP, repeat {rep + 1}: {ms:.1f} ms "
                          f"({nbytes / MB / ms * 1e3:.0f} MB/s)", flush=True)
        del params, data, warm
        gc.collect()

    table = []
    for (size, n, m), rs in runs.items():
        row = {"size_mb": size, "workers": n, "mode": m, **combine(rs)}
        if "na" not in row:
            row["gloo_ms"] = _median(gloo.get((size, n), []))
            if row["gloo_ms"] and row["sync_ms"]:
                row["ratio"] = row["sync_ms"] / row["gloo_ms"]
        table.append(row)
    table += [{"size_mb": s["size_mb"], "workers": s["workers"], "mode": s["mode"],
               "na": s["why"]} for s in skipped]
    table.sort(key=lambda r: (r["size_mb"], r["workers"], modes.index(r["mode"])))
    print()
    print_table(table)
    print()
    for size, ms in loop.items():
        med = statistics.median(ms)
        print(f"loopback floor, {size:g} MB: {med:.1f} ms ({size / med * 1e3:.0f} MB/s)")
    for k, ms in gloo.items():
        med = statistics.median(ms)
        print(f"gloo all_reduce, {k[0]:g} MB, {k[1]} processes: {med:.1f} ms "
              f"({k[0] / med * 1e3:.0f} MB/s of parameters)")
    if not have_torch:
        print(f"gloo baseline not measured: {TORCH_HINT}")
    print()
    print("targets: sharded sync <= 1.5x gloo at >= 40 MB; scheduler RSS growth <= "
          f"{SCHEDULER_RSS_TARGET_MB} MB (sharded modes); int8 <= 0.3x the bytes of the same "
          "mode uncompressed, and at 160 MB sync in <= 0.5x its time")
    targets = check_targets(table)
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['verdict']:4s} {t['target']}: {t['size_mb']:g} MB, {t['workers']} "
              f"workers: {value}")
    if not targets:
        print("  none measured (no sharded or int8 mode ran, or no size >= 40 MB)")
    load1 = os.getloadavg()
    print(f"load average before / after: {load0[0]:.2f} / {load1[0]:.2f}")
    print(json.dumps({
        "benchmark": "sync", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cores": len(os.sched_getaffinity(0)), "load": [load0[0], load1[0]],
        "args": vars(a), "every": EVERY, "batch": BATCH, "dim": DIM, "ids": IDS,
        "rows": table, "gloo_ms": {f"{s:g}MB/{n}": v for (s, n), v in gloo.items()},
        "loopback_ms": {f"{s:g}MB": v for s, v in loop.items()},
        "skipped": skipped, "targets": targets}, default=float))


if __name__ == "__main__":
    main()
