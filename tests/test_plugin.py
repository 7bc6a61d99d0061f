"""The scheduler plugin on a real in-process cluster (gen_cluster), driven by hand."""

import asyncio

import numpy as np
from distributed.utils_test import gen_cluster

import daskdl as ddl
from daskdl import protocol
from daskdl.protocol import SyncRequest
from daskdl.scheduler import TrainingPlugin, get_plugin

SECRET = "s3cret"


def leaves(v):
    return [np.full((2, 3), v, np.float32), np.full(4, v, np.float32)]


def start_msg(run="r", policy=None, members=2, timeout=5.0, secret=SECRET, **kw):
    if isinstance(members, int):
        members = {str(i): f"w{i}" for i in range(members)}
    return dict(run=run, secret=secret, params=leaves(0.0),
                policy=policy or ddl.BSP(every=1), members=members, timeout=timeout, **kw)


async def start(c, s, **kw):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    assert plugin.start_run(**start_msg(**kw))["status"] == "OK"
    return plugin


def sync(plugin, rank, clock, params, samples=1, version=0, run="r", secret=SECRET, **kw):
    """A SyncRequest as a replica sends it."""
    req = SyncRequest(run=run, rank=rank, clock=clock, gen=kw.pop("gen", 0), samples=samples,
                      version=version, params=params, **kw)
    return plugin.sync(**req.to_msg(secret))


def call(plugin, name, run="r", secret=SECRET, **kw):
    return getattr(plugin, name)(run=run, secret=secret, **kw)


@gen_cluster(client=True, nthreads=[])
async def test_bsp_barrier_waits_for_every_worker_then_averages(c, s):
    plugin = await start(c, s)
    first = asyncio.ensure_future(sync(plugin, 0, 0, leaves(1.0), 30))
    await asyncio.sleep(0.2)
    assert not first.done()  # waits in the barrier, the event loop stays free
    assert plugin.runs["r"].version == 0
    second = await sync(plugin, 1, 0, leaves(3.0), 10)
    reply = await first
    for rep in (reply, second):
        assert rep["status"] == "OK" and rep["version"] == 1
        np.testing.assert_allclose(protocol.load(rep["params"])[0], 1.5)  # (30*1 + 10*3) / 40
    st = plugin.runs["r"]
    assert st.clocks == {0: 1, 1: 1}
    assert [h["kind"] for h in st.history] == ["arrive", "arrive", "merge", "release", "release"]
    assert not st.waiting and not st.pending and not st.replies  # nothing kept afterwards


@gen_cluster(client=True, nthreads=[])
async def test_single_worker_gets_no_params_back(c, s):
    plugin = await start(c, s, members=1)
    reply = await sync(plugin, 0, 0, leaves(2.0), 10)
    assert reply["status"] == "OK" and "params" not in reply  # continue from what you sent
    np.testing.assert_allclose(plugin.runs["r"].leaves[0], 2.0)


@gen_cluster(client=True, nthreads=[])
async def test_abort_releases_waiting_workers(c, s):
    plugin = await start(c, s)
    waiting = asyncio.ensure_future(sync(plugin, 0, 0, leaves(1.0)))
    await asyncio.sleep(0.1)
    assert call(plugin, "abort", reason="worker 1 failed")["status"] == "OK"
    reply = await asyncio.wait_for(waiting, 2)
    assert reply["status"] == "aborted" and reply["reason"] == "worker 1 failed"
    late = await sync(plugin, 1, 0, leaves(1.0))
    assert late["status"] == "aborted"
    np.testing.assert_allclose(plugin.runs["r"].leaves[0], 0.0)


@gen_cluster(client=True, nthreads=[])
async def test_a_silent_worker_is_dropped_after_the_timeout_instead_of_hanging(c, s):
    plugin = await start(c, s, timeout=0.3)
    reply = await asyncio.wait_for(sync(plugin, 0, 0, leaves(1.0)), 5)
    st = plugin.runs["r"]
    assert reply["status"] == "OK"  # went on without rank 1
    assert st.members == {0: "w0"} and 1 in st.lost
    assert st.lost[1]["reason"] == "timed-out"
    assert "sent nothing for 0.3s" in st.lost[1]["detail"]
    assert st.aborted is None
    events = [m for _, m in s.get_events("daskdl-r")]
    assert events and events[-1]["action"] == "lost" and events[-1]["rank"] == 1
    assert events[-1]["reason"] == "timed-out"


@gen_cluster(client=True, nthreads=[])
async def test_bad_updates_are_rejected_and_never_touch_the_global_params(c, s):
    plugin = await start(c, s)
    bad_shape = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    reply = await sync(plugin, 0, 0, bad_shape)
    assert reply["status"] == "rejected" and "float32[3, 2]" in reply["reason"]
    np.testing.assert_allclose(protocol.load(reply["params"])[0], 0.0)  # re-sync from the global
    # the other worker's update is merged alone: the group does not wait for the rejected
    good = await sync(plugin, 1, 0, leaves(2.0))
    assert good["status"] == "OK"
    st = plugin.runs["r"]
    np.testing.assert_allclose(st.leaves[0], 2.0)
    assert st.rejected == 1 and st.history[-2]["ranks"] == [1]

    plugin.start_run(**start_msg("r2", members=1))
    wrong_tree = leaves(1.0)[:1]
    assert (await sync(plugin, 0, 0, wrong_tree, run="r2"))["status"] == "rejected"
    assert (await sync(plugin, 0, 1, leaves(np.inf), run="r2"))["status"] == "rejected"
    third = await sync(plugin, 0, 2, leaves(np.nan), run="r2")  # max-rejections: 3 in a row
    assert third["status"] == "aborted" and third["diverged"] and "NaN" in third["reason"]
    assert plugin.runs["r2"].version == 0 and plugin.runs["r2"].rejected == 3
    np.testing.assert_allclose(plugin.runs["r2"].leaves[0], 0.0)


