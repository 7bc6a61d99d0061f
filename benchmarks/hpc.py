"""Digits training on a LocalCluster vs a SLURMCluster (2 jobs of 1 core).

    python benchmarks/hpc.py [--epochs 10]

Needs a running SLURM (``.ci/slurm-up.sh`` starts a one-node one on Debian).  For
each cluster it reports the time from creating the cluster to 2 connected workers,
and training samples/s (median of the epochs after the first); then the ratios
SLURM / local.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import optax
from distributed import Client, LocalCluster
from sklearn.datasets import load_digits

import daskdl as ddl
from daskdl import hpc
from daskdl.workerenv import cluster_config

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from examples.digits import accuracy, init_mlp, loss_fn  # noqa: E402


def run(make_cluster, train, test, epochs):
    t0 = time.perf_counter()
    cluster = make_cluster()
    with cluster, Client(cluster) as client:
        if hasattr(cluster, "scale") and not isinstance(cluster, LocalCluster):
            cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=300)
        start = time.perf_counter() - t0
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                         policy=ddl.BSP(every=4), batch_size=32, client=client) as tr:
            hist = tr.fit(train, epochs=epochs)
            acc = tr.evaluate(test, accuracy)["accuracy"]
    rate = statistics.median(h["samples"] / h["seconds"] for h in hist[1:])
    return start, rate, acc


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args()
    d = load_digits()
    train, test = ddl.Dataset.from_arrays(x=(d.data / 16).astype(np.float32),
                                          y=d.target.astype(np.int32)).split(0.8, seed=0)

    def local():
        with cluster_config():
            return LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")

    def slurm():
        from dask_jobqueue import SLURMCluster

        return SLURMCluster(cores=1, memory="2GB", processes=1, walltime="00:20:00",
                            scheduler_options={"dashboard_address": ":0"},
                            log_directory=tempfile.mkdtemp(),
                            **hpc.jobqueue_kwargs(compile_cache=tempfile.mkdtemp()))

    res = {"LocalCluster": run(local, train, test, a.epochs),
           "SLURMCluster": run(slurm, train, test, a.epochs)}
    for k, (start, rate, acc) in res.items():
        print(f"{k:13s} start {start:6.2f} s   {rate:8.0f} samples/s   test accuracy {acc:.3f}")
    (s0, r0, _), (s1, r1, _) = res["LocalCluster"], res["SLURMCluster"]
    print(f"ratio start-up SLURM / local = {s1 / s0:.2f}")
    print(f"ratio samples/s SLURM / local = {r1 / r0:.3f}")


if __name__ == "__main__":
    main()
