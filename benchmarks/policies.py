"""Consistency policies with and without a straggler.

    python benchmarks/policies.py [--epochs 2] [--repeats 3] [--out docs]

The same model (MLP 784-256-256-10 on data labelled by a linear teacher, batch 64
per worker, Adam, ``every=8``) trains on 2 workers under each preset, first with
both workers at full speed, then with worker 1 slowed 2x (a simulated
straggler: it sleeps as long as it computed).  For every run it reports the wall
time until the training loss (mean of the last 8 rounds reported to the
first reaches the target, the rounds run, and the fraction of round
time spent waiting in barriers.  The loss is that of the global parameters on\n2048 held-out samples, sampled from the scheduler every 0.1 s while training.  Writes ``policies.md`` (the table) and
``policies.png`` (loss against wall time, one line per policy) into ``--out``.

The baseline is BSP in the same invocation: ratios are time-to-target of BSP
divided by that of each policy (above 1: faster than BSP).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import dask
import jax
import numpy as np
import optax
from distributed import Client, LocalCluster

import daskdl as ddl
from daskdl.workerenv import cluster_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as tp  # noqa: E402  (the MLP and its loss)
from throughput import loss_fn  # noqa: E402

SIZES = (784, 256, 256, 10)


def init_mlp(key):
    return tp.init_mlp(key, SIZES)


def make_data(n, seed=0):
    """Labels from a fixed linear teacher: learnable, so the held-out loss keeps falling."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0]), dtype=np.float32)
    teacher = np.random.default_rng(7).standard_normal((SIZES[0], SIZES[-1])).astype(np.float32)
    return x, (x @ teacher).argmax(-1).astype(np.int32)


def policies(every):
    return {
        "BSP": ddl.BSP(every=every),
        "SSP(s=2)": ddl.SSP(every=every, staleness=2),
        "Async": ddl.Async(every=every),
        "EASGD(0.25)": ddl.EASGD(every=every, alpha=0.25),
        "DiLoCo": ddl.DiLoCo(every=every),
    }


class Sampler(threading.Thread):
    """Fetches the global parameters from the scheduler every ``period`` seconds."""

    def __init__(self, trainer, period=0.1):
        super().__init__(daemon=True)
        self.trainer, self.period = trainer, period
        self.snapshots, self.stop = [], threading.Event()

    def run(self):
        c = self.trainer.client
        t0 = time.perf_counter()
        while not self.stop.is_set():
            reply = c.sync(c.scheduler.daskdl_params, run=self.trainer.run)
            if reply.get("status") == "OK" and reply["version"] > 0:
                if not self.snapshots:  # the clock starts at the first merge: start-up
                    t0 = time.perf_counter()  # and compilation are left out
                leaves = [np.array(x) for x in reply["params"]]
                self.snapshots.append((time.perf_counter() - t0, leaves))
            self.stop.wait(self.period)


def run(client, ds, policy, epochs, slowdown, eval_batch):
    with dask.config.set({"daskdl.testing.slowdown": slowdown}):
        with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(1e-3),
                         policy=policy, batch_size=64, client=client) as tr:
            sampler = Sampler(tr)
            sampler.start()
            tr.fit(ds, epochs=epochs)
            sampler.stop.set()
            sampler.join()
            total = sampler.snapshots[-1][0]
            rounds = tr.rounds
            treedef = jax.tree_util.tree_structure(tr.params)
    busy = sum(r["data_s"] + r["compute_s"] + r["sync_s"] for r in rounds)
    waiting = sum(r["wait_s"] for r in rounds)
    evaluate = jax.jit(loss_fn)
    curve = [(t, float(evaluate(jax.tree_util.tree_unflatten(treedef, leaves), eval_batch)))
             for t, leaves in sampler.snapshots]
    return {"curve": curve, "rounds": len(rounds), "waiting": waiting / busy, "total": total}


def time_to(curve, target):
    for t, loss in curve:
        if loss <= target:
            return t
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=32768)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    a = p.parse_args()

    x, y = make_data(a.samples + 2048)
    held_out = {"x": x[a.samples:], "y": y[a.samples:]}
    x, y = x[:a.samples], y[:a.samples]
    with cluster_config():
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    results = {}
    with cluster, Client(cluster) as client:
        ds = ddl.Dataset.from_arrays(x=x, y=y, chunk_size=1024)
        for rep in range(a.repeats):
            for cond, slow in (("no straggler", {}), ("straggler 2x", {1: 2.0})):
                for name, policy in policies(a.every).items():
                    r = run(client, ds, policy, a.epochs, slow, held_out)
                    results.setdefault((cond, name), []).append(r)
                    print(f"repeat {rep}: {cond:13s} {name:12s} done", flush=True)

    # target: what the worst run reaches at the end, so that every run reaches it
    finals = [min(loss for _, loss in r["curve"]) for rs in results.values() for r in rs]
    target = float(max(finals)) * 1.02
    med = statistics.median
    rows = []
    for cond in ("no straggler", "straggler 2x"):
        base = med(time_to(r["curve"], target) for r in results[cond, "BSP"])
        for name in policies(a.every):
            rs = results[cond, name]
            t = med(time_to(r["curve"], target) for r in rs)
            rows.append((cond, name, t, base / t, rs[0]["rounds"],
                         med(r["waiting"] for r in rs), med(r["total"] for r in rs)))
    header = (f"| condition | policy | seconds to loss <= {target:.3f} (median of "
              f"{a.repeats}) | BSP / policy | rounds | waiting | seconds to the end |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for cond, name, t, ratio, rounds, wait, total in rows:
        lines.append(f"| {cond} | {name} | {t:.2f} | {ratio:.2f} | {rounds} | "
                     f"{100 * wait:.0f}% | {total:.2f} |")
    table = "\n".join(lines)
    print(table)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "policies.md"), "w") as f:
        f.write("# Policies with and without a straggler\n\n")
        f.write("Written by `python benchmarks/policies.py` (see its docstring): 2 workers, "
                f"MLP 784-256-256-10, batch 64, every={a.every}, {a.epochs} epochs of "
                f"{a.samples} samples, each run repeated {a.repeats} times (the figure shows "
                "the first); straggler: worker 1 slowed 2x.  Loss: the global "
                "parameters' loss on 2048 held-out samples, sampled every 0.1 s; times count "
                "from the first merge (start-up and compilation left out).\n\n")
        f.write(table + "\n\n![loss against wall time](policies.png)\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, cond in zip(axes, ("no straggler", "straggler 2x")):
        for name in policies(a.every):
            t, loss = zip(*results[cond, name][0]["curve"])
            ax.plot(t, loss, label=name)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_title(cond)
        ax.set_xlabel("wall time since the first merge (s)")
        ax.set_yscale("log")
    axes[0].set_ylabel("held-out loss of the global parameters")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "policies.png"), dpi=110)
    print("wrote", os.path.join(a.out, "policies.md"), "and policies.png")


if __name__ == "__main__":
    main()
