"""Dataset.map and Dataset.share: compressed, atomic, encrypted and authenticated Zarr
stores on disk; every kind of tampering detected, each in its own test."""

import json
import os
import pickle
import shutil

import dask.array as da
import numpy as np
import pytest
import zarr

import daskdl as ddl
from daskdl.encryption import (ChunkAuthenticationError, KeyRef, MetadataAuthenticationError,
                               WrongKeyError)
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


# -- authenticated shares: every kind of tampering, each detected -------------------------
KEY = bytes(range(32))


@pytest.fixture
def sealed(ds, tmp_path):
    path = str(tmp_path / "sealed.zarr")
    ds.share(path, key=KEY)
    return path


def edit_meta(path, array, change):
    f = os.path.join(path, array, "zarr.json") if array else os.path.join(path, "zarr.json")
    doc = json.load(open(f))
    change(doc)
    json.dump(doc, open(f, "w"))


def test_deleted_chunk_is_detected_not_read_as_fill(sealed):
    os.remove(chunk_files(sealed, "x")[1])
    opened = ddl.Dataset.from_zarr(sealed, key=KEY)  # listing is fine: nothing extra
    np.testing.assert_array_equal(opened["x"].blocks[0].compute().shape, (50, 16))
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '1/0' of array 'x' is missing"):
        opened["x"].blocks[1].compute()


def test_empty_chunks_are_written_so_missing_means_tampered(tmp_path):
    zeros = ddl.Dataset.from_arrays(x=np.zeros((100, 4), np.float32), chunk_size=25)
    path = str(tmp_path / "z.zarr")
    zeros.share(path, key=KEY)
    assert len(chunk_files(path, "x")) == 4
    assert len(json.load(open(os.path.join(path, "zarr.json")))["attributes"]
               ["daskdl_encryption"]["chunks"]) == 4


def test_extra_chunk_is_detected(sealed):
    src = chunk_files(sealed, "y")[0]
    shutil.copy(src, os.path.join(os.path.dirname(src), "9"))  # beyond the array's end
    with pytest.raises(ChunkAuthenticationError,
                       match=r"chunk '9' of array 'y'.*not in the manifest"):
        ddl.Dataset.from_zarr(sealed, key=KEY)


def test_moved_chunk_is_detected(sealed):
    files = chunk_files(sealed, "y")
    os.replace(files[0], files[3])  # chunk 0 put in chunk 3's place, 0 gone
    opened = ddl.Dataset.from_zarr(sealed, key=KEY)
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '3' of array 'y'"):
        opened["y"].blocks[3].compute()
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '0' of array 'y' is missing"):
        opened["y"].blocks[0].compute()


def test_rewritten_chunk_is_detected(sealed, ds):
    f = chunk_files(sealed, "x")[2]
    data = bytearray(open(f, "rb").read())
    data[20] ^= 0xFF
    open(f, "wb").write(bytes(data))
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '2/0' of array 'x'"):
        ddl.Dataset.from_zarr(sealed, key=KEY)["x"].compute()


def test_chunk_from_another_store_with_the_same_key_is_detected(sealed, ds, tmp_path):
    other = str(tmp_path / "other.zarr")
    ds.share(other, key=KEY)
    shutil.copy(chunk_files(other, "y")[1], chunk_files(sealed, "y")[1])  # same place
    with pytest.raises(ChunkAuthenticationError, match=r"chunk '1' of array 'y'"):
        ddl.Dataset.from_zarr(sealed, key=KEY)["y"].compute()


@pytest.mark.parametrize("what,change", [
    ("shape", lambda d: d.__setitem__("shape", [150, 16])),
    ("fill value", lambda d: d.__setitem__("fill_value", 7.0)),
    ("dtype", lambda d: d.__setitem__("data_type", "int32")),
    ("compressor", lambda d: d.__setitem__("codecs", d["codecs"][:1])),
])
def test_changed_array_metadata_is_detected(sealed, what, change):
    edit_meta(sealed, "x", change)
    with pytest.raises(MetadataAuthenticationError, match=r"metadata of array 'x'.*was changed"):
        ddl.Dataset.from_zarr(sealed, key=KEY)


