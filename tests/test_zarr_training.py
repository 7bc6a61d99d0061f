"""Training from Zarr stores and other Dask sources, on real process clusters."""

import os
import threading
import time

import dask
import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zarr
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.workerenv import cluster_config

from .conftest import accuracy, init_mlp, loss_fn


def fit_digits(client, ds, epochs=8, seed=0, **kw):
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.BSP(every=4), batch_size=32, client=client, seed=seed,
                     **kw) as tr:
        tr.fit(ds, epochs=epochs)
        return tr.params, tr.evaluate(ds, accuracy)["accuracy"], tr


def test_store_written_by_plain_zarr(client2, digits, tmp_path):
    x, y = digits
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_array("images", data=x, chunks=(200, 64))
    g.create_array("labels", data=y, chunks=(200,))
    ds = ddl.Dataset.from_zarr(str(tmp_path / "plain.zarr"), x="images", y="labels")
    assert ds._zarr is not None  # training workers read the store themselves
    _, acc, tr = fit_digits(client2, ds)
    assert acc > 0.9
    # the rounds carried no chunk data: they read it on the worker
    assert all(r["samples"] > 0 for r in tr.rounds)


@pytest.mark.parametrize("fmt", [2, 3])
def test_store_written_by_xarray(client2, digits, tmp_path, fmt):
    xr = pytest.importorskip("xarray")
    x, y = digits
    path = str(tmp_path / f"xr{fmt}.zarr")
    xr.Dataset({"x": (("sample", "pixel"), x), "y": (("sample",), y)}).chunk(
        {"sample": 300}).to_zarr(path, zarr_format=fmt, consolidated=False)
    ds = ddl.Dataset.from_zarr(path, x="x", y="y")
    assert ds.chunks[0] == 300
    _, acc, _ = fit_digits(client2, ds)
    assert acc > 0.9


def test_encrypted_store_trains_and_is_deterministic_per_seed(client2, digits, tmp_path):
    x, y = digits
    key = os.urandom(32)
    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=150).share(str(tmp_path / "e.zarr"),
                                                                  key=key)
    p1, acc, _ = fit_digits(client2, ds, epochs=3, seed=4)
    p2, _, _ = fit_digits(client2, ddl.Dataset.from_zarr(str(tmp_path / "e.zarr"), key=key),
                          epochs=3, seed=4)
    p3, _, _ = fit_digits(client2, ds, epochs=3, seed=5)
    l1, l2, l3 = (jax.tree_util.tree_leaves(p) for p in (p1, p2, p3))
    assert all(np.array_equal(a, b) for a, b in zip(l1, l2))
    assert not all(np.array_equal(a, b) for a, b in zip(l1, l3))
    assert acc > 0.8


def test_key_reference_share_trains_and_tampering_fails_the_fit(client2, digits, tmp_path):
    """Workers resolve a ``file:`` key reference themselves; a chunk deleted after the
    store was opened fails training with an error naming the array and the chunk."""
    x, y = digits
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))
    key = f"file:{keyfile}"
    path = str(tmp_path / "ref.zarr")
    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=300).share(path, key=key, client=client2)
    assert ds._zarr.store._key == ddl.KeyRef(key)  # only the reference is in the rounds
    _, acc, _ = fit_digits(client2, ds, epochs=3)
    assert acc > 0.8
    opened = ddl.Dataset.from_zarr(path, key=key)
    victim = sorted(os.listdir(os.path.join(path, "y", "c")))[2]
    os.remove(os.path.join(path, "y", "c", victim))
    with pytest.raises(ddl.ChunkAuthenticationError,
                       match=rf"chunk '{victim}' of array 'y' is missing"):
        fit_digits(client2, opened, epochs=1)


