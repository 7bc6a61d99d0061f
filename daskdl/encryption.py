"""Authenticated encryption of Zarr chunks, bound to their place in the store.

A codec sees a chunk's bytes but not where the chunk lives, so a valid chunk
copied over another chunk's place would decrypt without complaint.  daskdl
therefore encrypts at the *store* layer: :class:`EncryptedStore` wraps any Zarr
v3 store and seals every chunk with AES-256-GCM, using as associated data the
store's identity (a random id written in the group's attributes) and the chunk's
key path (``"x/c/3/0"``: array and chunk coordinates).  Metadata documents
(``zarr.json``, ``.zarray`` ...) stay readable, so shapes, dtypes and codecs are
visible without the key; chunk contents are not.

A wrong key, a flipped byte or a chunk moved to another place raises
:class:`ChunkAuthenticationError` naming the array and the chunk.  The key is
never written to the store: only a random salt (for passphrases, derived with
scrypt) and a key-check token, so a wrong key is reported when the store is
opened rather than at the first chunk.
"""

from __future__ import annotations

import base64
import os
import uuid
from typing import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from zarr.storage import WrapperStore

from .errors import DaskDLError

ATTR = "daskdl_encryption"
_NONCE = 12
_META_SUFFIXES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


class ChunkAuthenticationError(DaskDLError):
    """A chunk (or the key check) did not authenticate: wrong key, or the store was
    tampered with (a changed byte, or a chunk moved to another place)."""


def new_encryption_attrs(key, store_id: str | None = None) -> tuple[bytes, dict]:
    """Derive the data key for a new store; return it and the attributes to store.

    ``key`` is 32 raw bytes, or a passphrase (``str``) stretched with scrypt and a
    random salt.  The attributes hold the salt, the store id and a key-check token,
    never the key.
    """
    salt = os.urandom(16)
    data_key = derive_key(key, salt)
    store_id = store_id or uuid.uuid4().hex
    nonce = os.urandom(_NONCE)
    check = nonce + AESGCM(data_key).encrypt(nonce, b"daskdl-key-check", _aad(store_id, ""))
    attrs = {"cipher": "AES-256-GCM", "kdf": "scrypt" if isinstance(key, str) else "raw",
             "salt": base64.b64encode(salt).decode(), "store_id": store_id,
             "check": base64.b64encode(check).decode()}
    return data_key, attrs


def derive_key(key, salt: bytes) -> bytes:
    """32 bytes from a raw key (used as is) or a passphrase (scrypt, n=2**14)."""
    if isinstance(key, str):
        if not key:
            raise ValueError("an empty passphrase cannot protect anything")
        return Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(key.encode())
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        return bytes(key)
    raise ValueError(
        "key must be 32 random bytes (e.g. os.urandom(32)) or a passphrase string, "
        f"got {type(key).__name__}{' of length ' + str(len(key)) if hasattr(key, '__len__') else ''}")


def open_key(key, attrs: dict, where: str) -> bytes:
    """The data key for an existing store, checked against its key-check token."""
    if key is None:
        raise DaskDLError(f"{where} is encrypted; pass key=... (the key or passphrase "
                          "used when it was written)")
    salt = base64.b64decode(attrs["salt"])
    data_key = derive_key(key, salt) if attrs.get("kdf") == "scrypt" or isinstance(key, str) \
        else derive_key(key, salt)
    blob = base64.b64decode(attrs["check"])
    try:
        AESGCM(data_key).decrypt(blob[:_NONCE], blob[_NONCE:], _aad(attrs["store_id"], ""))
    except InvalidTag:
        raise ChunkAuthenticationError(
            f"wrong key for {where}: it does not match the key the store was written with"
        ) from None
    return data_key


def _aad(store_id: str, key: str) -> bytes:
    return f"daskdl/{store_id}/{key}".encode()


def _is_chunk(key: str) -> bool:
    return not key.endswith(_META_SUFFIXES)


class EncryptedStore(WrapperStore):
    """A Zarr store whose chunks are sealed with AES-256-GCM (see the module docstring).

    Parameters
    ----------
    store : the Zarr v3 store to wrap (``LocalStore``, ``FsspecStore``, ...).
    data_key : 32 bytes, from :func:`new_encryption_attrs` or :func:`open_key`.
    store_id : the id recorded in the group's attributes; part of every chunk's
        associated data.
    """

    def __init__(self, store, data_key: bytes, store_id: str):
        super().__init__(store)
        self._data_key = data_key
        self._store_id = store_id
        self._aes = AESGCM(data_key)

    def _with_store(self, store):
        return type(self)(store, self._data_key, self._store_id)

    def __getstate__(self):
        return {"store": self._store, "key": self._data_key, "id": self._store_id}

    def __setstate__(self, state):
        self.__init__(state["store"], state["key"], state["id"])

    def __eq__(self, other):
        return (isinstance(other, EncryptedStore) and self._store == other._store
                and self._store_id == other._store_id)

    def __hash__(self):
        return hash((type(self), self._store_id))

    def __repr__(self):
        return f"EncryptedStore({self._store!r})"

    def _seal(self, key: str, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aes.encrypt(nonce, data, _aad(self._store_id, key))

    def _open_chunk(self, key: str, data) -> bytes:
        view = memoryview(data)  # no copies of the ciphertext
        try:
            return self._aes.decrypt(bytes(view[:_NONCE]), view[_NONCE:],
                                     _aad(self._store_id, key))
        except InvalidTag:
            array, _, chunk = key.partition("/c/") if "/c/" in key else key.rpartition("/")
            raise ChunkAuthenticationError(
                f"chunk {chunk or key!r} of array {array!r} failed authentication: wrong "
                f"key, or the chunk was changed or moved (store key {key!r})") from None

    async def get(self, key, prototype, byte_range=None):
        if not _is_chunk(key):
            return await self._store.get(key, prototype, byte_range)
        buf = await self._store.get(key, prototype, None)
        if buf is None:
            return None
        plain = self._open_chunk(key, buf.as_numpy_array())
        out = prototype.buffer.from_bytes(plain)
        if byte_range is None:
            return out
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

        if isinstance(byte_range, RangeByteRequest):
            return out[byte_range.start:byte_range.end]
        if isinstance(byte_range, OffsetByteRequest):
            return out[byte_range.offset:]
        if isinstance(byte_range, SuffixByteRequest):
            return out[len(plain) - byte_range.suffix:]
        raise TypeError(f"unsupported byte range {byte_range!r}")

    async def get_partial_values(self, prototype, key_ranges: Iterable):
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key, value):
        if _is_chunk(key):
            value = type(value).from_bytes(self._seal(key, value.to_bytes()))
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        if _is_chunk(key):
            value = type(value).from_bytes(self._seal(key, value.to_bytes()))
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values):
        for key, value in values:
            await self.set(key, value)

    @property
    def supports_partial_writes(self) -> bool:
        return False
