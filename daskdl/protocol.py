"""The messages of daskdl's training protocol, typed, and their validation.

Every side speaks through the names and types defined here: the client's fit loop
(:mod:`daskdl.fitloop`), the replicas on the workers (:mod:`daskdl.replica`), the
scheduler plugin (:mod:`daskdl.scheduler`), the dashboard and Prometheus.

Handlers the scheduler plugin serves (``HANDLERS``) and who calls them::

    daskdl_start            client    start (or restart) a run          needs the run secret
    daskdl_sync             replica   end of a round: SyncRequest        needs the run secret
    daskdl_params           replica   global params (+ restored state)   needs the run secret
    daskdl_freeze           client    end a generation                   needs the run secret
    daskdl_regroup          client    start the next generation          needs the run secret
    daskdl_checkpoint_meta  client    data position of a checkpoint      needs the run secret
    daskdl_checkpoint_flush client    wait for checkpoint writes         needs the run secret
    daskdl_abort            client    fail every waiting worker          needs the run secret
    daskdl_end              client    end the run                        needs the run secret
    daskdl_info             anyone    clocks, version, history (read only)
    daskdl_locations        client    which worker holds each key (read only)

Messages travel as plain dicts (Dask's RPC); the classes here are built from them
with ``from_msg``, which checks every field's type and range and raises
:class:`ProtocolError` naming the field.  Nothing a handler does changes state
before its message parsed.  Replies always carry ``status`` (a :class:`Status`
value); a refused message is answered ``refused`` with a ``reason``.

The **run secret** is made by the client for each trainer, given to the run's
replicas inside their worker plugin, and checked by the scheduler plugin with a
constant-time comparison.  It is never logged, shown in a repr, on the dashboard or
in ``/metrics``.  It protects a run against mistakes and stray clients of the same
cluster; it is no defence against code that runs on the scheduler itself (which
Dask lets any client do unless ``distributed.scheduler.blocked-handlers`` says no).
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import math
import secrets as _secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import DaskDLError

EXTENSION = "daskdl"  # scheduler.extensions key and plugin name of the training plugin
DASHBOARD_EXTENSION = "daskdl-dashboard"

START = "daskdl_start"
SYNC = "daskdl_sync"
SYNC_GROUP = "daskdl_sync_group"  # a relay's batch of its group's syncs (daskdl.relay)
PARAMS = "daskdl_params"
FREEZE = "daskdl_freeze"
REGROUP = "daskdl_regroup"
CHECKPOINT_META = "daskdl_checkpoint_meta"
CHECKPOINT_FLUSH = "daskdl_checkpoint_flush"
ABORT = "daskdl_abort"
INFO = "daskdl_info"
END = "daskdl_end"
LOCATIONS = "daskdl_locations"
HANDLERS = (START, SYNC, PARAMS, FREEZE, REGROUP, CHECKPOINT_META, CHECKPOINT_FLUSH,
            ABORT, INFO, END, LOCATIONS)

ROUND_PREFIX = "daskdl-round"  # task keys and the task-stream group of rounds


def event_topic(run: str) -> str:
    """The scheduler event topic on which a run's client hears of membership changes."""
    return f"daskdl-{run}"


class ProtocolError(DaskDLError, ValueError):
    """A message does not follow the protocol (wrong type, missing field, out of range,
    wrong secret, unknown run).  The scheduler answers it ``refused``; nothing changed."""


class Status(str, enum.Enum):
    """What a handler answers (``reply["status"]``)."""

    OK = "OK"
    REJECTED = "rejected"  # the update was bad (not finite, wrong shapes): start again
    REPLAN = "replan"  # the generation changed: the round is discarded
    ABORTED = "aborted"  # the run stopped
    REFUSED = "refused"  # the message itself was refused: nothing changed


class LeaveReason(str, enum.Enum):
    """Why a worker left a generation (``MemberEvent.reason``)."""

    LEFT = "left"  # it left the cluster
    PAUSED = "paused"  # Dask paused it for memory
    TIMED_OUT = "timed-out"  # it sent nothing for daskdl.sync-timeout while others waited


def new_secret() -> str:
    """An unguessable run secret (128 bits, hex)."""
    return _secrets.token_hex(16)


