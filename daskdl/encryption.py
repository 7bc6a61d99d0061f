"""Authenticated encryption of Zarr stores: keys, key references, chunks, metadata.

A codec sees a chunk's bytes but not where the chunk lives, so a valid chunk
copied over another chunk's place would decrypt without complaint.  daskdl
therefore encrypts at the *store* layer: :class:`EncryptedStore` wraps any Zarr
v3 store and seals every chunk with AES-256-GCM, using as associated data the
store's identity (a random id) and the chunk's key path (``"x/c/3/0"``: array
and chunk coordinates).

**Keys.**  What a user gives as ``key=`` is one of

* 32 random bytes (a *raw key*);
* a passphrase (``str``), stretched with scrypt (``n = 2**17, r = 8, p = 1`` by
  default; the parameters and the salt are recorded in the store);
* a *key reference*, resolved where the key is used (client, workers, scheduler):
  ``"env:NAME"`` (an environment variable), ``"file:/path"`` (a file; 32 bytes
  that are not all printable are a raw key, 64 hex digits too, any other text is a
  passphrase) or a callable
  returning a raw key or a passphrase (run on the worker).

The user's key never leaves the client as itself.  Every store (and every series
of checkpoints) has a *scope*; its key is derived from the user's key with HKDF
(``root -> scope``; the root is HKDF of a raw key, or scrypt of a passphrase).
Workers receive either the key reference (best: the bytes never travel at all)
or, for a raw key or passphrase held by the client, a :class:`SubKey` for that
one scope.  A client-held key is wrapped in an object that refuses to be pickled.

**Authentication.**  Besides every chunk, a store written by daskdl carries, in
its root group's ``daskdl_encryption`` attribute (written last):

* a manifest of every chunk key with its GCM tag (empty chunks are written too,
  so a missing chunk always means tampering),
* the SHA-256 of every array's metadata document (shape, dtype, fill value,
  codecs),
* a key check and an HMAC-SHA256 over the whole root document.

Reading verifies the HMAC first, then checks every metadata document and chunk
against the manifest: a missing, extra, moved, replaced or changed chunk, and
any metadata change, raise :class:`ChunkAuthenticationError` (or its subclass
:class:`MetadataAuthenticationError`) naming the array and the chunk.  A wrong
key raises :class:`WrongKeyError`.  Checking a key costs a full key derivation:
there is no cheaper test an offline guesser could run.

Nothing here stores or logs key bytes; reprs show the kind of key only.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import errno
import hashlib
import hmac
import json
import os
import threading
import uuid
from typing import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from zarr.storage import WrapperStore

from .errors import DaskDLError

ATTR = "daskdl_encryption"
FORMAT = 2
SCRYPT_N = 2**17  # 128 MiB and a few hundred ms per derivation: costly to guess offline
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_N_RANGE = (2**14, 2**22)  # what a reader accepts from a store's attributes
_NONCE = 12
_TAG = 16
_META_SUFFIXES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
_ROOT = "zarr.json"


class ChunkAuthenticationError(DaskDLError):
    """A chunk did not authenticate: the store was tampered with (a changed, moved,
    missing, extra or replaced chunk), or a wrong key."""


class MetadataAuthenticationError(ChunkAuthenticationError):
    """A store's metadata (shape, dtype, fill value, codecs, attributes, manifest)
    was changed after daskdl wrote it."""


class WrongKeyError(ChunkAuthenticationError):
    """The key given is not the key the store (or checkpoint) was written with."""


# -- keys ----------------------------------------------------------------------------
class KeyRef:
    """A reference to a key, resolved where the key is used.

    Parameters
    ----------
    spec : ``"env:NAME"``, ``"file:/path"``, or a callable returning 32 bytes or a
        passphrase.  Only the reference travels (in task specs, to the scheduler);
        each process that reads or writes resolves it itself.

    Examples
    --------
    >>> KeyRef("env:DASKDL_KEY")
    KeyRef('env:DASKDL_KEY')
    """

    def __init__(self, spec):
        if isinstance(spec, KeyRef):
            spec = spec.spec
        if isinstance(spec, str):
            kind, _, rest = spec.partition(":")
            if kind not in ("env", "file") or not rest:
                raise ValueError(f"a key reference is 'env:NAME' or 'file:/path', got {spec!r}")
        elif not callable(spec):
            raise TypeError(f"a key reference is 'env:NAME', 'file:/path' or a callable, got "
                            f"{type(spec).__name__}")
        self.spec = spec

    def resolve(self) -> bytes | str:
        """The key material (32 bytes or a passphrase), read here and now."""
        spec = self.spec
        if callable(spec):
            return _check_secret(spec(), f"the key function {self!r}")
        kind, _, rest = spec.partition(":")
        if kind == "env":
            if rest not in os.environ:
                raise DaskDLError(f"the key reference {spec!r} names the environment variable "
                                  f"{rest}, which is not set in this process (pid {os.getpid()})"
                                  "; set it on the client, the workers and the scheduler")
            return _check_secret(_text_secret(os.environ[rest].encode()), repr(spec))
        try:
            with open(rest, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DaskDLError(f"the key reference {spec!r} cannot be read here (pid "
                              f"{os.getpid()}): {e.strerror}; the file must exist on every "
                              "machine that reads or writes the data") from None
        return _check_secret(data if _looks_random(data) else _text_secret(data), repr(spec))

    def __eq__(self, other):
        return isinstance(other, KeyRef) and self.spec == other.spec

    def __hash__(self):
        return hash(("KeyRef", self.spec if isinstance(self.spec, str) else id(self.spec)))

    def __repr__(self):
        if callable(self.spec):
            return f"KeyRef({getattr(self.spec, '__qualname__', type(self.spec).__name__)})"
        return f"KeyRef({self.spec!r})"


class SubKey:
    """A key derived for one scope (one store, or one series of checkpoints).

    What travels to the workers or the scheduler when the user gave a raw key or a
    passphrase: it opens only what was written under its scope, never other data
    encrypted with the user's key.  Its repr names the scope only.
    """

    def __init__(self, key: bytes, scope: tuple, kdf: dict):
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a SubKey holds 32 bytes")
        self._key = key
        self.scope = tuple(scope)
        self.kdf = dict(kdf)

    def __reduce__(self):
        return (SubKey, (self._key, self.scope, self.kdf))

    def __repr__(self):
        return f"SubKey(scope={self.scope!r})"


class _Secret:
    """A raw key or passphrase held by the client: never pickled, never shown."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        raise TypeError("a daskdl key given as bytes or a passphrase stays on the client and "
                        "cannot be pickled; to use it elsewhere give a key reference, e.g. "
                        "key='env:DASKDL_KEY' or key='file:/path/to/key'")

    def __repr__(self):
        return "<daskdl key: hidden>"


