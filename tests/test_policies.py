"""Pure tests of the consistency policies: maths and barrier decisions, no cluster."""

import dask
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import daskdl as ddl
from daskdl.policies import Contribution, SyncInfo, from_config


def L(*vals):
    return [np.asarray(v, np.float32) for v in vals]


INFO2 = SyncInfo(version=5, members=(0, 1))


# -- barriers ------------------------------------------------------------------------------
def test_bsp_barrier_waits_for_every_worker():
    b = ddl.BSP(every=1).barrier
    assert not b({0: 3, 1: 2}, 0)  # rank 0 finished round 2, rank 1 not yet
    assert b({0: 3, 1: 3}, 0)
    assert b({0: 2, 1: 3}, 0)  # the slow one may always go on


@pytest.mark.parametrize("s", [0, 1, 3])
def test_ssp_barrier_bounds_the_lead(s):
    b = ddl.SSP(every=1, staleness=s).barrier
    for lead in range(0, 6):
        assert b({0: 10 + lead, 1: 10, 2: 12}, 0) == (lead <= s)


def test_ssp_zero_has_the_bsp_barrier():
    ssp, bsp = ddl.SSP(every=1, staleness=0).barrier, ddl.BSP(every=1).barrier
    for clocks in ({0: 1, 1: 1}, {0: 2, 1: 1}, {0: 1, 1: 3}, {0: 4, 1: 4, 2: 3}):
        for r in clocks:
            assert ssp(clocks, r) == bsp(clocks, r)


def test_async_never_waits():
    assert ddl.Async(every=1).barrier({0: 100, 1: 0}, 0)


# -- merges -------------------------------------------------------------------------------
def test_bsp_merge_is_the_sample_weighted_mean():
    p = ddl.BSP(every=4)
    out = p.merge((), L([0, 0]), [Contribution(0, L([1, 2]), 1, 0),
                                  Contribution(1, L([4, 8]), 2, 0)], INFO2)
    np.testing.assert_allclose(out.params[0], [3, 6])
    assert out.replies is None and p.group and p.sends == "params"


def test_ssp_applies_each_delta_on_arrival():
    p = ddl.SSP(every=1, staleness=2)
    g = L([1.0, 1.0])
    out = p.merge((), g, [Contribution(1, L([2.0, -4.0]), 10, 0)], INFO2)
    np.testing.assert_allclose(out.params[0], [2.0, -1.0])  # g + delta / 2 workers
    assert not p.group and p.sends == "delta"
    np.testing.assert_allclose(g[0], [1.0, 1.0])  # inputs untouched


def test_ssp_deltas_of_one_round_equal_the_bsp_mean():
    g = L(np.arange(4.0))
    locals_ = [L(np.arange(4.0) + 1), L(np.arange(4.0) * 3)]
    bsp = ddl.BSP(every=1).merge((), g, [Contribution(i, x, 8, 0)
                                         for i, x in enumerate(locals_)], INFO2).params
    ssp = ddl.SSP(every=1, staleness=0)
    cur = g
    for i, x in enumerate(locals_):
        cur = ssp.merge((), cur, [Contribution(i, [x[0] - g[0]], 8, 0)], INFO2).params
    np.testing.assert_allclose(cur[0], bsp[0], rtol=1e-6)


@pytest.mark.parametrize("scale,stale,want", [(True, 0, 1.0), (True, 3, 0.25), (False, 3, 1.0)])
def test_async_scales_by_staleness(scale, stale, want):
    p = ddl.Async(every=1, staleness_scale=scale)
    out = p.merge((), L([0.0]), [Contribution(0, L([2.0]), 1, 5 - stale)], INFO2)
    np.testing.assert_allclose(out.params[0], [want * 2.0 / 2])


def test_easgd_moves_center_and_workers_towards_each_other():
    a = 0.25
    p = ddl.EASGD(every=1, alpha=a)
    center = L([0.0, 0.0])
    x0, x1 = L([4.0, 0.0]), L([0.0, 8.0])
    out = p.merge((), center, [Contribution(0, x0, 1, 0), Contribution(1, x1, 1, 0)], INFO2)
    np.testing.assert_allclose(out.params[0], a * (x0[0] + x1[0]))
    np.testing.assert_allclose(out.replies[0][0], x0[0] - a * x0[0])
    np.testing.assert_allclose(out.replies[1][0], x1[0] - a * x1[0])
    with pytest.raises(ValueError, match="alpha"):
        ddl.EASGD(alpha=0)


def test_diloco_with_sgd_1_is_the_mean_and_with_momentum_is_an_optax_step():
    g = L([1.0, 2.0, 3.0])
    cs = [Contribution(0, L([0.0, 0.0, 0.0]), 1, 0), Contribution(1, L([2.0, 2.0, 2.0]), 3, 0)]
    mean = (0 * 1 + 2 * 3) / 4
    p = ddl.DiLoCo(every=1, outer=optax.sgd(1.0))
    out = p.merge(p.init(g), g, cs, INFO2)
    np.testing.assert_allclose(out.params[0], [mean] * 3, rtol=1e-6)

    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    p = ddl.DiLoCo(every=1, outer=outer)
    state = p.init(g)
    want_state = outer.init([jnp.asarray(g[0])])
    cur, want = g, [jnp.asarray(g[0])]
    for _ in range(3):  # momentum carries over rounds in the policy state
        out = p.merge(state, cur, cs, INFO2)
        cur, state = out.params, out.state
        grads = [want[0] - mean]
        upd, want_state = outer.update(grads, want_state, want)
        want = optax.apply_updates(want, upd)
    np.testing.assert_allclose(cur[0], want[0], rtol=1e-6)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(np.asarray, want_state))


def test_default_diloco_outer_is_nesterov_sgd():
    p = ddl.DiLoCo(every=8)
    assert p.every == 8 and p.name == "DiLoCo"


# -- configuration ---------------------------------------------------------------------------
def test_every_from_config():
    with dask.config.set({"daskdl.every": 7}):
        for make in (ddl.BSP, ddl.SSP, ddl.Async, ddl.EASGD, ddl.DiLoCo):
            assert make().every == 7
    with pytest.raises(ValueError, match="positive"):
        ddl.BSP(every=0)
    with pytest.raises(ValueError, match="staleness"):
        ddl.SSP(staleness=-1)


def test_policy_by_name_from_config():
    p = from_config({"class": "daskdl.SSP", "staleness": 2, "every": 3})
    assert p.name == "SSP(s=2)" and p.every == 3
    with dask.config.set({"daskdl.policy": {"class": "daskdl.EASGD", "alpha": 0.5}}):
        assert from_config(None).name == "EASGD(alpha=0.5)"
    assert from_config(None).name == "BSP"
    bsp = ddl.BSP(every=2)
    assert from_config(bsp) is bsp
    with pytest.raises(ValueError, match="cannot load the policy class 'daskdl.Nope'"):
        from_config({"class": "daskdl.Nope"})
    with pytest.raises(TypeError, match="config entry"):
        from_config("bsp")
    with pytest.raises(TypeError, match="not a daskdl Policy"):
        from_config({"class": "builtins.dict"})