@pytest.mark.parametrize("sync", ["scheduler", "sharded"])
def test_any_dask_source_trains(client2, digits, sync):
    """Sharded too: a round waits for its shard owners outside the thread pool, so a
    worker can compute the graph chunk another worker waits for (a deadlock before)."""
    x, y = digits
    parts = [dask.delayed(lambda a: a)(x[i:i + 300]) for i in range(0, 1500, 300)]
    lazy_x = da.concatenate([da.from_delayed(p, (300, 64), np.float32) for p in parts])
    ds = ddl.Dataset({"x": lazy_x, "y": da.from_array(y[:1500], chunks=300)})
    ds = ds.map(lambda b: {"x": b["x"] * 1.0, "y": b["y"]})  # a lazily preprocessed graph
    _, acc, tr = fit_digits(client2, ds, sync=sync)
    assert acc > 0.9 and tr.sync == sync


def test_persisted_chunks_are_trained_where_they_live(client2, digits):
    x, y = digits
    n = 1600
    workers = sorted(client2.scheduler_info()["workers"])
    xs, ys = [], []
    for i in range(8):  # 4 chunks on each worker
        w = workers[i % 2]
        fx, fy = client2.scatter([x[i * 200:(i + 1) * 200], y[i * 200:(i + 1) * 200]],
                                 workers=[w], hash=False)
        xs.append(da.from_delayed(fx, (200, 64), np.float32))
        ys.append(da.from_delayed(fy, (200,), np.int32))
    ds = ddl.Dataset({"x": da.concatenate(xs), "y": da.concatenate(ys)}).arrays
    ds = ddl.Dataset({k: client2.persist(v) for k, v in ds.items()})
    time.sleep(0.5)
    client2.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.BSP(every=4), batch_size=32, client=client2) as tr:
        hist = tr.fit(ds, epochs=3)  # training only: evaluation may move data as it likes
        moved = client2.run(
            lambda dask_worker: [t["keys"] for t in dask_worker.transfer_incoming_log])
    assert sum(len(v) for v in moved.values()) == 0, moved
    assert len(ds) == n and hist[-1]["samples"] == n


@pytest.mark.timeout(600)
def test_bigger_than_memory_store_trains_with_bounded_worker_memory(tmp_path):
    """A Zarr store 4x a worker's memory limit trains to the end."""
    import psutil  # noqa: F401  (distributed depends on it)

    limit = 1000 * 2**20
    rows, width, chunk = 4 * limit // (1024 * 4) + 1024, 1024, 1024
    x = (da.random.default_rng(0).integers(0, 8, (rows, width), chunks=(chunk, width))
         .astype(np.float32) / 8)
    raw = ddl.Dataset({"x": x}).map(
        lambda b: {"x": b["x"], "y": (b["x"][:, :8].sum(1) > 3.5).astype(np.int32)})
    assert raw["x"].nbytes >= 4 * limit

    with cluster_config():
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=limit,
                               dashboard_address=":0")
    with cluster, Client(cluster, set_as_default=False) as client:
        ds = raw.share(str(tmp_path / "big.zarr"), client=client)
        peak = {}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for w, rss in client.run(
                        lambda: __import__("psutil").Process().memory_info().rss).items():
                    peak[w] = max(peak.get(w, 0), rss)
                stop.wait(0.2)

        def lin_loss(p, batch):
            logits = batch["x"] @ p["w"] + p["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with ddl.Trainer(lin_loss, {"w": jnp.zeros((width, 2)), "b": jnp.zeros(2)},
                         optax.adam(1e-3), policy=ddl.BSP(every=4), batch_size=256,
                         client=client) as tr:
            hist = tr.fit(ds, epochs=1)
            logs = client.get_worker_logs()
        stop.set()
        watcher.join()
    assert hist[0]["samples"] >= rows - 2 * 256
    assert hist[0]["loss"] < 0.65  # ln 2 = 0.69 at the start
    assert peak and max(peak.values()) < 0.8 * limit, {w: v / 2**20 for w, v in peak.items()}
    assert not any("Pausing worker" in line for lines in logs.values() for _, line in lines)