def _looks_random(data: bytes) -> bool:
    """32 bytes that are not all printable text: a raw key (a random key is all
    printable with probability (95/256)**32, about 1e-14).  A 32-character
    passphrase saved without a newline stays a passphrase (and gets scrypt)."""
    return len(data) == 32 and not all(32 <= b < 127 for b in data)


def _text_secret(data: bytes):
    text = data.decode("utf-8", errors="strict").rstrip("\r\n")
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    return text


def _check_secret(value, where: str):
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where}: an empty passphrase cannot protect anything")
        return value
    if isinstance(value, (bytes, bytearray)) and len(value) == 32:
        return bytes(value)
    length = f" of length {len(value)}" if hasattr(value, "__len__") else ""
    raise ValueError(f"{where}: a key must be 32 random bytes (e.g. os.urandom(32)), a "
                     f"passphrase string, or a key reference ('env:NAME', 'file:/path', a "
                     f"callable); got {type(value).__name__}{length}")


def key_handle(key):
    """Normalize what a user gave as ``key=`` (``None``, bytes, passphrase, reference).

    Returns ``None``, a :class:`KeyRef`, a :class:`SubKey`, or a client-only wrapper
    of a raw key or passphrase that refuses to be pickled.
    """
    if key is None or isinstance(key, (KeyRef, SubKey, _Secret)):
        return key
    if isinstance(key, str) and key.partition(":")[0] in ("env", "file") and ":" in key:
        return KeyRef(key)
    if callable(key) and not isinstance(key, (str, bytes, bytearray)):
        return KeyRef(key)
    return _Secret(_check_secret(key, "key"))


