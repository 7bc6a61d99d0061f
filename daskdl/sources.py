"""Where a dataset's chunks come from, on the client and on the workers.

A :class:`ChunkSource` answers, for one dataset on one set of workers:

* where each chunk is (``owners``: the rank holding it, or -1; the plan trains a
  chunk on its owner first);
* what a round needs as task inputs (:meth:`ChunkSource.round_inputs`);
* how placement is repaired after workers left (:meth:`ChunkSource.repair`);
* the chunk's blocks for evaluation and prediction (``refs``).

Three kinds, chosen in one place (:func:`place`):

=====================  ====================================  ==========================
kind                   a round's chunks are                  after a worker left
=====================  ====================================  ==========================
:class:`Scattered`     numpy data scattered once from the    chunks only it held are
                       client to seeded owners: task         scattered again
                       dependencies
:class:`Graph`         any Dask graph: computed on the       lost chunks are computed
                       training worker one round ahead       again where needed
:class:`ZarrChunks`    a Zarr store the worker reads itself  nothing to repair
                       (the next round's chunks prefetched
                       while it computes)
=====================  ====================================  ==========================

:class:`ChunkReader` is the worker side of :class:`ZarrChunks`: it reads a round's
chunks, prefetched during the round before when possible.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from typing import Sequence

import numpy as np
from distributed import Client, Future

from . import protocol

logger = logging.getLogger("daskdl")


def locations(client: Client, keys: Sequence) -> dict:
    """``{key: address}`` of a worker holding each key that is in memory somewhere
    (the scheduler plugin's ``daskdl_locations``, a read-only handler)."""
    keys = list(keys)
    if not keys:
        return {}
    reply = client.sync(getattr(client.scheduler, protocol.LOCATIONS), keys=keys)
    if reply.get("status") != protocol.Status.OK.value:
        raise RuntimeError(f"cannot locate the dataset's chunks: {reply.get('reason')}")
    where = reply["where"]
    if isinstance(where, dict):
        return {k: where[k] for k in keys if where.get(k)}
    return {k: a for k, a in zip(keys, where) if a}


class ChunkSource:
    """Base class: one dataset placed on ``workers`` (see the module docstring)."""

    kind = "?"

    def __init__(self, dataset, workers: tuple, refs: list, owners: list):
        self.dataset = dataset
        self.workers = tuple(workers)
        self.refs = refs  # refs[chunk][name index]: a Future or a Delayed
        self.owners = owners  # rank holding each chunk, or -1

    def round_inputs(self, client: Client, chunks: Sequence[int], addr: str,
                     clock: int) -> list:
        """The task arguments carrying a round's chunks (one per chunk and name)."""
        return [ref for ch in chunks for ref in self.refs[ch]]

    def repair(self, client: Client, workers: tuple) -> "ChunkSource":
        """This source for the workers present after some left or joined."""
        return type(self)(self.dataset, workers, self.refs, [-1] * len(self.owners))

    @property
    def reader(self):
        """What the worker reads chunks from itself (Zarr), or None."""
        return None


class Scattered(ChunkSource):
    """Numpy data held by the client, scattered once to owners drawn from the seed
    (so placement, and with it the result, does not depend on the cluster)."""

    kind = "scattered"

    @classmethod
    def place(cls, client: Client, dataset, workers: tuple, seed: int) -> "Scattered":
        nchunks, names = dataset.nchunks, dataset.names
        order = np.random.default_rng([seed, 0x91AC]).permutation(nchunks)
        owners = [-1] * nchunks
        for pos, c in enumerate(order):
            owners[int(c)] = pos % len(workers)
        refs: list = [None] * nchunks
        for rank, addr in enumerate(workers):
            mine = [c for c in range(nchunks) if owners[c] == rank]
            if mine:
                blocks = [dataset.block(c)[n] for c in mine for n in names]
                futs = client.scatter(blocks, workers=[addr], hash=False)
                for i, c in enumerate(mine):
                    refs[c] = futs[i * len(names):(i + 1) * len(names)]
        return cls(dataset, workers, refs, owners)

    def repair(self, client: Client, workers: tuple) -> "Scattered":
        """Chunks that were only on workers that left are scattered again, to the
        least loaded worker present; the others keep their place."""
        where = locations(client, [f.key for refs in self.refs for f in refs])
        rank_of = {a: r for r, a in enumerate(workers)}
        chunks = self.dataset.chunks
        refs, owners, loads = [list(r) for r in self.refs], [], collections.Counter()
        for c, rr in enumerate(refs):
            locs = {where.get(f.key) for f in rr}
            owner = rank_of.get(next(iter(locs))) if len(locs) == 1 else None
            owners.append(-1 if owner is None else owner)
            if owner is not None:
                loads[owner] += chunks[c]
        lost = [c for c, rr in enumerate(refs) if any(where.get(f.key) is None for f in rr)]
        if lost:
            logger.warning("daskdl: %d chunks were only on workers that left; scattering "
                           "them again", len(lost))
        for c in lost:
            rank = min(range(len(workers)), key=lambda r: loads[r])
            blocks = [self.dataset.block(c)[n] for n in self.dataset.names]
            refs[c] = client.scatter(blocks, workers=[workers[rank]], hash=False)
            owners[c] = rank
            loads[rank] += chunks[c]
        return Scattered(self.dataset, workers, refs, owners)


class Graph(ChunkSource):
    """Chunks of any Dask graph (persisted or lazy).  Owners are where persisted
    chunks are; each round's chunks are computed on its worker one round ahead, so a
    worker holds at most two rounds of them."""

    kind = "graph"

    @classmethod
    def place(cls, client: Client, dataset, workers: tuple, seed: int) -> "Graph":
        names = dataset.names
        per_name = [dataset[n].to_delayed(optimize_graph=False).reshape(-1) for n in names]
        refs = [[per_name[j][c] for j in range(len(names))] for c in range(dataset.nchunks)]
        return cls(dataset, workers, refs, cls._owners(client, per_name[0], workers))

    @staticmethod
    def _owners(client: Client, delayed: Sequence, workers: tuple) -> list:
        keys = [d.key for d in delayed]
        where = locations(client, keys)
        rank_of = {a: r for r, a in enumerate(workers)}
        return [rank_of.get(where.get(k), -1) for k in keys]

    def round_inputs(self, client: Client, chunks: Sequence[int], addr: str,
                     clock: int) -> list:
        blocks = super().round_inputs(client, chunks, addr, clock)
        lazy = [j for j, b in enumerate(blocks) if not isinstance(b, Future)]
        if lazy:  # computed on the worker that trains on them, one round ahead
            futs = client.compute([blocks[j] for j in lazy], workers=[addr],
                                  priority=-clock + 1.5)
            for j, f in zip(lazy, futs):
                blocks[j] = f
        return blocks


class ZarrChunks(Graph):
    """A Zarr-backed dataset: training workers read their chunks from the store
    themselves (``reader``, a :class:`~daskdl.data.ZarrSource`); the graph is used
    only by ``evaluate`` and ``predict``."""

    kind = "zarr"

    def round_inputs(self, client: Client, chunks: Sequence[int], addr: str,
                     clock: int) -> list:
        return []

    @property
    def reader(self):
        return self.dataset._zarr


def place(client: Client, dataset, workers: tuple, seed: int) -> ChunkSource:
    """The :class:`ChunkSource` for ``dataset`` on ``workers`` (the one place where the
    kind is chosen)."""
    if dataset.in_memory:
        return Scattered.place(client, dataset, workers, seed)
    cls = ZarrChunks if dataset._zarr is not None else Graph
    return cls.place(client, dataset, workers, seed)


class ChunkReader:
    """The worker side of :class:`ZarrChunks`: a round's chunks, prefetched in a
    thread during the round before when the spec named them in ``next_chunks``."""

    def __init__(self):
        self._arrays: dict = {}
        self._prefetched: dict = {}
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._prefetched.clear()

    def _open(self, src):
        arrays = self._arrays.get(src.token)
        if arrays is None:  # one source open at a time
            self._arrays = {src.token: src.open()}
            arrays = self._arrays[src.token]
        return arrays

    def read(self, src, chunks: Sequence[int]) -> list:
        """The blocks of ``chunks`` (one per name, chunk after chunk)."""
        arrays = self._open(src)
        out = []
        for c in chunks:
            fut = self._prefetched.pop((src.token, c), None)
            out.extend(fut.result() if fut is not None else src.read(c, arrays))
        for fut in self._prefetched.values():  # a plan changed under us: drop stale reads
            fut.cancel()
        self._prefetched.clear()
        return out

    def prefetch(self, src, chunks: Sequence[int], blocks: Sequence, nxt: Sequence[int]):
        """Start reading chunks ``nxt``; reuse those among ``chunks`` (read already)."""
        arrays = self._open(src)
        width = len(src.paths)
        have = {c: tuple(blocks[i * width:(i + 1) * width]) for i, c in enumerate(chunks)}
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "daskdl-prefetch")
        for c in nxt:
            if c in have:
                done = concurrent.futures.Future()
                done.set_result(have[c])
                self._prefetched[(src.token, c)] = done
            else:
                self._prefetched[(src.token, c)] = self._pool.submit(src.read, c, arrays)
