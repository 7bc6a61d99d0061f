"""A real 2-worker training while a second client sends malformed and hostile
messages to every handler: the run finishes bit-identical to an undisturbed run."""

import logging
import threading
import urllib.request

import jax
import numpy as np
import optax
import pytest
from distributed import Client

import daskdl as ddl
from daskdl import protocol

from .conftest import init_mlp, loss_fn

pytestmark = pytest.mark.timeout(240)


def fuzz_messages(run: str, secret: str) -> list:
    """(handler, kwargs) pairs, each of which must change nothing.  About half carry
    the run's secret, with a malformed field; the others are hostile: well formed,
    without the secret."""
    huge = np.zeros(2_000_000, np.float32)  # 8 MB, far more than the model
    wrong = "0" * 32
    bad_values = [None, "abc", -1, 10**15, 1.5, [1, 2], {"a": 1}, ""]
    out = []
    for h in protocol.HANDLERS:
        out += [(h, {}), (h, {"run": 5}), (h, {"run": "x" * 500}), (h, {"run": "nope"}),
                (h, {"run": run, "secret": wrong}), (h, {"run": run, "secret": 7})]
    sync = dict(run=run, secret=secret, rank=0, clock=10**9, gen=0, samples=32,
                version=0, params=[np.zeros(3, np.float32)], loss=0.5, compute=0.01)
    for field in ("rank", "clock", "gen", "samples", "version", "loss", "compute"):
        for v in bad_values:
            out.append((protocol.SYNC, dict(sync, **{field: v})))
    for params in ("notalist", [huge], [np.full(5, np.nan)], [], None, [[1, 2]]):
        out.append((protocol.SYNC, dict(sync, params=params)))
        out.append((protocol.SYNC, dict(sync, params=params, clock=-3)))
    for rank in (1, 2, 99):  # hostile: plausible clocks, no secret
        for clock in (0, 1, 5, 50):
            out.append((protocol.SYNC, dict(sync, rank=rank, clock=clock, secret=wrong,
                                            params=[np.zeros(3, np.float32)])))
    for v in bad_values:
        if v == 10**15:  # a far clock is a valid regroup for the run's own client
            v = -(10**15)
        out += [(protocol.REGROUP, dict(run=run, secret=secret, members={"0": "a"}, clock=v)),
                (protocol.REGROUP, dict(run=run, secret=secret, members=v, clock=3)),
                (protocol.CHECKPOINT_META, dict(run=run, secret=secret, clock=v, meta={})),
                (protocol.PARAMS, dict(run=run, secret=wrong, rank=v)),
                (protocol.LOCATIONS, dict(keys=v))]
    for h in (protocol.ABORT, protocol.FREEZE, protocol.END, protocol.CHECKPOINT_FLUSH):
        out.append((h, dict(run=run, secret=wrong, reason="hostile")))
        out.append((h, dict(run=run, reason="hostile")))
        out.append((h, dict(run="someone-else", secret=secret, reason="hostile")))
    out += [(protocol.REGROUP, dict(run=run, secret=wrong, members={"0": "a"}, clock=3)),
            (protocol.START, dict(run=run, secret=wrong, params=[], policy=None,
                                  members={"0": "a"}, timeout=1)),
            (protocol.START, dict(run=run, secret=secret, params="x", policy=None,
                                  members={"0": 5}, timeout="soon")),
            (protocol.CHECKPOINT_META, dict(run=run, secret=secret, clock=10**12, meta={}))]
    return out


def train(client, x, y, callbacks=()):
    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=200)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.BSP(every=2), batch_size=16, client=client, seed=3) as tr:
        tr.fit(ds, epochs=5, verbose=False, callbacks=callbacks)
        return jax.tree_util.tree_leaves(tr.params), tr.info()


def test_malformed_and_hostile_messages_change_nothing(client2, digits, caplog):
    x, y = digits
    x, y = x[:1200], y[:1200]
    reference, _ = train(client2, x, y)

    other = Client(client2.scheduler.address, set_as_default=False)
    metrics_url = client2.dashboard_link.replace("/status", "/metrics")
    state = {"replies": [], "metrics": [], "thread": None, "error": None, "during": 0,
             "fit_done": False}

    def attack(run, secret):
        try:
            for i, (handler, kwargs) in enumerate(fuzz_messages(run, secret)):
                state["replies"].append(
                    (handler, other.sync(getattr(other.scheduler, handler), **kwargs)))
                state["during"] += not state["fit_done"]
                if i % 25 == 0:
                    with urllib.request.urlopen(metrics_url, timeout=10) as r:
                        state["metrics"].append(r.status)
        except Exception as e:  # reported by the test below
            state["error"] = e

    def on_round(r):
        if state["thread"] is None:  # the run exists on the scheduler now
            tr = on_round.trainer
            state["thread"] = threading.Thread(target=attack, args=(tr.run, tr._secret))
            state["thread"].start()

    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=200)
    caplog.set_level(logging.INFO)
    try:
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                         policy=ddl.BSP(every=2), batch_size=16, client=client2,
                         seed=3) as tr:
            on_round.trainer = tr
            tr.fit(ds, epochs=5, verbose=False, callbacks=[on_round])
            state["fit_done"] = True
            state["thread"].join(60)
            disturbed, info = jax.tree_util.tree_leaves(tr.params), tr.info()
            secret = tr._secret
    finally:
        other.close()

    assert state["error"] is None, state["error"]
    assert state["during"] >= 200  # sent while the run trained
    read_only = (protocol.INFO, protocol.LOCATIONS)  # answer anyone, change nothing
    accepted = [(h, rep) for h, rep in state["replies"] if h not in read_only
                and rep.get("status") not in ("refused", "replan")]
    assert not accepted, accepted[:3]
    assert state["metrics"] and set(state["metrics"]) == {200}
    assert info["rejected"] == 0 and info["generation"] == 0 and not info["lost"]
    for a, b in zip(reference, disturbed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for rec in caplog.records:
        assert not (rec.levelno >= logging.ERROR and rec.exc_info), rec.getMessage()
        assert secret not in rec.getMessage()
