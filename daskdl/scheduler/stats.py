"""What the dashboard and Prometheus read: per-rank counters, the event history,
the run's aggregates, and each worker's divergence from the global parameters.

Numbers are converted when they arrive (:func:`finite`): nothing that is not a
finite number reaches :meth:`Stats.metrics`.  History events are plain dicts with a
``kind``: ``arrive``, ``reject``, ``merge``, ``release``, ``lost``, ``regroup``,
``checkpoint``.
"""

from __future__ import annotations

import collections
import math
import time

import numpy as np

from ..policies import Contribution

DIVERGENCE_EVERY_S = 1.0  # divergence reads every byte of every contribution: rarely


def finite(x) -> float | None:
    """``float(x)`` when it is a finite number, else ``None``."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def rank_stats(address: str) -> dict:
    """The counters of one rank, all zero."""
    return {"address": address, "clock": 0, "rounds": 0, "samples": 0, "compute_s": 0.0,
            "wait_s": 0.0, "bytes_in": 0, "bytes_out": 0, "loss": None, "divergence": None,
            "rejected": 0, "raw_bytes": 0, "transfer_s": 0.0, "shard_merge_s": 0.0,
            "compression": 1.0}


def norm_of_difference(a: list, b: list) -> float:
    """``||a - b||`` over all floating leaves (for display: sums in the leaves' dtype)."""
    total = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.inexact):
            d = (x - y).ravel()
            total += float(np.vdot(d, d).real)
    return float(np.sqrt(total))


def divergences(contributions: list[Contribution], leaves: list, sends: str) -> dict:
    """``rank -> ||theta_rank - theta_global||`` (policies sending deltas: the size of
    the delta); reads every byte, so the plugin runs it in a thread for large models."""
    out = {}
    for c in contributions:
        if c.leaves is None:  # sharded: the worker sent the norm with its arrival
            continue
        if sends != "params":
            d = norm_of_difference(c.leaves, [np.zeros_like(x) for x in c.leaves])
        elif all(a is b for a, b in zip(c.leaves, leaves)):
            d = 0.0
        else:
            d = norm_of_difference(c.leaves, leaves)
        out[c.rank] = finite(d)
    return out


class Stats:
    """Counters and history of one run.

    Attributes
    ----------
    ranks : dict
        ``rank -> counters`` (see :func:`rank_stats`), kept for lost ranks too.
    history : collections.deque
        The run's events, oldest first (at most 100,000).
    rejected, merge_seconds, loss
        Updates rejected, seconds spent merging, sample-weighted loss of the last merge.
    """

    def __init__(self, members: dict[int, str]):
        self.ranks = {rank: rank_stats(a) for rank, a in members.items()}
        self.history: collections.deque = collections.deque(maxlen=100_000)
        self.rejected = 0
        self.merge_seconds = 0.0
        self.loss: float | None = None
        # scheduler messages carrying syncs: direct ones, relays' batches and their syncs
        self.messages = {"direct": 0, "batches": 0, "relayed": 0}
        self._divergence_at = -1e9

    def _rank(self, rank: int, address: str) -> dict:
        return self.ranks.setdefault(rank, rank_stats(address))

    def event(self, kind: str, **fields) -> None:
        self.history.append({"kind": kind, **fields, "time": time.time()})

    def arrived(self, rank: int, address: str, clock: int, samples: int, version: int,
                loss, compute, nbytes: int) -> None:
        """A rank's update for round ``clock`` was accepted."""
        loss, compute = finite(loss), finite(compute) or 0.0
        self.event("arrive", rank=rank, clock=clock, loss=loss, samples=samples,
                   compute=compute, version=version, bytes=nbytes)
        s = self._rank(rank, address)
        s["clock"] = clock + 1
        s["rounds"] += 1
        s["samples"] += int(samples)
        s["compute_s"] += compute
        s["bytes_in"] += int(nbytes)
        s["loss"] = loss

    def shard_traffic(self, rank: int, raw: int, received: int, transfer: float,
                      merge: float) -> None:
        """Sharded sync: what a worker moved and spent besides its update's bytes
        (counted by :meth:`arrived`): the bytes it gathered, the uncompressed size of
        what it sent, seconds sending and gathering, seconds its owner merged."""
        s = self.ranks.get(rank)
        if s is None:
            return
        s["bytes_out"] += int(received)
        s["raw_bytes"] += int(raw)
        s["transfer_s"] += finite(transfer) or 0.0
        s["shard_merge_s"] += finite(merge) or 0.0
        s["compression"] = s["raw_bytes"] / s["bytes_in"] if s["bytes_in"] else 1.0

    def rejected_update(self, rank: int, address: str, clock: int, why: str) -> None:
        self.rejected += 1
        self._rank(rank, address)["rejected"] += 1
        self.event("reject", rank=rank, clock=clock, reason=why)

    def replied(self, rank: int, waited: float, nbytes: int) -> None:
        s = self.ranks.get(rank)
        if s is not None:
            s["wait_s"] += waited
            s["bytes_out"] += int(nbytes)

    def regrouped(self, gen: int, clock: int, members: dict[int, str]) -> None:
        for rank, address in members.items():
            if self.ranks.get(rank, {}).get("address") != address:
                self.ranks[rank] = rank_stats(address)
        self.event("regroup", generation=gen, clock=clock, members=dict(members))

    def divergence_due(self) -> bool:
        """Whether the next merge measures divergence (at most once a second: it reads
        every byte of every contribution)."""
        now = time.monotonic()
        if now - self._divergence_at >= DIVERGENCE_EVERY_S:
            self._divergence_at = now
            return True
        return False

    def merged(self, contributions: list[Contribution], clock: int, version: int,
               seconds: float, divergence: dict | None = None) -> None:
        """Record a merge: time, loss, history, and the ``divergence`` measured for it
        (:func:`divergences`), if any."""
        self.merge_seconds += seconds
        divergence = divergence or {}
        for rank, d in divergence.items():
            if rank in self.ranks:
                self.ranks[rank]["divergence"] = d
        weighted = [(c.loss, c.samples) for c in contributions if finite(c.loss) is not None]
        if weighted:
            self.loss = finite(sum(lo * n for lo, n in weighted)
                               / max(sum(n for _, n in weighted), 1))
        self.event("merge", clock=clock, version=version,
                   ranks=[c.rank for c in contributions],
                   samples=sum(c.samples for c in contributions), loss=self.loss,
                   divergence=divergence)

    def metrics(self, clocks: dict[int, int], members: dict[int, str], started: float,
                now: float) -> dict:
        """The per-run numbers of :meth:`daskdl.scheduler.RunState.metrics` kept here."""
        top = max(clocks.values(), default=0)
        per_rank = {}
        for rank, s in self.ranks.items():
            d = dict(s)
            d["clock"] = clocks.get(rank, s["clock"])
            d["staleness"] = top - d["clock"]
            d["active"] = members.get(rank) == s["address"]
            per_rank[rank] = d
        samples = sum(s["samples"] for s in self.ranks.values())
        return {"samples": samples, "samples_per_s": samples / max(now - started, 1e-9),
                "loss": self.loss, "rejected": self.rejected,
                "merge_seconds": self.merge_seconds,
                "sync_messages": self.messages["direct"] + self.messages["batches"],
                "relayed_syncs": self.messages["relayed"], "ranks": per_rank}
