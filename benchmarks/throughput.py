"""Throughput of daskdl against a plain single-process JAX loop.

    python benchmarks/throughput.py [--epochs 4] [--samples-per-worker 16384]
    python benchmarks/throughput.py --dashboard [--repeats 3] [--epochs 4]

One MLP (784-512-512-10, batch 128, SGD with momentum) on synthetic
teacher-labelled data, measured in one invocation:

* ``plain``: a single-process loop of the same compiled 16-step ``lax.scan``,
  pinned to one core;
* ``daskdl-1``: daskdl with 1 worker, ``BSP(every=16)``;
* ``daskdl-2``: daskdl with 2 workers, ``BSP(every=16)``;
* ``ddp-2`` (needs torch: ``pip install -e ".[bench]"``): what two processes get on
  this machine with no coordinator at all: the same scan in 2 processes, each pinned
  to a core as daskdl pins its workers, averaging their parameters every 16 steps
  with one ``torch.distributed`` gloo ``all_reduce`` of one flat buffer (what BSP
  computes, the way DDP-style code does it).  ``ddp-2 / plain`` is the ceiling of
  2-process scaling here; ``daskdl-2 / ddp-2`` what coordinating through Dask costs.

Also samples/s over whole ``fit`` calls (epoch ends included): a fit of 1 + epochs
minus a fit of 1 in the same trainer, so start-up and compilation cancel out; the
median over ``--pairs`` such short/long pairs (default 3: one pair is one difference
of two wall times, and a hiccup of this machine in either fit moves it by 10-20 %;
the first pair alone, the figure of earlier versions, is printed too).

The plain loop runs twice, first and again after the daskdl runs, and its
figure is the median over the steady epochs of both, so that a machine drifting
during the invocation moves the baseline with the runs compared against it (each
run's own figure is printed).

Samples/s are medians over the steady epochs (the first epoch, with worker
start-up and compilation, is reported apart).  Prints the ratios
``daskdl-1 / plain`` (target >= 0.97) and ``daskdl-2 / daskdl-1`` (target >= 1.8).

``--dashboard`` measures instead what the ``/daskdl`` dashboard page costs: one
2-worker cluster and trainer, fits of ``--epochs`` epochs alternating between the
page open in headless Chromium (``/usr/bin/chromium`` and ``/usr/bin/chromedriver``,
Debian's ``chromium`` and ``chromium-driver``) and closed (the browser on
``about:blank``), ``--repeats`` times each.  Prints the median samples/s of each
(over the epochs of every fit, the first fit's first epoch left out: compilation)
and the ratio open / closed (target >= 0.98), with the CPU used by Chromium and by
this process (client and scheduler) during the fits.  The browser shares the
workers' cores here; ``--browser-nice 19`` runs it at the lowest priority, as if it
were on another machine (the usual case: a laptop looking at a cluster), leaving
the cost the cluster itself pays.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import dask
import jax
import numpy as np
import optax
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.step import init_state, make_train_steps
from daskdl.workerenv import cluster_config, pin_process

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import digits as _digits  # noqa: E402
from examples.digits import apply_mlp, loss_fn  # noqa: E402,F401  (the same MLP and loss)

SIZES = (784, 512, 512, 10)
BATCH = 128
EVERY = 16


def init_mlp(key, sizes=SIZES):
    return _digits.init_mlp(key, sizes)


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0]), dtype=np.float32)
    teacher = init_mlp(jax.random.PRNGKey(123))
    y = np.asarray(apply_mlp(teacher, x).argmax(-1)).astype(np.int32)
    return x, y


def optimizer():
    return optax.sgd(0.01, momentum=0.9)


def plain(x, y, epochs: int) -> list[float]:
    """The same compiled K-step scan in this process, pinned to one core."""
    before = os.sched_getaffinity(0)
    pin_process(sorted(before)[0])  # every thread, XLA's included
    try:
        steps = make_train_steps(loss_fn, optimizer())
        state = init_state(init_mlp(jax.random.PRNGKey(0)), optimizer())
        per_round = EVERY * BATCH
        rates = []
        for e in range(epochs):
            perm = np.random.default_rng(e).permutation(len(x))
            t = time.perf_counter()
            n = 0
            for r in range(len(x) // per_round):
                idx = perm[r * per_round:(r + 1) * per_round]
                batches = {"x": x[idx].reshape(EVERY, BATCH, -1), "y": y[idx].reshape(EVERY, BATCH)}
                state, (losses, _) = steps(state, batches)
                losses.block_until_ready()
                n += per_round
            rates.append(n / (time.perf_counter() - t))
        return rates
    finally:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), before)
            except OSError:
                pass


_DDP_TIMEOUT_S = 600


def ddp_rank(rank: int, world: int, port: int, epochs: int, per_worker: int) -> None:
    """One process of ``ddp-N`` (started by :func:`ddp`); rank 0 prints its epochs'
    seconds as JSON."""
    cores = sorted(os.sched_getaffinity(0))
    pin_process(cores[rank % len(cores)])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    x, y = make_data(world * per_worker)
    x, y = x[rank * per_worker:(rank + 1) * per_worker], y[rank * per_worker:(rank + 1) * per_worker]
    steps = make_train_steps(loss_fn, optimizer())
    state = init_state(init_mlp(jax.random.PRNGKey(0)), optimizer())
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    shapes = [np.shape(v) for v in leaves]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    flat = np.empty(int(offsets[-1]), np.float32)
    per_round = EVERY * BATCH
    seconds = []
    for e in range(epochs):
        perm = np.random.default_rng(1000 * e + rank).permutation(len(x))
        dist.barrier()
        t = time.perf_counter()
        for r in range(len(x) // per_round):
            idx = perm[r * per_round:(r + 1) * per_round]
            batches = {"x": x[idx].reshape(EVERY, BATCH, -1), "y": y[idx].reshape(EVERY, BATCH)}
            state, (losses, _) = steps(state, batches)
            for i, v in enumerate(jax.tree_util.tree_leaves(state.params)):  # one bucket
                flat[offsets[i]:offsets[i + 1]] = np.asarray(v).ravel()
            dist.all_reduce(torch.from_numpy(flat))
            flat /= world
            params = [jax.numpy.asarray(flat[offsets[i]:offsets[i + 1]].reshape(s))
                      for i, s in enumerate(shapes)]
            state = state._replace(params=jax.tree_util.tree_unflatten(treedef, params))
        dist.barrier()
        seconds.append(time.perf_counter() - t)
    if rank == 0:
        print(json.dumps(seconds), flush=True)
    dist.destroy_process_group()


def ddp(world: int, epochs: int, per_worker: int) -> list[float] | None:
    """Samples/s per epoch of ``ddp-<world>`` (``None`` without torch)."""
    import importlib.util
    import socket
    import subprocess

    if importlib.util.find_spec("torch") is None:
        print('ddp baseline skipped: torch is not installed (pip install -e ".[bench]")')
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--ddp-rank",
                               str(r), str(world), str(port), "--epochs", str(epochs),
                               "--samples-per-worker", str(per_worker)],
                              env=env, stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=_DDP_TIMEOUT_S)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"ddp-{world} failed (exit codes {[p.returncode for p in procs]})")
    seconds = json.loads(outs[0].strip().splitlines()[-1])
    return [world * (per_worker // (EVERY * BATCH)) * EVERY * BATCH / t for t in seconds]


def whole_fits(tr, ds, extra: int, pairs: int = 1) -> list[float]:
    """Samples/s over whole ``fit`` calls, epoch ends included, for each of ``pairs``
    pairs: a fit of ``1 + extra`` epochs minus a fit of 1 (start-up and compilation
    cancel out)."""
    rates = []
    for _ in range(pairs):
        t = time.perf_counter()
        short = tr.fit(ds, epochs=1, verbose=False)
        t_short = time.perf_counter() - t
        t = time.perf_counter()
        long = tr.fit(ds, epochs=1 + extra, verbose=False)
        t_long = time.perf_counter() - t
        samples = sum(h["samples"] for h in long) - sum(h["samples"] for h in short)
        rates.append(samples / (t_long - t_short))
    return rates


def with_daskdl(x, y, workers: int, epochs: int, sync: str = "auto",
                pairs: int = 1) -> tuple[list[float], float, list[float]]:
    t0 = time.perf_counter()
    with cluster_config():
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    with cluster, Client(cluster) as client:
        ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=EVERY * BATCH)
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optimizer(),
                         policy=ddl.BSP(every=EVERY), batch_size=BATCH, client=client,
                         sync=sync) as tr:
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            hist = tr.fit(ds, epochs=epochs)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            wall = sum(h["seconds"] for h in hist)
            used = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            print(f"  daskdl-{workers}: client+scheduler process used {100 * used / wall:.0f}% "
                  "of a core during fit")
            steady = tr.rounds[len(tr.rounds) // 2:]
            med = {k: 1e3 * statistics.median(r[k] for r in steady)
                   for k in ("data_s", "compute_s", "sync_s", "wait_s")}
            print(f"  daskdl-{workers}: median ms per round: " +
                  ", ".join(f"{k[:-2]} {v:.1f}" for k, v in med.items()))
            startup = (hist[0]["seconds"] + (time.perf_counter() - t0)
                       - sum(h["seconds"] for h in hist))
            whole = whole_fits(tr, ds, epochs, pairs)
    return [h["samples"] / h["seconds"] for h in hist], startup, whole


def _browser():
    """Headless Debian Chromium under selenium (``pip install selenium``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not os.path.exists(path):
            sys.exit(f"--dashboard needs {path}: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def _cpu_seconds(procs) -> float:
    """User + system CPU seconds of ``procs`` (psutil processes; ended ones count 0)."""
    import contextlib

    import psutil

    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def dashboard_overhead(x, y, epochs: int, repeats: int, browser_nice: int = 0) -> dict:
    """Samples/s per epoch with the ``/daskdl`` page open vs closed, fits alternating."""
    import psutil

    driver = _browser()
    browser = psutil.Process(driver.service.process.pid)
    me = psutil.Process()
    rates: dict = {"closed": [], "open": []}
    try:
        with cluster_config():
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")
        with cluster, Client(cluster) as client:
            page = client.dashboard_link.rsplit("/", 1)[0] + "/daskdl"
            ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=EVERY * BATCH)
            with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optimizer(),
                             policy=ddl.BSP(every=EVERY), batch_size=BATCH,
                             client=client) as tr:
                tr.fit(ds, epochs=1, verbose=False)  # compilation, not measured
                for i in range(2 * repeats):
                    state = ("closed", "open")[i % 2]
                    if state == "open":
                        driver.get(page)
                        while not driver.execute_script(
                                "return !!(window.Bokeh && Bokeh.documents.length)"):
                            time.sleep(0.2)
                    else:
                        driver.get("about:blank")
                    time.sleep(2.0)  # the page's server session starts or ends
                    procs = [browser, *browser.children(recursive=True)]
                    if browser_nice:
                        for p in procs:
                            p.nice(browser_nice)
                    c0, m0, t0 = _cpu_seconds(procs), _cpu_seconds([me]), time.perf_counter()
                    hist = tr.fit(ds, epochs=epochs, verbose=False)
                    wall = time.perf_counter() - t0
                    cpu_browser = 100 * (_cpu_seconds(procs) - c0) / wall
                    cpu_me = 100 * (_cpu_seconds([me]) - m0) / wall
                    got = [h["samples"] / h["seconds"] for h in hist]
                    rates[state].extend(got)
                    print(f"  fit {i + 1}, page {state:6s}: samples/s per epoch "
                          f"{[round(r) for r in got]}; CPU (% of a core): chromium "
                          f"{cpu_browser:.0f}, client+scheduler {cpu_me:.0f}", flush=True)
    finally:
        driver.quit()
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples-per-worker", type=int, default=16 * EVERY * BATCH)
    p.add_argument("--dashboard", action="store_true",
                   help="throughput with the /daskdl page open vs closed (2 workers)")
    p.add_argument("--repeats", type=int, default=3,
                   help="with --dashboard: fits with the page open (and as many closed)")
    p.add_argument("--browser-nice", type=int, default=0,
                   help="with --dashboard: nice value of the browser (19: as if elsewhere)")
    p.add_argument("--no-ddp", action="store_true", help="skip the ddp-2 baseline")
    p.add_argument("--pairs", type=int, default=3,
                   help="short/long fit pairs for the whole-fit figures (their median)")
    p.add_argument("--sync", default="auto", choices=("auto", "scheduler", "sharded"),
                   help="Trainer(sync=...) of the daskdl runs (default: auto)")
    p.add_argument("--shared-memory", default="auto", choices=("auto", "false"),
                   help="config daskdl.shared-memory of the daskdl runs (false: pieces "
                        "over Dask's comm between these same-host workers)")
    p.add_argument("--ddp-rank", nargs=3, type=int, metavar=("RANK", "WORLD", "PORT"),
                   help=argparse.SUPPRESS)  # one process of the ddp baseline
    a = p.parse_args()
    if a.ddp_rank:
        ddp_rank(*a.ddp_rank, a.epochs, a.samples_per_worker)
        return
    x2, y2 = make_data(2 * a.samples_per_worker)
    if a.dashboard:
        rates = dashboard_overhead(x2, y2, a.epochs, a.repeats, a.browser_nice)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k in ("closed", "open"):
            print(f"page {k:6s}: median samples/s {med[k]:8.0f}  ({len(rates[k])} epochs)")
        print(f"ratio open / closed = {med['open'] / med['closed']:.3f}  (target >= 0.98)")
        return
    x1, y1 = x2[:a.samples_per_worker], y2[:a.samples_per_worker]

    if a.pairs < 1:
        p.error("--pairs must be at least 1")
    rates_plain = plain(x1, y1, a.epochs)
    rates_ddp = None if a.no_ddp else ddp(2, 1 + a.epochs, a.samples_per_worker)
    with dask.config.set({"daskdl.shared-memory": a.shared_memory != "false"}):
        rates_1, start_1, pairs_1 = with_daskdl(x1, y1, 1, a.epochs, a.sync, a.pairs)
        rates_2, start_2, pairs_2 = with_daskdl(x2, y2, 2, a.epochs, a.sync, a.pairs)
    rates_plain_after = plain(x1, y1, a.epochs)

    med = {k: statistics.median(v) for k, v in
           {"plain": rates_plain[1:] + rates_plain_after[1:], "daskdl-1": rates_1[1:],
            "daskdl-2": rates_2[1:]}.items()}
    print(f"{'run':10s} {'samples/s (median of steady epochs)':>36s}  all epochs")
    for k, v in zip(med, (rates_plain + rates_plain_after, rates_1, rates_2)):
        print(f"{k:10s} {med[k]:36.0f}  {[round(r) for r in v]}")
    print(f"plain loop first {statistics.median(rates_plain[1:]):.0f}, after the daskdl runs "
          f"{statistics.median(rates_plain_after[1:]):.0f} samples/s (the baseline: both)")
    print(f"one-off start-up + first epoch: daskdl-1 {start_1:.1f}s, daskdl-2 {start_2:.1f}s")
    print(f"ratio daskdl-1 / plain    = {med['daskdl-1'] / med['plain']:.3f}  (target >= 0.97)")
    print(f"ratio daskdl-2 / daskdl-1 = {med['daskdl-2'] / med['daskdl-1']:.3f}  (target >= 1.8)")
    whole_1, whole_2 = statistics.median(pairs_1), statistics.median(pairs_2)
    print(f"whole fits (long minus short fit, epoch ends included; median of {a.pairs} "
          f"pairs): daskdl-1 {whole_1:.0f} {[round(r) for r in pairs_1]}, "
          f"daskdl-2 {whole_2:.0f} {[round(r) for r in pairs_2]} samples/s")
    print(f"first pair alone: whole-fit daskdl-1 / plain = {pairs_1[0] / med['plain']:.3f}, "
          f"daskdl-2 / daskdl-1 = {pairs_2[0] / pairs_1[0]:.3f}")
    print(f"whole-fit ratio daskdl-1 / plain    = {whole_1 / med['plain']:.3f}  (target >= 0.97)")
    print(f"whole-fit ratio daskdl-2 / daskdl-1 = {whole_2 / whole_1:.3f}  (target >= 1.8)")
    if rates_ddp is not None:
        ddp_2 = statistics.median(rates_ddp[1:])
        print(f"ddp-2 (2 processes, gloo all_reduce every {EVERY} steps, no coordinator): "
              f"{ddp_2:.0f} samples/s  {[round(r) for r in rates_ddp]}")
        print(f"ratio ddp-2 / plain       = {ddp_2 / med['plain']:.3f}  (this machine's "
              "ceiling for 2 processes)")
        print(f"whole-fit ratio daskdl-2 / ddp-2 = {whole_2 / ddp_2:.3f}")


if __name__ == "__main__":
    main()
