"""The scheduler plugin on a real in-process cluster (gen_cluster), driven by hand."""

import asyncio

import numpy as np
from distributed.utils_test import gen_cluster

import daskdl as ddl
from daskdl.plugin import TrainingPlugin, get_plugin


def leaves(v):
    return [np.full((2, 3), v, np.float32), np.full(4, v, np.float32)]


async def start(c, s, policy=None, members=2, timeout=5.0):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    plugin.start_run("r", leaves(0.0), policy or ddl.BSP(every=1),
                     {str(i): f"w{i}" for i in range(members)}, timeout)
    return plugin


@gen_cluster(client=True, nthreads=[])
async def test_bsp_barrier_waits_for_every_worker_then_averages(c, s):
    plugin = await start(c, s)
    first = asyncio.ensure_future(plugin.sync("r", 0, 0, leaves(1.0), 30, 0))
    await asyncio.sleep(0.2)
    assert not first.done()  # waits in the barrier, the event loop stays free
    assert plugin.runs["r"].version == 0
    second = await plugin.sync("r", 1, 0, leaves(3.0), 10, 0)
    reply = await first
    for rep in (reply, second):
        assert rep["status"] == "OK" and rep["version"] == 1
        np.testing.assert_allclose(rep["params"].data[0], 1.5)  # (30*1 + 10*3) / 40
    st = plugin.runs["r"]
    assert st.clocks == {0: 1, 1: 1}
    assert [h["kind"] for h in st.history] == ["arrive", "arrive", "merge", "release", "release"]
    assert not st.waiting and not st.pending and not st.replies  # nothing kept afterwards


@gen_cluster(client=True, nthreads=[])
async def test_single_worker_gets_no_params_back(c, s):
    plugin = await start(c, s, members=1)
    reply = await plugin.sync("r", 0, 0, leaves(2.0), 10, 0)
    assert reply.get("same") and "params" not in reply
    np.testing.assert_allclose(plugin.runs["r"].leaves[0], 2.0)


@gen_cluster(client=True, nthreads=[])
async def test_abort_releases_waiting_workers(c, s):
    plugin = await start(c, s)
    waiting = asyncio.ensure_future(plugin.sync("r", 0, 0, leaves(1.0), 1, 0))
    await asyncio.sleep(0.1)
    plugin.abort("r", "worker 1 failed")
    reply = await asyncio.wait_for(waiting, 2)
    assert reply["status"] == "aborted" and reply["reason"] == "worker 1 failed"
    late = await plugin.sync("r", 1, 0, leaves(1.0), 1, 0)
    assert late["status"] == "aborted"
    np.testing.assert_allclose(plugin.runs["r"].leaves[0], 0.0)


@gen_cluster(client=True, nthreads=[])
async def test_a_silent_worker_is_dropped_after_the_timeout_instead_of_hanging(c, s):
    plugin = await start(c, s, timeout=0.3)
    reply = await asyncio.wait_for(plugin.sync("r", 0, 0, leaves(1.0), 1, 0), 5)
    st = plugin.runs["r"]
    assert reply["status"] == "OK"  # went on without rank 1
    assert st.members == {0: "w0"} and 1 in st.lost
    assert "sent nothing for 0.3s" in st.lost[1]["reason"]
    assert st.aborted is None
    events = [m for _, m in s.get_events("daskdl-r")]
    assert events and events[-1]["action"] == "lost" and events[-1]["rank"] == 1