def same_secret(given, expected: str) -> bool:
    """Constant-time comparison; False for anything that is not a string."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


# -- field checks ------------------------------------------------------------------------
def int_field(msg: Mapping, name: str, lo: int = 0, hi: int = 2**62, default=...) -> int:
    v = msg.get(name, default)
    if v is ...:
        raise ProtocolError(f"missing field {name!r}")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ProtocolError(f"field {name!r} must be an integer, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise ProtocolError(f"field {name!r} = {int(v)} is outside [{lo}, {hi}]")
    return int(v)


def float_field(msg: Mapping, name: str, default=..., allow_none: bool = False,
           lo: float = -math.inf, hi: float = math.inf) -> float | None:
    v = msg.get(name, default)
    if v is ...:
        raise ProtocolError(f"missing field {name!r}")
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"field {name!r} must be a number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) and allow_none:
        return None
    if not lo <= v <= hi:
        raise ProtocolError(f"field {name!r} = {v!r} is outside [{lo}, {hi}]")
    return v


def opt_int_field(msg: Mapping, name: str, lo: int = 0, hi: int = 2**62) -> int | None:
    """An integer field that may be missing or ``None``."""
    return None if msg.get(name) is None else int_field(msg, name, lo, hi)


def _rank_key(k, name: str) -> int:
    """A rank as a mapping key (an integer, or its decimal string over the wire)."""
    if isinstance(k, str) and k.isdecimal() and len(k) <= 7:
        k = int(k)
    return int_field({name: k}, name, 0, 1_000_000)


def str_field(msg: Mapping, name: str, max_len: int = 256, default=...) -> str:
    v = msg.get(name, default)
    if v is ...:
        raise ProtocolError(f"missing field {name!r}")
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise ProtocolError(f"field {name!r} must be a non-empty string of at most "
                            f"{max_len} characters")
    return v


def run_id(msg: Mapping) -> str:
    """The ``run`` field of any message."""
    return str_field(msg, "run", 64)


def replica_part(worker, msg: Mapping, attr: str):
    """For a worker handler: the replica of the run ``msg`` names on ``worker`` and its
    part ``attr`` (its exchange, its relay), once ``msg``'s secret matched;
    ProtocolError otherwise."""
    run = run_id(msg)
    replica = worker.plugins.get(f"daskdl-replica-{run}")
    part = getattr(replica, attr, None)
    if part is None:
        raise ProtocolError(f"no training run {run!r} on worker {worker.address}")
    if not same_secret(msg.get("secret"), replica._secret):
        raise ProtocolError(f"wrong secret for training run {run!r}")
    return part


def members_field(msg: Mapping, name: str = "members") -> dict[int, str]:
    """``{rank: worker address}`` with ranks ``0..W-1``, distinct addresses."""
    v = msg.get(name)
    if not isinstance(v, Mapping) or not v or len(v) > 100_000:
        raise ProtocolError(f"field {name!r} must be a non-empty mapping rank -> address")
    out = {}
    for k, a in v.items():
        rank = _rank_key(k, name)
        if not isinstance(a, str) or not a or len(a) > 1024:
            raise ProtocolError(f"field {name!r}: address of rank {rank} must be a string")
        out[rank] = a
    if sorted(out) != list(range(len(out))) or len(set(out.values())) != len(out):
        raise ProtocolError(f"field {name!r} must map ranks 0..{len(out) - 1} to distinct "
                            "addresses")
    return out


def clocks_field(msg: Mapping, name: str, limit: int = 1_000_000) -> frozenset:
    v = msg.get(name, ())
    if v is None:
        return frozenset()
    if not isinstance(v, (list, tuple, set, frozenset)) or len(v) > limit:
        raise ProtocolError(f"field {name!r} must be a list of at most {limit} clocks")
    return frozenset(int_field({"c": c}, "c") for c in v)


def secret_field(msg: Mapping) -> str:
    """The ``secret`` field: a non-empty string (compare it with :func:`same_secret`)."""
    return str_field(msg, "secret", 256)


def bool_field(msg: Mapping, name: str, default=...) -> bool:
    v = msg.get(name, default)
    if v is ...:
        raise ProtocolError(f"missing field {name!r}")
    if not isinstance(v, (bool, np.bool_)):
        raise ProtocolError(f"field {name!r} must be true or false, got {type(v).__name__}")
    return bool(v)


def _key(k, depth: int = 0):
    """A Dask key: a string, bytes or number, or a tuple of keys (a list over msgpack)."""
    if isinstance(k, (str, bytes)) and len(k) <= 1024:
        return k
    if isinstance(k, (int, float)) and not isinstance(k, bool):
        return k
    if isinstance(k, (list, tuple)) and 0 < len(k) <= 16 and depth < 4:
        return tuple(_key(x, depth + 1) for x in k)
    raise ProtocolError("a key must be a string, a number, or a tuple of keys")


def keys_field(msg: Mapping, name: str = "keys", limit: int = 100_000) -> list:
    """A list of at most ``limit`` Dask keys."""
    v = msg.get(name)
    if not isinstance(v, (list, tuple)) or len(v) > limit:
        raise ProtocolError(f"field {name!r} must be a list of at most {limit} keys")
    return [_key(k) for k in v]


# -- payloads ------------------------------------------------------------------------------
def payload_nbytes(obj) -> int:
    """Bytes of a payload as it arrived, without deserializing it (``Serialized``
    frames over TCP; a list of arrays in process)."""
    from distributed.protocol.serialize import Serialized

    if isinstance(obj, Serialized):
        return sum(memoryview(f).nbytes for f in obj.frames)
    if isinstance(obj, (list, tuple)):
        return sum(getattr(x, "nbytes", 0) for x in obj)
    return 0


def load(obj, limit: int | None = None, what: str = "payload"):
    """Deserialize a payload wrapped in ``to_serialize`` (``Serialized`` over TCP).

    With ``limit``, a payload larger than ``limit`` bytes is refused before it is
    deserialized.
    """
    from distributed.protocol.serialize import Serialize, Serialized, merge_and_deserialize

    if isinstance(obj, Serialize):  # wrapped in this process, never sent
        obj = obj.data
    if limit is not None and payload_nbytes(obj) > limit:
        raise ProtocolError(f"{what} of {payload_nbytes(obj)} bytes is larger than the "
                            f"{limit} bytes expected")
    if isinstance(obj, Serialized):
        try:
            return merge_and_deserialize(obj.header, obj.frames)
        except Exception as e:
            raise ProtocolError(f"{what} cannot be deserialized: {type(e).__name__}") from None
    return obj


def leaves_field(obj, expected_nbytes: int, what: str) -> list:
    """A list of numpy arrays, at most ``expected_nbytes`` (+ framing) before loading."""
    leaves = load(obj, limit=expected_nbytes + 64 * 1024, what=what)
    if not isinstance(leaves, (list, tuple)) or not all(isinstance(x, np.ndarray)
                                                          for x in leaves):
        raise ProtocolError(f"{what} must be a list of numpy arrays")
    return list(leaves)


# -- messages -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncRequest:
    """A replica's end of round ``clock`` (handler ``daskdl_sync``).

    ``params`` stays as it arrived (possibly still serialized): the plugin checks its
    size against the model's before loading it.
    """

    run: str
    rank: int
    clock: int
    gen: int
    samples: int
    version: int
    params: Any = field(repr=False)
    loss: float | None = None
    compute: float = 0.0
    opt_state: Any = field(default=None, repr=False)
    state: Any = field(default=None, repr=False)  # the model state's leaves (or None)
    steps: int = 0  # optimizer steps the round took
    # sync="sharded": no params; the update went to the shard owners
    finite: bool = True  # the update was finite (a sharded update is checked at its worker)
    divergence: float | None = None  # norm of the update (params: of its change)
    sent: int = 0  # bytes sent to shard owners
    transfer: float = 0.0  # seconds the round before spent sending pieces and gathering
    raw: int = 0  # bytes those would have been uncompressed
    received: int = 0  # bytes gathered from shard owners in the round before
    merge: float = 0.0  # seconds this worker's shard owner spent merging since its last sync
    resent: bool = False  # sent again after its relay failed: answer it if counted already

    @classmethod
    def from_msg(cls, msg: Mapping) -> "SyncRequest":
        return cls(run=run_id(msg), rank=int_field(msg, "rank", 0, 1_000_000),
                   clock=int_field(msg, "clock"), gen=int_field(msg, "gen", 0, 2**31, default=0),
                   samples=int_field(msg, "samples", 0), version=int_field(msg, "version", -1),
                   params=msg.get("params"),
                   loss=float_field(msg, "loss", None, allow_none=True),
                   compute=float_field(msg, "compute", 0.0, lo=0.0, hi=1e9),
                   opt_state=msg.get("opt_state"), state=msg.get("state"),
                   steps=int_field(msg, "steps", 0, 2**31, default=0),
                   finite=bool_field(msg, "finite", True),
                   divergence=float_field(msg, "divergence", None, allow_none=True, lo=0.0),
                   sent=int_field(msg, "sent", 0, 2**50, default=0),
                   transfer=float_field(msg, "transfer", 0.0, lo=0.0, hi=1e9),
                   raw=int_field(msg, "raw", 0, 2**50, default=0),
                   received=int_field(msg, "received", 0, 2**50, default=0),
                   merge=float_field(msg, "merge", 0.0, lo=0.0, hi=1e9),
                   resent=bool_field(msg, "resent", False))

    def to_msg(self, secret: str) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["secret"] = secret
        return d


@dataclass(frozen=True)
class SyncReply:
    """The plugin's answer to a :class:`SyncRequest`.

    ``params`` is what the worker continues from; ``None`` with status OK means
    "continue from what you sent" (no bytes back).  ``reset`` asks for a fresh
    optimizer state (after a rejected update).
    """

    status: Status
    version: int = -1
    params: Any = field(default=None, repr=False)
    waited: float = 0.0
    reason: str = ""
    diverged: bool = False
    state: Any = field(default=None, repr=False)  # the merged model state (None: yours)
    steps: int = -1  # global optimizer steps at the worker's clock (-1: unknown)
    merges: tuple = ()  # sync="sharded": the merges owners may not have applied (msg form)

    def to_msg(self) -> dict:
        d = {"status": self.status.value, "version": self.version, "waited": self.waited,
             "reason": self.reason, "diverged": self.diverged, "steps": self.steps}
        if self.merges:
            d["merges"] = list(self.merges)
        if self.params is not None:
            from distributed.protocol.serialize import Serialized, to_serialize

            d["params"] = (self.params if isinstance(self.params, Serialized)
                           else to_serialize(self.params))
        if self.state is not None:
            from distributed.protocol.serialize import to_serialize

            d["state"] = to_serialize(self.state)
        return d

    @classmethod
    def from_msg(cls, msg: Mapping) -> "SyncReply":
        return cls(status=Status(msg["status"]), version=int(msg.get("version", -1)),
                   params=load(msg["params"]) if msg.get("params") is not None else None,
                   waited=float(msg.get("waited", 0.0)), reason=str(msg.get("reason", "")),
                   diverged=bool(msg.get("diverged", False)),
                   state=load(msg["state"]) if msg.get("state") is not None else None,
                   steps=int(msg.get("steps", -1)), merges=tuple(msg.get("merges") or ()))


def _leaves_or_none(obj, what: str) -> list | None:
    if obj is None:
        return None
    leaves = load(obj, what=what)
    if not isinstance(leaves, (list, tuple)) or not all(isinstance(x, np.ndarray)
                                                          for x in leaves):
        raise ProtocolError(f"{what} must be a list of numpy arrays")
    return list(leaves)


def restore_field(obj) -> dict[int, dict]:
    """``{rank: {"opt_state": leaves, "params": leaves or None}}`` read from a checkpoint."""
    v = load(obj, what="restore")
    if v is None:
        return {}
    if not isinstance(v, Mapping) or len(v) > 100_000:
        raise ProtocolError("field 'restore' must map rank -> {opt_state, params}")
    out = {}
    for k, r in v.items():
        rank = _rank_key(k, "restore")
        if not isinstance(r, Mapping):
            raise ProtocolError(f"field 'restore': rank {rank} must map to a dict")
        out[rank] = {"opt_state": _leaves_or_none(r.get("opt_state"), "restored opt_state")
                     or [],
                     "params": _leaves_or_none(r.get("params"), "restored params")}
    return out


def specs_field(v, limit: int = 1_000_000) -> list | None:
    """``[(shape, dtype name)]`` of a sharded run's parameters, or ``None``."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    from .shards import Spec

    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v or len(v) > limit:
        raise ProtocolError("field 'specs' must be a non-empty list of [shape, dtype]")
    out = []
    for item in v:
        try:
            shape, dtype = item
            shape = tuple(int_field({"d": d}, "d", 0, 2**40) for d in shape)
            dt = np.dtype(str_field({"t": dtype}, "t", 32))
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"field 'specs': {item!r} is no [shape, dtype] ({e})") from None
        if dt.kind not in "fiub" and dt.name != "bfloat16":
            raise ProtocolError(f"field 'specs': dtype {dt} is not numeric")
        out.append(Spec(shape, dt))
    return out


