"""Security end to end: no key bytes anywhere a run leaves traces, and a TLS-only cluster.

Real process clusters: the session's ``client2`` (key scans) and a fresh cluster whose
scheduler, workers, client and dashboard speak only TLS (``Security.temporary()``).
"""

from __future__ import annotations

import base64
import os
import ssl
import urllib.request

import cloudpickle
import jax
import optax
import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.security import Security

import daskdl as ddl
from daskdl.checkpoint import list_checkpoints, load_latest
from daskdl.workerenv import cluster_config

from .conftest import accuracy, init_mlp, loss_fn

RAW = bytes(range(7, 39))
PASSPHRASE = "tr0ub4dor and 3 more words"


class SpecRecorder(SchedulerPlugin):
    """Keeps every task spec the scheduler holds, pickled and as text."""

    name = "spec-recorder"

    def __init__(self):
        self.blobs: list[bytes] = []
        self.seen: set = set()

    def update_graph(self, scheduler, **kwargs):
        for key, ts in list(scheduler.tasks.items()):
            if key in self.seen or ts.run_spec is None:
                continue
            self.seen.add(key)
            try:
                self.blobs.append(cloudpickle.dumps(ts.run_spec))
            except Exception:  # noqa: BLE001 - a spec that cannot be pickled is still text
                pass
            self.blobs.append(repr(ts.run_spec).encode())


def forms(secret) -> list[bytes]:
    """Every way the key's bytes could be written down."""
    b = secret if isinstance(secret, bytes) else secret.encode()
    return [b, b.hex().encode(), b.hex().upper().encode(), base64.b64encode(b),
            base64.urlsafe_b64encode(b), base64.b64encode(b).rstrip(b"="), repr(secret).encode()]


def http_get(url: str, context=None) -> bytes:
    with urllib.request.urlopen(url, timeout=30, context=context) as r:
        assert r.status == 200
        return r.read()


@pytest.mark.parametrize("kind", ["raw", "passphrase", "file-ref", "callable-ref"])
def test_no_key_bytes_in_task_specs_logs_reprs_metrics_or_files(kind, client2, digits,
                                                                 tmp_path):
    keydir, out = tmp_path / "keys", tmp_path / "out"
    keydir.mkdir(mode=0o700)
    out.mkdir()
    secret = {"raw": RAW, "passphrase": PASSPHRASE, "file-ref": RAW,
              "callable-ref": PASSPHRASE}[kind]
    (keydir / "key").write_text(RAW.hex() if kind == "file-ref" else PASSPHRASE)
    keyfile = str(keydir / "key")
    key = {"raw": RAW, "passphrase": PASSPHRASE, "file-ref": f"file:{keyfile}",
           "callable-ref": lambda: open(keyfile).read()}[kind]

    scheduler = client2.cluster.scheduler
    recorder = SpecRecorder()
    scheduler.add_plugin(recorder, name=f"spec-recorder-{kind}")
    try:
        x, y = digits
        ds = ddl.Dataset.from_arrays(x=x[:1200], y=y[:1200], chunk_size=300).share(
            str(out / "data.zarr"), key=key, client=client2)
        ds = ddl.Dataset.from_zarr(str(out / "data.zarr"), key=key)
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                         policy=ddl.BSP(every=4), batch_size=32, client=client2,
                         checkpoint=str(out / "ck")) as tr:
            tr.fit(ds, epochs=1, verbose=False)
            assert 0 <= tr.evaluate(ds, accuracy)["accuracy"] <= 1
            base = client2.dashboard_link.rsplit("/", 1)[0]
            texts = [http_get(base + "/metrics"), http_get(base + "/daskdl"),
                     repr(tr).encode(), tr._repr_html_().encode() if hasattr(tr, "_repr_html_")
                     else b""]
        assert list_checkpoints(str(out / "ck"))  # the checkpoint is keyed by the share's key
        assert load_latest(str(out / "ck"), key=key)["meta"]["epoch"] == 1
        with pytest.raises(ddl.DaskDLError) as wrong:
            ddl.Dataset.from_zarr(str(out / "data.zarr"),
                                  key=os.urandom(32) if kind != "passphrase" else "nope")
    finally:
        scheduler.remove_plugin(name=f"spec-recorder-{kind}")
    assert recorder.blobs, "no task spec was recorded"
    texts += recorder.blobs
    texts += [repr(ds).encode(), ds._repr_html_().encode(), repr(ds._zarr.store).encode(),
              repr(ds._zarr.store._key).encode(), repr(ds._key).encode(),
              str(wrong.value).encode()]
    texts += [line.encode() for _, line in client2.get_scheduler_logs()]
    texts += [line.encode() for lines in client2.get_worker_logs().values() for _, line in lines]
    for root, _, files in os.walk(out):
        texts += [open(os.path.join(root, f), "rb").read() for f in files]
    leaks = [(form, i) for form in forms(secret) for i, t in enumerate(texts) if form in t]
    assert not leaks, f"key bytes found in {len(leaks)} places, e.g. {leaks[:3]}"


@pytest.mark.timeout(300)
def test_tls_only_cluster_fits_evaluates_shares_checkpoints_and_serves_https(
        digits, tmp_path, monkeypatch):
    sec = Security.temporary()
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o700)
    for name, pem in (("cert.pem", sec.tls_scheduler_cert), ("key.pem", sec.tls_scheduler_key),
                      ("ca.pem", sec.tls_ca_file)):
        (certs / name).write_text(pem)
    monkeypatch.setenv("DASKDL_TLS_TEST_KEY", RAW.hex())  # inherited by the workers
    import dask

    with dask.config.set({"distributed.scheduler.dashboard.tls.cert": str(certs / "cert.pem"),
                          "distributed.scheduler.dashboard.tls.key": str(certs / "key.pem")}):
        with cluster_config():
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   protocol="tls://", security=sec, dashboard_address=":0")
        with cluster, Client(cluster, security=sec, set_as_default=False) as client:
            assert cluster.scheduler_address.startswith("tls://")
            assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])
            x, y = digits
            ds = ddl.Dataset.from_arrays(x=x[:1200], y=y[:1200], chunk_size=300).share(
                str(tmp_path / "d.zarr"), key="env:DASKDL_TLS_TEST_KEY", client=client)
            with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                             policy=ddl.BSP(every=4), batch_size=32, client=client,
                             checkpoint=str(tmp_path / "ck")) as tr:
                tr.fit(ds, epochs=2, verbose=False)
                assert tr.evaluate(ds, accuracy)["accuracy"] > 0.3  # chance: 0.1
                port = cluster.scheduler.http_server.port
                ctx = ssl.create_default_context(cadata=sec.tls_ca_file)
                ctx.check_hostname = False  # the temporary certificate names no host
                page = http_get(f"https://127.0.0.1:{port}/daskdl", ctx)
                metrics = http_get(f"https://127.0.0.1:{port}/metrics", ctx).decode()
                with pytest.raises(Exception):  # plain http is not served
                    http_get(f"http://127.0.0.1:{port}/metrics")
    assert b"<html" in page.lower() or b"bokeh" in page.lower()
    assert "daskdl_" in metrics
    ck = load_latest(str(tmp_path / "ck"), key="env:DASKDL_TLS_TEST_KEY")
    assert ck["meta"]["epoch"] == 2
