"""What faults and checkpoints cost: digits training with a worker killed and one joining.

    python benchmarks/faults.py [--epochs 60] [--repeats 3] [--sync sharded]

Two worker processes without nannies (``dask worker --no-nanny``), one thread
each, ``BSP(every=4)``, the digits MLP of ``examples/digits.py``, in one
invocation, ``--repeats`` times each (medians):

* ``no-fault``: the plain run;
* ``fault``: worker rank 1 is SIGKILLed when 30% of the rounds are done (it stays
  dead), and a new worker process is started at 60% (it joins when it is up);
* ``checkpoint``: the plain run with ``checkpoint_every=20`` rounds (about every
  0.25 s here) to a local directory.

Prints wall times and the ratio fault / no-fault, the longest pause between two
rounds reported after the kill (until the new worker is started: how long the
survivor took to go on alone), the final test accuracy of both, and what a checkpoint costs: the time the scheduler's event loop spends
taking a snapshot (copying the arrays; the write is in a background thread),
the extra synchronisation time of the rounds that carry a checkpoint (they send
the optimizer state), and the wall-time ratio checkpoint / no-fault.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
from distributed import Client, LocalCluster

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import daskdl as ddl  # noqa: E402
from examples.digits import accuracy, init_mlp, loss_fn  # noqa: E402


CKPT_EVERY = 20  # rounds (about 0.25 s here: far more often than a real run needs)


def start_worker(address: str) -> subprocess.Popen:
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="268435456")
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                             "--no-nanny", "--nthreads", "1", "--no-dashboard"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return ddl.Dataset.from_arrays(x=x, y=y, chunk_size=90).split(0.8, seed=0)


def one_run(kind: str, epochs: int, sync: str = "auto") -> dict:
    train, test = data()
    cluster = LocalCluster(n_workers=0, dashboard_address=":0")
    procs = [start_worker(cluster.scheduler_address) for _ in range(2)]
    out: dict = {"kind": kind}
    try:
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)
            pids = client.run(os.getpid)
            ckpt = tempfile.mkdtemp(prefix="daskdl-bench-") if kind == "checkpoint" else None
            trainer = ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                                  policy=ddl.BSP(every=4), batch_size=32, client=client,
                                  seed=0, checkpoint=ckpt, sync=sync,
                                  checkpoint_every=CKPT_EVERY if ckpt else None)
            trainer.fit(train, epochs=1, verbose=False)  # compile and warm up
            per_epoch = len(trainer.rounds) // 2
            total = per_epoch * 2 * epochs
            seen = {"n": 0, "killed": None, "joined": None, "last": None, "pause": 0.0}
            t0 = time.perf_counter()

            def cb(r):
                seen["n"] += 1
                if kind != "fault":
                    return
                now = time.perf_counter()
                if seen["killed"] is not None and seen["joined"] is None:
                    seen["pause"] = max(seen["pause"], now - seen["last"])
                seen["last"] = now
                if seen["killed"] is None and seen["n"] >= 0.3 * total:
                    victim = sorted(pids)[-1]
                    os.kill(pids[victim], signal.SIGKILL)
                    seen["killed"] = time.perf_counter() - t0
                if seen["joined"] is None and seen["n"] >= 0.6 * total:
                    procs.append(start_worker(cluster.scheduler_address))
                    seen["joined"] = time.perf_counter() - t0

            trainer.fit(train, epochs=epochs, verbose=False, callbacks=[cb])
            out["seconds"] = time.perf_counter() - t0
            out["accuracy"] = trainer.evaluate(test, accuracy)["accuracy"]
            info = trainer.info()
            out["generations"] = info["generation"]
            out["workers_at_end"] = len(info["members"])
            if kind == "fault":
                out["killed_at_s"], out["started_joiner_at_s"] = seen["killed"], seen["joined"]
                out["pause_s"] = seen["pause"]
            if ckpt:
                m = info["metrics"]
                marks = {h["clock"] for h in info["history"] if h["kind"] == "checkpoint"}
                with_ck = [r["sync_s"] for r in trainer.rounds if r["clock"] + 1 in marks]
                without = [r["sync_s"] for r in trainer.rounds if r["clock"] + 1 not in marks]
                out["checkpoints"] = m["checkpoints"]
                out["skipped"] = m["checkpoints_skipped"]
                out["snapshot_ms"] = 1e3 * m["checkpoint_blocked_s"] / max(m["checkpoints"], 1)
                out["write_ms"] = 1e3 * m["checkpoint_write_s"] / max(m["checkpoints"], 1)
                out["extra_sync_ms"] = 1e3 * (statistics.median(with_ck)
                                              - statistics.median(without))
            trainer.close()
    finally:
        for p in procs:
            p.kill()
        cluster.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync", default="auto", choices=("auto", "scheduler", "sharded"),
                    help="Trainer(sync=...) (auto: the scheduler path for this small model)")
    args = ap.parse_args()
    runs: dict = {"no-fault": [], "fault": [], "checkpoint": []}
    for i in range(args.repeats):
        for kind in runs:
            r = one_run(kind, args.epochs, args.sync)
            runs[kind].append(r)
            print(f"[{i}] {kind:10s} " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in r.items() if k != "kind"), flush=True)

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    print()
    print(f"wall time  no-fault {med('no-fault', 'seconds'):.2f}s, fault "
          f"{med('fault', 'seconds'):.2f}s, ratio fault/no-fault "
          f"{med('fault', 'seconds') / med('no-fault', 'seconds'):.3f}")
    pauses = ", ".join(f"{r['pause_s']:.2f}" for r in runs["fault"])
    print(f"longest pause between two rounds reported after the kill: "
          f"{med('fault', 'pause_s'):.2f}s (runs: {pauses})")
    print(f"accuracy   no-fault {med('no-fault', 'accuracy'):.4f}, fault "
          f"{med('fault', 'accuracy'):.4f}")
    print(f"checkpoint every {CKPT_EVERY} rounds: {med('checkpoint', 'checkpoints'):.0f} written "
          f"({med('checkpoint', 'skipped'):.0f} replaced by a newer one while waiting); "
          f"scheduler snapshot {med('checkpoint', 'snapshot_ms'):.2f} ms each; rounds "
          f"carrying one sync {med('checkpoint', 'extra_sync_ms'):+.2f} ms longer; wall "
          f"ratio checkpoint/no-fault "
          f"{med('checkpoint', 'seconds') / med('no-fault', 'seconds'):.3f}; background write "
          f"{med('checkpoint', 'write_ms'):.1f} ms each")


if __name__ == "__main__":
    main()
