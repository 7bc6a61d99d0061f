"""Dataset.map and Dataset.share: compressed, atomic, encrypted Zarr stores on disk."""

import json
import os

import dask.array as da
import numpy as np
import pytest
import zarr

import daskdl as ddl
from daskdl.encryption import ChunkAuthenticationError
from daskdl.errors import DaskDLError, DatasetError


@pytest.fixture
def ds():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (200, 16)).astype(np.float32)  # compressible
    return ddl.Dataset.from_arrays(x=x, y=np.arange(200, dtype=np.int32), chunk_size=50)


def chunk_files(path, name):
    out = []
    for root, _, files in os.walk(os.path.join(path, name, "c")):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def test_map_is_lazy_and_infers_outputs(ds):
    calls = []

    def prep(batch):
        calls.append(len(batch["x"]))
        return {"x": batch["x"].mean(axis=1, keepdims=True) * 2, "label": batch["y"] % 2}

    m = ds.map(prep)
    assert calls == [2]  # only the two-row sample used to infer the outputs
    assert m.names == ("x", "label") and m.chunks == ds.chunks
    assert m["x"].shape == (200, 1) and m["label"].dtype == np.int32
    np.testing.assert_allclose(m["x"].compute()[:, 0], ds["x"].compute().mean(1) * 2, rtol=1e-6)


def test_map_with_given_outputs_and_bad_functions(ds):
    m = ds.map(lambda b: {"z": b["x"][:, :3]}, outputs={"z": ((3,), np.float32)})
    assert m["z"].shape == (200, 3)
    with pytest.raises(TypeError, match="must return a dict of arrays"):
        ds.map(lambda b: b["x"])
    with pytest.raises(ValueError, match="keep the number of rows"):
        ds.map(lambda b: {"x": b["x"][:1]})


def test_share_compresses_and_round_trips(ds, tmp_path):
    path = str(tmp_path / "plain.zarr")
    shared = ds.share(path)
    assert shared.names == ds.names and shared.chunks == ds.chunks
    np.testing.assert_array_equal(shared["x"].compute(), ds["x"].compute())
    meta = json.load(open(os.path.join(path, "x", "zarr.json")))
    assert any(c["name"] == "zstd" for c in meta["codecs"])
    stored = sum(os.path.getsize(f) for f in chunk_files(path, "x"))
    assert stored < ds["x"].nbytes / 3  # 2 bits of entropy in 32
    again = ddl.Dataset.from_zarr(path)  # a later run reuses the store
    np.testing.assert_array_equal(again["y"].compute(), np.arange(200))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ds.share(path)
    ds.share(path, compressor=None, overwrite=True)
    with pytest.raises(ValueError, match="unknown compressor"):
        ds.share(str(tmp_path / "other.zarr"), compressor="nope")


def test_share_of_a_preprocessed_lazy_dataset_runs_on_the_cluster(client2, tmp_path):
    x = da.random.default_rng(1).random((1000, 8), chunks=(250, 8)).astype(np.float32)
    ds = ddl.Dataset({"x": x}).map(lambda b: {"x": b["x"] * 10, "s": b["x"].sum(1)})
    shared = ds.share(str(tmp_path / "p.zarr"), client=client2)
    np.testing.assert_allclose(shared["s"].compute(), shared["x"].compute().sum(1) / 10, rtol=1e-5)


def test_interrupted_share_leaves_no_complete_store(ds, tmp_path):
    def boom(batch):
        if batch["y"][0] >= 100:
            raise RuntimeError("preprocessing failed")
        return batch

    bad = ds.map(boom, outputs={"x": ((16,), np.float32), "y": ((), np.int32)})
    path = str(tmp_path / "s.zarr")
    with pytest.raises(RuntimeError, match="preprocessing failed"):
        bad.share(path)
    assert not os.path.exists(path)  # only a temporary folder beside it

    store = zarr.storage.MemoryStore()
    with pytest.raises(RuntimeError, match="preprocessing failed"):
        bad.share(store)
    with pytest.raises(DatasetError, match="interrupted"):
        ddl.Dataset.from_zarr(store)


def test_encrypted_round_trip_and_the_key_is_not_stored(ds, tmp_path):
    key = os.urandom(32)
    path = str(tmp_path / "enc.zarr")
    shared = ds.share(path, key=key)
    np.testing.assert_array_equal(shared["x"].compute(), ds["x"].compute())
    again = ddl.Dataset.from_zarr(path, key=key)
    np.testing.assert_array_equal(again["y"].compute(), np.arange(200))
    blob = b"".join(open(os.path.join(r, f), "rb").read()
                    for r, _, fs in os.walk(path) for f in fs)
    assert key not in blob
    # chunk bytes are not the plain (compressed) data: the same share unencrypted differs
    plain = ds.share(str(tmp_path / "plain.zarr"))
    assert open(chunk_files(path, "x")[0], "rb").read() != \
        open(chunk_files(str(tmp_path / "plain.zarr"), "x")[0], "rb").read()
    del plain


def test_passphrase_and_wrong_keys(ds, tmp_path):
    path = str(tmp_path / "enc.zarr")
    ds.share(path, key="correct horse battery staple")
    assert "correct horse" not in "".join(
        open(os.path.join(r, f), "rb").read().decode("latin1")
        for r, _, fs in os.walk(path) for f in fs)
    ok = ddl.Dataset.from_zarr(path, key="correct horse battery staple")
    assert ok["x"].compute().shape == (200, 16)
    with pytest.raises(ChunkAuthenticationError, match="wrong key"):
        ddl.Dataset.from_zarr(path, key="wrong horse")
    with pytest.raises(ChunkAuthenticationError, match="wrong key"):
        ddl.Dataset.from_zarr(path, key=os.urandom(32))
    with pytest.raises(DaskDLError, match="encrypted; pass key="):
        ddl.Dataset.from_zarr(path)
    with pytest.raises(ValueError, match="32 random bytes"):
        ds.share(str(tmp_path / "short.zarr"), key=b"too short")
    with pytest.raises(DatasetError, match="not encrypted"):
        ddl.Dataset.from_zarr(ds.share(str(tmp_path / "p.zarr"))._zarr.store, key="x")


def test_flipped_byte_and_moved_chunk_are_detected(ds, tmp_path):
    path = str(tmp_path / "enc.zarr")
    key = os.urandom(32)
    ds.share(path, key=key)
    files = chunk_files(path, "x")
    data = bytearray(open(files[2], "rb").read())
    data[len(data) // 2] ^= 0x01
    open(files[2], "wb").write(bytes(data))
    opened = ddl.Dataset.from_zarr(path, key=key)
    np.testing.assert_array_equal(opened["x"].blocks[0].compute(), ds["x"].blocks[0].compute())
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '2/0' of array 'x'"):
        opened["x"].blocks[2].compute()

    path2 = str(tmp_path / "enc2.zarr")
    ds.share(path2, key=key)
    files = chunk_files(path2, "y")
    open(files[1], "wb").write(open(files[0], "rb").read())  # a valid chunk, moved
    opened = ddl.Dataset.from_zarr(path2, key=key)
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '1' of array 'y'"):
        opened["y"].compute()
    # a chunk from another store written with the same key does not fit either
    other = str(tmp_path / "enc3.zarr")
    ds.share(other, key=key)
    open(chunk_files(other, "y")[0], "wb").write(open(chunk_files(path, "y")[0], "rb").read())
    with pytest.raises(ChunkAuthenticationError):
        ddl.Dataset.from_zarr(other, key=key)["y"].compute()
