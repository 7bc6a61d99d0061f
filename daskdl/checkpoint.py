"""Atomic, verified (and, with a key, encrypted) checkpoints, as versioned Zarr groups.

A checkpoint root holds one Zarr group per checkpoint, ``ckpt-<clock>`` (clock =
rounds every worker had finished), with

* ``params/<dtype>``: the global parameters (flattened leaves),
* ``policy/<dtype>``: the consistency policy's state (e.g. DiLoCo's outer optimizer),
* ``opt/<rank>/<dtype>``: each worker's optimizer state,
* ``local/<rank>/<dtype>``: a worker's own parameters where a policy keeps them
  apart from the global ones (EASGD),

leaves of one dtype packed into one 1-D array (``layout`` gives each leaf's
dtype, shape and offset), and the metadata ``daskdl_checkpoint``: the data
position (epoch, round, the epoch's plan), the seed, the history, the clock and
the SHA-256 of every array.

**With a key** (``Trainer(checkpoint_key=...)``, by default the key of the
encrypted share being trained on) every array chunk is sealed with AES-256-GCM by
:class:`~daskdl.encryption.EncryptedStore`, the metadata is encrypted too, and the
group carries the authenticated manifest of :mod:`daskdl.encryption`: a changed,
truncated, missing, extra or moved file, or a checkpoint renamed to another
clock, fails authentication.  A key given as bytes or a passphrase stays on the
client; the scheduler, which writes the checkpoints, gets a key derived for this
run's checkpoints only (a key reference travels as itself).  With a key, an
unencrypted checkpoint is refused.  **Without a key** the SHA-256 digests detect
accidental damage, not deliberate changes.

Readers take the newest checkpoint that verifies; a damaged one is skipped with
a warning (a wrong key, or a plaintext checkpoint where a key is given, is an
error).

Why it is safe to crash at any moment: on a local file system a checkpoint is
written to ``.tmp-ckpt-...`` (directories 0700, files 0600), fsynced, and renamed
into place (a clock written again is exchanged atomically with the old one); on
other Zarr stores the ``daskdl_checkpoint`` attribute (or the manifest) is
written last and the group counts only once it is there.  Older checkpoints
beyond ``keep`` are deleted only after a newer one is complete.  A checkpoint
directory that is a symbolic link or owned by another user is refused.

Zarr rather than orbax-checkpoint: daskdl already reads and writes Zarr, its
state is a few flat lists of numpy arrays per rank (no sharded ``jax.Array``
to coordinate across hosts), and an unencrypted checkpoint stays readable with
plain ``zarr`` and no daskdl.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
import warnings
import zlib
from typing import Any

import numpy as np

from .encryption import (ATTR as ENC_ATTR, EncryptedStore, SubKey, WrongKeyError,
                         _Secret, fsync_tree, key_handle, new_kdf, new_store_key, open_bytes,
                         publish_dir, read_attrs, scope_key, seal_bytes, seal_store,
                         verify_store)
from .errors import DaskDLError

logger = logging.getLogger("daskdl")

ATTR = "daskdl_checkpoint"
PREFIX = "ckpt-"


class CheckpointError(DaskDLError):
    """No readable checkpoint where one was expected."""


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).view(np.uint8).reshape(-1).data).hexdigest()


def _crc(x: np.ndarray) -> int:  # checkpoints written before SHA-256
    return zlib.crc32(np.ascontiguousarray(x).view(np.uint8).reshape(-1).data) & 0xFFFFFFFF


def _digest(meta: dict) -> str:
    doc = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def _is_path(store) -> bool:
    return isinstance(store, (str, os.PathLike)) and "://" not in str(store)


def _name(clock: int) -> str:
    return f"{PREFIX}{int(clock):09d}"


def secure_directory(path: str) -> None:
    """Create ``path`` with mode 0700, or check that the existing one is a real
    directory owned by this user (not a symbolic link, not someone else's)."""
    path = os.fspath(path)
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"the checkpoint directory {path} is a symbolic link; give the "
                              "real directory (a link could be redirected by someone else)")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"the checkpoint path {path} exists and is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CheckpointError(
            f"the checkpoint directory {path} is owned by uid {st.st_uid}, not by you (uid "
            f"{os.getuid()}): someone else created it, and could read or replace your "
            "checkpoints. Use a directory you own, e.g. under your home directory")
    if st.st_mode & 0o022:
        logger.warning("daskdl: the checkpoint directory %s is writable by other users "
                       "(mode %o); they could delete or replace checkpoints", path,
                       stat.S_IMODE(st.st_mode))


def _private(path: str) -> None:
    os.chmod(path, 0o700)  # (zarr's mode="w" recreates the folder with default permissions)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
        for f in files:
            os.chmod(os.path.join(root, f), 0o600)


