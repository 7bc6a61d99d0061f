"""The scheduler plugin's handlers under hostile and malformed messages, over RPC.

A fuzz test sends hundreds of malformed messages to every handler of a running run,
interleaved with a legitimate two-rank BSP sequence, and checks that every one is
refused (or answered ``replan`` where that is the protocol's answer), that the run
ends exactly where the legitimate sequence alone takes it, that nothing is logged
with a traceback, and that ``/metrics`` answers throughout.
"""

import asyncio
import logging

import dask
import numpy as np
import pytest
from distributed.protocol.serialize import to_serialize
from distributed.utils_test import gen_cluster

import daskdl as ddl
from daskdl.dashboard import DashboardPlugin
from daskdl.packing import Packing
from daskdl.protocol import StartRequest, SyncRequest
from daskdl.scheduler import TrainingPlugin, get_plugin

SECRET = "the-right-secret"
MAX_SAMPLES = 100


def leaves(v):
    return [np.full((2, 3), v, np.float32), np.full(4, v, np.float32)]


def start_kwargs(run, secret=SECRET, members=2, **kw):
    req = StartRequest(run=run, params=leaves(0.0), policy=ddl.BSP(every=1),
                       members={r: f"tcp://w{r}:1" for r in range(members)}, timeout=10.0,
                       max_samples=MAX_SAMPLES, **kw)
    return req.to_msg(secret)


def sync_kwargs(run, rank, clock, v, samples, secret=SECRET, gen=0, **kw):
    req = SyncRequest(run=run, rank=rank, clock=clock, gen=gen, samples=samples, version=clock,
                      params=to_serialize(leaves(v)), loss=float(v), compute=0.01, **kw)
    return req.to_msg(secret)