@gen_cluster(client=True, nthreads=[])
async def test_freeze_discards_unmerged_rounds_and_regroup_starts_a_generation(c, s):
    plugin = await start(c, s)
    await asyncio.gather(sync(plugin, 0, 0, leaves(1.0)),
                         sync(plugin, 1, 0, leaves(3.0)))  # round 0 merged
    waiting = asyncio.ensure_future(sync(plugin, 0, 1, leaves(5.0), version=1))
    await asyncio.sleep(0.1)
    frozen = await call(plugin, "freeze")
    assert frozen["status"] == "OK" and frozen["done"] == {0: 1, 1: 1}
    assert (await asyncio.wait_for(waiting, 2))["status"] == "replan"
    assert (await sync(plugin, 1, 1, leaves(7.0), version=1))["status"] == "replan"
    st = plugin.runs["r"]
    np.testing.assert_allclose(st.leaves[0], 2.0)  # round 1 never merged
    reply = call(plugin, "regroup", members={"0": "w1", "1": "w2", "2": "w3"}, clock=1)
    assert reply == {"status": "OK", "generation": 1, "source": None}
    assert st.gen == 1 and st.clocks == {0: 1, 1: 1, 2: 1}
    old = await sync(plugin, 0, 1, leaves(9.0), version=1, gen=0)  # a round of generation 0
    assert old["status"] == "replan"
    replies = await asyncio.gather(*(sync(plugin, r, 1, leaves(float(r)), version=1, gen=1)
                                     for r in range(3)))
    assert all(rep["status"] == "OK" for rep in replies)
    np.testing.assert_allclose(st.leaves[0], 1.0)


@gen_cluster(client=True, nthreads=[])
async def test_failing_merge_aborts_the_run(c, s):
    def broken(state, g, contributions, info):
        raise ZeroDivisionError("boom")

    policy = ddl.BSP(every=1)._replace(merge=broken)
    plugin = await start(c, s, policy=policy, members=1)
    reply = await sync(plugin, 0, 0, leaves(1.0))
    assert reply["status"] == "aborted" and "boom" in reply["reason"]


@gen_cluster(client=True, nthreads=[])
async def test_handlers_over_rpc_and_unknown_run(c, s):
    await start(c, s, members=1)
    info = await c.scheduler.daskdl_info(run="r")
    assert info["status"] == "OK" and info["policy"] == "BSP" and info["members"] == {0: "w0"}
    assert (await c.scheduler.daskdl_params(run="nope", secret=SECRET))["status"] == "refused"
    assert (await c.scheduler.daskdl_params(run="r", secret="wrong"))["status"] == "refused"
    reply = await c.scheduler.daskdl_params(run="r", secret=SECRET, rank=0)
    assert reply["status"] == "OK" and reply["version"] == 0
    assert (await c.scheduler.daskdl_end(run="r", secret=SECRET))["status"] == "OK"
    info = await c.scheduler.daskdl_info(run="r")  # an ended run is still shown
    assert info["status"] == "OK" and info["aborted"] is None  # ended, not failed
    assert not info["metrics"]["active"] and info["metrics"]["ended"] is not None
    assert (await c.scheduler.daskdl_info(run="nope"))["status"] == "refused"


@gen_cluster(client=True)
async def test_worker_leaving_is_dropped_from_the_barrier_at_once(c, s, a, b):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    plugin.start_run(**start_msg(members={"0": a.address, "1": b.address}, timeout=30))
    waiting = asyncio.ensure_future(sync(plugin, 0, 0, leaves(1.0)))
    await asyncio.sleep(0.1)
    await b.close()
    reply = await asyncio.wait_for(waiting, 5)
    st = plugin.runs["r"]
    assert reply["status"] == "OK" and "params" not in reply  # merged with what arrived
    assert st.members == {0: a.address} and st.lost[1]["address"] == b.address
    assert st.lost[1]["done"] == 0 and st.lost[1]["reason"] == "left"
    assert st.aborted is None


@gen_cluster(client=True, nthreads=[])
async def test_a_large_model_is_checked_and_merged_off_the_event_loop(c, s):
    """Above INLINE_MERGE_BYTES the finiteness check, the merge and the divergence norm
    run in a thread: bad updates are still refused, good ones merged, and a second sync
    of the same round sent while the first is being checked is refused."""
    from daskdl.scheduler.plugin import INLINE_MERGE_BYTES

    n = INLINE_MERGE_BYTES // 4 + 1024
    big = lambda v: [np.full(n, v, np.float32)]  # noqa: E731
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    msg = dict(start_msg(), params=big(0.0))
    assert plugin.start_run(**msg)["status"] == "OK"
    bad = await sync(plugin, 0, 0, big(np.nan))
    assert bad["status"] == "rejected" and "NaN" in bad["reason"]
    # the same round twice, the second sent while the first is checked in a thread
    replies = await asyncio.gather(sync(plugin, 1, 0, big(2.0)), sync(plugin, 1, 0, big(3.0)))
    assert sorted(r["status"] for r in replies) == ["OK", "refused"], replies
    kept = 2.0 if replies[0]["status"] == "OK" else 3.0
    st = plugin.runs["r"]
    np.testing.assert_allclose(st.leaves[0][:3], kept)  # rank 1's alone: rank 0 rejected
    assert st.version == 1
