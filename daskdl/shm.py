"""Shard payloads between workers of one host through shared memory.

Under ``sync="sharded"`` each worker sends a piece of its update to every other
owner and, under the lockstep policies, each owner pushes its merged shard back:
per round and worker, two payloads out and two in of about ``model / N`` bytes.
Between workers of one host, serializing them and moving them through the
loopback socket costs both processes CPU on the cores that run XLA (a 1.35 MB
piece: ~0.35 ms to send, ~0.25 ms to receive, 0.44 ms from send to reply; through
shared memory 0.14 ms, 0.13 ms and 0.25 ms; see ``docs/benchmarks.md``).

With ``daskdl.shared-memory: auto`` (the default), a payload of at least
:data:`MIN_BYTES` of plain numeric arrays for a worker whose address has this
worker's host goes through a file in ``/dev/shm`` (tmpfs) that the sender owns:
the message (still a Dask RPC carrying the run secret) holds only the file's name,
a sequence number and where each array lies; the receiver copies the arrays out
before it replies.  One file per (peer, kind of message) is reused from round to
round; it is rewritten only once the reply to the message before came, and a
message without a reply (an error, a cancelled call) retires its file, so a reader
never sees it change under it (each file also carries the sequence number in a
header, checked before and after the copy).

Anything else goes over Dask's comm as before: arrays of another dtype (bfloat16,
compressed updates), small payloads, peers on other hosts, files beyond
:data:`MAX_BYTES` per process (they stay between rounds: up to three times the model
per worker: pieces, pushes and answers), a host without a writable ``/dev/shm`` or without room in it (space is reserved with
``posix_fallocate``, so a full tmpfs is an error here, not a ``SIGBUS`` later: that
peer gets the comm from then on), and a peer that cannot open the file (another
container on the same address): the receiver answers ``shm: False``, and that peer
gets the comm from then on.  At a new generation a sender drops the files of peers
that left and a receiver closes its mappings (opened again as messages come), so
neither holds memory for workers that are gone.

Files are ``/dev/shm/daskdl-<pid>-<token>-<slot>-<n>``, mode 0600; a receiver opens
only such names, regular files of its own user (no symlinks), and checks every
offset against the file's size.  The sender removes its files when the run's
exchange closes and at exit; files of a process that died are removed by the next
sender that starts on the host.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import contextlib
import mmap
import os
import re
import secrets
import struct
import weakref
from collections import OrderedDict

import numpy as np

from .protocol import ProtocolError

SHM_DIR = "/dev/shm"
MIN_BYTES = 64 * 1024  # smaller payloads go over the comm (a file costs more than they do)
# The files one process keeps, at most (they stay between rounds: about twice the
# model per worker, its pieces for the other owners and its pushes); a payload that
# would go beyond takes the comm.  Also at most a quarter of the tmpfs.
MAX_BYTES = 2**30
_MAGIC = b"DDLSHM01"
_HEADER = struct.Struct("<8sQQ")  # magic, sequence number, payload bytes
_DATA = 64  # arrays start here; each at a 64-byte boundary
_KINDS = set("biufc")  # numpy kinds sent this way (bool, ints, floats, complex)
_NAME = re.compile(r"^daskdl-(\d{1,10})-([0-9a-f]{8})-(\d{1,9})-(\d{1,12})$")
_MAX_OPEN = 256  # files a receiver keeps open (one per sender and kind of message)


class ShmUnavailable(Exception):
    """The receiver cannot read the sender's file: send over the comm instead."""


def available(path: str = SHM_DIR) -> bool:
    """Whether this host has a writable tmpfs at ``path``."""
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def shared_memory_setting(value) -> bool:
    """Check config ``daskdl.shared-memory``: ``"auto"``/``True`` (when the peer is on
    this host and can open the file) or ``False`` (always Dask's comm)."""
    if value is None or value is True or (isinstance(value, str) and
                                          value.strip().lower() in ("auto", "true")):
        return True
    if value is False or (isinstance(value, str) and value.strip().lower() == "false"):
        return False
    raise ValueError(f"daskdl.shared-memory must be 'auto', true or false, not {value!r}")