def test_changed_root_metadata_or_manifest_is_detected(sealed, tmp_path):
    def drop_chunk(doc):
        del doc["attributes"]["daskdl_encryption"]["chunks"]["x/c/1/0"]

    edit_meta(sealed, "", drop_chunk)
    with pytest.raises(MetadataAuthenticationError, match="was changed after it was written"):
        ddl.Dataset.from_zarr(sealed, key=KEY)


def test_added_consolidated_metadata_is_detected(sealed):
    edit_meta(sealed, "", lambda d: d.__setitem__("consolidated_metadata", {
        "kind": "inline", "must_understand": False, "metadata": {}}))
    with pytest.raises(MetadataAuthenticationError, match="was changed"):
        ddl.Dataset.from_zarr(sealed, key=KEY)


# -- keys: references, what travels, passphrases ------------------------------------------
def test_key_references_env_file_and_callable(ds, tmp_path, monkeypatch):
    monkeypatch.setenv("DASKDL_TEST_KEY", KEY.hex())
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "pass").write_text("a file passphrase\n")
    path = str(tmp_path / "ref.zarr")
    shared = ds.share(path, key="env:DASKDL_TEST_KEY")
    assert isinstance(shared._zarr.store._key, KeyRef)  # only the reference travels
    for key in ("env:DASKDL_TEST_KEY", f"file:{tmp_path / 'key'}", KEY, lambda: KEY):
        np.testing.assert_array_equal(ddl.Dataset.from_zarr(path, key=key)["y"].compute(),
                                      np.arange(200))
    ds.share(str(tmp_path / "p.zarr"), key=f"file:{tmp_path / 'pass'}")
    ddl.Dataset.from_zarr(str(tmp_path / "p.zarr"), key="a file passphrase")
    (tmp_path / "pass32").write_text("x" * 32)  # 32 printable bytes: a passphrase (scrypt)
    assert KeyRef(f"file:{tmp_path / 'pass32'}").resolve() == "x" * 32
    with pytest.raises(ddl.DaskDLError, match="DASKDL_NOPE, which is not set"):
        ddl.Dataset.from_zarr(path, key="env:DASKDL_NOPE")
    with pytest.raises(ddl.DaskDLError, match="cannot be read here"):
        ddl.Dataset.from_zarr(path, key=f"file:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="32 random bytes"):
        ddl.Dataset.from_zarr(path, key=lambda: b"short")


def test_a_raw_key_or_passphrase_never_travels(ds, tmp_path):
    shared = ds.share(str(tmp_path / "raw.zarr"), key=KEY)
    blob = pickle.dumps(shared._zarr) + pickle.dumps(shared["x"].dask)
    for form in (KEY, KEY.hex().encode(), repr(KEY).encode()):
        assert form not in blob
    travelling = repr(shared._zarr.store._key)
    assert "SubKey" in travelling and KEY.hex() not in travelling
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(shared._key)  # the client's own handle refuses to travel
    assert "hidden" in repr(shared._key)


def test_passphrase_parameters_are_recorded_and_costly(ds, tmp_path):
    path = str(tmp_path / "pp.zarr")
    ds.share(path, key="correct horse battery staple")
    enc = json.load(open(os.path.join(path, "zarr.json")))["attributes"]["daskdl_encryption"]
    assert enc["kdf"]["name"] == "scrypt" and enc["kdf"]["n"] >= 2**17
    assert enc["kdf"]["r"] == 8 and enc["kdf"]["p"] == 1 and len(enc["kdf"]["salt"]) >= 20
    assert "check" in enc and enc["check"] not in ("", None)  # keyed by the derived key only
    with pytest.raises(WrongKeyError, match="wrong key"):
        ddl.Dataset.from_zarr(path, key="correct horse battery stapler")
    enc["kdf"]["n"] = 2**10  # a cheaper derivation written by someone else is refused
    edit_meta(path, "",
              lambda d: d["attributes"]["daskdl_encryption"].__setitem__("kdf", enc["kdf"]))
    with pytest.raises(MetadataAuthenticationError, match="scrypt parameters"):
        ddl.Dataset.from_zarr(path, key="correct horse battery staple")


# -- overwrite, atomicity, durability -----------------------------------------------------
def test_overwrite_false_never_deletes_a_store_created_meanwhile(ds, tmp_path):
    path = str(tmp_path / "race.zarr")

    def create_concurrently(batch):
        if batch["y"][0] == 0:  # another share finishes first
            os.makedirs(os.path.join(path, "theirs"), exist_ok=True)
            open(os.path.join(path, "theirs", "data"), "w").write("keep me")
        return batch

    racing = ds.map(create_concurrently, outputs={"x": ((16,), np.float32), "y": ((), np.int32)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        racing.share(path, key=KEY)
    assert open(os.path.join(path, "theirs", "data")).read() == "keep me"
    assert [n for n in os.listdir(tmp_path) if n != "race.zarr"] == []  # no temporary left


def test_overwrite_swaps_and_fsyncs_before_publishing(ds, tmp_path, monkeypatch):
    import daskdl.encryption as enc

    path = str(tmp_path / "s.zarr")
    ds.share(path, key=KEY)
    synced, renamed = [], []
    real_fsync, real_publish_rename = os.fsync, enc._rename2

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename2(src, dst, flags):
        renamed.append((src, list(synced)))
        return real_publish_rename(src, dst, flags)

    monkeypatch.setattr(enc.os, "fsync", fsync)
    monkeypatch.setattr(enc, "_rename2", rename2)
    new = ddl.Dataset.from_arrays(x=np.ones((40, 2), np.float32), chunk_size=20)
    new.share(path, key=KEY, overwrite=True)
    src, before = renamed[0]
    assert any(p.startswith(src + "/x/c/") for p in before)  # chunks fsynced before
    assert src in before  # and the directory itself
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]  # old store gone, nothing aside
    np.testing.assert_array_equal(ddl.Dataset.from_zarr(path, key=KEY)["x"].compute(), 1)


def test_share_to_a_zarr_store_refuses_to_clobber(ds):
    store = zarr.storage.MemoryStore()
    ds.share(store)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ds.share(store)
    ds.share(store, overwrite=True, key=KEY)


# -- codecs that unpickle -------------------------------------------------------------------
def test_store_with_a_pickle_codec_is_refused(tmp_path):
    import numcodecs

    path = tmp_path / "pickled.zarr"  # Zarr v2, as older tools wrote it
    (path / "x").mkdir(parents=True)
    (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (path / "x" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [10], "chunks": [5], "dtype": "<f8", "order": "C",
        "fill_value": 0.0, "filters": None, "compressor": {"id": "pickle", "protocol": 5}}))
    for i in range(2):
        (path / "x" / str(i)).write_bytes(pickle.dumps(np.arange(5.0)))
    path = str(path)
    with pytest.raises(DaskDLError, match="unpickles data"):
        ddl.Dataset.from_zarr(path)
    # and numcodecs itself (the pinned version) refuses to unpickle on decode
    with pytest.raises(Exception, match="(?i)unsafe|pickle"):
        numcodecs.Pickle().decode(numcodecs.Pickle().encode(np.arange(3.0)))


def test_publish_without_renameat2_renames_the_old_store_aside_first(ds, tmp_path, monkeypatch):
    import daskdl.encryption as enc

    path = str(tmp_path / "s.zarr")
    ds.share(path)
    moves = []
    real_rename = os.rename
    monkeypatch.setattr(enc, "_rename2", lambda src, dst, flags: False)  # e.g. not Linux
    monkeypatch.setattr(enc.os, "rename", lambda a, b: (moves.append((a, b)), real_rename(a, b)))
    ds.share(path, overwrite=True, key=KEY)
    assert moves[0][0] == path and ".old-" in moves[0][1]  # the old store aside, not deleted
    assert moves[1][1] == path and sorted(os.listdir(tmp_path)) == ["s.zarr"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ds.share(path)
    ddl.Dataset.from_zarr(path, key=KEY)
