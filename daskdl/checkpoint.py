"""Atomic checkpoints of a training run, as versioned Zarr groups.

A checkpoint root holds one Zarr group per checkpoint, ``ckpt-<clock>`` (clock =
rounds every worker had finished), with

* ``params/<dtype>``: the global parameters (flattened leaves),
* ``policy/<dtype>``: the consistency policy's state (e.g. DiLoCo's outer optimizer),
* ``opt/<rank>/<dtype>``: each worker's optimizer state,
* ``local/<rank>/<dtype>``: a worker's own parameters where a policy keeps them
  apart from the global ones (EASGD),

leaves of one dtype packed into one 1-D array (``layout`` in the attribute gives
each leaf's dtype, shape and offset), and the attribute ``daskdl_checkpoint``:
the data position (epoch, round, the epoch's plan), the seed, the history, and a
CRC-32 of every array.  Readers take
the newest group whose attribute is present and whose arrays match their CRCs;
a damaged one is skipped with a warning.

Why it is safe to crash at any moment: on a local file system a checkpoint is
written to ``.tmp-ckpt-...`` and renamed into place when complete (a rename is
atomic); on other Zarr stores the ``daskdl_checkpoint`` attribute is written
last and the group counts only once it is there.  Older checkpoints beyond
``keep`` are deleted only after a newer one is complete.

Zarr rather than orbax-checkpoint: daskdl already reads and writes Zarr, its
state is a few flat lists of numpy arrays per rank (no sharded ``jax.Array``
to coordinate across hosts), and a checkpoint stays readable with plain
``zarr`` and no daskdl.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import threading
import time
import uuid
import warnings
import zlib
from typing import Any

import numpy as np

from .errors import DaskDLError

logger = logging.getLogger("daskdl")

ATTR = "daskdl_checkpoint"
PREFIX = "ckpt-"


class CheckpointError(DaskDLError):
    """No readable checkpoint where one was expected."""


def _crc(x: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(x).view(np.uint8).reshape(-1).data) & 0xFFFFFFFF


def _is_path(store) -> bool:
    return isinstance(store, (str, os.PathLike)) and "://" not in str(store)


def _name(clock: int) -> str:
    return f"{PREFIX}{int(clock):09d}"


def write_checkpoint(store, clock: int, params: list, policy_state: list,
                     opt_states: dict, local_params: dict, meta: dict) -> str:
    """Write one complete checkpoint under ``store``; return its group name.

    ``store`` is a directory path (written to a temporary name, then renamed) or a
    Zarr store / URL (the completion attribute is written last).
    """
    import zarr

    name = _name(clock)
    if _is_path(store):
        os.makedirs(store, exist_ok=True)
        tmp = os.path.join(os.fspath(store), f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        group = zarr.open_group(tmp, mode="w")
    else:
        group = zarr.open_group(store, mode="a").require_group(name)
    crcs: dict[str, int] = {}
    layout: dict[str, list] = {}

    def put(path: str, leaves: list) -> None:
        """Leaves of one dtype are packed into one 1-D array ``<path>/<dtype>``: a few
        arrays per checkpoint instead of one per leaf (Zarr's per-array metadata is
        what a checkpoint of many small leaves spends its time on)."""
        parts: dict[str, list] = {}
        sizes: dict[str, int] = {}
        entries = []
        for x in leaves:
            x = np.asarray(x)
            name = x.dtype.name
            entries.append([name, list(x.shape), sizes.get(name, 0)])
            parts.setdefault(name, []).append(x.reshape(-1))
            sizes[name] = sizes.get(name, 0) + x.size
        for name, xs in parts.items():
            packed = np.concatenate(xs)
            group.create_array(f"{path}/{name}", data=packed, overwrite=True)
            crcs[f"{path}/{name}"] = _crc(packed)
        layout[path] = entries

    put("params", params)
    put("policy", policy_state)
    for rank, leaves in opt_states.items():
        put(f"opt/{int(rank)}", leaves)
    for rank, leaves in local_params.items():
        put(f"local/{int(rank)}", leaves)
    group.attrs[ATTR] = dict(meta, clock=int(clock), crc32=crcs, layout=layout,
                             written=time.time(),
                             opt_ranks=sorted(int(r) for r in opt_states),
                             local_ranks=sorted(int(r) for r in local_params))
    if _is_path(store):
        final = os.path.join(os.fspath(store), name)
        if os.path.exists(final):  # the same clock written again (a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(os.fspath(store))
    return name


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(store) -> list[str]:
    """Names of the checkpoint groups under ``store``, oldest first (complete or not)."""
    import zarr

    if _is_path(store):
        if not os.path.isdir(store):
            return []
        names = [n for n in os.listdir(store) if n.startswith(PREFIX)]
    else:
        try:
            names = [n for n in zarr.open_group(store, mode="r").group_keys()
                     if n.startswith(PREFIX)]
        except (FileNotFoundError, KeyError, ValueError):
            return []
    return sorted(names)


def read_checkpoint(store, name: str) -> dict:
    """Read and verify one checkpoint; raise :class:`CheckpointError` if it is
    incomplete or damaged."""
    import zarr

    name_ = name
    try:
        root = os.path.join(os.fspath(store), name) if _is_path(store) else store
        group = zarr.open_group(root, mode="r", path=None if _is_path(store) else name)
        meta = dict(group.attrs.get(ATTR) or {})
        if not meta:
            raise CheckpointError(f"checkpoint {name} is incomplete (no {ATTR} attribute)")

        def get(path: str) -> list:
            packed = {}
            out = []
            for name, shape, offset in meta["layout"][path]:
                if name not in packed:
                    x = np.asarray(group[f"{path}/{name}"][...])
                    if _crc(x) != meta["crc32"][f"{path}/{name}"]:
                        raise CheckpointError(f"array {path}/{name} of checkpoint {name_} "
                                              "does not match its checksum")
                    packed[name] = x
                size = int(np.prod(shape, dtype=np.int64))
                out.append(packed[name][offset:offset + size].reshape(shape).copy())
            return out

        return {
            "meta": meta,
            "params": get("params"),
            "policy_state": get("policy"),
            "opt_states": {r: get(f"opt/{r}") for r in meta["opt_ranks"]},
            "local_params": {r: get(f"local/{r}") for r in meta["local_ranks"]},
        }
    except CheckpointError:
        raise
    except Exception as e:  # truncated files, bad JSON, missing arrays
        raise CheckpointError(f"checkpoint {name} cannot be read: {e!r}") from e


def load_latest(store) -> dict | None:
    """The newest readable checkpoint under ``store`` (``None`` if there is none).

    A damaged or incomplete newer one is skipped with a ``UserWarning`` naming it,
    and the one before is used.
    """
    for name in reversed(list_checkpoints(store)):
        try:
            ckpt = read_checkpoint(store, name)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {name} under {store}: {e}; falling back to "
                          "the one before", UserWarning, stacklevel=2)
            continue
        ckpt["name"] = name
        return ckpt
    return None


def _prune(store, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale temporaries)."""
    if not _is_path(store):
        return
    names = list_checkpoints(store)
    for name in names[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(os.fspath(store), name), ignore_errors=True)
    for n in os.listdir(store):
        if n.startswith(f".tmp-{PREFIX}"):
            path = os.path.join(os.fspath(store), n)
            if time.time() - os.path.getmtime(path) > 3600:
                shutil.rmtree(path, ignore_errors=True)