def checkpoint_field(obj) -> dict | None:
    """``{"store": path or Zarr store, "keep": n, "key": ...}`` or ``None``."""
    v = load(obj, what="checkpoint")
    if v is None:
        return None
    if not isinstance(v, Mapping) or v.get("store") is None:
        raise ProtocolError("field 'checkpoint' must be {'store': ..., 'keep': n}")
    return {"store": v["store"], "keep": int_field(v, "keep", 1, 1_000_000),
            "key": v.get("key")}  # a key reference or a series key (daskdl.checkpoint)


@dataclass(frozen=True)
class StartRequest:
    """A client starting (or restarting) a run (handler ``daskdl_start``).

    ``members`` is ``{rank: address}``; ``max_samples`` the most samples one rank
    may report in one sync (steps x batch size); ``checkpoint_clocks`` the clocks at
    which checkpoints are planned in the first generation.
    """

    run: str
    params: Any = field(repr=False)
    policy: Any
    members: dict
    timeout: float
    clock: int = 0
    version: int = 0
    policy_state: Any = field(default=None, repr=False)
    restore: dict = field(default_factory=dict, repr=False)
    checkpoint: dict | None = None
    max_rejections: int | None = None
    max_samples: int | None = None
    checkpoint_clocks: frozenset = frozenset()
    state: list = field(default_factory=list, repr=False)  # the model state's leaves
    steps: int = 0  # global optimizer steps at ``clock``
    specs: list | None = None  # sync="sharded": [(shape, dtype)] of the params (no bytes)
    fit: int = 0  # the trainer's fit number (shard owners are keyed by fit and generation)

    @property
    def sharded(self) -> bool:
        return self.specs is not None

    @classmethod
    def from_msg(cls, msg: Mapping) -> "StartRequest":
        from .policies import Policy

        specs = specs_field(msg.get("specs"))
        params = _leaves_or_none(msg.get("params"), "params")
        if specs is not None and params:
            raise ProtocolError("a sharded run sends 'specs', not 'params'")
        if not params and specs is None:
            raise ProtocolError("field 'params' must be a non-empty list of numpy arrays")
        policy = load(msg.get("policy"), what="policy")
        if not isinstance(policy, Policy):
            raise ProtocolError("field 'policy' must be a daskdl Policy")
        return cls(run=run_id(msg), params=params, policy=policy,
                   members=members_field(msg),
                   timeout=float_field(msg, "timeout", lo=1e-3, hi=1e7),
                   clock=int_field(msg, "clock", default=0), version=int_field(msg, "version", default=0),
                   policy_state=load(msg.get("policy_state"), what="policy_state"),
                   restore=restore_field(msg.get("restore")),
                   checkpoint=checkpoint_field(msg.get("checkpoint")),
                   max_rejections=opt_int_field(msg, "max_rejections", 1, 1_000_000),
                   max_samples=opt_int_field(msg, "max_samples", 1),
                   checkpoint_clocks=clocks_field(msg, "checkpoint_clocks"),
                   state=_leaves_or_none(msg.get("state"), "state") or [],
                   steps=int_field(msg, "steps", 0, 2**62, default=0), specs=specs,
                   fit=int_field(msg, "fit", 0, 2**31, default=0))

    def to_msg(self, secret: str) -> dict:
        """The keyword arguments of ``scheduler.daskdl_start`` (payloads serialized)."""
        from distributed.protocol.serialize import to_serialize

        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("params", "policy", "policy_state", "restore", "checkpoint", "state"):
            if d[name] is not None:
                d[name] = to_serialize(d[name])
        d["checkpoint_clocks"] = sorted(self.checkpoint_clocks)
        d["members"] = {str(r): a for r, a in self.members.items()}
        d["secret"] = secret
        return d


