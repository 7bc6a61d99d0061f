import dask.array as da
import numpy as np
import pytest
import zarr

import daskdl as ddl
from daskdl.errors import DatasetError


def test_from_arrays_basics():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100) % 3
    ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=30)
    assert len(ds) == 100 and ds.names == ("x", "y") and ds.nchunks == 4
    assert ds.chunks == (30, 30, 30, 10)
    assert ds.in_memory
    assert np.array_equal(ds["x"].compute(), x)
    assert np.array_equal(ds.block(1)["y"], y[30:60])
    assert "100 samples" in repr(ds)


def test_default_chunking_gives_several_chunks():
    ds = ddl.Dataset.from_arrays(x=np.zeros((1600, 8), np.float32))
    assert ds.nchunks == 16


def test_from_arrays_accepts_dask_arrays_and_rechunks_numpy_to_match():
    x = da.ones((90, 3), chunks=(20, 3))
    y = np.zeros(90, np.int32)
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    assert ds["y"].chunks[0] == ds["x"].chunks[0] == (20, 20, 20, 20, 10)
    assert not ds.in_memory


def test_unaligned_dask_chunks_are_rechunked_once_with_a_warning():
    x = da.ones((90, 3), chunks=(20, 3))
    y = da.zeros(90, chunks=45)
    with pytest.warns(UserWarning, match="rechunking"):
        ds = ddl.Dataset({"x": x, "y": y})
    assert ds["y"].chunks[0] == x.chunks[0]


def test_different_lengths_is_an_error():
    with pytest.raises(DatasetError, match="same length.*x: 10, y: 9"):
        ddl.Dataset.from_arrays(x=np.zeros((10, 2)), y=np.zeros(9))
    with pytest.raises(DatasetError, match="same length"):
        ddl.Dataset({"x": da.zeros((10, 2)), "y": da.zeros(9)})


def test_zero_samples_is_an_error():
    with pytest.raises(DatasetError, match="zero samples"):
        ddl.Dataset.from_arrays(x=np.zeros((0, 2), np.float32))


def test_non_numeric_dtype_is_an_error():
    with pytest.raises(DatasetError, match="dtype <U1.*numeric"):
        ddl.Dataset.from_arrays(x=np.zeros((3, 2)), y=np.array(["a", "b", "c"]))
    with pytest.raises(DatasetError, match="object"):
        ddl.Dataset.from_arrays(x=np.array([None, 1, 2], dtype=object))


def test_no_arrays_is_an_error():
    with pytest.raises(DatasetError, match="at least one array"):
        ddl.Dataset.from_arrays()


def test_split_in_memory_is_disjoint_complete_and_seeded():
    x = np.arange(100, dtype=np.float32)[:, None]
    ds = ddl.Dataset.from_arrays(x=x, chunk_size=10)
    a, b = ds.split(0.8, seed=0)
    assert len(a) == 80 and len(b) == 20
    va, vb = a["x"].compute()[:, 0], b["x"].compute()[:, 0]
    assert set(va) | set(vb) == set(range(100)) and not set(va) & set(vb)
    a2, _ = ds.split(0.8, seed=0)
    a3, _ = ds.split(0.8, seed=1)
    assert np.array_equal(a2["x"].compute(), a["x"].compute())
    assert not np.array_equal(a3["x"].compute(), a["x"].compute())
    with pytest.raises(ValueError, match="between 0 and 1"):
        ds.split(1.5)


def test_split_lazy_dataset_per_chunk():
    x = da.arange(100, chunks=25).astype(np.float32)[:, None]
    ds = ddl.Dataset({"x": x, "i": da.arange(100, chunks=25)})
    a, b = ds.split(0.8, seed=0)
    assert a.chunks == (20, 20, 20, 20) and b.chunks == (5, 5, 5, 5)
    va, vb = a["i"].compute(), b["i"].compute()
    assert sorted(np.concatenate([va, vb]).tolist()) == list(range(100))
    assert np.array_equal(a["x"].compute()[:, 0], va.astype(np.float32))


def test_from_zarr_reads_named_arrays(tmp_path):
    path = tmp_path / "d.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("features", data=np.arange(60, dtype=np.float32).reshape(30, 2), chunks=(10, 2))
    g.create_array("labels", data=np.arange(30, dtype=np.int32), chunks=(10,))
    ds = ddl.Dataset.from_zarr(str(path), x="features", y="labels")
    assert ds.names == ("x", "y") and ds.nchunks == 3 and not ds.in_memory
    assert np.array_equal(ds["y"].compute(), np.arange(30))
    everything = ddl.Dataset.from_zarr(str(path))
    assert set(everything.names) == {"features", "labels"}


def test_from_zarr_missing_array_names_it(tmp_path):
    path = tmp_path / "d.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("x", data=np.zeros((4, 2), np.float32))
    with pytest.raises(DatasetError, match=r"'labels' .* holds \['x'\]"):
        ddl.Dataset.from_zarr(str(path), x="x", y="labels")


def test_from_zarr_missing_store(tmp_path):
    with pytest.raises(DatasetError, match="cannot open a Zarr group"):
        ddl.Dataset.from_zarr(str(tmp_path / "nothing.zarr"), x="x")


def test_from_zarr_arrays_of_different_length(tmp_path):
    path = tmp_path / "d.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("x", data=np.zeros((4, 2), np.float32))
    g.create_array("y", data=np.zeros(5, np.int32))
    with pytest.raises(DatasetError, match="x: 4, y: 5"):
        ddl.Dataset.from_zarr(str(path), x="x", y="y")
