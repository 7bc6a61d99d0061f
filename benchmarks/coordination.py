"""What coordinating a round costs the scheduler and the client, per worker-round.

    python benchmarks/coordination.py [--workers 2 8 16] [--every 1 4] [--repeats 3]
                                      [--relay-group auto 1] [--depth 1] [--rounds 200]
                                      [--profile DIR]

Starts a standalone scheduler process (``dask scheduler``) and N light workers
(``dask worker --nthreads 1 --no-nanny``, XLA on one thread), and trains a tiny model
(the digits MLP 64-32-10, batch 32; ``--depth D``: D hidden layers of 32, 2(D+1)
parameter leaves, for the cost that grows with a model's number of leaves) from this process as the client, with
``BSP(every=E)``: compute is a fraction of a millisecond, so what is measured is
coordination.  For each (N, E):

* ``relay``: config ``daskdl.relay-group`` (``auto``, the default: groups of
  ``ceil(sqrt(N))`` workers from 16 workers on send their syncs through a relay, one
  scheduler message per group and round; ``1``: every worker syncs with the
  scheduler itself) and ``msgs/wr``, scheduler messages carrying syncs per
  worker-round;
* worker-rounds/s over the whole measured fit (all workers together);
* scheduler CPU ms and client CPU ms per worker-round (psutil, process CPU time during
  the fit minus the same process's idle CPU over an equal time just before);
* the number of workers one scheduler core can coordinate at 1, 4 and 10 rounds/s per
  worker (1000 ms / scheduler ms per worker-round / rate);
* whether the fit stalled (a worker lost, a generation change, or rounds missing);
* the floor: scheduler CPU ms per plain Dask RPC from each worker to a handler that
  sends back what it got (the model's parameters each way, like a sync), measured on
  the same scheduler right after the fit, and the ratio of the two.  One sync per
  worker-round is what a round needs; the floor is what Dask's comm layer costs for
  one on this machine.

A first fit compiles and warms up; the second is measured.  Medians of ``--repeats``.
``--profile DIR`` profiles the scheduler's event loop (cProfile, started and stopped on
the scheduler) and the client during the measured fit only, and prints the top
functions by cumulative time of each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import time

import dask
import jax
import numpy as np
import optax
import psutil
from distributed import Client

import daskdl as ddl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import digits as _digits  # noqa: E402
from examples.digits import loss_fn  # noqa: E402,F401

BATCH = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(ddl.__file__))  # the daskdl this process runs
    env.update(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root] + sys.path))
    return env


def start_cluster(n: int, profile: str | None):
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
            str(port), "--dashboard-address", ":0", "--no-show"]
    sched = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    workers = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
         "--no-nanny", "--no-dashboard", "--memory-limit", "0"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    client = Client(addr, set_as_default=False, timeout=60)
    client.wait_for_workers(n, timeout=180)
    return sched, workers, client


def stop_cluster(sched, workers, client) -> None:
    client.close()
    for p in workers:
        p.terminate()
    sched.send_signal(signal.SIGINT)  # cProfile writes its file on a clean exit
    for p in workers + [sched]:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure(n: int, every: int, rounds: int, profile: str | None, relay="auto",
            depth: int = 1) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    per_epoch = n * BATCH * every * 50  # 50 rounds per epoch and worker
    reps = -(-per_epoch // len(x))
    x, y = np.tile(x, (reps, 1))[:per_epoch], np.tile(y, reps)[:per_epoch]
    epochs = max(1, rounds // 50)
    sched, workers, client = start_cluster(n, profile)
    sp, me = psutil.Process(sched.pid), psutil.Process()
    try:
        ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=BATCH * every * 10)
        sizes = (64,) + (32,) * depth + (10,)
        with dask.config.set({"daskdl.relay-group": relay}), \
                ddl.Trainer(loss_fn, _digits.init_mlp(jax.random.PRNGKey(0), sizes),
                            optax.sgd(0.05), policy=ddl.BSP(every=every), batch_size=BATCH,
                            client=client, sync_timeout=120) as tr:
            tr.fit(ds, epochs=1, verbose=False)  # start-up and compilation
            time.sleep(1.0)
            s0, c0, t0 = cpu(sp), cpu(me), time.perf_counter()
            time.sleep(2.0)
            idle_s, idle_c = (cpu(sp) - s0) / 2.0, (cpu(me) - c0) / 2.0
            prof = cProfile.Profile() if profile else None
            s0, c0, t0 = cpu(sp), cpu(me), time.perf_counter()
            if prof:
                client.run_on_scheduler(_profile, None)
                prof.enable()
            hist = tr.fit(ds, epochs=epochs, verbose=False)
            if prof:
                prof.disable()
                prof.dump_stats(os.path.join(profile, "client.prof"))
                client.run_on_scheduler(_profile, os.path.join(profile, "scheduler.prof"))
            wall = time.perf_counter() - t0
            ds_, dc = cpu(sp) - s0 - idle_s * wall, cpu(me) - c0 - idle_c * wall
            info = tr.info()
            msgs = info["metrics"].get("sync_messages", float("nan"))
            leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(tr.params)]
        floor = rpc_floor(client, sp, leaves, max(100, rounds))
        worker_rounds = sum(h["rounds"] for h in hist) * n
        expected = epochs * 50 * n
        stalled = info["generation"] != 0 or bool(info["lost"]) or worker_rounds != expected
        sched_ms = 1e3 * ds_ / worker_rounds
        return {"rounds_s": worker_rounds / wall, "sched_ms": sched_ms,
                "client_ms": 1e3 * dc / worker_rounds, "stalled": stalled,
                "gap": epoch_gaps(info["history"]), "floor_ms": floor,
                "msgs": msgs / worker_rounds}  # each fit is a run of its own
    finally:
        stop_cluster(sched, workers, client)


def _profile(path, dask_scheduler=None):
    """On the scheduler: start profiling its event loop (``path=None``), or stop and
    write the profile to ``path``."""
    if path is None:
        dask_scheduler._daskdl_bench_profile = prof = cProfile.Profile()
        prof.enable()
    else:
        prof = dask_scheduler._daskdl_bench_profile
        prof.disable()
        prof.dump_stats(path)


def _echo(dask_scheduler=None):
    """Install a scheduler handler that answers with what it got (the floor)."""
    dask_scheduler.handlers["daskdl_bench_echo"] = lambda comm=None, x=None: {"x": x}


async def _echo_loop(dask_worker=None, leaves=None, n=0):
    from distributed.protocol.serialize import to_serialize

    for _ in range(n):
        await dask_worker.scheduler.daskdl_bench_echo(x=to_serialize(leaves))
    return n


def rpc_floor(client, sched: psutil.Process, leaves: list, n: int) -> float:
    """Scheduler CPU ms per echo RPC carrying ``leaves`` each way, every worker at once."""
    client.run_on_scheduler(_echo)
    client.run(_echo_loop, leaves=leaves, n=20)  # connections, warm-up
    c0 = cpu(sched)
    calls = sum(client.run(_echo_loop, leaves=leaves, n=n).values())
    return 1e3 * (cpu(sched) - c0) / calls


def epoch_gaps(history: list) -> float:
    """Median over epoch boundaries of (gap between the last merge of an epoch and the
    first of the next) / (median gap between two merges): 1 means no bubble."""
    merges = [h for h in history if h["kind"] == "merge"]
    times = [h["time"] for h in merges]
    gaps = np.diff(times)
    if len(gaps) < 3:
        return float("nan")
    typical = float(np.median(gaps))
    bounds = [i for i in range(1, len(merges)) if (merges[i]["clock"] % 50) == 0]
    return float(np.median([gaps[i - 1] for i in bounds]) / typical) if bounds else 1.0


def top(path: str, n: int = 15) -> str:
    out = io.StringIO()
    pstats.Stats(path, stream=out).sort_stats("cumulative").print_stats(n)
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 8, 16])
    p.add_argument("--every", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--relay-group", nargs="+", default=["auto"],
                   help="config daskdl.relay-group values to compare (auto, 1: no relays, an int)")
    p.add_argument("--rounds", type=int, default=200, help="rounds per worker measured")
    p.add_argument("--depth", type=int, default=1, help="hidden layers of 32 in the MLP")
    p.add_argument("--profile", default=None, help="directory for cProfile outputs")
    a = p.parse_args()
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    print(f"{'N':>4} {'every':>5} {'relay':>5} {'msgs/wr':>7} {'rounds/s':>9} {'sched ms':>9} {'client ms':>9} "
          f"{'N@1/s':>7} {'N@4/s':>7} {'N@10/s':>7} {'gap':>5} {'floor ms':>8} {'/floor':>6} "
          "stalled")
    for n in a.workers:
        for every in a.every:
            for relay in a.relay_group:
                runs = [measure(n, every, a.rounds, a.profile, relay, a.depth) for _ in range(a.repeats)]
                med = {k: statistics.median(r[k] for r in runs)
                       for k in ("rounds_s", "sched_ms", "client_ms", "gap", "floor_ms", "msgs")}
                cap = [1000.0 / max(med["sched_ms"], 1e-6) / rate for rate in (1, 4, 10)]
                print(f"{n:>4} {every:>5} {relay:>5} {med['msgs']:>7.2f} {med['rounds_s']:>9.0f} "
                      f"{med['sched_ms']:>9.2f} {med['client_ms']:>9.2f} {cap[0]:>7.0f} "
                      f"{cap[1]:>7.0f} {cap[2]:>7.0f} {med['gap']:>5.2f} "
                      f"{med['floor_ms']:>8.2f} {med['sched_ms'] / med['floor_ms']:>6.2f} "
                      f"{sum(r['stalled'] for r in runs)}/{len(runs)}", flush=True)
    if a.profile:
        for name in ("scheduler", "client"):
            path = os.path.join(a.profile, f"{name}.prof")
            if os.path.exists(path):
                print(f"\n== {name}: top functions by cumulative time ==\n{top(path)}")


if __name__ == "__main__":
    main()
