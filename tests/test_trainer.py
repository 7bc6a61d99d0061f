"""End-to-end training on real process clusters, with real JAX compilation."""

import dask
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from distributed import get_task_stream

import daskdl as ddl
from daskdl.plan import make_plan
from daskdl.protocol import RoundSpec
from daskdl.replica import gather_batches

from .conftest import accuracy, apply_mlp, init_mlp, loss_fn


def test_one_worker_bsp_equals_plain_optax_on_the_same_batches(client1, digits):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:600], y=y[:600], chunk_size=100)
    params0 = init_mlp(jax.random.PRNGKey(1))
    opt = optax.adam(1e-2)
    every, bs, seed, epochs = 3, 32, 5, 2
    with ddl.Trainer(loss_fn, params0, opt, policy=ddl.BSP(every=every), batch_size=bs,
                     client=client1, seed=seed) as tr:
        tr.fit(ds, epochs=epochs)
        got = tr.params

    # the same batches, by hand, trained one optax step at a time
    params, state = params0, opt.init(params0)

    @jax.jit
    def step(params, state, batch):
        g = jax.grad(loss_fn)(params, batch)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    for e in range(epochs):
        plan = make_plan(ds.chunks, 1, bs, every, seed, e, owners=[0] * ds.nchunks)
        for r in range(plan.rounds):
            segs = plan.round_segments(0, r)
            chunks = list(dict.fromkeys(s.chunk for s in segs))
            spec = RoundSpec(run="ref", fit=1, gen=0, epoch=e, round=r, rank=0, clock=0,
                             first_clock=0, steps=plan.round_steps(r), batch_size=bs,
                             segments=tuple((s.chunk, s.start, s.stop, s.epoch) for s in segs),
                             chunks=tuple(chunks), names=("x", "y"), timeout=1.0)
            blocks = [ds.block(c)[n] for c in chunks for n in ("x", "y")]
            batches = gather_batches(seed, spec, blocks)
            for k in range(spec.steps):
                params, state = step(params, state, {n: v[k] for n, v in batches.items()})
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_workers_bsp_every_1_whole_shard_equals_full_batch_gradient_descent(client2):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    y = (x @ rng.standard_normal(5) + 0.1).astype(np.float32)
    params0 = {"w": np.zeros(5, np.float32), "b": np.zeros((), np.float32)}

    def mse(p, batch):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=100)  # 2 equal chunks
    with ddl.Trainer(mse, params0, optax.sgd(0.1), policy=ddl.BSP(every=1), batch_size=100,
                     client=client2) as tr:
        tr.fit(ds, epochs=6)
        got = tr.params
    p = {k: jnp.asarray(v) for k, v in params0.items()}
    for _ in range(6):
        g = jax.grad(mse)(p, {"x": x, "y": y})
        p = jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g)
    np.testing.assert_allclose(got["w"], p["w"], atol=1e-5)
    np.testing.assert_allclose(got["b"], p["b"], atol=1e-5)


def _train_digits(client, x, y, seed, epochs=2):
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.BSP(every=4), batch_size=32, client=client, seed=seed) as tr:
        hist = tr.fit(ds, epochs=epochs)
        return tr.params, hist, tr


def test_same_seed_same_cluster_size_is_bit_identical(client2, digits):
    x, y = digits
    p1, h1, _ = _train_digits(client2, x, y, seed=0)
    p2, h2, _ = _train_digits(client2, x, y, seed=0)
    p3, _, _ = _train_digits(client2, x, y, seed=1)
    l1, l2, l3 = (jax.tree_util.tree_leaves(p) for p in (p1, p2, p3))
    assert all(np.array_equal(a, b) for a, b in zip(l1, l2))
    assert not all(np.array_equal(a, b) for a, b in zip(l1, l3))
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]


