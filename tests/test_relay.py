"""Relayed syncs (daskdl.relay): one scheduler message per group of workers and round."""

from __future__ import annotations

import os
import signal
import time

import dask
import jax
import numpy as np
import optax
import pytest
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.relay import group_size, relay_group_setting, relay_groups
from daskdl.workerenv import cluster_config

from .conftest import init_mlp, loss_fn


def _fit(client, digits, policy, relay, epochs=2, **testing):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:1024], y=y[:1024], chunk_size=128)
    cfg = {"daskdl.relay-group": relay}
    cfg.update({f"daskdl.testing.{k}": v for k, v in testing.items()})
    with dask.config.set(cfg):
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(1e-2),
                         policy=policy, batch_size=16, client=client, seed=0) as tr:
            hist = tr.fit(ds, epochs=epochs, verbose=False)
            leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(tr.params)]
            return hist, leaves, tr.info()


@pytest.mark.parametrize("policy", [ddl.BSP(every=1), ddl.EASGD(every=2),
                                    ddl.DiLoCo(every=2)], ids=lambda p: p.name)
def test_relayed_syncs_give_the_same_params_as_direct_ones(client2, digits, policy):
    """The relay's batch is checked, counted and merged like direct syncs: the same
    parameters bit for bit (EASGD: a reply per rank), with one scheduler message per
    round instead of one per worker."""
    hist, direct, info = _fit(client2, digits, policy, 1)
    rounds = sum(h["rounds"] for h in hist)
    assert info["metrics"]["sync_messages"] == 2 * rounds
    assert info["metrics"]["relayed_syncs"] == 0
    _, relayed, info = _fit(client2, digits, policy, 2)
    assert info["metrics"]["sync_messages"] == rounds  # one batch of 2 syncs per round
    assert info["metrics"]["relayed_syncs"] == 2 * rounds
    assert info["aborted"] is None and info["generation"] == 0
    merges = [h["clock"] for h in info["history"] if h["kind"] == "merge"]
    assert merges == list(range(rounds))
    for a, b in zip(direct, relayed):
        np.testing.assert_array_equal(a, b)


def test_a_sync_whose_relay_failed_after_delivering_it_is_answered_once(client2, digits):
    """A relay that fails after the scheduler counted a sync (simulated at clocks 3 and
    7 of rank 1): the worker sends it again, marked ``resent``; the scheduler answers it
    without counting it twice, and training ends where an undisturbed run does."""
    _, direct, _ = _fit(client2, digits, ddl.BSP(every=1), 1)
    hist, relayed, info = _fit(client2, digits, ddl.BSP(every=1), 2,
                               **{"lose-relay-reply": {1: [3, 7]}})
    rounds = sum(h["rounds"] for h in hist)
    assert info["metrics"]["relayed_syncs"] == 2 * rounds
    assert info["metrics"]["sync_messages"] == rounds + 2  # the two sent again
    assert info["metrics"]["ranks"][1]["rounds"] == rounds  # counted once each
    merges = [h["clock"] for h in info["history"] if h["kind"] == "merge"]
    assert merges == list(range(rounds))
    for a, b in zip(direct, relayed):
        np.testing.assert_array_equal(a, b)


def test_policies_that_are_not_lockstep_never_relay(client2, digits):
    """SSP and Async let workers run apart: a relay would hold the fast ones back."""
    for policy in (ddl.SSP(every=1, staleness=2), ddl.Async(every=1)):
        hist, _, info = _fit(client2, digits, policy, 2, epochs=1)
        assert info["metrics"]["relayed_syncs"] == 0
        assert info["metrics"]["sync_messages"] == 2 * sum(h["rounds"] for h in hist)


def test_relay_groups_keep_hosts_together_and_sizes_even():
    w = ("tcp://10.0.0.2:1", "tcp://10.0.0.1:5", "tcp://10.0.0.2:2", "tcp://10.0.0.1:6",
         "tcp://10.0.0.3:1")
    groups = relay_groups(w, 2)
    # host order: ranks 1, 3 (10.0.0.1), 0, 2 (10.0.0.2), 4 (10.0.0.3); 3 groups of <= 2
    assert groups[1] == groups[3] == (w[1], (1, 3))
    assert groups[0] == groups[2] == (w[0], (0, 2))
    assert 4 not in groups  # alone in its group: syncs with the scheduler itself
    assert relay_groups(w, 1) == {} and relay_groups(w[:1], 4) == {}
    big = relay_groups(tuple(f"tcp://h{i // 4}:{i}" for i in range(64)), 8)
    sizes = {len(g) for _, g in big.values()}
    assert sizes == {8} and len({a for a, _ in big.values()}) == 8


def test_relay_group_size_and_config():
    assert group_size("auto", 2, 10_000, True) == 1  # few workers: direct
    assert group_size("auto", 8, 10_000, True) == 1
    assert group_size("auto", 16, 10_000, True) == 4
    assert group_size("auto", 500, 10_000, True) == 23
    assert group_size("auto", 64, 100 << 20, True) == 1  # large model: bytes would hop twice
    assert group_size(8, 64, 100 << 20, True) == 8
    assert group_size(8, 64, 10_000, False) == 1  # SSP, Async: never
    assert relay_group_setting("auto") == "auto" and relay_group_setting("4") == 4
    for bad in (0, -1, "many", 2.5, True):
        with pytest.raises(ValueError, match="daskdl.relay-group must be 'auto' or a positive"):
            relay_group_setting(bad)


def test_a_relay_that_dies_mid_training(digits):
    """SIGKILL the relay of a 3-worker BSP run (every=1): its group's workers send their
    syncs to the scheduler, the run re-plans for the 2 left (who relay again) and ends
    with every round merged once, in order, and no run aborted."""
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:1152], y=y[:1152], chunk_size=64)
    with cluster_config():
        cluster = LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    with cluster, Client(cluster, set_as_default=False) as client, \
            dask.config.set({"daskdl.relay-group": 3}):
        pids = client.run(os.getpid)
        relay = sorted(pids)[0]  # rank 0: the first worker of the only group
        state = {"killed": False, "rounds": 0}

        def cb(r):
            state["rounds"] += 1
            if not state["killed"] and state["rounds"] >= 20:
                os.kill(pids[relay], signal.SIGKILL)
                state["killed"] = True

        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                         policy=ddl.BSP(every=1), batch_size=16, client=client,
                         sync_timeout=60) as tr:
            t0 = time.monotonic()
            hist = tr.fit(ds, epochs=3, verbose=False, callbacks=[cb])
            seconds = time.monotonic() - t0
            info = tr.info()
    assert state["killed"] and len(hist) == 3
    # nobody waited out Dask's 30 s connect timeout on the dead relay (relay.RELAY_CONNECT_S)
    assert seconds < 30, seconds
    assert info["aborted"] is None and info["generation"] >= 1
    assert relay not in info["members"].values()
    merges = [h["clock"] for h in info["history"] if h["kind"] == "merge"]
    assert merges == sorted(set(merges)) and merges[-1] == len(merges) - 1
    assert info["metrics"]["relayed_syncs"] > 0
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(tr.params))
