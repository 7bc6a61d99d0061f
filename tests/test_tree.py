import jax.numpy as jnp
import numpy as np
import pytest

from daskdl.errors import DaskDLError
from daskdl.tree import check_like, check_params, flatten, unflatten, weighted_mean


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    b = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    out = weighted_mean([a, b], [30, 10])
    for o, x, y in zip(out, a, b):
        assert o.dtype == np.float32
        np.testing.assert_allclose(o, 0.75 * x + 0.25 * y, rtol=1e-6)


def test_weighted_mean_is_deterministic_and_does_not_mutate():
    rng = np.random.default_rng(1)
    parts = [[rng.standard_normal(100).astype(np.float32)] for _ in range(3)]
    copies = [[p[0].copy()] for p in parts]
    r1 = weighted_mean(parts, [1, 2, 3])
    r2 = weighted_mean(parts, [1, 2, 3])
    assert np.array_equal(r1[0], r2[0])
    for p, c in zip(parts, copies):
        assert np.array_equal(p[0], c[0])


def test_weighted_mean_single_contribution_is_identity():
    a = [np.arange(4.0, dtype=np.float32)]
    assert weighted_mean([a], [7])[0] is a[0]


def test_weighted_mean_keeps_integer_leaves():
    a = [np.array([1, 2]), np.ones(2, np.float32)]
    b = [np.array([5, 6]), np.zeros(2, np.float32)]
    out = weighted_mean([a, b], [1, 1])
    assert np.array_equal(out[0], [1, 2])
    np.testing.assert_allclose(out[1], 0.5)


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([[np.ones(1)]], [0])
    with pytest.raises(ValueError, match="one weight per"):
        weighted_mean([[np.ones(1)]], [1, 2])


def test_check_like_names_the_problem():
    ref = [np.zeros((2, 3), np.float32)]
    check_like([np.ones((2, 3), np.float32)], ref)
    with pytest.raises(DaskDLError, match="leaves"):
        check_like([], ref)
    with pytest.raises(DaskDLError, match=r"float32\[3, 2\]"):
        check_like([np.ones((3, 2), np.float32)], ref)
    with pytest.raises(DaskDLError, match="NaN"):
        check_like([np.full((2, 3), np.nan, np.float32)], ref)


def test_check_params_errors():
    check_params({"w": jnp.zeros(3), "b": np.zeros(2)})
    with pytest.raises(TypeError, match="at least one leaf"):
        check_params({})
    with pytest.raises(TypeError, match=r"\['w'\] is a str"):
        check_params({"w": "hello"})
    with pytest.raises(TypeError, match="not an array"):
        check_params([1.0, 2.0])
    with pytest.raises(TypeError, match="numeric"):
        check_params({"w": np.array(["a", "b"])})


def test_flatten_roundtrip():
    p = {"a": [np.ones(2), np.zeros((1, 2))], "b": np.arange(3)}
    leaves, treedef = flatten(p)
    q = unflatten(treedef, leaves)
    assert np.array_equal(q["a"][1], p["a"][1]) and np.array_equal(q["b"], p["b"])


def test_public_names_import():
    import daskdl

    for name in daskdl.__all__:
        assert getattr(daskdl, name) is not None, name
    assert {"Trainer", "Dataset", "BSP", "SSP", "Async", "EASGD", "DiLoCo",
            "TrainingDiverged"} <= set(daskdl.__all__)