def host(address: str) -> str:
    """The host part of a Dask address (``tcp://10.0.0.5:8786`` -> ``10.0.0.5``)."""
    from distributed.comm import get_address_host

    try:
        return get_address_host(address)
    except (ValueError, TypeError):
        return ""


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64


def _sendable(group) -> bool:
    return all(isinstance(a, np.ndarray) and a.dtype.kind in _KINDS and
               a.dtype.isnative for a in group)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def sweep(path: str = SHM_DIR) -> int:
    """Remove this user's daskdl files whose writing process is gone; their number."""
    removed = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            m = _NAME.fullmatch(name)
            if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                full = os.path.join(path, name)
                if os.lstat(full).st_uid == os.getuid():
                    os.unlink(full)
                    removed += 1
    return removed


class _Slot:
    """One file this worker writes the messages of one kind for one peer into."""

    def __init__(self, outbox: "Outbox", slot_id: int):
        self.outbox, self.id = outbox, slot_id
        self.lock = asyncio.Lock()
        self.name: str | None = None
        self.path = None
        self.mm: mmap.mmap | None = None
        self.size = 0
        self.files = 0

    def _ensure(self, size: int) -> None:
        if self.mm is not None and self.size >= size:
            return
        self.retire()
        size = max(_aligned(size), 2**20)
        if self.outbox.nbytes() + size > self.outbox.max_bytes:
            raise OSError(f"files of {self.outbox.nbytes() + size} bytes would exceed "
                          f"{self.outbox.max_bytes} (daskdl.shm.MAX_BYTES)")
        vfs = os.statvfs(self.outbox.dir)
        if vfs.f_bavail * vfs.f_frsize < size + 16 * 2**20:
            raise OSError(f"{self.outbox.dir} has no room for {size} more bytes")
        self.files += 1
        name = f"daskdl-{os.getpid()}-{self.outbox.token}-{self.id}-{self.files}"
        path = os.path.join(self.outbox.dir, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            self.outbox.files.add(path)
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS on a write
            self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except BaseException:
            self.outbox.files.discard(path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.name, self.path, self.size = name, path, size

    def write(self, groups) -> list:
        """Copy ``groups`` (lists of arrays, or None) in; one reference per group."""
        offset, layout = _DATA, []
        for g in groups:
            if g is None:
                layout.append(None)
                continue
            arrays = []
            for a in g:
                arrays.append((a, offset))
                offset = _aligned(offset + a.nbytes)
            layout.append(arrays)
        self._ensure(offset)
        self.outbox.seq += 1
        seq = self.outbox.seq
        _HEADER.pack_into(self.mm, 0, _MAGIC, seq, offset)
        refs = []
        for arrays in layout:
            if arrays is None:
                refs.append(None)
                continue
            spec = []
            for a, off in arrays:
                dst = np.frombuffer(self.mm, a.dtype, a.size, off)
                np.copyto(dst.reshape(a.shape), a)
                del dst
                spec.append([a.dtype.str, list(a.shape), off])
            refs.append({"shm": self.name, "seq": seq, "arrays": spec})
        return refs

    def retire(self) -> None:
        """Drop the file (a reader that still maps it keeps its pages until it closes)."""
        if self.mm is not None:
            with contextlib.suppress(BufferError):
                self.mm.close()
            self.mm = None
        if self.path is not None:
            self.outbox.files.discard(self.path)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = self.name = None
        self.size = 0


class Outbox:
    """The files one process writes shard payloads into, one per (peer, kind)."""

    def __init__(self, local_address: str, path: str = SHM_DIR, min_bytes: int = MIN_BYTES,
                 max_bytes: int | None = None):
        self.dir = path
        self.min_bytes = min_bytes
        if max_bytes is None:
            vfs = os.statvfs(path)
            max_bytes = min(MAX_BYTES, vfs.f_blocks * vfs.f_frsize // 4)
        self.max_bytes = max_bytes
        self.token = secrets.token_hex(4)
        self.host = host(local_address)
        self.slots: dict = {}
        self._ids = itertools.count()  # slot ids are never reused (file names stay unique)
        self.off: set = set()  # peers that cannot read our files
        self.files: set = set()
        self.seq = 0
        self.stats = {"sent": 0}  # payloads sent through shared memory
        sweep(path)
        self.closed = False
        self._finalizer = weakref.finalize(self, _remove, self.files)  # also at exit

    def nbytes(self) -> int:
        """Bytes of the files this process keeps now."""
        return sum(s.size for s in self.slots.values())

    def usable(self, address: str, groups) -> bool:
        """Whether ``groups`` for ``address`` go through shared memory."""
        if self.closed or address in self.off or not self.host or host(address) != self.host:
            return False
        present = [g for g in groups if g is not None]
        if not present or not all(_sendable(g) for g in present):
            return False
        return sum(a.nbytes for g in present for a in g) >= self.min_bytes

    def slot(self, address: str, kind: str) -> _Slot:
        key = (address, kind)
        if key not in self.slots:
            self.slots[key] = _Slot(self, next(self._ids))
        return self.slots[key]

    def disable(self, address: str) -> None:
        """``address`` cannot read this host's files: the comm from now on."""
        self.off.add(address)
        for (a, _), s in list(self.slots.items()):
            if a == address:
                s.retire()

    def keep(self, addresses) -> None:
        """Drop the files for peers not in ``addresses`` (a new generation)."""
        for key in [k for k in self.slots if k[0] not in set(addresses)]:
            self.slots.pop(key).retire()

    def close(self) -> None:
        self.closed = True
        for s in self.slots.values():
            s.retire()
        self.slots.clear()
        self._finalizer()


def _remove(files: set) -> None:
    for path in list(files):
        with contextlib.suppress(OSError):
            os.unlink(path)
    files.clear()


def reply(outbox: Outbox | None, address: str, groups, serialize) -> list:
    """Payloads for a reply to ``address``: references to this worker's ``reply`` file
    for that peer when shared memory serves it, else ``serialize(group)`` for each
    group.  The file is rewritten by the next reply to that peer only, which answers
    a message the peer sends after it copied this reply's arrays out (as the reply
    came); a reader that finds it rewritten all the same refuses it (the sequence
    number) and asks again over the comm."""
    if outbox is not None and outbox.usable(address, groups):
        s = outbox.slot(address, "reply")
        try:
            return s.write(groups)
        except OSError:  # no room: the comm from now on
            s.retire()
            outbox.disable(address)
    return [None if g is None else serialize(g) for g in groups]


async def send(outbox: Outbox | None, address: str, kind: str, groups, call, serialize):
    """``await call(*payloads)``, one payload per group of arrays in ``groups`` (or
    None): references to this host's shared memory when ``address`` can read it,
    else ``serialize(group)``.  A reply with ``shm: False`` (the peer cannot open
    the file) is sent again over the comm, and that peer gets the comm from then on."""
    if outbox is not None and outbox.usable(address, groups):
        s = outbox.slot(address, kind)
        async with s.lock:
            if outbox.closed:  # closed while this send waited: no file after close
                return await call(*[None if g is None else serialize(g) for g in groups])
            try:
                refs = s.write(groups)
            except OSError:  # no room, or a tmpfs that cannot reserve: the comm from now on
                s.retire()
                outbox.disable(address)
                refs = None
            if refs is not None:
                try:
                    reply = await call(*refs)
                except BaseException:
                    s.retire()  # no reply: the peer may still read it; never rewrite it
                    raise
                if not (isinstance(reply, dict) and reply.get("shm") is False):
                    outbox.stats["sent"] += 1
                    return reply
                outbox.disable(address)
    return await call(*[None if g is None else serialize(g) for g in groups])


class Inbox:
    """The files of other processes this process reads payloads from."""

    def __init__(self, path: str = SHM_DIR, enabled: bool = True):
        self.dir = path
        self.enabled = enabled  # daskdl.shared-memory: false refuses references
        self.maps: OrderedDict = OrderedDict()  # lineage (pid, token, slot) -> (name, mmap)

    @staticmethod
    def is_ref(obj) -> bool:
        return isinstance(obj, dict) and "shm" in obj

    def _map(self, name: str) -> mmap.mmap:
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise ProtocolError(f"{name!r} is not a daskdl shared-memory name")
        lineage = m.groups()[:3]
        held = self.maps.get(lineage)
        if held is not None and held[0] == name:
            self.maps.move_to_end(lineage)
            return held[1]
        if held is not None:  # the sender moved on to a new file for this slot
            self._close(lineage)
        path = os.path.join(self.dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise ShmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            import stat

            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():  # the comm instead
                raise ShmUnavailable(f"{path} is not a regular file of this user")
            if st.st_size < _DATA:
                raise ShmUnavailable(f"{path} is too small")
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.maps[lineage] = (name, mm)
        while len(self.maps) > _MAX_OPEN:
            self._close(next(iter(self.maps)))
        return mm

    def _close(self, lineage) -> None:
        _, mm = self.maps.pop(lineage)
        with contextlib.suppress(BufferError):
            mm.close()

    def load(self, ref, limit: int | None = None, what: str = "payload") -> list:
        """The arrays ``ref`` names, copied out of the sender's file."""
        if not self.enabled:
            raise ProtocolError(f"{what}: shared memory is off here (daskdl.shared-memory)")
        if not isinstance(ref, dict):
            raise ProtocolError(f"{what}: a shared-memory reference must be a dict")
        seq, spec = ref.get("seq"), ref.get("arrays")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(spec, (list, tuple)):
            raise ProtocolError(f"{what}: a shared-memory reference needs seq and arrays")
        parsed, total = [], 0
        for item in spec:
            try:
                dtype_s, shape, off = item
                dtype = np.dtype(str(dtype_s))
                shape = tuple(int(s) for s in shape)
                off = int(off)
            except (TypeError, ValueError):
                raise ProtocolError(f"{what}: malformed array in a shared-memory "
                                    "reference") from None
            if dtype.kind not in _KINDS or any(s < 0 for s in shape) or off < _DATA:
                raise ProtocolError(f"{what}: array {dtype} {shape} at {off} refused")
            n = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
            if limit is not None and n > limit:
                raise ProtocolError(f"{what} of {n} bytes is larger than the {limit} bytes "
                                    "expected")
            if n > 2**62:
                raise ProtocolError(f"{what}: array {dtype} {shape} is too large")
            total += n
            parsed.append((dtype, shape, off, n))
        if limit is not None and total > limit:
            raise ProtocolError(f"{what} of {total} bytes is larger than the {limit} bytes "
                                "expected")
        mm = self._map(ref["shm"])
        if any(off + n > len(mm) for _, _, off, n in parsed):
            raise ProtocolError(f"{what}: an array lies beyond the end of {ref['shm']}")

        def header_ok():
            magic, at, _ = _HEADER.unpack_from(mm, 0)
            return magic == _MAGIC and at == seq

        if not header_ok():
            raise ProtocolError(f"{what}: {ref['shm']} holds another message (not {seq})")
        out = []
        for dtype, shape, off, n in parsed:
            src = np.frombuffer(mm, dtype, n // dtype.itemsize if dtype.itemsize else 0, off)
            out.append(src.reshape(shape).copy())
            del src
        if not header_ok():  # rewritten while we copied (the sender gave up on it)
            raise ProtocolError(f"{what}: {ref['shm']} changed while it was read")
        return out

    def close(self) -> None:
        for lineage in list(self.maps):
            self._close(lineage)