def travelling_key(handle, scope: tuple, kdf: dict):
    """What may leave the client for ``scope``: the reference itself, or a
    :class:`SubKey` derived here for that scope only."""
    if handle is None or isinstance(handle, KeyRef):
        return handle
    return SubKey(scope_key(handle, kdf, scope, "this scope"), scope, kdf)


def new_kdf(handle) -> dict:
    """Key-derivation parameters for something new written with ``handle``."""
    if isinstance(handle, SubKey):
        return dict(handle.kdf)
    secret = handle.resolve() if isinstance(handle, KeyRef) else handle.value
    if isinstance(secret, str):
        return {"name": "scrypt", "salt": base64.b64encode(os.urandom(16)).decode(),
                "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    return {"name": "hkdf"}


_PROCESS_KEY = os.urandom(32)
_ROOTS: dict[bytes, bytes] = {}
_ROOTS_LOCK = threading.Lock()


def _hkdf(key: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"daskdl/v2/{info}".encode()).derive(key)


def _root(secret, kdf: dict, where: str) -> bytes:
    name = kdf.get("name")
    if name == "hkdf":
        if not isinstance(secret, bytes):
            raise WrongKeyError(f"wrong key for {where}: it was written with a 32-byte key, "
                                "and a passphrase was given")
        return _hkdf(secret, "root")
    if name != "scrypt":
        raise MetadataAuthenticationError(f"{where} names an unknown key derivation {name!r}")
    if not isinstance(secret, str):
        raise WrongKeyError(f"wrong key for {where}: it was written with a passphrase, and a "
                            "32-byte key was given")
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    if not (_SCRYPT_N_RANGE[0] <= n <= _SCRYPT_N_RANGE[1] and n & (n - 1) == 0
            and 1 <= r <= 32 and 1 <= p <= 16):
        raise MetadataAuthenticationError(
            f"{where} records scrypt parameters n={n}, r={r}, p={p} outside what daskdl "
            f"writes or accepts (n a power of 2 in [2**14, 2**22])")
    # derived keys are cached per process under a keyed hash (never the passphrase)
    cache = hmac.new(_PROCESS_KEY, json.dumps(kdf, sort_keys=True).encode() + b"\0"
                     + secret.encode(), hashlib.sha256).digest()
    with _ROOTS_LOCK:
        if cache in _ROOTS:
            return _ROOTS[cache]
    salt = base64.b64decode(kdf["salt"])
    stretched = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret.encode())
    root = _hkdf(stretched, "root")
    with _ROOTS_LOCK:
        if len(_ROOTS) > 32:
            _ROOTS.clear()
        _ROOTS[cache] = root
    return root


def scope_key(handle, kdf: dict, scope: tuple, where: str) -> bytes:
    """The 32-byte key of ``scope`` (a tuple of names, outermost first)."""
    if handle is None:
        raise DaskDLError(f"{where} is encrypted; pass key=... (the key, passphrase or key "
                          "reference used when it was written)")
    scope = tuple(scope)
    if isinstance(handle, SubKey):
        n = len(handle.scope)
        if scope[:n] != handle.scope:
            raise WrongKeyError(f"wrong key for {where}: the derived key given belongs to "
                                f"another store or checkpoint series ({handle.scope[-1]!r})")
        key, rest = handle._key, scope[n:]
    else:
        secret = handle.resolve() if isinstance(handle, KeyRef) else handle.value
        key, rest = _root(secret, kdf, where), scope
    for name in rest:
        key = _hkdf(key, f"scope/{name}")
    return key


