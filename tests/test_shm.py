"""Shard payloads between workers of one host through /dev/shm (daskdl.shm): the files
themselves, hostile references, the fall-back to Dask's comm, and a real 2-worker
cluster giving the same bits with and without shared memory."""

from __future__ import annotations

import asyncio
import os

import dask
import jax
import ml_dtypes
import numpy as np
import optax
import pytest

import daskdl as ddl
from daskdl import shm
from daskdl.protocol import ProtocolError

from .conftest import init_mlp
from .conftest import loss_fn as loss_fn_wide
from .test_policies_cluster import train

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm here")

HERE = "tcp://127.0.0.1:1"
PEER = "tcp://127.0.0.1:2"


def _groups():
    rng = np.random.default_rng(0)
    return [[rng.normal(size=(300, 70)).astype(np.float32), np.arange(5, dtype=np.int32),
             np.float64(2.5) * np.ones(()), np.array([True, False, True])],
            None, [rng.normal(size=(17,)).astype(np.float32)]]


def _recorder():
    """``(sent, call)``: an RPC stand-in that keeps each payload and answers OK."""
    sent = []

    async def call(payload):
        sent.append(payload)
        return {"status": "OK"}

    return sent, call


def _ser(group):
    return ("ser", group)


def _files(outbox):
    return sorted(p for p in os.listdir(shm.SHM_DIR) if f"-{outbox.token}-" in p)


def test_arrays_come_out_as_they_went_in_and_are_copies():
    out, inbox = shm.Outbox(HERE), shm.Inbox()
    try:
        groups = _groups()
        refs = out.slot(PEER, "put").write(groups)
        assert refs[1] is None and all(isinstance(r["shm"], str) for r in (refs[0], refs[2]))
        got = [None if r is None else inbox.load(r) for r in refs]
        for g, back in zip(groups, got):
            if g is None:
                assert back is None
                continue
            for a, b in zip(g, back):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
        # copies: the next message in the same file does not change what was read
        kept = got[0][0].copy()
        out.slot(PEER, "put").write([[np.zeros((300, 70), np.float32)]])
        np.testing.assert_array_equal(got[0][0], kept)
        # a reference to the message before is refused, not read as the new one
        with pytest.raises(ProtocolError, match="holds another message"):
            inbox.load(refs[0])
        assert len(_files(out)) == 1
    finally:
        out.close()
        inbox.close()
    assert _files(out) == []  # closing removes the sender's files


def test_a_file_grows_into_a_new_one_and_readers_follow():
    out, inbox = shm.Outbox(HERE), shm.Inbox()
    try:
        s = out.slot(PEER, "push")
        small = s.write([[np.ones(1000, np.float32)]])[0]
        np.testing.assert_array_equal(inbox.load(small)[0], np.ones(1000, np.float32))
        big = s.write([[np.full(600_000, 7.0, np.float32)]])[0]  # beyond the first 1 MiB
        assert big["shm"] != small["shm"] and len(_files(out)) == 1
        np.testing.assert_array_equal(inbox.load(big)[0], np.full(600_000, 7.0, np.float32))
        assert len(inbox.maps) == 1  # the old file's mapping was closed
    finally:
        out.close()
        inbox.close()


def test_hostile_references_are_refused_with_the_reason():
    out, inbox = shm.Outbox(HERE), shm.Inbox()
    try:
        ref = out.slot(PEER, "put").write([[np.ones(100, np.float32)]])[0]
        bad = {
            "not a daskdl shared-memory name": dict(ref, shm="../../etc/passwd"),
            "needs seq and arrays": dict(ref, seq="1"),
            "malformed array": dict(ref, arrays=[["<f4", [100]]]),
            "refused": dict(ref, arrays=[["|O", [100], 64]]),
            "beyond the end": dict(ref, arrays=[["<f4", [10**7], 64]]),
            "larger than the 40 bytes": ref,
        }
        for reason, r in bad.items():
            with pytest.raises(ProtocolError, match=reason):
                inbox.load(r, limit=40 if r is ref else None)
        for shape in ([2**32, 2**32], [2**62, 3], [2**70]):  # no wrap-around to small
            with pytest.raises(ProtocolError, match="too large|larger than"):
                inbox.load(dict(ref, arrays=[["<f4", shape, 64]]))
        with pytest.raises(ProtocolError, match="not a daskdl shared-memory name"):
            inbox.load(dict(ref, shm=ref["shm"] + "\n"))
        with pytest.raises(ProtocolError, match="shared memory is off here"):
            shm.Inbox(enabled=False).load(ref)
        # a well-formed name that is not there: the sender must use the comm
        gone = dict(ref, shm=f"daskdl-{os.getpid()}-0123abcd-0-1")
        with pytest.raises(shm.ShmUnavailable, match="cannot open"):
            inbox.load(gone)
    finally:
        out.close()
        inbox.close()


