"""Checkpoints: atomic versioned Zarr groups, verified on read, and exact resume."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest
import zarr

import daskdl as ddl
from daskdl.checkpoint import (CheckpointWriter, list_checkpoints, load_latest,
                               read_checkpoint, write_checkpoint)

from .conftest import init_mlp, loss_fn


def _write(store, clock, value):
    write_checkpoint(store, clock, params=[np.full((3, 4), value, np.float32)],
                     policy_state=[np.arange(3)], opt_states={0: [np.ones(2), np.int32(clock)]},
                     local_params={}, meta={"epoch": 0, "round": clock})


def test_round_trip_newest_first_and_stale_temporaries_ignored(tmp_path):
    root = str(tmp_path / "ck")
    _write(root, 5, 1.0)
    _write(root, 10, 2.0)
    os.makedirs(os.path.join(root, ".tmp-ckpt-000000015-dead"))  # a crash mid-write
    assert list_checkpoints(root) == ["ckpt-000000005", "ckpt-000000010"]
    ck = load_latest(root)
    assert ck["name"] == "ckpt-000000010" and ck["meta"]["clock"] == 10
    np.testing.assert_array_equal(ck["params"][0], 2.0)
    assert int(ck["opt_states"][0][1]) == 10 and ck["policy_state"][0].tolist() == [0, 1, 2]
    g = zarr.open_group(os.path.join(root, "ckpt-000000010"), mode="r")  # plain zarr
    assert g["params/float32"].shape == (12,)
    assert g.attrs["daskdl_checkpoint"]["layout"]["params"] == [["float32", [3, 4], 0]]


def test_damaged_or_incomplete_newest_falls_back_with_a_warning(tmp_path):
    root = str(tmp_path / "ck")
    _write(root, 5, 1.0)
    _write(root, 10, 2.0)
    chunk_dir = os.path.join(root, "ckpt-000000010", "params", "float32", "c")
    chunk = next(os.path.join(d, f) for d, _, fs in os.walk(chunk_dir) for f in fs)
    with open(chunk, "r+b") as f:
        f.truncate(3)
    with pytest.raises(ddl.DaskDLError, match="ckpt-000000010"):
        read_checkpoint(root, "ckpt-000000010")
    with pytest.warns(UserWarning, match="skipping checkpoint ckpt-000000010"):
        ck = load_latest(root)
    assert ck["name"] == "ckpt-000000005"

    # a zarr store without the completion attribute: not a checkpoint
    store = zarr.storage.MemoryStore()
    _write(store, 3, 1.0)
    g = zarr.open_group(store, mode="a").require_group("ckpt-000000007")
    g.create_array("params/float32", data=np.zeros(12, np.float32))
    with pytest.warns(UserWarning, match="incomplete"):
        assert load_latest(store)["name"] == "ckpt-000000003"


def test_writer_keeps_the_newest_and_reports_errors(tmp_path):
    root = str(tmp_path / "ck")
    w = CheckpointWriter(root, keep=2)
    for clock in (1, 2, 3, 4):
        w.submit(clock, clock, [np.full(4, clock, np.float32)], [], {0: [np.zeros(1)]}, {},
                 {"epoch": 0})
    assert w.close() == [] and w.written + w.skipped == 4 and w.written >= 1
    assert list_checkpoints(root)[-1] == "ckpt-000000004"  # the newest is always written
    assert len(list_checkpoints(root)) <= 2
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    w = CheckpointWriter(str(blocked), keep=2)
    w.submit(1, 1, [np.zeros(2)], [], {}, {}, {})
    errors = w.close()
    assert len(errors) == 1 and "failed" in errors[0]


@pytest.mark.parametrize("policy,sync", [(ddl.DiLoCo(every=4), "scheduler"),
                                         (ddl.EASGD(every=4, alpha=0.3), "scheduler"),
                                         (ddl.DiLoCo(every=4), "sharded"),
                                         (ddl.EASGD(every=4, alpha=0.3), "sharded")])
def test_resume_restores_policy_and_optimizer_state_exactly(policy, sync, client2, digits,
                                                            tmp_path):
    """Two epochs in one go == one epoch, then a new trainer resuming for the second:
    the outer optimizer (DiLoCo) or each worker's own parameters (EASGD) and every
    worker's Adam state come back from the checkpoint.  Sharded, the checkpoint is
    gathered from the shard owners (the outer optimizer's state too)."""
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)

    def trainer(ckpt=None):
        return ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                           policy=policy, batch_size=32, client=client2, seed=5,
                           checkpoint=ckpt, sync=sync)

    with trainer() as tr:
        tr.fit(ds, epochs=2, verbose=False)
        reference = jax.tree_util.tree_leaves(tr.params)
    ckpt = str(tmp_path / "ck")
    with trainer(ckpt) as tr:
        tr.fit(ds, epochs=1, verbose=False)
    assert len(list_checkpoints(ckpt)) == 1
    with trainer(ckpt) as tr:
        hist = tr.fit(ds, epochs=2, verbose=False, resume=True)
        assert [h["epoch"] for h in hist] == [1] and tr.history[-1]["epoch"] == 1
        resumed = jax.tree_util.tree_leaves(tr.params)
        assert tr.fit(ds, epochs=2, verbose=False, resume=True) == []  # already done
    for a, b in zip(reference, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_errors_name_the_mismatch(client2, digits, tmp_path):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     batch_size=32, client=client2) as tr:
        with pytest.raises(ValueError, match="needs Trainer\\(checkpoint="):
            tr.fit(ds, resume=True)
    ckpt = str(tmp_path / "ck")
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     batch_size=32, client=client2, checkpoint=ckpt) as tr:
        tr.fit(ds, epochs=1, verbose=False, resume=True)  # nothing there yet: starts
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                     batch_size=16, client=client2, checkpoint=ckpt) as tr:
        with pytest.raises(ValueError, match="batch_size=32"):
            tr.fit(ds, epochs=2, resume=True)
    with pytest.raises(ValueError, match="no checkpoint= directory"):
        ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                    client=client2, checkpoint_key="env:DASKDL_KEY")
    with pytest.raises(ValueError, match="32 random bytes"):
        ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                    client=client2, checkpoint=ckpt, checkpoint_key=b"short")
    with pytest.raises(TypeError, match="checkpoint must be"):
        ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                    client=client2, checkpoint=3)