class _Keys:
    """The purpose keys of one scope."""

    def __init__(self, key: bytes):
        self.aes = AESGCM(_hkdf(key, "chunks"))
        self.mac = _hkdf(key, "mac")
        self.check = _hkdf(key, "check")
        self.seal = AESGCM(_hkdf(key, "seal"))


def seal_bytes(keys: _Keys, data: bytes, aad: str) -> str:
    """AES-GCM of ``data`` (e.g. a checkpoint's metadata), base64 for an attribute."""
    nonce = os.urandom(_NONCE)
    return base64.b64encode(nonce + keys.seal.encrypt(nonce, data, aad.encode())).decode()


def open_bytes(keys: _Keys, blob: str, aad: str, where: str) -> bytes:
    """The inverse of :func:`seal_bytes`."""
    raw = base64.b64decode(blob)
    try:
        return keys.seal.decrypt(raw[:_NONCE], raw[_NONCE:], aad.encode())
    except InvalidTag:
        raise MetadataAuthenticationError(f"the sealed metadata of {where} failed "
                                          "authentication") from None


def _aad(store_id: str, key: str) -> bytes:
    return f"daskdl/{store_id}/{key}".encode()


def _is_meta(key: str) -> bool:
    return key.endswith(_META_SUFFIXES)


def _where(key: str) -> tuple[str, str]:
    """(array, chunk) of a chunk key such as ``x/c/3/0``."""
    if "/c/" in key:
        array, _, chunk = key.partition("/c/")
        return array, chunk
    array, _, chunk = key.rpartition("/")
    return array, chunk


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _mac_of(keys: _Keys, doc: dict) -> str:
    doc = json.loads(json.dumps(doc))
    doc["attributes"][ATTR].pop("mac", None)
    return hmac.new(keys.mac, _canonical(doc), hashlib.sha256).hexdigest()


def _check_value(keys: _Keys, store_id: str) -> str:
    return hmac.new(keys.check, f"daskdl key check {store_id}".encode(),
                    hashlib.sha256).hexdigest()


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def _proto():
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


async def _get(store, key: str, byte_range=None):
    buf = await store.get(key, _proto(), byte_range)
    return None if buf is None else buf.to_bytes()


async def _keys_under(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _expected_chunks(path: str, meta: dict) -> list[str]:
    """Every chunk key of a Zarr v3 array with a regular grid."""
    import itertools
    import math

    shape = meta["shape"]
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    sep = enc.get("configuration", {}).get("separator", "/" if enc["name"] == "default" else ".")
    counts = [math.ceil(s / c) for s, c in zip(shape, grid)]
    base = f"{path}/" if path else ""
    out = []
    for idx in itertools.product(*[range(n) for n in counts]):
        coords = sep.join(str(i) for i in idx)
        if enc["name"] == "default":
            out.append(f"{base}c{sep}{coords}" if idx else f"{base}c")
        else:
            out.append(f"{base}{coords or '0'}")
    return out


# -- writing and checking a whole store ------------------------------------------------
def seal_store(store, keys: _Keys, store_id: str, kdf: dict, scope: tuple,
               extra_attrs: dict, prefix: str = "") -> None:
    """Write the manifest, metadata hashes, key check and MAC into the root group's
    attributes (the last write of a store): after every chunk is written.

    ``prefix`` is the group's path inside ``store`` (``""`` for the store's root).
    Raises if a chunk of the regular grid is missing (empty chunks are written).
    """
    async def run():
        keys_ = await _keys_under(store, prefix)
        root_key = prefix + _ROOT
        metas, chunks = {}, {}
        for k in keys_:
            rel = k[len(prefix):]
            if k == root_key:
                continue
            if _is_meta(rel):
                metas[rel] = await _get(store, k)
            else:
                tail = await _get(store, k, _suffix(_TAG))
                chunks[rel] = base64.b64encode(tail).decode()
        for rel, data in metas.items():
            doc = json.loads(data)
            if doc.get("node_type") == "array":
                path = rel[:-len("/zarr.json")] if rel != _ROOT else ""
                missing = [c for c in _expected_chunks(path, doc) if c not in chunks]
                if missing:
                    raise DaskDLError(f"array {path!r} lacks chunk(s) {missing[:5]} at the end "
                                      "of writing; it was not written completely")
        doc = json.loads(await _get(store, root_key))
        attrs = doc.setdefault("attributes", {})
        attrs.update(json.loads(json.dumps(extra_attrs)))
        attrs[ATTR] = {
            "format": FORMAT, "cipher": "AES-256-GCM", "kdf": kdf, "scope": list(scope),
            "store_id": store_id, "check": _check_value(keys, store_id),
            "metadata": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(metas.items())},
            "chunks": dict(sorted(chunks.items())),
        }
        attrs[ATTR]["mac"] = _mac_of(keys, doc)
        from zarr.core.buffer import default_buffer_prototype

        await store.set(root_key, default_buffer_prototype().buffer.from_bytes(
            json.dumps(doc, indent=1).encode()))

    _sync(run())