class CheckpointWriter:
    """Writes checkpoints in a background thread so that training never waits for
    the disk; the caller only pays for copying the arrays (``blocked_s``).

    One write runs at a time and at most one snapshot waits for it: when checkpoints
    come faster than the disk takes them, the newest waiting one replaces the older
    (counted in ``skipped``), so memory and CPU stay bounded and the last state of a
    ``fit`` is always written.
    """

    def __init__(self, store, keep: int = 3):
        self.store = store
        self.keep = int(keep)
        self.written = 0
        self.blocked_s = 0.0
        self.write_s = 0.0
        self.errors: list[str] = []
        self.skipped = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "daskdl-checkpoint")
        self._futures: list = []
        self._queued = None  # at most one snapshot waits for the writer
        self._lock = threading.Lock()

    def submit(self, clock: int, version: int, params: list, policy_state: list,
               opt_states: dict, local_params: dict, meta: dict) -> None:
        copy = [np.array(x, copy=True) for x in params]  # the run goes on changing them
        pol = [np.array(x, copy=True) for x in policy_state]
        opts = {r: [np.asarray(x) for x in v] for r, v in opt_states.items()}
        local = {r: [np.array(x, copy=True) for x in v] for r, v in local_params.items()}
        self._futures = [f for f in self._futures if not f.done()]
        job = (clock, copy, pol, opts, local, dict(meta, version=int(version)))
        with self._lock:
            if self._queued is not None:  # the disk is slower than the checkpoints:
                self.skipped += 1  # the newest state replaces the one still waiting
            self._queued = job
        self._futures.append(self._pool.submit(self._write_queued))

    def _write_queued(self) -> None:
        with self._lock:
            job, self._queued = self._queued, None
        if job is not None:
            self._write(*job)

    def _write(self, clock, params, pol, opts, local, meta) -> None:
        t0 = time.perf_counter()
        try:
            write_checkpoint(self.store, clock, params, pol, opts, local, meta)
            _prune(self.store, self.keep)
            self.written += 1
        except Exception as e:  # a full disk must not stop training: report it
            msg = f"writing checkpoint at clock {clock} to {self.store} failed: {e!r}"
            logger.error("daskdl: %s", msg)
            self.errors.append(msg)
        self.write_s += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the writes queued so far are done."""
        for f in list(self._futures):
            f.result()

    def close(self, wait: bool = True) -> list[str]:
        """Finish (or drop) queued writes; return the errors seen."""
        if wait:
            for f in list(self._futures):
                f.result()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        return list(self.errors)


def checkpoint_spec(checkpoint: Any) -> Any:
    """Validate what ``Trainer(checkpoint=...)`` was given."""
    if checkpoint is None:
        return None
    if isinstance(checkpoint, (str, os.PathLike)):
        return os.fspath(checkpoint)
    if hasattr(checkpoint, "get") or hasattr(checkpoint, "set"):  # a zarr store
        return checkpoint
    raise TypeError(f"checkpoint must be a directory path or a Zarr store, got "
                    f"{type(checkpoint).__name__}")


class CheckpointCut:
    """Where a run's checkpoints are cut, and what each rank sent for them.

    A checkpoint at clock ``K`` is a consistent cut: taken when every member has had
    round ``K - 1`` merged and has sent its optimizer state with that round, with the
    data position the client sent (``meta``).  Only the clocks of the plan
    (``planned``, given at the start of each generation) are cut: optimizer states
    and metadata for other clocks are not kept.  The snapshot is handed to a
    :class:`CheckpointWriter`, which writes it in a thread.

    Parameters
    ----------
    writer : CheckpointWriter
    clocks : iterable of int
        The clocks at which checkpoints are planned in this generation.
    """

    def __init__(self, writer: CheckpointWriter, clocks=()):
        self.writer = writer
        self.planned = frozenset(int(c) for c in clocks)
        self.meta: dict[int, dict] = {}  # clock -> what the client adds (data position)
        self.opt: dict[int, dict] = {}  # clock -> rank -> flat optimizer state

    @classmethod
    def open(cls, spec: dict, clocks=()) -> "CheckpointCut":
        """A cut writing to ``spec["store"]``, keeping ``spec["keep"]`` checkpoints."""
        return cls(CheckpointWriter(spec["store"], keep=int(spec["keep"])), clocks)

    def wants(self, clock: int) -> bool:
        """Whether a checkpoint is planned at ``clock``."""
        return clock in self.planned

    def keep_opt_state(self, clock: int, rank: int, leaves: list) -> None:
        """A rank's optimizer state after round ``clock - 1`` (planned clocks only)."""
        if self.wants(clock):
            self.opt.setdefault(clock, {})[rank] = leaves

    def set_meta(self, clock: int, meta: dict) -> None:
        if self.wants(clock):
            self.meta[clock] = meta

    def replan(self, clocks, after: int) -> None:
        """A new generation from clock ``after`` with its own planned ``clocks``."""
        self.planned = frozenset(int(c) for c in clocks)
        self.opt.clear()
        self.meta = {k: v for k, v in self.meta.items() if k > after and k in self.planned}

    def take(self, members: dict, done: dict, version: int, params: list,
             policy_state: list, local: dict, meta: dict) -> list[int]:
        """Submit every complete cut (oldest first); return the clocks submitted.

        ``local`` holds ranks' own parameters where the policy keeps them (EASGD);
        ``meta`` is added to each checkpoint's metadata.
        """
        taken = []
        for clock in sorted(self.meta):
            opts = self.opt.get(clock, {})
            if not members or any(done.get(r, 0) < clock for r in members) \
                    or not set(opts) >= set(members):
                break
            extra = self.meta.pop(clock)
            self.opt.pop(clock, None)
            t0 = time.perf_counter()
            self.writer.submit(
                clock=clock, version=version, params=params, policy_state=policy_state,
                opt_states={r: opts[r] for r in members},
                local_params={r: local[r] for r in members if r in local},
                meta=dict(extra, clock=clock, version=version, **meta))
            self.writer.blocked_s += time.perf_counter() - t0
            taken.append(clock)
        return taken

    def close(self, wait: bool = True) -> list[str]:
        """Finish (or drop) queued writes; return the errors seen."""
        return self.writer.close(wait=wait)
