"""One training run as the scheduler holds it (:class:`RunState`).

The run composes its parts, one concern each: :class:`~.membership.Membership`
(generations, clocks), :class:`~.barrier.Barrier` (waiting, group merges),
:class:`~.stats.Stats` (counters, history) and, when it writes checkpoints, a
:class:`~daskdl.checkpoint.CheckpointCut`.  It owns the global parameters, their
version, the policy and its state, and the run secret.
"""

from __future__ import annotations

import logging
import time

from .. import protocol
from ..checkpoint import CheckpointCut
from ..errors import DaskDLError
from ..packing import Packing, packed
from ..protocol import ProtocolError
from ..tree import check_like
from ..policies import Policy
from .barrier import Barrier
from .membership import Membership
from .stats import Stats

logger = logging.getLogger("daskdl")


class RunState:
    """Everything the scheduler knows about one training run.

    Parameters
    ----------
    run, secret : str
        The run id and its secret (never logged or shown).
    leaves : list of numpy arrays
        The global parameters, flat.
    policy : Policy
    members : dict
        ``rank -> worker address`` of the first generation.
    timeout : float
        ``daskdl.sync-timeout`` in seconds.
    clock, version : int
        Rounds every rank has finished, version of ``leaves`` (resumed runs).
    policy_state
        The policy's state (``policy.init(leaves)`` when ``None``).
    """

    def __init__(self, run: str, secret: str, leaves: list, policy: Policy,
                 members: dict, timeout: float, clock: int = 0, version: int = 0,
                 policy_state=None):
        self.run, self.secret = run, secret
        self.leaves = leaves
        self.nbytes = sum(x.nbytes for x in leaves)  # the most a params payload may hold
        self.packing = Packing(leaves) if leaves else None  # params as one buffer
        self.version = version
        self.policy = policy
        self.policy_state = policy.init(leaves) if policy_state is None else policy_state
        self.timeout = timeout
        self.membership = Membership(members, clock)
        self.barrier = Barrier()
        self.stats = Stats(members)
        self.cut: CheckpointCut | None = None
        self.replies: dict[int, list] = {}  # rank -> leaves it continues from (EASGD)
        self.restore: dict[int, dict] = {}  # rank -> {opt_state, params} from a checkpoint
        self.strikes: dict[int, int] = {}  # rank -> rejected updates in a row
        self.max_rejections = 3
        self.max_samples = 2**62
        self.aborted: str | None = None
        self.diverged = False  # aborted because one rank's updates kept being rejected
        self.ending = False  # daskdl_end was called: leaving workers are not news
        self.started = time.time()
        self.ended: float | None = None
        self.state: list = []  # the model state (BatchNorm statistics), flat; [] without
        self.state_nbytes = 0
        self.steps_at: dict[int, int] = {clock: 0}  # clock -> global optimizer steps
        # sync="sharded": the params live on the workers (daskdl.shards); the plugin keeps
        # their specs, the merges owners may not have applied yet, and where a new
        # generation's workers find the version it starts from
        self.specs = None
        self.fit = 0
        self.log: list = []  # MergeEntry, versions above the floor
        self.reported: dict[int, int] = {}  # rank -> version it started its last round from
        self.done_floor: dict[int, int] = {}  # rank -> rounds merged into pruned entries
        self.start_version = version  # version the generation starts from
        self.source: str | None = None  # a worker holding it (None: the fit's init data)
        self.owner_state = None  # policy state handed to the owners (resume), then None
        self.owner_state_sent: set = set()  # ranks that got it
        self._serialized = None  # (version, the params serialized once)

    def params_msg(self):
        """The global parameters serialized once per version (a ``Serialized``): every
        reply of a merge carries the same frames instead of serializing them again."""
        return self.params_as(False)

    def params_as(self, as_buffer: bool):
        """:meth:`params_msg`, as one packed buffer (:mod:`daskdl.packing`) when
        ``as_buffer``: what a worker that sent its update packed gets back."""
        from distributed.protocol.serialize import Serialized, serialize_and_split

        if self._serialized is None or self._serialized[0] != self.version:
            self._serialized = (self.version, {})
        cache = self._serialized[1]
        if as_buffer not in cache:
            obj = self.packing.pack(self.leaves) if as_buffer else self.leaves
            header, frames = serialize_and_split(obj)
            cache[as_buffer] = Serialized(header, frames)
        return cache[as_buffer]

    def load_update(self, payload, what: str) -> tuple[list, object]:
        """The leaves of an update as it arrived (a list of arrays, or one packed
        buffer: then views of it, and the buffer for :meth:`check_update`); its size
        is checked before it is loaded.  ProtocolError for anything else."""
        obj = protocol.load(payload, limit=max(self.nbytes, self.packing.nbytes) + 65536,
                            what=what)
        if packed(obj):
            try:
                return self.packing.unpack(obj, what), obj
            except DaskDLError as e:
                raise ProtocolError(str(e)) from None
        return protocol.leaves_field(obj, self.nbytes, what), None

    def check_update(self, leaves: list, buf, what: str) -> None:
        """DaskDLError unless the update is shaped like the params and finite (a
        packed one is shaped by construction: one finiteness check per dtype)."""
        if buf is not None and self.packing.finite(buf):
            return
        check_like(leaves, self.leaves, what=what)

    @property
    def sharded(self) -> bool:
        return self.specs is not None

    def shard_floor(self) -> int:
        """The lowest version a member started its last round from: every owner has
        applied the merges up to it."""
        m = self.membership.members
        return min((self.reported.get(r, self.start_version) for r in m),
                   default=self.start_version)

    def merges_msg(self) -> list:
        """The merge log above the floor (what owners may still have to apply), in
        message form; entries below it are pruned."""
        floor = self.shard_floor()
        if self.log and self.log[0].version <= floor:
            keep = []
            for e in self.log:
                if e.version <= floor:
                    for rank, clock, *_ in e.contributions:
                        self.done_floor[rank] = max(self.done_floor.get(rank, 0), clock + 1)
                else:
                    keep.append(e)
            self.log = keep
        return [e.to_msg() for e in self.log]

    def roll_back(self, version: int) -> None:
        """Forget the merges after ``version`` (no surviving worker holds them): the
        rounds they held count as not merged."""
        kept = [e for e in self.log if e.version <= version]
        done = dict(self.done_floor)
        for e in kept:
            for rank, clock, *_ in e.contributions:
                done[rank] = max(done.get(rank, 0), clock + 1)
        m = self.membership
        for rank in list(m.done):
            m.done[rank] = min(m.done[rank], max(done.get(rank, 0), m.start_clock))
        for rank, v in m.lost.items():
            v["done"] = min(v["done"], max(done.get(rank, 0), m.start_clock))
        self.log, self.version = kept, version

    def __repr__(self) -> str:
        return f"<RunState {self.run!r} generation {self.gen} version {self.version}>"

    # the parts' state, by the names dashboards and tests read
    members = property(lambda self: self.membership.members)
    clocks = property(lambda self: self.membership.clocks)
    done = property(lambda self: self.membership.done)
    lost = property(lambda self: self.membership.lost)
    gen = property(lambda self: self.membership.gen)
    waiting = property(lambda self: self.barrier.waiting)
    pending = property(lambda self: self.barrier.pending)
    history = property(lambda self: self.stats.history)
    rejected = property(lambda self: self.stats.rejected)

    @property
    def training(self) -> bool:
        """Neither aborted nor ended."""
        return self.aborted is None and self.ended is None

    def abort(self, reason: str, log: bool = True) -> None:
        """Stop the run: every waiting rank is answered ``aborted``."""
        if self.aborted is None:
            self.aborted = reason
            if log:
                logger.warning("daskdl run %s aborted: %s", self.run, reason)
        self.barrier.open_all()

    def release(self) -> None:
        """Open the barrier of every waiting rank the policy lets go on."""
        clocks = self.membership.clocks
        if not clocks:
            return
        slowest = clocks.slowest
        for rank, clock in self.barrier.release(self.policy, clocks):
            self.stats.event("release", rank=rank, clock=clock, slowest=slowest)

    def set_state(self, leaves: list, steps: int, clock: int) -> None:
        """The model state, and the global optimizer steps at ``clock`` (the first)."""
        self.state = list(leaves)
        self.state_nbytes = sum(x.nbytes for x in self.state)
        self.steps_at = {int(clock): int(steps)}

    def count_steps(self, clock: int, steps: int) -> None:
        """A rank took ``steps`` optimizer steps in round ``clock``: global steps at
        ``clock + 1`` (the plan gives every rank the same steps per round)."""
        self.steps_at[clock + 1] = self.global_steps(clock) + int(steps)
        if len(self.steps_at) > 4096:  # keep the newest clocks
            for c in sorted(self.steps_at)[:1024]:
                del self.steps_at[c]

    def global_steps(self, clock: int) -> int:
        """Optimizer steps a rank has taken when it starts round ``clock``: what a
        single process would have counted (optax schedules count them)."""
        if clock in self.steps_at:
            return self.steps_at[clock]
        below = [c for c in self.steps_at if c <= clock]
        return self.steps_at[max(below)] if below else 0

    def strip(self) -> None:
        """The run ended: drop what only training needs (parameters, pending rounds),
        keep what dashboards read."""
        self.ended = time.time()
        self.leaves, self.policy_state, self.replies, self.restore = [], None, {}, {}
        self.log, self.owner_state, self._serialized = [], None, None
        self.state = []
        self.barrier.clear()
        if self.cut is not None:
            self.cut.opt.clear()

    def metrics(self) -> dict:
        """Aggregates for dashboards and Prometheus: plain numbers, cheap to compute."""
        m = self.membership
        writer = None if self.cut is None else self.cut.writer
        out = {"run": self.run, "policy": self.policy.name, "every": self.policy.every,
               "active": self.training, "aborted": self.aborted,
               "started": self.started, "ended": self.ended, "workers": len(m.members),
               "generation": m.gen, "version": self.version}
        out.update(self.stats.metrics(m.clocks, m.members, self.started,
                                      self.ended or time.time()))
        out.update({"checkpoints": 0 if writer is None else writer.written,
                    "checkpoint_blocked_s": 0.0 if writer is None else writer.blocked_s,
                    "checkpoint_write_s": 0.0 if writer is None else writer.write_s,
                    "checkpoints_skipped": 0 if writer is None else writer.skipped})
        return out

    def info(self) -> dict:
        """Clocks, membership, history and metrics (``daskdl_info``)."""
        m = self.membership
        return {"run": self.run, "version": self.version, "policy": self.policy.name,
                "every": self.policy.every, "generation": m.gen,
                "members": dict(m.members), "clocks": dict(m.clocks), "done": dict(m.done),
                "lost": {r: dict(v) for r, v in m.lost.items()}, "aborted": self.aborted,
                "history": list(self.stats.history),
                "merge_seconds": self.stats.merge_seconds, "rejected": self.stats.rejected,
                "metrics": self.metrics()}
