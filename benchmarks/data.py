"""Training throughput from memory, from a compressed Zarr store, and from an encrypted one.

    python benchmarks/data.py [--epochs 4] [--samples-per-worker 32768]

The throughput benchmark's MLP (784-512-512-10, batch 128 per worker, SGD with
momentum, ``BSP(every=16)``) on 2 workers, trained from:

(a) the dataset in worker memory (numpy input, scattered once: the baseline);
(b) a Zarr store on disk written by ``Dataset.share`` with zstd;
(c) the same store encrypted and authenticated (``share(..., key=...)``: AES-256-GCM
    chunks checked against the authenticated manifest; the workers get a key
    derived for this store);
(d) as (c), with a key reference (``key="env:NAME"``): each worker resolves and
    derives the key itself, nothing secret in the task specs.

The data are image-like (pixel values k/255, stored as float32).  Samples/s are
medians of the epochs after the first; prints the ratios b/a, c/a and d/a (target
>= 0.95: loading hidden behind compute), the stores' sizes and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import statistics
import tempfile

import jax
import numpy as np
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.workerenv import cluster_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as tp  # noqa: E402  (the same model and loss)


def image_like(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (n, 784)) / 255).astype(np.float32)
    teacher = tp.init_mlp(jax.random.PRNGKey(123))
    y = np.asarray(tp.apply_mlp(teacher, x - 0.5).argmax(-1)).astype(np.int32)
    return x, y


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def rates(client, ds, epochs):
    with ddl.Trainer(tp.loss_fn, tp.init_mlp(jax.random.PRNGKey(0)), tp.optimizer(),
                     policy=ddl.BSP(every=tp.EVERY), batch_size=tp.BATCH, client=client) as tr:
        hist = tr.fit(ds, epochs=epochs)
        steady = tr.rounds[len(tr.rounds) // epochs:]
        data_ms = 1e3 * statistics.median(r["data_s"] for r in steady)
    return [h["samples"] / h["seconds"] for h in hist], data_ms


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples-per-worker", type=int, default=16 * tp.EVERY * tp.BATCH)
    p.add_argument("--compressor", default="zstd", help="zstd (default), lz4, blosc, gzip")
    a = p.parse_args()
    x, y = image_like(2 * a.samples_per_worker)
    tmp = tempfile.mkdtemp(prefix="daskdl-bench-")
    os.environ["DASKDL_BENCH_KEY"] = os.urandom(32).hex()  # inherited by the workers
    load = os.getloadavg()
    try:
        with cluster_config():
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
        with cluster, Client(cluster) as client:
            mem = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=tp.EVERY * tp.BATCH)
            plain = mem.share(os.path.join(tmp, "plain.zarr"), compressor=a.compressor,
                              client=client)
            enc = mem.share(os.path.join(tmp, "enc.zarr"), compressor=a.compressor,
                            key=os.urandom(32), client=client)
            ref = mem.share(os.path.join(tmp, "ref.zarr"), compressor=a.compressor,
                            key="env:DASKDL_BENCH_KEY", client=client)
            runs = {"(a) memory": mem, "(b) zarr": plain, "(c) zarr+AES-GCM+auth": enc,
                    "(d) (c), key reference": ref}
            out = {name: rates(client, ds, a.epochs) for name, ds in runs.items()}
        raw = x.nbytes + y.nbytes
        sizes = {"(b) zarr": du(os.path.join(tmp, "plain.zarr")),
                 "(c) zarr+AES-GCM+auth": du(os.path.join(tmp, "enc.zarr"))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v[0][1:]) for k, v in out.items()}
    print(f"{'source':24s} {'samples/s':>10s} {'data ms/round':>14s}  all epochs")
    for k, (r, data_ms) in out.items():
        print(f"{k:24s} {med[k]:10.0f} {data_ms:14.2f}  {[round(v) for v in r]}")
    for k, size in sizes.items():
        print(f"store {k}: {size / 2**20:.1f} MiB for {raw / 2**20:.1f} MiB of data "
              f"(compression ratio {raw / size:.2f})")
    a_ = med["(a) memory"]
    print(f"compressor: {a.compressor}")
    print(f"ratio b/a = {med['(b) zarr'] / a_:.3f}  (target >= 0.95)")
    print(f"ratio c/a = {med['(c) zarr+AES-GCM+auth'] / a_:.3f}  (target >= 0.95)")
    print(f"ratio d/a = {med['(d) (c), key reference'] / a_:.3f}  (target >= 0.95)")
    print(f"load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
