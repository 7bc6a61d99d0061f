"""Sharded synchronisation: shard maps and owners (pure), and real clusters where the
workers exchange shards and the scheduler plugin holds no parameter bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from distributed import Client
from distributed.utils_test import gen_cluster

import daskdl as ddl
from daskdl import protocol
from daskdl.errors import DaskDLError
from daskdl.policies import Contribution, Merged, Policy, no_state
from daskdl.protocol import ProtocolError
from daskdl.shards import (AUTO_SHARDED_BYTES, MergeEntry, Owner, ShardMap, Spec, check_sync,
                           choose_sync, join_states, specs_of, split_state)

from .conftest import init_mlp, loss_fn
from .test_policies_cluster import train


# -- shard maps and owners, without a cluster ------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shard_map_cuts_every_leaf_into_n_pieces_and_puts_them_back(n):
    rng = np.random.default_rng(n)
    leaves = [rng.normal(size=s).astype(np.float32) for s in [(7, 3), (2,), (), (4, 4, 2)]]
    leaves.append(np.arange(11, dtype=np.int32))
    m = ShardMap(specs_of(leaves), n)
    shards = [m.pieces(leaves, j) for j in range(n)]
    for j, pieces in enumerate(shards):
        assert [p.shape for p in pieces] == [s.shape for s in m.piece_specs(j)]
    # every element in exactly one piece, sizes differ by at most one
    for i, x in enumerate(leaves):
        sizes = [shards[j][i].size for j in range(n)]
        assert sum(sizes) == x.size and max(sizes) - min(sizes) <= 1
    back = m.assemble(shards)
    for a, b in zip(back, leaves):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    # each owner holds 1/n of the bytes (within one element per leaf)
    total = sum(x.nbytes for x in leaves)
    assert all(abs(m.nbytes(j) - total / n) <= 4 * len(leaves) for j in range(n))


@pytest.mark.parametrize("make", [lambda: optax.adam(1e-3), lambda: optax.sgd(0.7, momentum=0.9)])
def test_a_policy_state_splits_into_shards_and_joins_back(make):
    leaves = [np.ones((5, 3), np.float32), np.arange(4, dtype=np.float32)]
    opt = make()
    state = jax.tree_util.tree_map(np.asarray, opt.init(leaves))
    # make it non-trivial: one step
    _, state = opt.update([np.full_like(x, 0.5) for x in leaves], state, leaves)
    state = jax.tree_util.tree_map(np.asarray, state)
    m = ShardMap(specs_of(leaves), 3)
    parts = [split_state(state, specs_of(leaves), m, j) for j in range(3)]
    # a shard's state is what init + update over the shard's pieces would give
    opt_j = opt.init(m.pieces(leaves, 1))
    assert jax.tree_util.tree_structure(parts[1]) == jax.tree_util.tree_structure(opt_j)
    back = join_states(parts, specs_of(leaves))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _owner(policy, shard, version=0):
    return Owner(policy, 0, 0, shard, version, specs_of(shard))


def test_an_owner_merges_in_version_order_as_the_whole_model_would():
    policy = ddl.SSP(every=1, staleness=1)
    shard = [np.zeros(4, np.float32)]
    owner = _owner(policy, shard)
    owner.put(0, 0, [np.full(4, 1.0, np.float32)], delta=True)
    owner.put(1, 0, [np.full(4, 3.0, np.float32)], delta=True)
    entries = [MergeEntry(1, ((1, 0, 8, 0, None),), (0, 1)),
               MergeEntry(2, ((0, 0, 8, 0, None),), (0, 1))]
    owner.catch_up(entries, upto=1)  # only what was asked
    assert owner.version == 1
    np.testing.assert_array_equal(owner.shard[0], np.full(4, 1.5, np.float32))
    owner.catch_up(entries, upto=5)
    assert owner.version == 2
    np.testing.assert_array_equal(owner.shard[0], np.full(4, 2.0, np.float32))
    owner.catch_up(entries, upto=5)  # applied once
    np.testing.assert_array_equal(owner.shard[0], np.full(4, 2.0, np.float32))
    # the same merges over the whole model
    whole = policy.merge((), [np.zeros(4, np.float32)],
                         [Contribution(1, [np.full(4, 3.0, np.float32)], 8, 0)],
                         ddl.policies.SyncInfo(0, (0, 1)))
    assert whole.params[0][0] == 1.5


def test_an_owner_refuses_a_gap_and_names_a_missing_update():
    owner = _owner(ddl.BSP(every=1), [np.zeros(2, np.float32)])
    with pytest.raises(DaskDLError, match="cannot be applied before 1"):
        owner.catch_up([MergeEntry(2, ((0, 0, 1, 0, None),), (0,))], upto=2)
    with pytest.raises(DaskDLError, match="rank 0 after round 3 never came"):
        owner.catch_up([MergeEntry(1, ((0, 3, 1, 0, None),), (0,))], upto=1)
    assert owner.version == 0  # nothing applied


def test_an_owner_names_the_pieces_a_merge_still_waits_for():
    owner = _owner(ddl.BSP(every=1), [np.zeros(2, np.float32)])
    entries = [MergeEntry(1, ((0, 0, 1, 0, None), (1, 0, 1, 0, None)), (0, 1))]
    owner.put(0, 0, [np.ones(2, np.float32)], delta=False)
    assert owner.missing(entries, 1) == [(1, 0)]
    assert owner.missing(entries, 0) == []  # nothing asked
    owner.refuse(1, 0, "piece 0 is float64[2], expected float32[2]")
    with pytest.raises(DaskDLError, match="rank 1 after round 0 was refused: piece 0"):
        owner.missing(entries, 1)
    with pytest.raises(DaskDLError, match="was refused"):
        owner.catch_up(entries, 1)
    assert owner.version == 0
    other = _owner(ddl.BSP(every=1), [np.zeros(2, np.float32)])
    other.retire()
    assert other.missing([], 1) == []
    with pytest.raises(DaskDLError, match="never came .a new generation started"):
        other.missing(entries, 1)


def _local_exchange(shards: int):
    """An Exchange (BSP, 2 members) owning shard 0 of one 4-float leaf cut in
    ``shards``, with no cluster behind it (call from a running event loop)."""
    from daskdl.exchange import Exchange

    class _Worker:
        address = "tcp://127.0.0.1:1"
        loop = None

    ex = Exchange(_Worker(), ddl.BSP(every=1))
    smap = ShardMap(specs_of([np.zeros(4, np.float32)]), shards)
    ex.set_owner((0, 0), ("a", "b"), smap,
                 _owner(ddl.BSP(every=1), [np.zeros(4 // shards, np.float32)]))
    return ex


def test_the_exchange_merges_once_a_piece_on_its_way_comes():
    """The plugin may log a merge before a piece reaches its owner (a worker sends its
    pieces and its arrival at once): the exchange waits for the piece, merges, and
    fails at once when the piece was refused."""
    import asyncio

    async def main():
        ex = _local_exchange(shards=1)
        try:
            entries = [MergeEntry(1, ((0, 0, 8, 0, None), (1, 0, 8, 0, None)), (0, 1))]
            ex.put_local(0, 0, [np.full(4, 1.0, np.float32)], False)
            task = asyncio.ensure_future(ex.catch_up(ex.owner, entries, 1, {"timeout": 30}))
            await asyncio.sleep(0.05)
            assert not task.done() and ex.owner.version == 0  # waits for rank 1's piece
            ex.put_local(1, 0, [np.full(4, 3.0, np.float32)], False)
            await asyncio.wait_for(task, 5)
            assert ex.owner.version == 1
            np.testing.assert_array_equal(ex.owner.shard[0], np.full(4, 2.0, np.float32))
            # a refused piece: the waiting merge fails at once, not after the timeout
            entries.append(MergeEntry(2, ((0, 1, 8, 1, None), (1, 1, 8, 1, None)), (0, 1)))
            task = asyncio.ensure_future(ex.catch_up(ex.owner, entries, 2, {"timeout": 30}))
            await asyncio.sleep(0.05)
            ex.owner.refuse(1, 1, "wrong shape")
            ex._signal()
            with pytest.raises(DaskDLError, match="rank 1 after round 1 was refused"):
                await asyncio.wait_for(task, 5)
            # a piece that never comes: named after the timeout
            with pytest.raises(DaskDLError, match="rank 0 after round 1 never came"):
                await ex.catch_up(ex.owner, [MergeEntry(2, ((0, 1, 8, 1, None),), (0, 1))],
                                  2, {"timeout": 0.1})
            assert ex.owner.version == 1
        finally:
            ex.pool.shutdown(wait=False)

    asyncio.run(main())


def test_a_put_answer_carries_the_shard_and_a_bad_one_is_dropped():
    """The answer to the put that completes a round holds the sender's shard (kept
    as a push is, taken for the merge the plugin logs); an answer that cannot be
    read is dropped (the member then asks the owner), and one in a file this worker
    cannot map makes its later puts to that owner ask for answers over the comm."""
    import asyncio

    async def main():
        ex = _local_exchange(shards=2)
        try:
            logged = [MergeEntry(1, ((0, 0, 8, 0, 0.5), (1, 0, 8, 0, 0.5)), (0, 1))]
            shard = [np.full(2, 5.0, np.float32)]
            good = {"status": "OK", "merged": logged[0].to_msg(), "pieces": shard,
                    "center": None}
            ex.keep_answer((0, 0), 1, good, "b")
            got = await ex.take(1, (0, 0), 1, logged, 0)
            np.testing.assert_array_equal(got[0][0], shard[0])
            assert got[1] is None and ex.stats["taken"] == 1 and not ex.no_shm_replies
            assert ex.stats["answered"] == 1
            # not shaped like shard 1, or another generation: nothing kept, nothing raised
            ex.keep_answer((0, 0), 1, dict(good, pieces=[np.zeros(3, np.float32)]), "b")
            ex.keep_answer((0, 1), 1, good, "b")
            assert 1 not in ex.inbox and not ex.no_shm_replies
            # a file this worker cannot open: dropped, and that owner answers over the comm
            from daskdl import shm

            ex.shm_in = shm.Inbox(enabled=True)
            ref = {"shm": "daskdl-1-abcdef01-0-1", "seq": 1, "arrays": [["<f4", [2], 64]]}
            ex.keep_answer((0, 0), 1, dict(good, pieces=ref), "b")
            assert 1 not in ex.inbox and ex.no_shm_replies == {"b"}
            assert ex.stats["answered"] == 1
        finally:
            ex.pool.shutdown(wait=False)

    asyncio.run(main())


def test_an_owner_merges_a_round_ahead_and_keeps_it_only_for_the_same_merge():
    """Under a group policy an owner holding every member's piece of a round merges
    it ahead; the result becomes the shard only when the plugin logs that very merge
    (same contributions, same order, same version), else the logged merge runs."""
    def owners():
        a, b = (_owner(ddl.BSP(every=1), [np.zeros(4, np.float32)]) for _ in range(2))
        for o in (a, b):
            o.put(0, 0, [np.full(4, 1.0, np.float32)], False, (8, 0, 0.5))
            o.put(1, 0, [np.full(4, 4.0, np.float32)], False, (24, 0, 0.25))
        return a, b

    full = MergeEntry(1, ((0, 0, 8, 0, 0.5), (1, 0, 24, 0, 0.25)), (0, 1), pin=True)
    ahead, plain = owners()
    entry, shard, replies = ahead.speculate(0, (0, 1))
    assert entry.version == 1 and entry.contributions == full.contributions and not replies
    np.testing.assert_array_equal(shard[0], np.full(4, 3.25, np.float32))
    assert ahead.version == 0 and ahead.shard[0].sum() == 0  # not the shard yet
    assert ahead.speculate(0, (0, 1)) is None  # once
    ahead.catch_up([full], 1)
    plain.catch_up([full], 1)
    assert ahead.shard[0] is shard[0] and ahead.version == 1 and 1 in ahead.pinned
    np.testing.assert_array_equal(ahead.shard[0], plain.shard[0])
    assert not ahead.pending and not ahead.meta

    # the plugin logged another merge (rank 1's update rejected): the logged one runs
    ahead, plain = owners()
    assert ahead.speculate(0, (0, 1)) is not None
    only0 = MergeEntry(1, ((0, 0, 8, 0, 0.5),), (0, 1))
    ahead.catch_up([only0], 1)
    plain.catch_up([only0], 1)
    np.testing.assert_array_equal(ahead.shard[0], np.full(4, 1.0, np.float32))
    np.testing.assert_array_equal(ahead.shard[0], plain.shard[0])
    # a piece replaced after the merge ahead: the merge runs again on the new piece
    ahead, plain = owners()
    assert ahead.speculate(0, (0, 1)) is not None
    for o in (ahead, plain):
        o.put(1, 0, [np.full(4, 8.0, np.float32)], False, (24, 0, 0.25))
    assert ahead.ahead is None
    ahead.catch_up([full], 1)
    plain.catch_up([full], 1)
    np.testing.assert_array_equal(ahead.shard[0], np.full(4, 6.25, np.float32))
    np.testing.assert_array_equal(ahead.shard[0], plain.shard[0])
    # a piece left out of its round's merge (the update was rejected) goes at the next
    ahead, _ = owners()
    ahead.catch_up([only0], 1)
    assert (1, 0) in ahead.pending and (1, 0) in ahead.meta
    ahead.refuse(1, 0, "late")
    for r in (0, 1):
        ahead.put(r, 1, [np.ones(4, np.float32)], False, (8, 1, 0.5))
    ahead.catch_up([MergeEntry(2, ((0, 1, 8, 1, 0.5), (1, 1, 8, 1, 0.5)), (0, 1))], 2)
    assert not ahead.pending and not ahead.meta and not ahead.refused
    # a piece missing, a policy that is not a group merge: nothing ahead
    lone = _owner(ddl.BSP(every=1), [np.zeros(4, np.float32)])
    lone.put(0, 0, [np.ones(4, np.float32)], False, (8, 0, 0.5))
    assert lone.speculate(0, (0, 1)) is None and lone.ahead is None
    ssp = _owner(ddl.SSP(every=1, staleness=1), [np.zeros(4, np.float32)])
    ssp.put(0, 0, [np.ones(4, np.float32)], True, (8, 0, 0.5))
    assert ssp.speculate(0, (0,)) is None


def test_a_pushed_shard_is_taken_only_as_the_merge_the_plugin_logged():
    import asyncio

    async def main():
        ex = _local_exchange(shards=2)
        try:
            logged = [MergeEntry(1, ((0, 0, 8, 0, 0.5), (1, 0, 8, 0, 0.5)), (0, 1))]
            pushed = [np.full(2, 7.0, np.float32)]
            other = MergeEntry(1, ((0, 0, 8, 0, 0.5), (1, 0, 8, 0, 0.75)), (0, 1))
            ex.inbox[1] = ((0, 0), other, pushed, None)
            assert await ex.take(1, (0, 0), 1, logged, 0) is None  # another merge: ask
            ex.inbox[1] = ((0, 1), logged[0], pushed, None)
            assert await ex.take(1, (0, 0), 1, logged, 0) is None  # another generation
            # on its way: taken when it comes
            task = asyncio.ensure_future(ex.take(1, (0, 0), 1, logged, 0))
            await asyncio.sleep(0.01)
            ex.inbox[1] = ((0, 0), logged[0], pushed, None)
            ex._signal()
            got = await asyncio.wait_for(task, 5)
            assert got[0] is pushed and 1 not in ex.inbox and ex.stats["taken"] == 1
            # never comes: the member asks the owner after a short wait
            t0 = time.monotonic()
            assert await ex.take(1, (0, 0), 1, logged, 0) is None
            assert time.monotonic() - t0 < 5
            # a merge of some members only is never merged ahead: no wait at all
            part = [MergeEntry(1, ((0, 0, 8, 0, 0.5),), (0, 1))]
            t0 = time.monotonic()
            assert await ex.take(1, (0, 0), 1, part, 0) is None
            assert time.monotonic() - t0 < 0.01
            # an update rejected (rank None: start from the global shard): a push holds
            # what the rank continues from (under EASGD its own reply), so never taken
            ex.inbox[1] = ((0, 0), logged[0], pushed, [np.zeros(2, np.float32)])
            t0 = time.monotonic()
            assert await ex.take(1, (0, 0), 1, logged, None) is None
            assert time.monotonic() - t0 < 0.01 and 1 in ex.inbox
            # a push of an older version is dropped, not kept for ever
            later = [MergeEntry(2, ((0, 1, 8, 1, 0.5), (1, 1, 8, 1, 0.5)), (0, 1))]
            assert await ex.take(1, (0, 0), 2, later, 0) is None
            assert 1 not in ex.inbox
        finally:
            ex.pool.shutdown(wait=False)

    asyncio.run(main())


def test_a_merge_that_changes_the_shard_shape_is_refused():
    bad = Policy("Bad", 1, no_state, ddl.all_arrived,
                 lambda s, g, c, i: Merged([np.zeros(3, np.float32)], s))
    owner = _owner(bad, [np.zeros(2, np.float32)])
    owner.put(0, 0, [np.ones(2, np.float32)], delta=False)
    with pytest.raises(DaskDLError, match="not shaped like the shard"):
        owner.catch_up([MergeEntry(1, ((0, 0, 1, 0, None),), (0,))], upto=1)
    np.testing.assert_array_equal(owner.shard[0], np.zeros(2, np.float32))


def test_merge_entries_round_trip_and_junk_is_refused():
    e = MergeEntry(7, ((0, 3, 32, 6, 0.5), (1, 3, 32, 6, None)), (0, 1), True)
    assert MergeEntry.from_msg(e.to_msg()) == e
    for junk in (None, [1, 2], [1, [[0, 1]], [0], False], "abc"):
        with pytest.raises(ProtocolError):
            MergeEntry.from_msg(junk)


def test_specs_field_refuses_what_is_not_shapes_and_numeric_dtypes():
    assert protocol.specs_field([[[2, 3], "float32"]]) == [Spec((2, 3), np.dtype("float32"))]
    for junk in ([], [[[2], "object"]], [[[-1], "float32"]], [["x", "float32"]], "abc"):
        with pytest.raises(ProtocolError):
            protocol.specs_field(junk)


def test_sync_and_compression_arguments_are_checked_before_anything_starts():
    assert check_sync("sharded") == "sharded"
    with pytest.raises(ValueError, match="sync must be one of"):
        check_sync("allreduce")
    assert choose_sync("auto", 1000) == "scheduler"
    assert choose_sync("auto", 10**9) == "sharded"
    assert choose_sync("auto", AUTO_SHARDED_BYTES - 1) == "scheduler"
    assert choose_sync("auto", AUTO_SHARDED_BYTES) == "sharded"
    # throughput.py's 784-512-512-10 MLP (2.7 MB) syncs sharded under "auto"
    assert choose_sync("auto", 4 * (784 * 512 + 512 + 512 * 512 + 512 + 5120 + 10)) == "sharded"
    assert choose_sync("scheduler", 10**9) == "scheduler"
    params = init_mlp(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs sync='sharded'"):
        ddl.Trainer(loss_fn, params, optax.sgd(0.1), sync="scheduler", compression="int8")
    with pytest.raises(ValueError, match="compression"):
        ddl.Trainer(loss_fn, params, optax.sgd(0.1), sync="sharded", compression="fp4")


# -- on a cluster ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [ddl.BSP(every=4), ddl.DiLoCo(every=4, outer=optax.sgd(1.0)),
                                    ddl.DiLoCo(every=4), ddl.EASGD(every=4, alpha=0.3)],
                         ids=["BSP", "DiLoCo-sgd1", "DiLoCo", "EASGD"])
def test_sharded_is_bit_identical_to_the_scheduler_path(client2, digits, policy):
    p_sched, acc_s, info_s, tr_s = train(client2, digits, policy, epochs=2, sync="scheduler")
    p_shard, acc_h, info_h, tr_h = train(client2, digits, policy, epochs=2, sync="sharded")
    assert tr_s.sync == "scheduler" and tr_h.sync == "sharded"
    for a, b in zip(jax.tree_util.tree_leaves(p_sched), jax.tree_util.tree_leaves(p_shard)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert acc_s == acc_h
    assert info_h["version"] == info_s["version"]
    # sharded rounds say what they moved and how long it took
    r = tr_h.rounds[-1]
    assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["transfer_s"] > 0
    ranks = info_h["metrics"]["ranks"]
    assert all(ranks[k]["bytes_in"] > 0 and ranks[k]["transfer_s"] > 0 for k in ranks)
    # the owners merged ahead and pushed the shards (EASGD: each rank its own reply)
    assert sum(r["pushed"] for r in tr_h.rounds) > 0
    # ... or answered the put that completed a round with the sender's shard
    assert sum(r["answered"] for r in tr_h.rounds) > 0


def test_the_scheduler_holds_no_parameter_bytes_while_a_sharded_run_trains(client2, digits):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    seen = []

    def inspect(dask_scheduler, run):
        st = dask_scheduler.extensions["daskdl"].runs[run]
        arrays = [a for a in jax.tree_util.tree_leaves((st.leaves, st.policy_state,
                                                        st.replies, st.owner_state))
                  if isinstance(a, np.ndarray) and a.size > 1]
        return st.sharded, len(arrays), len(st.log)

    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     policy=ddl.DiLoCo(every=4), batch_size=32, client=client2,
                     sync="sharded") as tr:
        def cb(r):
            if len(seen) < 3:
                seen.append(client2.run_on_scheduler(inspect, run=tr.run))
        tr.fit(ds, epochs=1, verbose=False, callbacks=[cb])
    assert seen and all(s[0] and s[1] == 0 for s in seen), seen
    assert all(s[2] <= 4 for s in seen)  # the merge log is pruned as owners catch up


def test_int8_with_error_feedback_trains_as_well_as_exact_updates(client2, digits):
    policy, epochs = ddl.BSP(every=4), 12
    _, exact, *_ = train(client2, digits, policy, epochs=epochs, sync="sharded")
    _, int8, _, tr = train(client2, digits, policy, epochs=epochs, sync="sharded",
                           compression="int8")
    import dask

    with dask.config.set({"daskdl.error-feedback": False}):
        _, plain, *_ = train(client2, digits, policy, epochs=epochs, sync="sharded",
                             compression="int8")
    print(f"digits test accuracy: exact {exact:.4f}, int8 with error feedback {int8:.4f}, "
          f"int8 without {plain:.4f}")
    assert int8 >= exact - 0.005, (int8, exact)
    ratios = [r["compression"] for r in tr.rounds]
    assert min(ratios) > 3.0, min(ratios)  # int8 codes + one float32 scale per 256


def test_three_workers_mix_answers_and_pushes_and_match_the_scheduler_path(digits):
    """With three workers the owner answers the put that completed a round and pushes
    the third member its shard: both kinds are taken, and BSP and EASGD (replies and
    the centre in answers too) end bit-identical to the scheduler path."""
    from .conftest import _cluster

    with _cluster(3) as cluster, Client(cluster, set_as_default=False) as client:
        for policy in (ddl.BSP(every=4), ddl.EASGD(every=4, alpha=0.3)):
            p_s, acc_s, _, _ = train(client, digits, policy, epochs=1, sync="scheduler")
            p_h, acc_h, _, tr = train(client, digits, policy, epochs=1, sync="sharded")
            for a, b in zip(jax.tree_util.tree_leaves(p_s), jax.tree_util.tree_leaves(p_h)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert acc_s == acc_h
            answered = sum(r["answered"] for r in tr.rounds)
            taken = sum(r["pushed"] for r in tr.rounds)
            assert 0 < answered < taken, (policy.name, answered, taken)


@pytest.mark.parametrize("policy,continues", [(ddl.BSP(every=4), True),
                                              (ddl.DiLoCo(every=4), False)],
                         ids=["BSP", "DiLoCo"])
def test_one_worker_continues_from_its_own_state_when_the_merge_is_its_update(
        client1, digits, policy, continues):
    """With one worker an averaging merge is the worker's own update, the very arrays:
    it continues from its own state (nothing assembled or put on the device again)
    and ends bit-identical to the scheduler path; a merge that changes the shard
    (DiLoCo's outer step) is assembled as before."""
    p_sched, acc_s, _, _ = train(client1, digits, policy, epochs=2, sync="scheduler")
    p_shard, acc_h, _, tr = train(client1, digits, policy, epochs=2, sync="sharded")
    for a, b in zip(jax.tree_util.tree_leaves(p_sched), jax.tree_util.tree_leaves(p_shard)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert acc_s == acc_h
    continued = [r["continued"] for r in tr.rounds]
    assert all(continued) if continues else not any(continued), continued


def test_shard_handlers_refuse_a_wrong_secret_wrong_shapes_and_unknown_runs(client2, digits):
    x, y = digits
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1),
                     policy=ddl.BSP(every=4), batch_size=32, client=client2,
                     sync="sharded") as tr:
        tr.fit(ddl.Dataset.from_arrays(x=x, y=y), epochs=1, verbose=False)
        addr = tr.info()["members"][0]
        before = jax.tree_util.tree_leaves(tr.params)
        rpc = client2.rpc(addr)

        def put(**kw):
            msg = dict(run=tr.run, secret=tr._secret, fit=tr._fits, gen=0, rank=1,
                       clock=10**6, shard=0, delta=False, timeout=1.0,
                       pieces=[np.zeros(3, np.float32)])
            msg.update(kw)
            return client2.sync(rpc.daskdl_shard_put, **msg)

        assert "wrong secret" in put(secret="x" * 32)["reason"]
        assert "no training run" in put(run="nope")["reason"]
        reply = put()
        assert reply["status"] == "refused" and "piece" in reply["reason"]
        reply = put(pieces=[np.full(s.shape, np.nan, s.dtype) for s in
                            ddl.shards.ShardMap(specs_of(before), 2).piece_specs(0)])
        assert reply["status"] == "refused" and "NaN" in reply["reason"]
        reply = client2.sync(rpc.daskdl_shard_full, run=tr.run, secret="x" * 32, version=0)
        assert reply["status"] == "refused"

        def push(**kw):
            entry = MergeEntry(10**6, ((0, 0, 8, 0, 0.5), (1, 0, 8, 0, 0.5)), (0, 1))
            msg = dict(run=tr.run, secret=tr._secret, fit=tr._fits, gen=0, shard=1,
                       entry=entry.to_msg(), pieces=[np.zeros(3, np.float32)])
            msg.update(kw)
            return client2.sync(rpc.daskdl_shard_push, **msg)

        smap = ddl.shards.ShardMap(specs_of(before), 2)
        shaped = {j: [np.zeros(s.shape, s.dtype) for s in smap.piece_specs(j)] for j in (0, 1)}
        assert "wrong secret" in push(secret="x" * 32)["reason"]
        assert "shard 1 pushed must be a list" in push()["reason"]  # not shaped like shard 1
        assert "pushed to its own owner" in push(shard=0, pieces=shaped[0])["reason"]
        assert "there are 2 shards" in push(shard=7, pieces=shaped[1])["reason"]
        assert push(entry=["junk"], pieces=shaped[1])["status"] == "refused"
        crowded = MergeEntry(10**6, tuple((r, 0, 8, 0, 0.5) for r in range(3)), (0, 1))
        reply = push(entry=crowded.to_msg(), pieces=shaped[1])
        assert "lists 3 updates for 2 workers" in reply["reason"], reply
        # another generation's push, well formed: of no use, ignored (nothing kept)
        assert push(gen=9, pieces=shaped[1])["status"] == "OK"
        # nothing changed: a fit from here starts where the last one ended
        tr._fetch_params()
        for a, b in zip(before, jax.tree_util.tree_leaves(tr.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- memory: the scheduler in its own process ----------------------------------------------------
D = 64


def _table_model(mb: float):
    rows = int(mb * 1e6 / 4 / D)
    return {"table": jnp.zeros((rows, D), jnp.float32) + 0.01, "w": jnp.ones((D, 1)) * 0.1}


def table_loss(params, batch):
    emb = params["table"][batch["ids"]].mean(axis=1)
    return jnp.mean((emb @ params["w"])[:, 0] - batch["y"]) ** 2


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def test_scheduler_memory_does_not_grow_with_the_model_when_sharded(tmp_path):
    """A 100 MB model on 2 workers: the scheduler process grows by less than 64 MB."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(ddl.__file__)),
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                              "--port", "0", "--no-dashboard", "--scheduler-file",
                              str(tmp_path / "s.json")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 60
        while not (tmp_path / "s.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                     "--scheduler-file", str(tmp_path / "s.json"),
                                     "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for _ in range(2)]
        with Client(scheduler_file=str(tmp_path / "s.json"), set_as_default=False) as c:
            c.wait_for_workers(2, timeout=60)
            rng = np.random.default_rng(0)
            params = _table_model(100)
            rows = params["table"].shape[0]
            ds = ddl.Dataset.from_arrays(ids=rng.integers(0, rows, (1024, 8), dtype=np.int32),
                                         y=rng.normal(size=1024).astype(np.float32))
            with ddl.Trainer(table_loss, params, optax.sgd(0.1), policy=ddl.BSP(every=4),
                             batch_size=32, client=c, sync="sharded") as tr:
                tr.fit(ds, epochs=1, verbose=False)  # compiled, warm
                base, peak, stop = _rss(sched.pid), [0], threading.Event()

                def sample():
                    while not stop.is_set():
                        peak[0] = max(peak[0], _rss(sched.pid))
                        time.sleep(0.02)

                t = threading.Thread(target=sample)
                t.start()
                try:
                    tr.fit(ds, epochs=1, verbose=False)
                finally:
                    stop.set()
                    t.join()
                moved = sum(r["bytes_sent"] + r["bytes_received"] for r in tr.rounds)
            growth = (peak[0] - base) / 2**20
            print(f"scheduler RSS growth {growth:.1f} MB; {moved / 2**20:.0f} MB moved "
                  "between workers")
            assert moved > 2 * 100e6  # the model's bytes did move, between the workers
            assert growth < 64, growth
    finally:
        for p in workers + [sched]:
            p.kill()


# -- overlap: round r + 1 computes while round r syncs ------------------------------------------
@pytest.mark.parametrize("policy", [ddl.BSP(every=4), ddl.Async(every=4)], ids=["BSP", "Async"])
def test_overlapped_rounds_train_as_well_and_the_last_round_syncs(client2, digits, policy):
    epochs = 30 if policy.name == "Async" else 20
    params, acc, info, tr = train(client2, digits, policy, epochs=epochs, sync="sharded",
                                  overlap=True)
    assert acc >= 0.95, (policy.name, acc)
    overlapped = [r["overlapped"] for r in tr.rounds]
    assert sum(overlapped) >= 0.9 * len(overlapped)  # every round but each rank's last
    last = {r["rank"]: r for r in tr.rounds}
    assert not any(r["overlapped"] for r in last.values())
    # the trainer's params are the owners' last version: every round was merged
    assert info["version"] == (len(tr.rounds) // 2 if policy.group else len(tr.rounds))


def test_overlap_needs_sharded_sync_and_a_merge_without_state():
    with pytest.raises(ValueError, match="overlap=True needs sync='sharded'"):
        ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1),
                    sync="scheduler", overlap=True)
    # one round late, DiLoCo's outer momentum diverges (0.78 instead of 0.97 on digits)
    with pytest.raises(ValueError, match="outer momentum"):
        ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.1),
                    policy=ddl.DiLoCo(every=4), sync="sharded", overlap=True)


@gen_cluster(nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)],
             config={"distributed.comm.timeouts.connect": "600s"})
async def test_a_call_to_a_worker_that_left_fails_once_the_scheduler_has_removed_it(s, a, b):
    """A sharded round asks an owner for its merged shard after the plugin's answer;
    when that owner was killed after taking this worker's piece, Dask would retry
    connecting to it for its connect timeout (30 s by default, 600 s here) before the
    round could re-plan.  The exchange's calls ask the scheduler instead while they
    wait: a call to a present worker that answers slowly is left alone, one to a
    worker the scheduler removed fails at once."""
    import asyncio

    from daskdl.errors import DaskDLError
    from daskdl.exchange import OWNER_CHECK_S, asking, fetch_full, fetch_global, install
    from daskdl.replica import _watched
    from daskdl.shards import Spec

    async def slow_echo(x):
        await asyncio.sleep(2.5 * OWNER_CHECK_S)
        return x

    b.handlers["daskdl_test_slow_echo"] = slow_echo
    assert await _watched(a, b.address, a.rpc(b.address).daskdl_test_slow_echo(x=7)) == 7

    gone = b.address
    await b.close()
    while gone in s.workers:
        await asyncio.sleep(0.01)
    with pytest.raises(OSError, match="left the cluster"):
        # wait_for guards the suite: without the check this call hangs for 600 s
        await asyncio.wait_for(_watched(a, gone, a.rpc(gone).identity()), 20)

    # the same for the fetches outside rounds (the client's after a fit, checkpoints)
    specs = [Spec((4,), np.dtype("float32"))]
    with pytest.raises(OSError, match="left the cluster"):
        await asyncio.wait_for(fetch_global(a.rpc, "run", "secret", 0, 0, {0: gone}, 1, [],
                                            specs, asking(a.scheduler)), 20)
    install(a)  # the exchange's handlers, as a worker of a sharded run has them
    with pytest.raises(DaskDLError, match="no worker holds version 1.*no training run"):
        await asyncio.wait_for(fetch_full(a.rpc, "run", "secret", [gone, a.address], 1,
                                          specs, asking(a.scheduler)), 20)
