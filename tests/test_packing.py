"""Parameters packed in one buffer on the wire (daskdl.packing)."""

import jax.numpy as jnp
import numpy as np
import pytest

from daskdl.errors import DaskDLError
from daskdl.packing import ALIGN, Packing


def _leaves():
    return [np.arange(6, dtype=np.float32).reshape(2, 3), np.float32(2.5) * np.ones(()),
            np.arange(5, dtype=np.float64), np.ones((3, 1), jnp.bfloat16),
            np.arange(7, dtype=np.float32)]


def test_pack_unpack_round_trip_aligned_views():
    leaves = _leaves()
    p = Packing(leaves)
    buf = p.pack(leaves)
    assert buf.dtype == np.uint8 and buf.nbytes == p.nbytes and p.nbytes % ALIGN == 0
    out = p.unpack(buf)
    assert all(o.base is not None for o in out)  # views of the buffer, no copy
    assert p.offsets == sorted(p.offsets) and all(o % ALIGN == 0 for o in p.offsets)
    for a, b in zip(leaves, out):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert p.finite(buf)


@pytest.mark.parametrize("leaf", [0, 1, 2, 3, 4])
def test_a_non_finite_value_in_any_leaf_is_seen(leaf):
    leaves = _leaves()
    bad = np.array(leaves[leaf], copy=True)
    bad.reshape(-1)[-1] = np.inf if leaf % 2 else np.nan
    leaves[leaf] = bad
    p = Packing(_leaves())
    assert not p.finite(p.pack(leaves))


def test_a_buffer_that_is_not_this_models_is_refused():
    p = Packing(_leaves())
    buf = p.pack(_leaves())
    for wrong in (buf[:-1], buf.view(np.float32), buf.reshape(-1, ALIGN),
                  np.concatenate([buf, buf]), [buf]):
        with pytest.raises(DaskDLError, match="packed buffer of this model"):
            p.unpack(wrong)


def test_only_many_small_leaves_are_packed():
    from daskdl.packing import LEAF_BYTES, worth_packing

    assert worth_packing(_leaves())
    assert not worth_packing(_leaves()[:1])  # one leaf: nothing to gain
    big = [np.zeros(LEAF_BYTES, np.float32), np.zeros(LEAF_BYTES, np.float32)]
    assert not worth_packing(big)  # large leaves cost their bytes: no extra copy