def refused(reason: str) -> dict:
    """The reply to a message that was refused (nothing changed)."""
    return {"status": Status.REFUSED.value, "reason": str(reason)}


def ok(**fields) -> dict:
    return {"status": Status.OK.value, **fields}


@dataclass(frozen=True)
class MemberEvent:
    """A membership change, published on :func:`event_topic` for the run's client."""

    action: str  # "lost" or "joined"
    worker: str
    rank: int = -1
    reason: LeaveReason | None = None
    detail: str = ""

    def to_msg(self, run: str) -> dict:
        return {"action": self.action, "worker": self.worker, "rank": self.rank,
                "reason": None if self.reason is None else self.reason.value,
                "detail": self.detail, "run": run}

    @classmethod
    def from_msg(cls, msg: Mapping) -> "MemberEvent":
        reason = msg.get("reason")
        return cls(action=str(msg.get("action")), worker=str(msg.get("worker")),
                   rank=int(msg.get("rank", -1)),
                   reason=None if reason is None else LeaveReason(reason),
                   detail=str(msg.get("detail", "")))


@dataclass(frozen=True)
class Faults:
    """Fault injection for tests and benchmarks (config ``daskdl.testing``), never
    set otherwise: ``slowdown`` makes the round's compute that many times slower
    (a straggler; a round is taken to compute for at least ``SLOWDOWN_FLOOR_S``, so
    the factor shows over scheduling noise), ``send_nan`` replaces the update by NaN,
    ``lose_relay_reply`` has the relay fail the sync after the scheduler counted it
    (as a relay dying then would), so that the worker sends it again."""

    SLOWDOWN_FLOOR_S = 0.01
    slowdown: float = 1.0
    send_nan: bool = False
    lose_relay_reply: bool = False