def _suffix(n: int):
    from zarr.abc.store import SuffixByteRequest

    return SuffixByteRequest(n)


class Manifest:
    """What :func:`verify_store` authenticated: chunk tags, metadata hashes and the
    root document's bytes."""

    def __init__(self, doc_bytes: bytes, attrs: dict):
        self.doc_bytes = doc_bytes
        self.attrs = attrs  # the root group's attributes, authenticated
        enc = attrs[ATTR]
        self.chunks = {k: base64.b64decode(v) for k, v in enc["chunks"].items()}
        self.metadata = dict(enc["metadata"])


def read_attrs(store, prefix: str = "") -> dict:
    """The root group's attributes as stored (not yet authenticated)."""
    data = _sync(_get(store, prefix + _ROOT))
    if data is None:
        raise DaskDLError(f"no Zarr group at {prefix or 'the root'} of {store!r}")
    return json.loads(data).get("attributes", {})


async def _verify(store, handle, where: str, prefix: str = "", keys: _Keys | None = None):
    data = await _get(store, prefix + _ROOT)
    if data is None:
        raise MetadataAuthenticationError(f"{where} has lost its root metadata document")
    try:
        doc = json.loads(data)
        enc = doc["attributes"][ATTR]
    except (ValueError, KeyError, TypeError):
        raise MetadataAuthenticationError(f"the root metadata of {where} is not a daskdl "
                                          "encrypted store (or was changed)") from None
    if enc.get("format") != FORMAT:
        raise DaskDLError(f"{where} was written by an older daskdl, without authenticated "
                          "metadata; write it again (Dataset.share) with this version")
    store_id, scope, kdf = enc["store_id"], tuple(enc["scope"]), enc["kdf"]
    if keys is None:
        keys = _Keys(scope_key(handle, kdf, scope, where))
    if not hmac.compare_digest(_check_value(keys, store_id), str(enc.get("check"))):
        raise WrongKeyError(f"wrong key for {where}: it does not match the key it was "
                            "written with")
    if not hmac.compare_digest(_mac_of(keys, doc), str(enc.get("mac"))):
        raise MetadataAuthenticationError(
            f"the metadata of {where} was changed after it was written (its attributes or "
            "manifest do not authenticate)")
    return keys, Manifest(data, doc["attributes"])


def verify_store(store, handle, where: str, prefix: str = "", listing: bool = True):
    """Authenticate a store's root document; return ``(keys, manifest)``.

    With ``listing``, also list the store and refuse any chunk or metadata document
    the manifest does not name (an *extra* chunk).
    """
    keys, man = _sync(_verify(store, handle, where, prefix))
    if listing:
        for k in _sync(_keys_under(store, prefix)):
            rel = k[len(prefix):]
            if rel == _ROOT or rel in man.chunks or rel in man.metadata:
                continue
            if _is_meta(rel):
                raise MetadataAuthenticationError(
                    f"{where} holds a metadata document {rel!r} that was not written with it")
            array, chunk = _where(rel)
            raise ChunkAuthenticationError(
                f"chunk {chunk!r} of array {array!r} in {where} is not in the manifest: an "
                f"extra chunk was added after the store was written (store key {rel!r})")
    return keys, man