def series_key(key):
    """The key a checkpoint writer works with: a :class:`~daskdl.encryption.SubKey`
    for a new series of checkpoints (derived once: one scrypt for a passphrase), or
    ``None``.  Run where the key may be used (client or scheduler)."""
    handle = key_handle(key)
    if handle is None or isinstance(handle, SubKey):
        return handle
    kdf = new_kdf(handle)
    scope = (f"ckpts/{uuid.uuid4().hex}",)
    return SubKey(scope_key(handle, kdf, scope, "checkpoints"), scope, kdf)


def checkpoint_key(key, dataset=None):
    """The key of a trainer's checkpoints: ``key``, else the key the dataset was
    opened with (training on an encrypted share), else ``None``.  Client side."""
    handle = key_handle(key)
    if handle is None and dataset is not None:
        handle = getattr(dataset, "_key", None)
    return handle


def trainer_checkpoint_key(key, checkpoint):
    """Validate ``Trainer(checkpoint_key=...)``: the client-side handle of the key
    (never pickled), or ``None``."""
    if key is not None and checkpoint is None:
        raise ValueError("checkpoint_key= encrypts checkpoints, but no checkpoint= directory "
                         "was given; pass Trainer(checkpoint='path/to/dir', checkpoint_key=...)")
    return key_handle(key)


def sendable_checkpoint_key(key, dataset=None):
    """What travels to the scheduler for :func:`checkpoint_key`: a key reference as
    itself, a raw key or passphrase as a key derived for this series only."""
    handle = checkpoint_key(key, dataset)
    return series_key(handle) if isinstance(handle, _Secret) else handle


def write_checkpoint(store, clock: int, params: list, policy_state: list,
                     opt_states: dict, local_params: dict, meta: dict, key=None) -> str:
    """Write one complete checkpoint under ``store``; return its group name.

    ``store`` is a directory path (written to a temporary name, fsynced, then
    renamed) or a Zarr store / URL (the completion attribute is written last).
    ``key``: encrypt and authenticate it (a raw key, passphrase, key reference or
    :class:`~daskdl.encryption.SubKey`); ``None``: SHA-256 digests only.
    """
    import zarr
    from zarr.storage import LocalStore

    name = _name(clock)
    handle = key_handle(key)
    if _is_path(store):
        root = os.fspath(store)
        secure_directory(root)
        tmp = os.path.join(root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        os.mkdir(tmp, 0o700)
        inner, prefix, path = LocalStore(tmp), "", None
    else:
        zarr.open_group(store, mode="a")
        inner, prefix, path = store, f"{name}/", name
    if handle is not None:
        keys, moving, gid, kdf, scope = new_store_key(handle)
        target = EncryptedStore(inner, moving, gid, kdf, scope, writing=True, prefix=prefix,
                                _keys=keys)
    else:
        target = inner
    group = zarr.open_group(target, mode="w", path=path)
    digests: dict[str, str] = {}
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
            group.create_array(f"{path}/{name}", data=packed, overwrite=True,
                               config={"write_empty_chunks": True})
            digests[f"{path}/{name}"] = _sha256(packed)
        layout[path] = entries

    put("params", params)
    put("policy", policy_state)
    for rank, leaves in opt_states.items():
        put(f"opt/{int(rank)}", leaves)
    for rank, leaves in local_params.items():
        put(f"local/{int(rank)}", leaves)
    full = json.loads(json.dumps(dict(meta, clock=int(clock), sha256=digests, layout=layout,
                                      written=time.time(),
                                      opt_ranks=sorted(int(r) for r in opt_states),
                                      local_ranks=sorted(int(r) for r in local_params)),
                                 default=_jsonable))
    if handle is not None:  # metadata sealed, then the manifest: the last write
        sealed = seal_bytes(keys, json.dumps(full).encode(), aad=f"{gid}/{name}")
        seal_store(inner, keys, gid, kdf, scope, {ATTR: {"sealed": sealed}}, prefix=prefix)
    else:
        group.attrs[ATTR] = dict(full, digest=_digest(full))
    if _is_path(store):
        _private(tmp)
        fsync_tree(tmp)
        publish_dir(tmp, os.path.join(root, name), overwrite=True)  # a clock written again
    return name


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"checkpoint metadata holds a {type(x).__name__}, which JSON cannot store")


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