class Errors(logging.Handler):
    """Every record at ERROR or above, carrying a traceback, or showing the secret."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info \
                or SECRET in record.getMessage():
            self.records.append(record)


@pytest.fixture
def errors():
    h = Errors()
    names = ("distributed", "daskdl", "tornado")
    logging.getLogger("daskdl").setLevel(logging.DEBUG)  # refusals are logged at debug
    for n in names:
        logging.getLogger(n).addHandler(h)
    yield h
    for n in names:
        logging.getLogger(n).removeHandler(h)
    logging.getLogger("daskdl").setLevel(logging.NOTSET)


async def legit_round(c, run, k, during=None):
    """Round ``k`` of two ranks; ``during`` runs while rank 0 waits in the barrier."""
    first = asyncio.ensure_future(c.scheduler.daskdl_sync(**sync_kwargs(run, 0, k, k + 1.0, 10)))
    await asyncio.sleep(0.05)
    if during is not None:
        await during(k)
    second = await c.scheduler.daskdl_sync(**sync_kwargs(run, 1, k, k + 3.0, 30))
    first = await first
    assert first["status"] == second["status"] == "OK", (first, second)


def malformed(k: int) -> list:
    """``(handler, kwargs, answers allowed)`` while rank 0 waits after round ``k`` and
    rank 1 is at clock ``k``."""
    ok_sync = sync_kwargs("r", 1, k, 5.0, 10)
    nope = {"refused"}
    out = []

    def sync(answers=nope, **change):
        msg = dict(ok_sync)
        for key, v in change.items():
            if v is KeyError:
                msg.pop(key)
            else:
                msg[key] = v
        out.append(("daskdl_sync", msg, answers))

    # no or wrong secret: refused whatever else the message says
    for secret in ("wrong", "", None, 5, ["x"], SECRET + "x", KeyError):
        sync(secret=secret)
    sync(secret="wrong", params=to_serialize(leaves(np.nan)))  # NaN: rejected only with it
    sync(secret="wrong", rank=0, clock=k + 1)
    # unknown runs, ranks and generations
    for run in ("nope", "", 7, None, "x" * 1000, KeyError):
        sync(run=run)
    sync({"replan"}, rank=7)
    sync({"replan"}, gen=3)
    for rank in (-1, "1", 1.5, None, True, 10**9):
        sync(rank=rank)
    for gen in ("0", -1, None, 2**40):
        sync(gen=gen)
    # far, wrong or malformed clocks; the waiting rank again
    for clock in (k + 1, k + 5, k - 1, 10**9, -1, "abc", None, 1.5, KeyError):
        sync(clock=clock)
    sync(rank=0, clock=k + 1)  # rank 0 waits already
    sync(rank=0, clock=k)
    # payloads: too big (refused before deserializing), wrong types, none
    sync(params=to_serialize([np.zeros(100_000, np.float32)]))
    sync(params=to_serialize(leaves(1.0) * 5000))
    for params in ("abc", [1, 2, 3], {"a": 1}, None, 5, KeyError, to_serialize("abc"),
                   to_serialize({"a": np.zeros(3)})):
        sync(params=params)
    # packed payloads (daskdl.packing: one uint8 buffer): wrong size, dtype or shape
    packing = Packing(leaves(1.0))
    buf = packing.pack(leaves(1.0))
    for params in (buf[:-1], buf.view(np.float32), buf.reshape(2, -1),
                   np.concatenate([buf, buf]), np.zeros(0, np.uint8)):
        sync(params=to_serialize(params))
    # relayed batches (daskdl_sync_group): unauthenticated, malformed, or of bad syncs
    inner = {key: v for key, v in ok_sync.items() if key != "secret"}

    def group(answers=nope, **kw):
        out.append(("daskdl_sync_group", dict(dict(run="r", secret=SECRET), **kw), answers))

    for secret in ("wrong", None, 5):
        group(secret=secret, syncs=[inner])
    for syncs in ("abc", [], [1, 2], None, [inner] * 3, [inner, inner], [inner, "x"]):
        group(syncs=syncs)
    group({"OK"}, syncs=[dict(inner, clock=k + 5), dict(inner, rank=0, clock=k)])
    group({"OK"}, syncs=[dict(inner, params=to_serialize(buf[:-3])), dict(inner, rank=7)])
    # counters
    for samples in (MAX_SAMPLES + 1, 10**12, -1, "10", None, 2.5):
        sync(samples=samples)
    for loss in ("abc", [1.0], {"x": 1}, True):
        sync(loss=loss)
    for compute in (-1.0, "x", 1e12):
        sync(compute=compute)
    for version in ("x", -5, None):
        sync(version=version)

    def other(name, answers=nope, **kw):
        out.append((name, kw, answers))

    for secret in ("wrong", None, 5):  # well-formed but unauthenticated
        other("daskdl_freeze", run="r", secret=secret)
        other("daskdl_abort", run="r", secret=secret, reason="hostile")
        other("daskdl_end", run="r", secret=secret)
        other("daskdl_regroup", run="r", secret=secret, members={"0": "tcp://x:1"}, clock=k)
        other("daskdl_params", run="r", secret=secret, rank=0)
        other("daskdl_checkpoint_flush", run="r", secret=secret)
        other("daskdl_checkpoint_meta", run="r", secret=secret, clock=k, meta={})
        other("daskdl_start", **start_kwargs("r", secret=secret or "x"))
    for clock in ("abc", -1, None, 1.5, KeyError):
        kw = dict(run="r", secret=SECRET, members={"0": "tcp://a:1", "1": "tcp://b:1"})
        if clock is not KeyError:
            kw["clock"] = clock
        other("daskdl_regroup", **kw)
    for members in ({}, [1, 2], {"0": "a", "0x": "b"}, {"1": "a"}, {"0": "a", "1": "a"},
                    {"0": 5}, "abc", None, {"-1": "a"}):
        other("daskdl_regroup", run="r", secret=SECRET, members=members, clock=k)
    other("daskdl_regroup", run="r", secret=SECRET, members={"0": "a"}, clock=k,
          checkpoint_clocks="x")
    other("daskdl_regroup", run="r", secret=SECRET, members={"0": "a"}, clock=k,
          checkpoint_clocks=["a"])
    other("daskdl_checkpoint_meta", run="r", secret=SECRET, clock=k + 1, meta={})  # not planned
    other("daskdl_checkpoint_meta", run="r", secret=SECRET, clock="x", meta={})
    for reason in (5, None, "x" * 10_000, ""):
        other("daskdl_abort", run="r", secret=SECRET, reason=reason)
    other("daskdl_end", run="r", secret=SECRET, wait_checkpoints="yes")
    for rank in ("x", -5, 1.5):
        other("daskdl_params", run="r", secret=SECRET, rank=rank)
    other("daskdl_params", run="nope", secret=SECRET)
    for run in (5, None, "nope", "", ["r"]):
        other("daskdl_info", run=run)
    other("daskdl_info")
    for keys in ("abc", [{"a": 1}], list(range(200_000)), [[]], [None], None, [["a"] * 20]):
        other("daskdl_locations", keys=keys)
    other("daskdl_locations")
    # new runs that must not start
    bad_starts = [dict(params=None), dict(policy="abc"), dict(policy=to_serialize(5)),
                  dict(members={"0": "a", "0x": "b"}), dict(members={"1": "a"}),
                  dict(timeout="x"), dict(timeout=-1.0), dict(clock="abc"),
                  dict(params=to_serialize([1, 2])), dict(restore=to_serialize("x")),
                  dict(checkpoint=to_serialize({"keep": 1})), dict(max_samples=0),
                  dict(max_rejections="x"), dict(checkpoint_clocks=["x"])]
    for i, change in enumerate(bad_starts):
        other("daskdl_start", **dict(start_kwargs(f"new{i}"), **change))
    other("daskdl_start", run="new", secret=SECRET)
    return out


def state_of(st) -> dict:
    return {"version": st.version, "leaves": [x.tolist() for x in st.leaves],
            "clocks": dict(st.clocks), "done": dict(st.done), "gen": st.gen,
            "strikes": dict(st.strikes), "rejected": st.rejected, "lost": dict(st.lost),
            "aborted": st.aborted, "members": dict(st.members),
            "ranks": {r: (s["rounds"], s["samples"], s["rejected"], s["bytes_in"])
                      for r, s in st.stats.ranks.items()}}


@gen_cluster(client=True, nthreads=[], timeout=120,
             scheduler_kwargs={"dashboard": True, "dashboard_address": ":0"},
             clean_kwargs={"processes": False})
async def test_fuzz_every_handler_leaves_the_run_as_the_legitimate_sequence_does(c, s, errors):
    from tornado.httpclient import AsyncHTTPClient

    await c.register_plugin(TrainingPlugin())
    await c.register_plugin(DashboardPlugin())
    plugin = get_plugin(s)
    http = AsyncHTTPClient()
    url = f"http://localhost:{s.http_server.port}/metrics"

    for run in ("ref", "r"):
        assert (await c.scheduler.daskdl_start(**start_kwargs(run)))["status"] == "OK"
    for k in range(3):  # the legitimate sequence alone
        await legit_round(c, "ref", k)

    sent = []

    async def fuzz(k):
        for name, kw, answers in malformed(k):
            reply = await getattr(c.scheduler, name)(**kw)
            assert reply["status"] in answers, (name, kw, reply)
            sent.append(name)
        assert (await http.fetch(url)).code == 200

    for k in range(3):
        await legit_round(c, "r", k, during=fuzz)
    assert len(sent) >= 200 and set(sent) >= {
        "daskdl_start", "daskdl_sync", "daskdl_params", "daskdl_freeze", "daskdl_regroup",
        "daskdl_checkpoint_meta", "daskdl_checkpoint_flush", "daskdl_abort", "daskdl_end",
        "daskdl_info", "daskdl_locations", "daskdl_sync_group"}
    assert set(plugin.runs) == {"ref", "r"} and not plugin.finished
    got, want = state_of(plugin.runs["r"]), state_of(plugin.runs["ref"])
    assert got == want and want["version"] == 3 and want["clocks"] == {0: 3, 1: 3}
    metrics = (await http.fetch(url)).body.decode()
    assert 'daskdl_run_version{policy="BSP",run="r"} 3.0' in metrics
    assert not errors.records, [r.getMessage() for r in errors.records]


@gen_cluster(client=True, nthreads=[])
async def test_well_formed_messages_without_the_secret_change_nothing(c, s, errors):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    await c.scheduler.daskdl_start(**start_kwargs("r"))
    before = state_of(plugin.runs["r"])
    s_ = "not-the-secret"
    replies = [
        await c.scheduler.daskdl_sync(**sync_kwargs("r", 0, 0, 1.0, 10, secret=s_)),
        await c.scheduler.daskdl_sync(**sync_kwargs("r", 1, 0, np.nan, 10, secret=s_)),
        await c.scheduler.daskdl_abort(run="r", secret=s_, reason="x"),
        await c.scheduler.daskdl_freeze(run="r", secret=s_),
        await c.scheduler.daskdl_regroup(run="r", secret=s_, members={"0": "a"}, clock=0),
        await c.scheduler.daskdl_end(run="r", secret=s_),
        await c.scheduler.daskdl_start(**start_kwargs("r", secret=s_, members=1)),
        await c.scheduler.daskdl_params(run="r", secret=s_),
    ]
    assert all(r["status"] == "refused" for r in replies), replies
    st = plugin.runs["r"]
    assert state_of(st) == before and st.secret == SECRET and not st.membership.frozen
    assert not errors.records
    # a NaN update with the secret is rejected (a strike), without it refused
    reply = await c.scheduler.daskdl_sync(**sync_kwargs("r", 1, 0, np.nan, 10))
    assert reply["status"] == "rejected" and st.strikes == {1: 1} and st.rejected == 1


# checkpoint flush and end wait in the event loop's default executor, whose threads stay
@gen_cluster(client=True, nthreads=[], clean_kwargs={"threads": False})
async def test_round_checks_waiting_rank_samples_and_opt_state(c, s):
    import tempfile

    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    await c.scheduler.daskdl_start(**start_kwargs("r"))
    waiting = asyncio.ensure_future(c.scheduler.daskdl_sync(**sync_kwargs("r", 0, 0, 1.0, 10)))
    await asyncio.sleep(0.1)
    again = await c.scheduler.daskdl_sync(**sync_kwargs("r", 0, 1, 1.0, 10))
    assert again["status"] == "refused" and "waits" in again["reason"]
    too_many = await c.scheduler.daskdl_sync(**sync_kwargs("r", 1, 0, 1.0, MAX_SAMPLES + 1))
    assert too_many["status"] == "refused" and "samples" in too_many["reason"]
    opt = to_serialize([np.ones(3, np.float32)])
    reply = await c.scheduler.daskdl_sync(**sync_kwargs("r", 1, 0, 3.0, 10, opt_state=opt))
    assert reply["status"] == "OK" and (await waiting)["status"] == "OK"
    assert plugin.runs["r"].cut is None  # no checkpoint writer: the state was dropped

    with tempfile.TemporaryDirectory() as d:
        kw = start_kwargs("c", members=1, checkpoint={"store": d, "keep": 2},
                          checkpoint_clocks=frozenset({2}))
        assert (await c.scheduler.daskdl_start(**kw))["status"] == "OK"
        cut = plugin.runs["c"].cut
        await c.scheduler.daskdl_sync(**sync_kwargs("c", 0, 0, 1.0, 10, opt_state=opt))
        assert cut.opt == {}  # clock 1 is no checkpoint clock
        big = to_serialize([np.ones(100_000, np.float32)])
        reply = await c.scheduler.daskdl_sync(**sync_kwargs("c", 0, 1, 1.0, 10, opt_state=big))
        assert reply["status"] == "refused" and cut.opt == {}  # too big for an opt state
        reply = await c.scheduler.daskdl_checkpoint_meta(run="c", secret=SECRET, clock=1,
                                                         meta={})
        assert reply["status"] == "refused"  # not planned
        assert (await c.scheduler.daskdl_checkpoint_meta(
            run="c", secret=SECRET, clock=2, meta={"epoch": 0}))["status"] == "OK"
        await c.scheduler.daskdl_sync(**sync_kwargs("c", 0, 1, 1.0, 10, opt_state=opt))
        flushed = await c.scheduler.daskdl_checkpoint_flush(run="c", secret=SECRET)
        assert flushed["status"] == "OK" and not flushed["errors"]  # a tuple over msgpack
        assert cut.writer.written == 1 and cut.opt == {} and cut.meta == {}
        ended = await c.scheduler.daskdl_end(run="c", secret=SECRET)
        assert ended["status"] == "OK" and not ended["checkpoint_errors"]


@gen_cluster(client=True, nthreads=[])
async def test_max_runs_drops_ended_then_aborted_runs_then_refuses(c, s):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    with dask.config.set({"daskdl.max-runs": 3}):
        for run in ("a", "b", "c"):
            assert (await c.scheduler.daskdl_start(**start_kwargs(run)))["status"] == "OK"
        await c.scheduler.daskdl_end(run="a", secret=SECRET)
        await c.scheduler.daskdl_abort(run="b", secret=SECRET, reason="x")
        assert (await c.scheduler.daskdl_start(**start_kwargs("d")))["status"] == "OK"
        assert "a" not in plugin.finished and set(plugin.runs) == {"b", "c", "d"}
        assert (await c.scheduler.daskdl_start(**start_kwargs("e")))["status"] == "OK"
        assert set(plugin.runs) == {"c", "d", "e"}  # the aborted one went next
        full = await c.scheduler.daskdl_start(**start_kwargs("f"))
        assert full["status"] == "refused" and "daskdl.max-runs" in full["reason"]
        assert set(plugin.runs) == {"c", "d", "e"}
        # a restart of a running run needs no room
        assert (await c.scheduler.daskdl_start(**start_kwargs("c")))["status"] == "OK"


@gen_cluster(client=True, nthreads=[])
async def test_an_ended_run_keeps_its_secret(c, s):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    await c.scheduler.daskdl_start(**start_kwargs("r"))
    await c.scheduler.daskdl_end(run="r", secret=SECRET)
    assert "r" in plugin.finished and plugin.finished["r"].leaves == []
    other = await c.scheduler.daskdl_start(**start_kwargs("r", secret="another"))
    assert other["status"] == "refused" and "r" in plugin.finished
    assert (await c.scheduler.daskdl_start(**start_kwargs("r")))["status"] == "OK"
    assert "r" in plugin.runs and "r" not in plugin.finished


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_locations_and_a_worker_leaving_after_the_end(c, s, a, b, caplog):
    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    x = await c.scatter(41, workers=[a.address])
    y = c.submit(lambda v: v + 1, x, key=("y", 0), workers=[b.address])
    await y
    reply = await c.scheduler.daskdl_locations(keys=[x.key, ("y", 0), ("missing", 1), "no"])
    assert reply["status"] == "OK" and set(reply["where"]) == {x.key, ("y", 0)}
    assert reply["where"][("y", 0)] == b.address  # x was copied to b for y: either holds it
    assert reply["where"][x.key] in {a.address, b.address}
    kw = start_kwargs("r")
    kw["members"] = {"0": a.address, "1": b.address}
    await c.scheduler.daskdl_start(**kw)
    await c.scheduler.daskdl_end(run="r", secret=SECRET)
    with caplog.at_level(logging.INFO, logger="daskdl"):
        await b.close()
        await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.name == "daskdl"]
    assert plugin.finished["r"].lost == {}


@gen_cluster(client=True, nthreads=[])
async def test_a_resent_sync_is_answered_not_counted_again(c, s):
    """A worker whose relay failed sends its sync again marked ``resent``: while its
    first copy still waits in the barrier, and after it was answered, the copy gets the
    same answer and nothing is counted twice (without ``resent`` it is refused)."""
    await c.register_plugin(TrainingPlugin())
    assert (await c.scheduler.daskdl_start(**start_kwargs("r")))["status"] == "OK"
    first = asyncio.ensure_future(c.scheduler.daskdl_sync(**sync_kwargs("r", 0, 0, 1.0, 10)))
    await asyncio.sleep(0.05)
    again = asyncio.ensure_future(
        c.scheduler.daskdl_sync(**sync_kwargs("r", 0, 0, 1.0, 10, resent=True)))
    plain = await c.scheduler.daskdl_sync(**sync_kwargs("r", 0, 0, 1.0, 10))
    assert plain["status"] == "refused" and not first.done() and not again.done()
    second = await c.scheduler.daskdl_sync(**sync_kwargs("r", 1, 0, 3.0, 30))
    a, b = await first, await again
    late = await c.scheduler.daskdl_sync(**sync_kwargs("r", 1, 0, 3.0, 30, resent=True))
    assert a["status"] == b["status"] == second["status"] == late["status"] == "OK"
    assert a["version"] == b["version"] == late["version"] == 1
    st = get_plugin(s).runs["r"]
    assert st.version == 1 and dict(st.clocks) == {0: 1, 1: 1}
    assert [st.stats.ranks[r]["rounds"] for r in (0, 1)] == [1, 1]
    np.testing.assert_allclose(st.leaves[0], 2.5)  # (1 * 10 + 3 * 30) / 40