# -- encrypted, authenticated checkpoints; permissions; durability ---------------------------
KEY = bytes(range(100, 132))


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def _chunk(root, name, array="params/float32"):
    return next(f for f in _files(os.path.join(root, name, array, "c")))


def test_keyed_checkpoints_are_encrypted_private_and_round_trip(tmp_path):
    root = str(tmp_path / "ck")
    _write_keyed = lambda clock, key: write_checkpoint(  # noqa: E731
        root, clock, params=[np.full((3, 4), 1234.5, np.float32)], policy_state=[],
        opt_states={0: [np.ones(2)]}, local_params={}, meta={"epoch": 0, "round": clock},
        key=key)
    _write_keyed(5, KEY)
    ck = load_latest(root, key=KEY)
    np.testing.assert_array_equal(ck["params"][0], 1234.5)
    blob = b"".join(open(f, "rb").read() for f in _files(root))
    assert np.float32(1234.5).tobytes() * 4 not in blob and KEY not in blob
    assert b'"round"' not in blob  # the metadata is sealed too
    assert os.stat(root).st_mode & 0o777 == 0o700
    assert all(os.stat(f).st_mode & 0o777 == 0o600 for f in _files(root))
    assert all(os.stat(d).st_mode & 0o777 == 0o700 for d, _, _ in os.walk(root))
    _write_keyed(5, KEY)  # the same clock again: exchanged atomically, nothing left aside
    assert os.listdir(root) == ["ckpt-000000005"]
    with pytest.raises(ddl.DaskDLError, match="encrypted; pass the key"):
        load_latest(root)
    with pytest.raises(ddl.DaskDLError, match="wrong key"):
        load_latest(root, key=os.urandom(32))
    _write(root, 9, 1.0)  # a plaintext one where a key is expected: refused, not used
    with pytest.raises(ddl.DaskDLError, match="not encrypted, but a checkpoint key is given"):
        load_latest(root, key=KEY)


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "keyed"])
@pytest.mark.parametrize("damage", ["changed", "truncated"])
def test_changed_or_truncated_checkpoint_file_is_detected(tmp_path, key, damage):
    root = str(tmp_path / "ck")
    for clock, value in ((5, 1.0), (10, 2.0)):
        write_checkpoint(root, clock, params=[np.full((3, 4), value, np.float32)],
                         policy_state=[], opt_states={}, local_params={}, meta={}, key=key)
    chunk = _chunk(root, "ckpt-000000010")
    data = bytearray(open(chunk, "rb").read())
    if damage == "changed":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[:len(data) // 2]
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(ddl.DaskDLError, match="ckpt-000000010|chunk"):
        read_checkpoint(root, "ckpt-000000010", key=key)
    with pytest.warns(UserWarning, match="skipping checkpoint ckpt-000000010"):
        ck = load_latest(root, key=key)
    assert ck["name"] == "ckpt-000000005"


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "keyed"])
def test_changed_checkpoint_metadata_is_detected(tmp_path, key):
    import json

    root = str(tmp_path / "ck")
    write_checkpoint(root, 5, params=[np.zeros(4, np.float32)], policy_state=[],
                     opt_states={}, local_params={}, meta={"epoch": 3}, key=key)
    f = os.path.join(root, "ckpt-000000005", "params", "float32", "zarr.json")
    doc = json.load(open(f))
    doc["fill_value"] = 1.0
    doc["shape"] = [2]
    json.dump(doc, open(f, "w"))
    with pytest.raises(ddl.DaskDLError):
        ck = read_checkpoint(root, "ckpt-000000005", key=key)
        assert ck["params"][0].shape == (4,)  # without a key: the digest catches it
        raise AssertionError("not detected")


