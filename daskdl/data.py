"""Datasets: named Dask arrays aligned on axis 0, with identical chunks.

A :class:`Dataset` never holds data on the client: its arrays are Dask arrays
(built from Zarr stores, from any Dask graph, or from numpy arrays the user
already holds).  Training reads them chunk by chunk on the worker that trains
on each chunk.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import dask.array as da
import numpy as np

from . import config
from .errors import DatasetError

_TARGET_CHUNK_BYTES = 64 * 2**20
_TARGET_CHUNKS = 16


def _check_dtype(name: str, dtype) -> None:
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise DatasetError(
            f"array {name!r} has dtype {dtype}, which cannot be fed to JAX. Convert it to "
            f"a numeric dtype first, e.g. labels with np.unique(y, return_inverse=True)[1]."
        )


def default_chunk_rows(n: int, row_bytes: int) -> int:
    """Rows per chunk for in-memory input: about 16 chunks, at most 64 MiB each."""
    rows = config.get("chunk-rows")
    if rows:
        return int(rows)
    by_bytes = max(1, _TARGET_CHUNK_BYTES // max(row_bytes, 1))
    return max(1, min(math.ceil(n / _TARGET_CHUNKS), by_bytes))


class Dataset:
    """Named arrays sharing their first axis and its chunks.

    Build one with :meth:`from_arrays` or :meth:`from_zarr`.

    Attributes
    ----------
    names : tuple of the array names, as the keys of each training ``batch``.
    nchunks : number of chunks along axis 0.
    chunks : samples in each chunk.

    Examples
    --------
    >>> import numpy as np
    >>> ds = Dataset.from_arrays(x=np.zeros((100, 3)), y=np.zeros(100, int), chunk_size=25)
    >>> len(ds), ds.names, ds.nchunks
    (100, ('x', 'y'), 4)
    """

    def __init__(self, arrays: Mapping[str, da.Array], *, _source: Mapping | None = None):
        if not arrays:
            raise DatasetError("a Dataset needs at least one named array, e.g. x=X, y=y")
        arrays = dict(arrays)
        for name, a in arrays.items():
            if not isinstance(a, da.Array):
                raise TypeError(f"array {name!r} must be a dask array, got {type(a).__name__}")
            if a.ndim == 0:
                raise DatasetError(f"array {name!r} is a scalar; arrays need a first (sample) axis")
            _check_dtype(name, a.dtype)
            if any(math.isnan(c) for c in a.chunks[0]):
                raise DatasetError(
                    f"array {name!r} has unknown chunk sizes; call "
                    f"arr.compute_chunk_sizes() before building a Dataset."
                )
        lengths = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k}: {v}" for k, v in lengths.items())
            raise DatasetError(
                f"arrays must have the same length along axis 0, got {desc}. "
                "Every sample needs a value in every array."
            )
        first = next(iter(arrays))
        ref = arrays[first].chunks[0]
        for name, a in arrays.items():
            want = (ref,) + tuple((s,) if len(c) == 1 else c for s, c in zip(a.shape[1:], a.chunks[1:]))
            if a.chunks[0] != ref or any(len(c) > 1 for c in a.chunks[1:]):
                warnings.warn(
                    f"array {name!r} is chunked differently from {first!r} along axis 0 "
                    f"(or split along another axis); rechunking it once to match.",
                    stacklevel=3,
                )
                arrays[name] = a.rechunk((ref,) + tuple(-1 for _ in a.shape[1:]))
            del want
        if lengths[first] == 0:
            raise DatasetError("the dataset has zero samples; there is nothing to train on.")
        self._arrays = arrays
        self._source = dict(_source) if _source is not None else None

    # -- constructors --------------------------------------------------------------
    @classmethod
    def from_arrays(cls, chunk_size: int | None = None, **arrays) -> "Dataset":
        """Build a dataset from numpy or Dask arrays, by name.

        Parameters
        ----------
        chunk_size : rows per chunk for numpy input (Dask arrays keep their chunks
            unless given).  ``None`` picks about 16 chunks of at most 64 MiB
            (config ``daskdl.chunk-rows`` overrides).
        **arrays : the arrays, e.g. ``x=X, y=y``; their names are the keys of each
            training batch.

        Numpy input stays on the client until a :class:`~daskdl.Trainer` uses it;
        it then sends each chunk once to the worker that will own it.
        """
        if not arrays:
            raise DatasetError("from_arrays needs at least one array, e.g. from_arrays(x=X, y=y)")
        lengths = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in arrays.items()}
        if any(v is None for v in lengths.values()):
            bad = [k for k, v in lengths.items() if v is None]
            raise DatasetError(f"arrays {bad} are scalars; every array needs a sample axis")
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k}: {v}" for k, v in lengths.items())
            raise DatasetError(
                f"arrays must have the same length along axis 0, got {desc}. "
                "Every sample needs a value in every array."
            )
        n = next(iter(lengths.values()))
        all_numpy = not any(isinstance(v, da.Array) for v in arrays.values())
        out, source = {}, {}
        for name, v in arrays.items():
            if isinstance(v, da.Array):
                out[name] = v if chunk_size is None else v.rechunk({0: chunk_size})
                continue
            v = np.asarray(v)
            _check_dtype(name, v.dtype)
            row_bytes = sum(
                int(np.prod(np.shape(a)[1:], dtype=np.int64)) * np.asarray(a).dtype.itemsize
                for a in arrays.values() if not isinstance(a, da.Array))
            rows = chunk_size or default_chunk_rows(n, row_bytes)
            out[name] = da.from_array(v, chunks=(rows,) + v.shape[1:])
            source[name] = v
        if not all_numpy:
            ref = next(a for a in out.values())
            for name in source:
                out[name] = out[name].rechunk({0: ref.chunks[0]})
        return cls(out, _source=source if all_numpy else None)

    @classmethod
    def from_zarr(cls, store, **names: str) -> "Dataset":
        """Open arrays of a Zarr group, by name; read chunk by chunk on the workers.

        Parameters
        ----------
        store : a path, URL or Zarr store holding a group.
        **names : dataset name -> array path in the group, e.g. ``x="x", y="y"``.
            With none, every array at the group's top level is used under its name.
        """
        import zarr

        try:
            group = zarr.open_group(store, mode="r")
        except Exception as e:  # zarr raises several types for a missing/malformed group
            raise DatasetError(f"cannot open a Zarr group at {store!r}: {e}") from e
        available = sorted(k for k, _ in group.arrays())
        if not names:
            names = {k: k for k in available}
        arrays = {}
        for name, path in names.items():
            try:
                arr = group[path]
            except KeyError:
                raise DatasetError(
                    f"array {path!r} (for {name!r}) is not in the Zarr group {store!r}; "
                    f"it holds {available}."
                ) from None
            if not isinstance(arr, zarr.Array):
                raise DatasetError(f"{path!r} in {store!r} is a group, not an array")
            arrays[name] = da.from_zarr(arr)
        return cls(arrays)

    # -- views ----------------------------------------------------------------------
    @property
    def names(self) -> tuple:
        return tuple(self._arrays)

    @property
    def chunks(self) -> tuple:
        return tuple(int(c) for c in next(iter(self._arrays.values())).chunks[0])

    @property
    def nchunks(self) -> int:
        return len(self.chunks)

    @property
    def arrays(self) -> dict:
        """The Dask arrays by name (a new dict)."""
        return dict(self._arrays)

    @property
    def in_memory(self) -> bool:
        """True when built from numpy arrays held by this process."""
        return self._source is not None

    def __len__(self) -> int:
        return int(next(iter(self._arrays.values())).shape[0])

    def __getitem__(self, name: str) -> da.Array:
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"no array {name!r} in this dataset; it has {list(self.names)}") from None

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {a.dtype}{list(a.shape)}" for k, a in self._arrays.items())
        return f"<daskdl.Dataset {len(self)} samples in {self.nchunks} chunks; {parts}>"

    def block(self, i: int) -> dict:
        """Chunk ``i`` as numpy arrays by name (in-memory datasets only)."""
        if self._source is None:
            raise TypeError("block() is for in-memory datasets; use dataset[name].blocks[i]")
        start = sum(self.chunks[:i])
        sl = slice(start, start + self.chunks[i])
        return {k: np.ascontiguousarray(v[sl]) for k, v in self._source.items()}

    # -- transformations -------------------------------------------------------------
    def split(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Split into two datasets at random, e.g. ``train, test = ds.split(0.8)``.

        In-memory data is permuted as a whole and cut at ``round(fraction * n)``;
        Dask- or Zarr-backed data is split inside each chunk (``round(fraction * size)``
        samples of every chunk go to the first part), so nothing is shuffled across
        workers.  The result depends only on ``seed``.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
        n = len(self)
        if self._source is not None:
            perm = np.random.default_rng(seed).permutation(n)
            cut = int(round(fraction * n))
            rows = self.chunks[0]
            parts = []
            for idx in (np.sort(perm[:cut]), np.sort(perm[cut:])):
                if len(idx) == 0:
                    raise DatasetError(f"split({fraction}) of {n} samples leaves one part empty")
                src = {k: v[idx] for k, v in self._source.items()}
                parts.append(Dataset.from_arrays(chunk_size=min(rows, len(idx)), **src))
            return parts[0], parts[1]

        sizes = self.chunks
        sel = []
        for c, s in enumerate(sizes):
            perm = np.random.default_rng([seed, c]).permutation(s)
            k = int(round(fraction * s))
            sel.append((np.sort(perm[:k]), np.sort(perm[k:])))
        parts = []
        for side in (0, 1):
            counts = tuple(len(p[side]) for p in sel)
            if sum(counts) == 0:
                raise DatasetError(f"split({fraction}) leaves one part empty")
            arrays = {}
            for name, a in self._arrays.items():
                arrays[name] = a.map_blocks(
                    _take_rows, [p[side] for p in sel],
                    chunks=(counts,) + a.chunks[1:], dtype=a.dtype,
                    meta=np.empty((0,) * a.ndim, a.dtype),
                )
            parts.append(Dataset(arrays))
        return parts[0], parts[1]


def _take_rows(block, selections, block_info=None):
    i = block_info[0]["chunk-location"][0]
    return block[selections[i]]