class EncryptedStore(WrapperStore):
    """A Zarr store whose chunks are sealed with AES-256-GCM and checked against an
    authenticated manifest (see the module docstring).

    Parameters
    ----------
    store : the Zarr v3 store to wrap (``LocalStore``, ``FsspecStore``, ...).
    key : a :class:`KeyRef` or :class:`SubKey` (what may travel; resolved lazily,
        where the store is used).
    store_id : the store's id: part of every chunk's associated data.
    kdf, scope : how ``key`` becomes this store's key (from its attributes).
    writing : ``True`` while the store is being written (no manifest yet).
    prefix : the group's path inside ``store``.
    """

    def __init__(self, store, key, store_id: str, kdf: dict, scope: tuple,
                 writing: bool = False, prefix: str = "", _keys: _Keys | None = None,
                 _manifest: Manifest | None = None):
        super().__init__(store)
        if isinstance(key, _Secret):
            raise TypeError("EncryptedStore takes a KeyRef or SubKey (what may travel), "
                            "not the user's key")
        self._key = key
        self._store_id = store_id
        self._kdf = dict(kdf)
        self._scope = tuple(scope)
        self._writing = bool(writing)
        self._prefix = prefix
        self._keys = _keys
        self._manifest = _manifest
        self._lock = threading.Lock()

    def _with_store(self, store):
        return type(self)(store, self._key, self._store_id, self._kdf, self._scope,
                          self._writing, self._prefix, self._keys, self._manifest)

    def __getstate__(self):
        return {"store": self._store, "key": self._key, "id": self._store_id,
                "kdf": self._kdf, "scope": self._scope, "writing": self._writing,
                "prefix": self._prefix}

    def __setstate__(self, s):
        self.__init__(s["store"], s["key"], s["id"], s["kdf"], s["scope"], s["writing"],
                      s["prefix"])

    def __eq__(self, other):
        return (isinstance(other, EncryptedStore) and self._store == other._store
                and self._store_id == other._store_id)

    def __hash__(self):
        return hash((type(self), self._store_id))

    def __repr__(self):
        return f"EncryptedStore({self._store!r})"

    def _name(self) -> str:
        return f"the encrypted store {self._store!r}"

    async def _ready(self) -> tuple[_Keys, Manifest | None]:
        if self._keys is not None and (self._writing or self._manifest is not None):
            return self._keys, self._manifest
        keys = self._keys or _Keys(scope_key(self._key, self._kdf, self._scope, self._name()))
        man = None
        if not self._writing:
            cached = _MANIFESTS.get((self._store_id, keys.check))
            if cached is None:
                keys, man = await _verify(self._store, self._key, self._name(),
                                          self._prefix, keys)
                if len(_MANIFESTS) > 64:
                    _MANIFESTS.clear()
                _MANIFESTS[(self._store_id, keys.check)] = man
            else:
                man = cached
        self._keys, self._manifest = keys, man
        return keys, man

    def _rel(self, key: str) -> str:
        return key[len(self._prefix):] if key.startswith(self._prefix) else key

    def _seal(self, keys: _Keys, key: str, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + keys.aes.encrypt(nonce, data, _aad(self._store_id, self._rel(key)))

    def _open_chunk(self, keys: _Keys, man, key: str, data: bytes) -> bytes:
        rel = self._rel(key)
        array, chunk = _where(rel)
        if man is not None:
            want = man.chunks.get(rel)
            if want is None:
                raise ChunkAuthenticationError(
                    f"chunk {chunk!r} of array {array!r} is not in the manifest of "
                    f"{self._name()}: an extra chunk (store key {rel!r})")
            if not hmac.compare_digest(bytes(data[-_TAG:]), want):
                raise ChunkAuthenticationError(
                    f"chunk {chunk!r} of array {array!r} failed authentication: it is not the "
                    f"chunk written there (changed, moved, or from another store; store key "
                    f"{rel!r})")
        view = memoryview(data)
        try:
            return keys.aes.decrypt(bytes(view[:_NONCE]), view[_NONCE:],
                                    _aad(self._store_id, rel))
        except InvalidTag:
            raise ChunkAuthenticationError(
                f"chunk {chunk!r} of array {array!r} failed authentication: wrong key, or the "
                f"chunk was changed or moved (store key {rel!r})") from None

    async def get(self, key, prototype, byte_range=None):
        keys, man = await self._ready()
        rel = self._rel(key)
        if _is_meta(key):
            if man is None:
                return await self._store.get(key, prototype, byte_range)
            if rel == _ROOT:
                data = man.doc_bytes
            else:
                buf = await self._store.get(key, prototype, None)
                data = None if buf is None else buf.to_bytes()
                want = man.metadata.get(rel)
                if want is None and data is not None:
                    raise MetadataAuthenticationError(
                        f"{self._name()} holds a metadata document {rel!r} that was not "
                        "written with it")
                if want is not None and data is None:
                    raise MetadataAuthenticationError(
                        f"the metadata of array {rel.rpartition('/')[0]!r} is missing from "
                        f"{self._name()}")
                if data is not None and not hmac.compare_digest(
                        hashlib.sha256(data).hexdigest(), want):
                    raise MetadataAuthenticationError(
                        f"the metadata of array {rel.rpartition('/')[0]!r} in {self._name()} "
                        "was changed (shape, dtype, fill value or codecs differ from what was "
                        "written)")
            if data is None:
                return None
            out = prototype.buffer.from_bytes(data)
            return out if byte_range is None else _slice(out, len(data), byte_range)
        buf = await self._store.get(key, prototype, None)
        if buf is None:
            if man is not None and rel in man.chunks:
                array, chunk = _where(rel)
                raise ChunkAuthenticationError(
                    f"chunk {chunk!r} of array {array!r} is missing from {self._name()}: it "
                    f"was deleted after the store was written (store key {rel!r})")
            return None
        plain = self._open_chunk(keys, man, key, buf.as_numpy_array())
        out = prototype.buffer.from_bytes(plain)
        return out if byte_range is None else _slice(out, len(plain), byte_range)

    async def get_partial_values(self, prototype, key_ranges: Iterable):
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key, value):
        if not self._writing:
            raise DaskDLError(f"{self._name()} is complete and authenticated; it is not "
                              "written to again (share the data to a new store instead)")
        if not _is_meta(key):
            keys, _ = await self._ready()
            value = type(value).from_bytes(self._seal(keys, key, value.to_bytes()))
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        if not self._writing:
            raise DaskDLError(f"{self._name()} is complete; it is not written to again")
        if not _is_meta(key):
            keys, _ = await self._ready()
            value = type(value).from_bytes(self._seal(keys, key, value.to_bytes()))
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values):
        for key, value in values:
            await self.set(key, value)

    @property
    def supports_partial_writes(self) -> bool:
        return False