def test_renamed_keyed_checkpoint_is_detected(tmp_path):
    root = str(tmp_path / "ck")
    write_checkpoint(root, 5, params=[np.zeros(2)], policy_state=[], opt_states={},
                     local_params={}, meta={}, key=KEY)
    os.rename(os.path.join(root, "ckpt-000000005"), os.path.join(root, "ckpt-000000099"))
    with pytest.raises(ddl.DaskDLError, match="ckpt-000000099.*failed authentication"):
        read_checkpoint(root, "ckpt-000000099", key=KEY)


def test_checkpoint_directory_of_another_user_or_a_link_is_refused(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(theirs).st_uid + 1)  # not the owner
    with pytest.raises(ddl.DaskDLError, match="not by you"):
        _write(str(theirs), 1, 1.0)
    monkeypatch.undo()
    link = tmp_path / "link"
    link.symlink_to(theirs)
    with pytest.raises(ddl.DaskDLError, match="symbolic link"):
        _write(str(link), 1, 1.0)
    w = CheckpointWriter(str(link), keep=2)  # the writer reports it like a full disk
    w.submit(1, 1, [np.zeros(2)], [], {}, {}, {})
    assert "symbolic link" in w.close()[0]


def test_training_on_an_encrypted_share_encrypts_its_checkpoints(client2, digits, tmp_path,
                                                                 monkeypatch):
    """Trainer(checkpoint=...) on a share opened with a key: the checkpoints use it by
    default (a raw key: the scheduler gets a key for this series only), and resume."""
    import json

    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:600], y=y[:600], chunk_size=150).share(
        str(tmp_path / "e.zarr"), key=KEY)
    ckpt = str(tmp_path / "ck")

    def trainer(**kw):
        return ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                           policy=ddl.BSP(every=4), batch_size=32, client=client2,
                           checkpoint=ckpt, **kw)

    with trainer() as tr:
        tr.fit(ds, epochs=1, verbose=False)
    name = list_checkpoints(ckpt)[-1]
    attrs = json.load(open(os.path.join(ckpt, name, "zarr.json")))["attributes"]
    assert "daskdl_encryption" in attrs and "sealed" in attrs["daskdl_checkpoint"]
    assert load_latest(ckpt, key=KEY)["meta"]["epoch"] == 1
    with trainer() as tr:
        assert [h["epoch"] for h in tr.fit(ds, epochs=2, verbose=False, resume=True)] == [1]
    # an explicit key reference: resolved on the scheduler (in-process here) and client
    monkeypatch.setenv("DASKDL_TEST_CKPT_KEY", "a checkpoint passphrase")
    ckpt = str(tmp_path / "ck2")
    with trainer(checkpoint_key="env:DASKDL_TEST_CKPT_KEY") as tr:
        tr.fit(ds, epochs=1, verbose=False)
    assert load_latest(ckpt, key="a checkpoint passphrase")["meta"]["epoch"] == 1


def test_checkpoint_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    import daskdl.encryption as enc

    root = str(tmp_path / "ck")
    synced, renamed = [], []
    real_fsync, real_rename2 = os.fsync, enc._rename2

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename2(src, dst, flags):
        renamed.append((src, list(synced)))
        return real_rename2(src, dst, flags)

    monkeypatch.setattr(enc.os, "fsync", fsync)
    monkeypatch.setattr(enc, "_rename2", rename2)
    _write(root, 3, 1.0)
    _write(root, 3, 2.0)  # the same clock rewritten: exchanged, after an fsync too
    for src, before in renamed:
        assert src in before and any(p.startswith(src + "/params/") for p in before)
    assert os.listdir(root) == ["ckpt-000000003"]
    np.testing.assert_array_equal(load_latest(root)["params"][0], 2.0)