def test_only_peers_of_this_host_and_plain_numeric_payloads_use_it():
    out = shm.Outbox(HERE)
    try:
        big = [np.ones(100_000, np.float32)]
        assert out.usable(PEER, [big, None])
        assert not out.usable("tcp://10.1.2.3:5", [big])  # another host
        assert not out.usable(PEER, [[np.ones(10, np.float32)]])  # below MIN_BYTES
        assert not out.usable(PEER, [[np.ones(100_000, ml_dtypes.bfloat16)]])
        assert not out.usable(PEER, [big + [np.ones(3, object)]])
        out.disable(PEER)
        assert not out.usable(PEER, [big])
    finally:
        out.close()


def test_a_peer_that_cannot_open_the_file_gets_the_comm_and_a_failed_call_retires_it():
    out = shm.Outbox(HERE)
    calls = []

    async def refuses(payload):
        calls.append(payload)
        if isinstance(payload, dict):
            return {"status": "refused", "reason": "cannot open", "shm": False}
        return {"status": "OK"}

    async def main():
        big = [np.ones(100_000, np.float32)]
        r = await shm.send(out, PEER, "put", [big], refuses, serialize=_ser)
        assert r == {"status": "OK"} and len(calls) == 2
        assert isinstance(calls[0], dict) and calls[1][0] == "ser"
        assert PEER in out.off and _files(out) == []  # its file is gone too

        other = "tcp://127.0.0.1:3"

        async def fails(payload):
            raise OSError("connection lost")

        with pytest.raises(OSError):
            await shm.send(out, other, "put", [big], fails, serialize=lambda g: g)
        assert _files(out) == []  # no reply: never rewritten, removed
        assert other not in out.off  # a lost connection says nothing about shared memory

    try:
        asyncio.run(main())
    finally:
        out.close()


def test_no_room_means_the_comm_and_a_new_generation_drops_files_of_peers_that_left(
        monkeypatch):
    out = shm.Outbox(HERE)
    big = [np.ones(100_000, np.float32)]
    sent, call = _recorder()

    async def main():
        await shm.send(out, PEER, "put", [big], call, serialize=_ser)
        other = "tcp://127.0.0.1:3"
        await shm.send(out, other, "put", [big], call, serialize=_ser)
        assert all(isinstance(p, dict) for p in sent) and len(_files(out)) == 2
        out.keep([PEER])  # the other worker left
        assert len(_files(out)) == 1
        # slots made after a peer left never reuse a live slot's file name
        fourth = "tcp://127.0.0.1:5"
        await shm.send(out, fourth, "put", [big], call, serialize=_ser)
        assert isinstance(sent[-1], dict) and fourth not in out.off
        assert len(_files(out)) == 2
        out.keep([PEER])

        def full(fd, offset, size):
            raise OSError(28, "No space left on device")

        # beyond the process's budget: the comm for that peer
        third = "tcp://127.0.0.1:4"
        out.max_bytes = out.nbytes() + 2**20
        await shm.send(out, third, "put", [[np.ones(300_000, np.float32)]], call,
                       serialize=_ser)
        assert sent[-1][0] == "ser" and third in out.off and len(_files(out)) == 1
        out.max_bytes = 2**30

        monkeypatch.setattr(shm.os, "posix_fallocate", full)
        await shm.send(out, other, "push", [big], call, serialize=_ser)
        assert sent[-1][0] == "ser" and other in out.off
        out.close()
        assert not out.usable(PEER, [big]) and _files(out) == []

    try:
        asyncio.run(main())
    finally:
        out.close()


def test_files_of_a_process_that_died_are_swept():
    dead = os.path.join(shm.SHM_DIR, "daskdl-999999999-0123abcd-0-1")
    mine = os.path.join(shm.SHM_DIR, f"daskdl-{os.getpid()}-0123abcd-0-1")
    for p in (dead, mine):
        with open(p, "wb") as f:
            f.write(b"x")
    try:
        assert shm.sweep() >= 1
        assert not os.path.exists(dead) and os.path.exists(mine)
    finally:
        for p in (dead, mine):
            if os.path.exists(p):
                os.unlink(p)


def test_the_setting_is_checked():
    assert shm.shared_memory_setting("auto") and shm.shared_memory_setting(True)
    assert not shm.shared_memory_setting(False) and not shm.shared_memory_setting("false")
    with pytest.raises(ValueError, match="daskdl.shared-memory must be"):
        shm.shared_memory_setting("sometimes")
    with dask.config.set({"daskdl.shared-memory": "sometimes"}), \
            pytest.raises(ValueError, match="daskdl.shared-memory must be"):
        ddl.Trainer(lambda p, b: 0.0, {"w": np.zeros(2, np.float32)}, optax.sgd(0.1))


