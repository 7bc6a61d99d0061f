"""Throughput of daskdl against a plain single-process JAX loop.

    python benchmarks/throughput.py [--epochs 4] [--samples-per-worker 16384]

One MLP (784-512-512-10, batch 128, SGD with momentum) on synthetic
teacher-labelled data, measured in one invocation:

* ``plain``: a single-process loop of the same compiled 16-step ``lax.scan``,
  pinned to one core;
* ``daskdl-1``: daskdl with 1 worker, ``BSP(every=16)``;
* ``daskdl-2``: daskdl with 2 workers, ``BSP(every=16)``.

Samples/s are medians over the steady epochs (the first epoch, with worker
start-up and compilation, is reported apart).  Prints the ratios
``daskdl-1 / plain`` (target >= 0.97) and ``daskdl-2 / daskdl-1`` (target >= 1.8).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

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


def with_daskdl(x, y, workers: int, epochs: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    with cluster_config():
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    with cluster, Client(cluster) as client:
        ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=EVERY * BATCH)
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optimizer(),
                         policy=ddl.BSP(every=EVERY), batch_size=BATCH, client=client) as tr:
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
    startup = hist[0]["seconds"] + (time.perf_counter() - t0) - sum(h["seconds"] for h in hist)
    return [h["samples"] / h["seconds"] for h in hist], startup


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples-per-worker", type=int, default=16 * EVERY * BATCH)
    a = p.parse_args()
    x2, y2 = make_data(2 * a.samples_per_worker)
    x1, y1 = x2[:a.samples_per_worker], y2[:a.samples_per_worker]

    rates_plain = plain(x1, y1, a.epochs)
    rates_1, start_1 = with_daskdl(x1, y1, 1, a.epochs)
    rates_2, start_2 = with_daskdl(x2, y2, 2, a.epochs)

    med = {k: statistics.median(v[1:]) for k, v in
           {"plain": rates_plain, "daskdl-1": rates_1, "daskdl-2": rates_2}.items()}
    print(f"{'run':10s} {'samples/s (median of steady epochs)':>36s}  all epochs")
    for k, v in zip(med, (rates_plain, rates_1, rates_2)):
        print(f"{k:10s} {med[k]:36.0f}  {[round(r) for r in v]}")
    print(f"one-off start-up + first epoch: daskdl-1 {start_1:.1f}s, daskdl-2 {start_2:.1f}s")
    print(f"ratio daskdl-1 / plain    = {med['daskdl-1'] / med['plain']:.3f}  (target >= 0.97)")
    print(f"ratio daskdl-2 / daskdl-1 = {med['daskdl-2'] / med['daskdl-1']:.3f}  (target >= 1.8)")


if __name__ == "__main__":
    main()