_MANIFESTS: dict = {}  # (store id, key fingerprint) -> the authenticated manifest


def _slice(out, n: int, byte_range):
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, RangeByteRequest):
        return out[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return out[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return out[n - byte_range.suffix:]
    raise TypeError(f"unsupported byte range {byte_range!r}")


def new_store_key(handle, scope_prefix: tuple = (), store_id: str | None = None):
    """Everything needed to write a new encrypted store (or checkpoint group).

    Returns ``(keys, travelling, store_id, kdf, scope)``: the purpose keys (used
    where this runs), what may travel to other processes (a reference or a
    :class:`SubKey`), and the attributes that record the derivation.
    """
    store_id = store_id or uuid.uuid4().hex
    kdf = new_kdf(handle)
    base = handle.scope if isinstance(handle, SubKey) else tuple(scope_prefix)
    scope = base + (f"store/{store_id}",)
    key = scope_key(handle, kdf, scope, "a new store")
    travelling = handle if isinstance(handle, KeyRef) else SubKey(key, scope, kdf)
    return _Keys(key), travelling, store_id, kdf, scope


def raw_array_metadata(store, path: str) -> dict:
    """An array's metadata document as stored (``zarr.json``, or v2 ``.zarray``),
    read before Zarr interprets it; ``{}`` if there is none."""
    for name in ("zarr.json", ".zarray"):
        data = _sync(_get(store, f"{path}/{name}" if path else name))
        if data is not None:
            try:
                return json.loads(data)
            except ValueError:
                return {}
    return {}


def top_level_metadata(store) -> dict:
    """The raw metadata documents of a group's top-level members, by name."""
    async def names():
        return [k async for k in store.list_dir("")]
    return {n: raw_array_metadata(store, n) for n in _sync(names()) if not _is_meta(n)}


def refuse_pickle_codecs(meta_docs: dict, where: str) -> None:
    """Refuse arrays whose codecs unpickle (``pickle`` in v3 codecs, v2 filters or
    compressor), or whose dtype is ``object``: reading them could run code."""
    def names(doc):
        for c in doc.get("codecs", []) or []:
            yield (c.get("name") if isinstance(c, dict) else str(c))
        for c in (doc.get("filters") or []) + [doc.get("compressor") or {}]:
            if isinstance(c, dict) and c:
                yield c.get("id")
    for path, doc in meta_docs.items():
        bad = [n for n in names(doc) if n and "pickle" in str(n).lower()]
        dtype = str(doc.get("data_type", doc.get("dtype", "")))
        if bad or dtype in ("|O", "object", "O"):
            raise DaskDLError(
                f"array {path!r} of {where} uses {bad or ['an object dtype']}: decoding it "
                "unpickles data, which can run arbitrary code. daskdl refuses such stores; "
                "rewrite the array with a numeric dtype and a plain codec")


# -- durable, atomic directory writes (shares and checkpoints) ---------------------------
def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (and ``path`` itself)."""
    for root, dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries), ignoring file systems that cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2: Callable | None = None
_AT_FDCWD = -100


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    return _renameat2 or None


def _rename2(src: str, dst: str, flags: int) -> bool:
    """renameat2(2); ``False`` where the system or file system lacks it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else -1):
        return False
    raise OSError(err, os.strerror(err), dst)


def publish_dir(tmp: str, final: str, overwrite: bool) -> None:
    """Move the complete directory ``tmp`` to ``final``, durably and without a gap.

    Without ``overwrite`` an existing ``final`` is never touched (``FileExistsError``,
    atomic even against a concurrent writer).  With ``overwrite`` the two are
    exchanged atomically and the old one deleted afterwards; where the system lacks
    an atomic exchange, the old one is first renamed aside (never deleted before
    the new one is in place).  ``tmp`` is fsynced first, the parent after.
    """
    import shutil

    fsync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if not overwrite:
        try:
            done = _rename2(tmp, final, _RENAME_NOREPLACE)
        except FileExistsError:
            raise FileExistsError(f"{final} exists; pass overwrite=True to replace it") from None
        if not done:
            if os.path.lexists(final):
                raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
            os.rename(tmp, final)  # fails on a non-empty directory written meanwhile
        fsync_dir(parent)
        return
    try:
        exchanged = _rename2(tmp, final, _RENAME_EXCHANGE)
    except FileNotFoundError:  # nothing to replace
        exchanged = False
    if exchanged:
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    aside = None
    if os.path.lexists(final):
        aside = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


__all__ = ["ATTR", "ChunkAuthenticationError", "EncryptedStore", "KeyRef",
           "MetadataAuthenticationError", "SubKey", "WrongKeyError", "key_handle",
           "publish_dir", "seal_store", "verify_store"]