@dataclass(frozen=True)
class RoundSpec:
    """What one ``daskdl-round-...`` task runs (it travels in the task, so it holds
    nothing secret).

    ``segments`` are ``(chunk, start, stop, permutation epoch)`` in the plan's order;
    ``chunks`` the distinct chunks the round reads (the task's data arguments follow
    that order, one block per name); ``source`` reads chunks on the worker itself
    (Zarr), with ``next_chunks`` to prefetch.  ``secede``: the round leaves the
    worker's thread pool while it waits in the barrier, so that tasks other workers
    need from this one (chunks of a Dask graph computed here) can run meanwhile; with
    data that needs no task here (scattered, Zarr) it stays, and no thread is started.
    """

    run: str
    fit: int
    gen: int
    epoch: int
    round: int
    rank: int
    clock: int
    first_clock: int
    steps: int
    batch_size: int
    segments: tuple
    chunks: tuple
    names: tuple
    timeout: float
    sends: str = "params"
    checkpoint: bool = False
    source: Any = None
    next_chunks: tuple = ()
    faults: Faults | None = None
    secede: bool = True  # leave the thread pool while waiting in the barrier
    members: tuple = ()  # sync="sharded": the generation's workers by rank (shard owners)
    compression: str | None = None  # sync="sharded": how updates travel (None, bf16, int8)
    overlap: bool = False  # sync="sharded": the next round computes while this one syncs
    last: bool = False  # the rank's last round of the generation (an overlapped sync ends)
    relay: str | None = None  # the worker relaying this rank's syncs (daskdl.relay); None: direct
    group: tuple = ()  # the ranks whose syncs that relay sends together

    @property
    def sharded(self) -> bool:
        return bool(self.members)

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    @property
    def where(self) -> str:
        return f"round {self.round} of epoch {self.epoch}"


class RoundBatch:
    """The :class:`RoundSpec` of a task's consecutive rounds, as one opaque task
    argument.

    Dask walks the arguments of every task it is given (tuples, dataclasses, their
    fields) looking for collections; a tuple of specs with their segments costs the
    client a millisecond or more per task that way.  Wrapped, it is one literal.
    """

    __slots__ = ("specs",)

    def __init__(self, specs):
        self.specs = tuple(specs)

    def __iter__(self):
        return iter(self.specs)

    def __getitem__(self, i):
        return self.specs[i]

    def __repr__(self) -> str:
        first = self.specs[0] if self.specs else None
        return (f"RoundBatch({len(self.specs)} rounds of rank {first.rank} from clock "
                f"{first.clock})" if first else "RoundBatch(empty)")
