"""The cost of coordination: no bubble at epoch boundaries."""

import jax
import numpy as np
import optax
import pytest

import daskdl as ddl

from .conftest import init_mlp, loss_fn


def test_no_bubble_at_epoch_boundaries(client2, digits):
    """The next epoch's rounds are queued before the current epoch ends: the gap
    between the last merge of an epoch and the first of the next stays below one
    round's time beyond a typical gap (from the plugin's timestamps)."""
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:1024], y=y[:1024], chunk_size=128)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                     policy=ddl.BSP(every=2), batch_size=16, client=client2) as tr:
        tr.fit(ds, epochs=1, verbose=False)  # compiles
        tr.fit(ds, epochs=6, verbose=False)
        history = tr.info()["history"]
    R = 1024 // 2 // 16 // 2  # rounds per epoch
    merges = [h for h in history if h["kind"] == "merge"]
    assert [m["clock"] for m in merges] == list(range(R, 7 * R))
    t = {m["clock"]: m["time"] for m in merges}
    gaps = np.diff([t[c] for c in sorted(t)])
    typical = float(np.median(gaps))
    boundary = [t[c] - t[c - 1] for c in sorted(t) if c % R == 0 and c - 1 in t]
    assert len(boundary) == 5
    assert float(np.median(boundary)) < 2 * typical, (boundary, typical)


def test_auto_rounds_per_task_grows_tasks_for_short_rounds(client2, digits):
    """Under ``rounds-per-task: auto`` (the default) short rounds go in long tasks:
    far fewer round tasks than rounds, every round still run, merged once in order
    and reported (its metrics, its coverage)."""
    import dask
    from distributed import get_task_stream

    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:1024], y=y[:1024], chunk_size=128)
    assert dask.config.get("daskdl.rounds-per-task") == "auto"
    with get_task_stream(client=client2) as ts, \
            dask.config.set({"daskdl.task-seconds": "0.3s"}):
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                         policy=ddl.BSP(every=1), batch_size=16, client=client2) as tr:
            hist = tr.fit(ds, epochs=8, verbose=False)
            history = tr.info()["history"]
            rounds = list(tr.rounds)
            coverage = tr.coverage
            seen = []  # with a callback, tasks keep 4 rounds (called soon after each)
            tr.fit(ds, epochs=1, verbose=False, callbacks=[seen.append])
            run = tr.run
    R = 1024 // 2 // 16  # rounds per epoch and worker
    assert [h["rounds"] for h in hist] == [R] * 8
    merges = [h["clock"] for h in history if h["kind"] == "merge"]
    assert merges == list(range(8 * R))
    assert sorted((r["rank"], r["clock"]) for r in rounds) == \
        [(rank, c) for rank in range(2) for c in range(8 * R)]
    assert all(sum(c.values()) == 1024 for c in coverage.values())
    tasks = {t["key"] for t in ts.data if str(t["key"]).startswith("daskdl-round-")}
    last = {k for k in tasks if k.startswith(f"daskdl-round-{run}-8-")}
    assert len(seen) == 2 * R and len(last) == 2 * (R // 4), sorted(last)
    tasks -= last
    # the first tasks hold 4 rounds; once a round's time is known (~ms here) they grow
    assert len(tasks) < 2 * 8 * R / 8, len(tasks)


def test_rounds_per_task_config_is_checked():
    import dask

    from daskdl.trainer import _rounds_per_task

    assert _rounds_per_task("auto") is None and _rounds_per_task(None) is None
    assert _rounds_per_task(16) == 16 and _rounds_per_task("3") == 3
    for bad in (0, -2, "many", 2.5):
        with pytest.raises(ValueError, match="rounds-per-task must be 'auto' or a positive"):
            _rounds_per_task(bad)
    with dask.config.set({"daskdl.rounds-per-task": "lots"}):
        with pytest.raises(ValueError, match="not 'lots'"):
            ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                        batch_size=16, client=None)
    with dask.config.set({"daskdl.task-seconds": "0s"}):
        with pytest.raises(ValueError, match="task-seconds must be a positive duration"):
            ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                        batch_size=16, client=None)


def test_epoch_seconds_come_from_the_rounds_end_times(client2, digits):
    """Tasks span several epochs (``rounds-per-task: auto``), so the client hears of an
    epoch's end late; an epoch's ``seconds`` is the time from the end of the epoch
    before to the end of its last round, on the workers' clocks, and the epochs of a
    fit add up to no more than the fit took."""
    import time

    import dask

    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:1024], y=y[:1024], chunk_size=128)
    with dask.config.set({"daskdl.task-seconds": "0.3s"}):
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                         policy=ddl.BSP(every=1), batch_size=16, client=client2) as tr:
            tr.fit(ds, epochs=1, verbose=False)  # compiles
            n0 = len(tr.rounds)
            t0 = time.time()
            hist = tr.fit(ds, epochs=6, verbose=False)
            wall = time.time() - t0
            rounds = tr.rounds[n0:]
    ends = [max(r["finished"] for r in rounds if r["epoch"] == h["epoch"]) for h in hist]
    assert all(h["seconds"] > 0 for h in hist)
    for h, before, end in zip(hist[1:], ends, ends[1:]):
        assert h["seconds"] == pytest.approx(end - before, abs=1e-9), (h, before, end)
    # the first epoch counts from the fit's start (a moment after t0: the fit's set-up)
    assert ends[0] - t0 - 0.5 < hist[0]["seconds"] <= ends[0] - t0
    assert sum(h["seconds"] for h in hist) <= wall
