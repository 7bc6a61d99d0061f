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


@pytest.mark.parametrize("policy", [ddl.DiLoCo(every=4), ddl.EASGD(every=4, alpha=0.3)])
def test_resume_restores_policy_and_optimizer_state_exactly(policy, client2, digits, tmp_path):
    """Two epochs in one go == one epoch, then a new trainer resuming for the second:
    the outer optimizer (DiLoCo) or each worker's own parameters (EASGD) and every
    worker's Adam state come back from the checkpoint."""
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)

    def trainer(ckpt=None):
        return ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                           policy=policy, batch_size=32, client=client2, seed=5,
                           checkpoint=ckpt)

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
    with pytest.raises(TypeError, match="checkpoint must be"):
        ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                    client=client2, checkpoint=3)
