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
    assert reply == {"status": "aborted", "reason": "worker 1 failed"}
    late = await plugin.sync("r", 1, 0, leaves(1.0), 1, 0)
    assert late["status"] == "aborted"
    np.testing.assert_allclose(plugin.runs["r"].leaves[0], 0.0)


@gen_cluster(client=True, nthreads=[])
async def test_barrier_timeout_aborts_instead_of_hanging(c, s):
    plugin = await start(c, s, timeout=0.3)
    reply = await asyncio.wait_for(plugin.sync("r", 0, 0, leaves(1.0), 1, 0), 5)
    assert reply["status"] == "aborted"
    assert "waited 0.3s" in reply["reason"] and "ranks [1]" in reply["reason"]


@gen_cluster(client=True, nthreads=[])
async def test_bad_updates_never_touch_the_global_params(c, s):
    plugin = await start(c, s)
    bad_shape = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    reply = await plugin.sync("r", 0, 0, bad_shape, 1, 0)
    assert reply["status"] == "aborted" and "float32[3, 2]" in reply["reason"]
    np.testing.assert_allclose(plugin.runs["r"].leaves[0], 0.0)

    plugin.start_run("r2", leaves(0.0), ddl.BSP(every=1), {"0": "w0"}, 5.0)
    reply = await plugin.sync("r2", 0, 0, leaves(np.nan), 1, 0)
    assert reply["status"] == "aborted" and "NaN" in reply["reason"]
    assert plugin.runs["r2"].version == 0
    np.testing.assert_allclose(plugin.runs["r2"].leaves[0], 0.0)


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
async def test_worker_leaving_aborts_its_runs(c, s, a, b):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    plugin.start_run("r", leaves(0.0), ddl.BSP(every=1), {"0": a.address, "1": b.address}, 30)
    waiting = asyncio.ensure_future(plugin.sync("r", 0, 0, leaves(1.0), 1, 0))
    await asyncio.sleep(0.1)
    await b.close()
    reply = await asyncio.wait_for(waiting, 5)
    assert reply["status"] == "aborted" and b.address in reply["reason"]