def test_fit_history_coverage_rounds_and_tasks(client2, digits):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=150)
    with get_task_stream(client=client2) as ts, \
            dask.config.set({"daskdl.rounds-per-task": 4}):
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                         policy=ddl.BSP(every=5), batch_size=32, client=client2) as tr:
            hist = tr.fit(ds, epochs=2)
            hist += tr.fit(ds, epochs=1)  # a second fit continues the numbering
            info = tr.info()
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    n, w = len(ds), 2
    steps = (n // w) // 32
    for h in hist:
        assert set(h) >= {"epoch", "loss", "samples", "seconds", "rounds"}
        assert h["samples"] == steps * 32 * w  # every worker took every step
        assert n - h["samples"] < w * 32  # remainder below one batch per worker
        assert h["rounds"] == -(-steps // 5)
        assert np.isfinite(h["loss"]) and h["seconds"] > 0
    assert hist[-1]["loss"] < hist[0]["loss"]
    # one compilation for full rounds, one more for the shorter last round
    last = {}
    for r in tr.rounds:
        last[r["worker"]] = r["compiles"]
    assert set(last.values()) == {2 if steps % 5 else 1}
    # rounds run as named tasks of rounds-per-task rounds, pinned to their rank's worker
    per, R = 4, hist[0]["rounds"]
    keys = {}
    for t in ts.data:
        if str(t["key"]).startswith("daskdl-round-"):
            keys[t["key"]] = t["worker"]
    assert len(keys) == (-(-2 * R // per) + -(-R // per)) * w  # fits of 2 and 1 epochs
    rank_worker = {r["rank"]: r["worker"] for r in tr.rounds}
    assert len(set(rank_worker.values())) == 2
    for key, worker in keys.items():
        assert worker == rank_worker[int(key.rsplit("-", 1)[1])]
    assert info["version"] == hist[-1]["rounds"]  # the last fit's merges
    assert set(info["clocks"].values()) == {3 * hist[0]["rounds"]}


def test_evaluate_and_predict_match_local_computation(client2, digits):
    x, y = digits
    train, test = ddl.Dataset.from_arrays(x=x, y=y).split(0.8, seed=0)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     batch_size=32, client=client2) as tr:
        tr.fit(train, epochs=3)
        params = tr.params
        got = tr.evaluate(test, accuracy)
        pred = tr.predict(test, apply_mlp)
        assert pred.chunks[0] == test.chunks
        pred = client2.compute(pred).result()
    xt, yt = test["x"].compute(), test["y"].compute()
    want = float((apply_mlp(params, xt).argmax(-1) == yt).mean())
    assert abs(got["accuracy"] - want) < 1e-6
    np.testing.assert_allclose(pred, apply_mlp(params, xt), rtol=1e-5, atol=1e-5)
    assert got["accuracy"] > 0.8


def test_trainer_uses_the_default_client(client2, digits):
    with client2.as_current():
        tr = ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1))
    assert tr.client is client2
    tr.close()


def test_trainer_without_client_starts_and_closes_its_own_cluster(digits):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:400], y=y[:400])
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(1e-2),
                     batch_size=32) as tr:
        client = tr.client
        assert len(client.scheduler_info()["workers"]) >= 1
        env = ddl.worker_environment(client)
        assert all(e["malloc_trim_threshold"] is None for e in env.values())
        tr.fit(ds, epochs=1)
    assert client.status == "closed"


# -- bad input gets a clear error ------------------------------------------------------------
def test_batch_size_larger_than_shard(client2):
    ds = ddl.Dataset.from_arrays(x=np.zeros((100, 64), np.float32), y=np.zeros(100, np.int32))
    tr = ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1), batch_size=64,
                     client=client2)
    with pytest.raises(ddl.DatasetError, match="batch_size=64 is larger than each worker's share"):
        tr.fit(ds)
    tr.close()


def test_loss_returning_a_non_scalar(client2):
    ds = ddl.Dataset.from_arrays(x=np.zeros((100, 64), np.float32), y=np.zeros(100, np.int32))

    def bad_loss(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(p, batch["x"]), batch["y"])

    with ddl.Trainer(bad_loss, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1), batch_size=8,
                     client=client2) as tr:
        with pytest.raises(TypeError, match=r"loss_fn must return a scalar.*shape \(8,\)"):
            tr.fit(ds)


def test_loss_with_metrics_dict_is_accepted(client2, digits):
    x, y = digits

    def loss_with_aux(p, batch):
        logits = apply_mlp(p, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"acc": (logits.argmax(-1) == batch["y"]).mean()}

    ds = ddl.Dataset.from_arrays(x=x[:500], y=y[:500])
    with ddl.Trainer(loss_with_aux, init_mlp(jax.random.PRNGKey(0)), optax.adam(1e-2),
                     batch_size=16, client=client2) as tr:
        tr.fit(ds, epochs=1)
        assert "acc" in tr.rounds[-1]["metrics"]


def test_params_not_a_pytree_of_arrays():
    with pytest.raises(TypeError, match="not an array"):
        ddl.Trainer(loss_fn, {"w": "zeros"}, optax.sgd(0.1), client=object())
    with pytest.raises(TypeError, match="at least one leaf"):
        ddl.Trainer(loss_fn, None, optax.sgd(0.1), client=object())


def test_other_constructor_errors():
    p = {"w": np.zeros(2)}
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        ddl.Trainer(loss_fn, p, "adam", client=object())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ddl.Trainer(loss_fn, p, optax.sgd(0.1), batch_size=0, client=object())
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        ddl.Trainer(3, p, optax.sgd(0.1), client=object())
    with pytest.raises(TypeError, match="daskdl policy"):
        ddl.Trainer(loss_fn, p, optax.sgd(0.1), policy="bsp", client=object())


def test_metric_fn_returning_a_non_dict(client2, digits):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:200], y=y[:200])
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1),
                     client=client2) as tr:
        with pytest.raises(TypeError, match="metric_fn must return a dict of scalars"):
            tr.evaluate(ds, lambda p, b: (apply_mlp(p, b["x"]).argmax(-1) == b["y"]).mean())
        with pytest.raises(TypeError, match="must be a scalar"):
            tr.evaluate(ds, lambda p, b: {"pred": apply_mlp(p, b["x"]).argmax(-1)})