@gen_cluster(client=True, nthreads=[])
async def test_bad_updates_are_rejected_and_never_touch_the_global_params(c, s):
    plugin = await start(c, s)
    bad_shape = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    reply = await plugin.sync("r", 0, 0, bad_shape, 1, 0)
    assert reply["status"] == "rejected" and "float32[3, 2]" in reply["reason"]
    np.testing.assert_allclose(reply["params"].data[0], 0.0)  # re-sync from the global
    # the other worker's update is merged alone: the group does not wait for the rejected
    good = await plugin.sync("r", 1, 0, leaves(2.0), 1, 0)
    assert good["status"] == "OK"
    st = plugin.runs["r"]
    np.testing.assert_allclose(st.leaves[0], 2.0)
    assert st.rejected == 1 and st.history[-2]["ranks"] == [1]

    plugin.start_run("r2", leaves(0.0), ddl.BSP(every=1), {"0": "w0"}, 5.0)
    wrong_tree = leaves(1.0)[:1]
    assert (await plugin.sync("r2", 0, 0, wrong_tree, 1, 0))["status"] == "rejected"
    assert (await plugin.sync("r2", 0, 1, leaves(np.inf), 1, 0))["status"] == "rejected"
    third = await plugin.sync("r2", 0, 2, leaves(np.nan), 1, 0)  # max-rejections: 3 in a row
    assert third["status"] == "aborted" and third["diverged"] and "NaN" in third["reason"]
    assert plugin.runs["r2"].version == 0 and plugin.runs["r2"].rejected == 3
    np.testing.assert_allclose(plugin.runs["r2"].leaves[0], 0.0)


@gen_cluster(client=True, nthreads=[])
async def test_freeze_discards_unmerged_rounds_and_regroup_starts_a_generation(c, s):
    plugin = await start(c, s)
    await asyncio.gather(plugin.sync("r", 0, 0, leaves(1.0), 1, 0),
                         plugin.sync("r", 1, 0, leaves(3.0), 1, 0))  # round 0 merged
    waiting = asyncio.ensure_future(plugin.sync("r", 0, 1, leaves(5.0), 1, 1))
    await asyncio.sleep(0.1)
    frozen = plugin.freeze("r")
    assert frozen["done"] == {0: 1, 1: 1}
    assert (await asyncio.wait_for(waiting, 2))["status"] == "replan"
    assert (await plugin.sync("r", 1, 1, leaves(7.0), 1, 1))["status"] == "replan"
    st = plugin.runs["r"]
    np.testing.assert_allclose(st.leaves[0], 2.0)  # round 1 never merged
    plugin.regroup("r", {"0": "w1", "1": "w2", "2": "w3"}, clock=1)
    assert st.gen == 1 and st.clocks == {0: 1, 1: 1, 2: 1}
    old = await plugin.sync("r", 0, 1, leaves(9.0), 1, 1, gen=0)  # a round of generation 0
    assert old["status"] == "replan"
    replies = await asyncio.gather(*(plugin.sync("r", r, 1, leaves(float(r)), 1, 1, gen=1)
                                     for r in range(3)))
    assert all(rep["status"] == "OK" for rep in replies)
    np.testing.assert_allclose(st.leaves[0], 1.0)


@gen_cluster(client=True, nthreads=[])
async def test_failing_merge_aborts_the_run(c, s):
    def broken(state, g, contributions, info):
        raise ZeroDivisionError("boom")

    policy = ddl.BSP(every=1)._replace(merge=broken)
    plugin = await start(c, s, policy=policy, members=1)
    reply = await plugin.sync("r", 0, 0, leaves(1.0), 1, 0)
    assert reply["status"] == "aborted" and "boom" in reply["reason"]


@gen_cluster(client=True, nthreads=[])
async def test_handlers_over_rpc_and_unknown_run(c, s):
    await start(c, s, members=1)
    info = await c.scheduler.daskdl_info(run="r")
    assert info["policy"] == "BSP" and info["members"] == {0: "w0"}
    assert (await c.scheduler.daskdl_params(run="nope"))["status"] == "error"
    await c.scheduler.daskdl_end(run="r")
    assert await c.scheduler.daskdl_info(run="r") is None


@gen_cluster(client=True)
async def test_worker_leaving_is_dropped_from_the_barrier_at_once(c, s, a, b):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    plugin.start_run("r", leaves(0.0), ddl.BSP(every=1), {"0": a.address, "1": b.address}, 30)
    waiting = asyncio.ensure_future(plugin.sync("r", 0, 0, leaves(1.0), 1, 0))
    await asyncio.sleep(0.1)
    await b.close()
    reply = await asyncio.wait_for(waiting, 5)
    st = plugin.runs["r"]
    assert reply["status"] == "OK" and reply.get("same")  # merged with what arrived
    assert st.members == {0: a.address} and st.lost[1]["address"] == b.address
    assert st.lost[1]["done"] == 0 and st.aborted is None
