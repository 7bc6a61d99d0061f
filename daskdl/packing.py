"""Parameters as one buffer on the wire.

A sync carries every leaf of the model.  Sent as a list, each leaf costs the scheduler
its own Dask serialization header, deserialization, shape and dtype check and
finiteness check: a few microseconds a leaf, which for a model of 60 leaves is more
than the Dask RPC carrying them.  Packed, the leaves travel as one ``uint8`` buffer
(each leaf at an offset aligned to :data:`ALIGN` bytes, zero padding between); the
scheduler, which knows the model's shapes and dtypes, takes views of it without
copying, and checks finiteness once per run of leaves of one dtype.  Results are the
same bit for bit: only the framing changes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import DaskDLError

ALIGN = 64  # bytes: every leaf starts at a multiple (cache lines; any dtype's alignment)
# Packing copies the update once on its worker and the params once per version on the
# scheduler; it pays where a leaf's fixed costs (~10 us) outweigh copying it (~10 GB/s)
LEAF_BYTES = 64 << 10


def worth_packing(leaves: Sequence) -> bool:
    """Whether ``leaves`` should travel packed: several, of at most ``LEAF_BYTES``
    each on average (large leaves cost their bytes, not their count)."""
    return len(leaves) > 1 and sum(np.asarray(x).nbytes for x in leaves) <= \
        LEAF_BYTES * len(leaves)


class Packing:
    """The layout of a model's leaves in one buffer (same on every process)."""

    __slots__ = ("specs", "offsets", "nbytes", "_runs")

    def __init__(self, leaves: Sequence):
        self.specs = [(tuple(np.shape(x)), np.dtype(np.asarray(x).dtype)) for x in leaves]
        self.offsets, pos = [], 0
        for shape, dtype in self.specs:
            self.offsets.append(pos)
            pos += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // ALIGN) * ALIGN
        self.nbytes = pos
        # (start, stop, dtype) of consecutive leaves of one inexact dtype: one check each
        self._runs = []
        for (_, dtype), off, end in zip(self.specs, self.offsets,
                                        self.offsets[1:] + [self.nbytes]):
            if not _inexact(dtype):
                continue
            if self._runs and self._runs[-1][2] == dtype and self._runs[-1][1] == off:
                self._runs[-1][1] = end
            else:
                self._runs.append([off, end, dtype])

    def pack(self, leaves: Sequence) -> np.ndarray:
        """One zero-padded ``uint8`` buffer holding ``leaves`` (laid out as this packing)."""
        buf = np.zeros(self.nbytes, np.uint8)
        for x, off in zip(leaves, self.offsets):
            a = np.ascontiguousarray(x)
            buf[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
        return buf

    def unpack(self, buf: np.ndarray, what: str = "update") -> list:
        """Views of ``buf`` shaped as the leaves (no copy); DaskDLError when it is not a
        1-D ``uint8`` buffer of exactly this packing's size."""
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or \
                buf.nbytes != self.nbytes:
            got = (f"{buf.dtype}{list(buf.shape)}" if isinstance(buf, np.ndarray)
                   else type(buf).__name__)
            raise DaskDLError(f"{what} is {got}, not the {self.nbytes}-byte packed buffer "
                              "of this model's parameters")
        out = []
        for (shape, dtype), off in zip(self.specs, self.offsets):
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out.append(buf[off:off + n].view(dtype).reshape(shape))
        return out

    def finite(self, buf: np.ndarray) -> bool:
        """Whether every inexact leaf packed in ``buf`` is finite (padding is zeros)."""
        return all(bool(np.isfinite(buf[a:b].view(dtype)).all()) for a, b, dtype in self._runs)


def _inexact(dtype) -> bool:
    """Floating point, bfloat16 included (numpy's issubdtype says no to it)."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.inexact))


def packed(obj) -> bool:
    """Whether a payload, once loaded, is a packed buffer (not a list of leaves)."""
    return isinstance(obj, np.ndarray)