def read_checkpoint(store, name: str, key=None) -> dict:
    """Read and verify one checkpoint.

    Raises :class:`CheckpointError` if it is incomplete or damaged, and
    :class:`~daskdl.encryption.WrongKeyError` (with a key) if it was written with
    another key or without one.
    """
    import zarr
    from zarr.storage import LocalStore

    handle = key_handle(key)
    where = f"checkpoint {name}"
    name_ = name
    try:
        if _is_path(store):
            inner, prefix, path = LocalStore(os.path.join(os.fspath(store), name),
                                             read_only=True), "", None
        else:
            inner, prefix, path = store, f"{name}/", name
        attrs = read_attrs(inner, prefix)
        if ENC_ATTR in attrs:
            if handle is None:
                raise WrongKeyError(f"{where} is encrypted; pass the key it was written with "
                                    "(Trainer(checkpoint_key=...) or load_latest(..., key=...))")
            keys, man = verify_store(inner, handle, where, prefix)
            enc = man.attrs[ENC_ATTR]
            meta = json.loads(open_bytes(keys, man.attrs[ATTR]["sealed"],
                                         f"{enc['store_id']}/{name}", where))
            source = EncryptedStore(inner, None, enc["store_id"], enc["kdf"], enc["scope"],
                                    prefix=prefix, _keys=keys, _manifest=man)
        else:
            if handle is not None:
                raise WrongKeyError(
                    f"{where} is not encrypted, but a checkpoint key is given: refusing it "
                    "(it could have been put there by anyone who can write the directory). "
                    "Move it away, or read it without a key")
            meta = dict(attrs.get(ATTR) or {})
            if not meta:
                raise CheckpointError(f"{where} is incomplete (no {ATTR} attribute)")
            if "digest" in meta and meta["digest"] != _digest(meta):
                raise CheckpointError(f"the metadata of {where} does not match its digest")
            source = inner
        if int(meta.get("clock", -1)) != int(name[len(PREFIX):]):
            raise CheckpointError(f"{where} holds the state of clock {meta.get('clock')}: it "
                                  "was renamed")
        group = zarr.open_group(source, mode="r", path=path, use_consolidated=False)

        def get(path: str) -> list:
            packed = {}
            out = []
            for name, shape, offset in meta["layout"][path]:
                if name not in packed:
                    x = np.asarray(group[f"{path}/{name}"][...])
                    if "sha256" in meta:
                        ok = _sha256(x) == meta["sha256"][f"{path}/{name}"]
                    else:
                        ok = _crc(x) == meta["crc32"][f"{path}/{name}"]
                    if not ok:
                        raise CheckpointError(f"array {path}/{name} of checkpoint {name_} "
                                              "does not match its digest")
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
    except (CheckpointError, WrongKeyError):
        raise
    except Exception as e:  # truncated files, bad JSON, missing arrays, failed authentication
        raise CheckpointError(f"checkpoint {name} cannot be read: {e}") from e


def load_latest(store, key=None) -> dict | None:
    """The newest readable checkpoint under ``store`` (``None`` if there is none).

    Parameters
    ----------
    store : the checkpoint directory or Zarr store.
    key : the checkpoints' key (raw key, passphrase or key reference), resolved
        here; ``None`` for unencrypted checkpoints.

    A damaged or incomplete newer one is skipped with a ``UserWarning`` naming it,
    and the one before is used.  A wrong key, or an unencrypted checkpoint where a
    key is given, raises :class:`~daskdl.encryption.WrongKeyError`.
    """
    handle = key_handle(key)
    for name in reversed(list_checkpoints(store)):
        try:
            ckpt = read_checkpoint(store, name, key=handle)
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

    Parameters
    ----------
    store : the checkpoint directory (created 0700; refused if owned by someone
        else) or Zarr store.
    keep : complete checkpoints kept.
    key : encrypt and authenticate the checkpoints with this key (a key reference
        is resolved here, in the writer's process); ``None``: SHA-256 digests only.
    """

    def __init__(self, store, keep: int = 3, key=None):
        self.store = store
        self.keep = int(keep)
        self._key = key_handle(key)  # resolved (a reference) at the first write, here
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
        """Queue a checkpoint.  ``params`` may be a function returning ``(params,
        policy_state, local_params)``, called in the writer's thread (sharded runs: it
        fetches the shards from their owners)."""
        if callable(params):
            copy, pol, local = params, [], {}
        else:
            copy = [np.array(x, copy=True) for x in params]  # the run goes on changing them
            pol = [np.array(x, copy=True) for x in policy_state]
            local = {r: [np.array(x, copy=True) for x in v] for r, v in local_params.items()}
        opts = {r: [np.asarray(x) for x in v] for r, v in opt_states.items()}
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
            if callable(params):
                params, pol, local = params()
            if self._key is not None and not isinstance(self._key, SubKey):
                self._key = series_key(self._key)  # one derivation for the whole series
            write_checkpoint(self.store, clock, params, pol, opts, local, meta, key=self._key)
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
        return cls(CheckpointWriter(spec["store"], keep=int(spec["keep"]),
                                    key=spec.get("key")), clocks)

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