def test_nan_loss_raises_training_diverged_and_keeps_last_finite_params(client2):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype(np.float32) * 10
    y = rng.standard_normal(256).astype(np.float32)

    def mse(p, batch):
        return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)

    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=64)
    tr = ddl.Trainer(mse, {"w": np.zeros(4, np.float32)}, optax.sgd(5.0),
                     policy=ddl.BSP(every=1), batch_size=32, client=client2)
    with pytest.raises(ddl.TrainingDiverged) as info:
        tr.fit(ds, epochs=50)
    err = info.value
    assert err.worker in client2.scheduler_info()["workers"]
    assert f"epoch {err.epoch}, round {err.round}" in str(err)
    assert "learning rate" in str(err)
    w = tr.params["w"]
    assert np.isfinite(w).all() and np.abs(w).max() > 0  # trained, and never merged a NaN
    assert tr.info()["aborted"]
    tr.close()


def test_a_round_that_starts_early_waits_for_the_rounds_before_it(client1):
    """Rounds do not depend on each other; a later round that starts first secedes and
    waits, so rounds still sync in clock order."""
    import time

    rng = np.random.default_rng(0)
    ds = ddl.Dataset.from_arrays(x=rng.standard_normal((64, 64)).astype(np.float32),
                                 y=rng.integers(0, 10, 64).astype(np.int32), chunk_size=32)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.01),
                     policy=ddl.BSP(every=1), batch_size=16, client=client1) as tr:
        from daskdl.fitloop import FitLoop, FitStart
        from daskdl.trainer import _progress_bar

        loop = FitLoop(client1, tr._fit_config(), FitStart(tr._leaves, 0, 0, [], 1), ds, 1,
                       [], _progress_bar(0, False), tr._place)
        loop.start()  # places the data, plans the epoch, starts the run on the scheduler
        (args, kw), _ = loop.round_task(0, [(0, 1, 1)])
        late = client1.submit(*args, **kw)
        time.sleep(1.0)
        assert late.status == "pending"  # started, waiting for round 0
        (args, kw), _ = loop.round_task(0, [(0, 0, 0)])
        early = client1.submit(*args, **kw)
        (r0,), (r1,) = early.result(timeout=60), late.result(timeout=60)
        assert (r0["version"], r1["version"]) == (1, 2)
        arrivals = [h["clock"] for h in tr.info()["history"] if h["kind"] == "arrive"]
        assert arrivals == [0, 1]


def test_progress_bar_and_callbacks(client2, digits, capsys):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    seen = []
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.BSP(every=4), batch_size=32, client=client2) as tr:
        hist = tr.fit(ds, epochs=2, callbacks=[seen.append])
        err = capsys.readouterr().err
        assert "daskdl fit" in err and "round" in err
        assert len(seen) == sum(h["rounds"] for h in hist) * 2
        assert {"rank", "epoch", "round", "loss", "samples", "wait_s", "compute_s"} <= set(seen[0])
        for rank in (0, 1):
            clocks = [r["clock"] for r in seen if r["rank"] == rank]
            assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)
        tr.fit(ds, epochs=1, verbose=False, callbacks=lambda r: None)
        assert "daskdl fit" not in capsys.readouterr().err
        with pytest.raises(TypeError, match="callbacks must be functions"):
            tr.fit(ds, callbacks=[1])


def test_html_reprs(client2, digits, tmp_path):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    html = ds._repr_html_()
    assert "1797 samples" in html and "numpy arrays" in html and "float32" in html
    enc = ds.share(str(tmp_path / "e.zarr"), key="pw")._repr_html_()
    assert "Zarr store" in enc and "encrypted" in enc
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.SSP(every=4, staleness=1), client=client2) as tr:
        assert "not trained yet" in tr._repr_html_()
        tr.fit(ds, epochs=1, verbose=False)
        html = tr._repr_html_()
    assert "SSP(s=1), every 4" in html and "1 epochs, last loss" in html
    assert "<td>workers</td><td>2</td>" in html


def test_barrier_time_shows_in_dask_fine_performance_metrics(client2, digits):
    import time

    x, y = digits
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.BSP(every=4), batch_size=32, client=client2) as tr:
        tr.fit(ddl.Dataset.from_arrays(x=x, y=y), epochs=1, verbose=False)

    def metrics(dask_scheduler=None):
        return {k[2]: v for k, v in dask_scheduler.cumulative_worker_metrics.items()
                if len(k) == 4 and k[:2] == ("execute", "daskdl-round") and k[3] == "seconds"}

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # workers report with their heartbeats
        got = client2.run_on_scheduler(metrics)
        if got.get("daskdl-sync", 0) > 0 and got.get("daskdl-data", 0) > 0:
            break
        time.sleep(0.5)
    assert got.get("daskdl-sync", 0) > 0 and got.get("daskdl-data", 0) > 0, got