def test_an_exchange_asks_for_the_comm_without_refusing_the_update():
    """A put whose file this worker cannot open is not a bad update: the sender is told
    to send it again over the comm, and the owner still waits for that piece."""
    from .test_sharded import _local_exchange

    async def main():
        ex = _local_exchange(shards=2)
        ex.shm_in.enabled = True  # as with daskdl.shared-memory on
        try:
            ref = {"shm": f"daskdl-{os.getpid()}-0123abcd-0-1", "seq": 1,
                   "arrays": [["<f4", [2], 64]]}
            with pytest.raises(shm.ShmUnavailable):
                await ex.put(fit=0, gen=0, rank=1, clock=0, shard=0, delta=False,
                             pieces=ref, timeout=5)
            assert not ex.owner.refused and (1, 0) not in ex.owner.pending
            await ex.put(fit=0, gen=0, rank=1, clock=0, shard=0, delta=False,
                         pieces=[np.ones(2, np.float32)], timeout=5)
            assert (1, 0) in ex.owner.pending
        finally:
            ex.pool.shutdown(wait=False)

    asyncio.run(main())


# -- on a cluster ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [ddl.BSP(every=4), ddl.EASGD(every=4, alpha=0.3)],
                         ids=["BSP", "EASGD"])
def test_shared_memory_gives_the_same_bits_as_the_comm(client2, digits, policy):
    """Two worker processes of one host: the pieces and pushes (EASGD: each rank's
    reply and the centre) go through /dev/shm (a model with pieces above MIN_BYTES),
    and the parameters are bit-identical to the same run over Dask's comm."""
    wide = init_mlp(jax.random.PRNGKey(0), (64, 512, 10))

    def run(setting):
        with dask.config.set({"daskdl.shared-memory": setting}):
            return train(client2, digits, policy, epochs=1, sync="sharded", params=wide)

    p_shm, acc_shm, _, tr_shm = run("auto")
    p_comm, acc_comm, _, tr_comm = run(False)
    for a, b in zip(jax.tree_util.tree_leaves(p_shm), jax.tree_util.tree_leaves(p_comm)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert acc_shm == acc_comm
    assert sum(r["shm"] for r in tr_shm.rounds) >= len(tr_shm.rounds)  # at least its put
    assert sum(r["shm"] for r in tr_comm.rounds) == 0
    assert sum(r["pushed"] for r in tr_shm.rounds) > 0


def test_a_killed_worker_leaves_files_that_the_next_exchange_sweeps(digits):
    """SIGKILL one of two worker processes mid-fit while they exchange through /dev/shm:
    the survivor trains on alone (its mappings of the dead worker's file closed at the
    new generation), and the dead worker's files go at the next sweep."""
    from .test_faults import _kill_when, _split, _two_workers_without_nanny

    train_ds, _ = _split(digits)
    with _two_workers_without_nanny() as (client, pids):
        rounds: list = []
        cb, state = _kill_when(rounds, 12, pids.__getitem__, client)
        with ddl.Trainer(loss_fn_wide, init_mlp(jax.random.PRNGKey(0), (64, 512, 10)),
                         optax.adam(1e-3), policy=ddl.BSP(every=4), batch_size=32,
                         client=client, sync="sharded", sync_timeout=60) as tr:
            hist = tr.fit(train_ds, epochs=6, verbose=False, callbacks=[cb])
            info = tr.info()
        dead = state["killed"][1]
        assert len(hist) == 6 and info["aborted"] is None and len(info["members"]) == 1
        assert sum(r["shm"] for r in rounds if r["clock"] < 10) > 0  # it was in use
        assert any(f"daskdl-{dead}-" in f for f in os.listdir(shm.SHM_DIR))
        shm.sweep()
        assert not any(f"daskdl-{dead}-" in f for f in os.listdir(shm.SHM_DIR))


def test_a_slot_made_after_a_peer_left_does_not_take_a_live_slots_file():
    out = shm.Outbox(HERE)
    big = [np.ones(100_000, np.float32)]
    sent, call = _recorder()

    async def main():
        a, c, d = (f"tcp://127.0.0.1:{p}" for p in (11, 12, 13))
        for peer in (a, c):
            await shm.send(out, peer, "put", [big], call, serialize=_ser)
        out.keep([c])  # a left; c's file stays
        await shm.send(out, d, "put", [big], call, serialize=_ser)
        assert isinstance(sent[-1], dict) and d not in out.off and len(_files(out)) == 2

    try:
        asyncio.run(main())
    finally:
        out.close()
