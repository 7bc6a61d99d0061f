"""Lossy compression of parameter deltas, with error feedback.

Workers exchange *deltas* (how far their parameters moved since the last
synchronisation).  Deltas tolerate a lot of rounding, so they can travel in far
fewer bytes than the float32 parameters themselves:

``"bf16"``
    Round each value to the nearest bfloat16 (ties to even): 8 significant
    bits, the same exponent range as float32.  Half the bytes of float32;
    relative error at most ``2**-8`` (below ``1.2e-38``, where bfloat16 is
    subnormal, absolute error at most ``2**-134`` instead).

``"int8"``
    Cut the flattened array into blocks of :data:`BLOCK` values; each block
    gets one float32 ``scale = max|x| / 127`` and each value becomes the int8
    code ``round(x / scale)``.  A quarter of the bytes of float32 (plus 4 bytes
    per block); the error of a value is at most half its block's scale.

Rounding errors add up over many steps, and with int8 a small value next to a
large one in the same block is rounded to zero *every* step, so its update is
lost for good.  **Error feedback** fixes both: the sender keeps what was lost
(the *residual* ``x + r - decode(encode(x + r))``) and adds it to the next
delta of the same leaf.  Nothing is lost, only delayed: the sum of everything
decoded tracks the sum of everything sent to within one step's rounding error.
:class:`ErrorFeedback` does this for a list of pieces (the leaves, or the
pieces of the leaves, a worker sends), :func:`decompress` undoes it on the
receiving side.

Only float arrays (float16, bfloat16, float32, float64) are compressed; integer
leaves (step counters, ...) must travel exactly, so :func:`encode` refuses them
and :class:`ErrorFeedback` passes them through.

An :class:`Encoded` received from another process is untrusted: check it with
:func:`check_encoded` against the shape and dtype you expect before decoding.

>>> import numpy as np
>>> from daskdl.compression import ErrorFeedback, decompress
>>> ef = ErrorFeedback("int8")
>>> delta = [np.linspace(-1, 1, 1000, dtype=np.float32), np.arange(3)]
>>> wire = ef.compress(delta)          # an Encoded and the int array itself
>>> received = decompress(wire)
>>> bool(np.abs(received[0] - delta[0]).max() <= 1 / 127 / 2 + 1e-7)
True
>>> round(ef.ratio, 1)                 # raw bytes / bytes on the wire
3.9

This module is pure numpy (plus ``ml_dtypes`` for bfloat16); it imports
neither Dask nor JAX.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import ml_dtypes
import numpy as np

__all__ = [
    "BLOCK",
    "KINDS",
    "Encoded",
    "ErrorFeedback",
    "check_encoded",
    "check_kind",
    "decode",
    "decompress",
    "encode",
    "nbytes",
]

KINDS = (None, "bf16", "int8")
"""The values ``compression=`` accepts: no compression, bfloat16, int8 blocks."""

BLOCK = 256
"""Number of consecutive values (of the flattened array) sharing one int8 scale."""

_BF16 = np.dtype(ml_dtypes.bfloat16)
_U16 = np.dtype(np.uint16)
_I8 = np.dtype(np.int8)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)

# float dtypes that can be compressed, by name (names travel in Encoded.dtype)
_FLOATS = {dt.name: dt for dt in (np.dtype(np.float16), _BF16, _F32, _F64)}

# int8 works on this many blocks at a time, so that its temporaries stay in cache
_ROWS = 1024


def check_kind(kind) -> str | None:
    """Return ``kind`` if it is a known compression, else raise ``ValueError``.

    Parameters
    ----------
    kind : None, "bf16" or "int8"

    Returns
    -------
    The kind itself (``None`` means no compression).

    Examples
    --------
    >>> check_kind("int8")
    'int8'
    >>> check_kind("fp8")
    Traceback (most recent call last):
    ...
    ValueError: unknown compression 'fp8'; use compression=None | "bf16" | "int8"
    """
    if kind is None:
        return None
    if isinstance(kind, str) and kind in KINDS:
        return str(kind)
    raise ValueError(f'unknown compression {kind!r}; use compression=None | "bf16" | "int8"')


class Encoded(NamedTuple):
    """A compressed float array, as it travels between processes.

    Plain numpy arrays and Python scalars only, so it pickles to little more
    than :func:`nbytes` and without copies beyond the usual one.

    Attributes
    ----------
    kind : str
        ``"bf16"`` or ``"int8"``.
    shape : tuple of int
        Shape of the original array.
    dtype : str
        Numpy dtype name of the original array (``"float32"``, ``"bfloat16"``, ...).
    data : numpy.ndarray
        1-d: the bfloat16 values viewed as ``uint16`` (bf16), or the int8 codes
        (int8), one per element of the flattened original.
    scales : numpy.ndarray or None
        1-d float32, one scale per block of :data:`BLOCK` values (int8);
        ``None`` for bf16.
    """

    kind: str
    shape: tuple
    dtype: str
    data: np.ndarray
    scales: np.ndarray | None

    def __repr__(self) -> str:
        try:
            size = f", nbytes={nbytes(self)}"
        except Exception:  # a malformed one: still printable
            size = ""
        return f"Encoded(kind={self.kind!r}, shape={self.shape!r}, dtype={self.dtype!r}{size})"


def _float_dtype(dtype) -> np.dtype | None:
    """The numpy dtype if it is one of the compressible float dtypes, else None."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        return None
    return _FLOATS.get(dt.name) if dt.isnative else None


def _compute_dtype(dt: np.dtype) -> np.dtype:
    """float64 stays float64; the 16-bit floats are worked on in float32."""
    return _F64 if dt == _F64 else _F32


def _nblocks(n: int) -> int:
    return -(-n // BLOCK)


def encode(x: np.ndarray, kind: str) -> Encoded:
    """Compress a float array.

    Parameters
    ----------
    x : numpy.ndarray
        float16, bfloat16, float32 or float64, any shape (0-d and empty too).
    kind : "bf16" or "int8"

    Returns
    -------
    Encoded
        Independent of ``x``: changing ``x`` later does not change it.

    Raises
    ------
    TypeError
        ``x`` is not a float array (integer leaves are sent uncompressed).
    ValueError
        Unknown ``kind``, or ``kind="int8"`` and ``x`` holds NaN or infinity
        (which int8 cannot represent).

    Examples
    --------
    >>> x = np.array([1.0, -0.5, 3.14159], dtype=np.float32)
    >>> decode(encode(x, "bf16"))
    array([ 1.      , -0.5     ,  3.140625], dtype=float32)
    >>> e = encode(x, "int8")
    >>> e.data, e.scales
    (array([ 40, -20, 127], dtype=int8), array([0.02473693], dtype=float32))
    """
    kind = check_kind(kind)
    if kind is None:
        raise ValueError("kind=None means no compression: send the array itself "
                         'instead of encoding it, or use kind="bf16" | "int8"')
    x = np.asarray(x)
    dt = _float_dtype(x.dtype)
    if dt is None:
        raise TypeError(
            f"only float arrays (float16, bfloat16, float32, float64) can be compressed, "
            f"got dtype {x.dtype}; send integer and other arrays uncompressed"
            + (" (or convert to a native float dtype first)" if x.dtype.kind == "f" else ""))
    return _encode(x, kind, dt)


def _encode(x: np.ndarray, kind: str, dt: np.dtype, resid: np.ndarray | None = None,
            add: bool = False) -> Encoded:
    """Encode ``x`` as an array of dtype ``dt``.

    With ``resid`` (1-d, the compute dtype, one value per element of ``x``): when
    ``add``, encode ``x + resid`` instead of ``x``; in any case overwrite
    ``resid`` with what the encoding lost, ``(x [+ resid]) - decode(result)``.
    Works through the array a chunk of ``_ROWS`` blocks at a time so that the
    temporaries stay in cache."""
    shape = tuple(int(s) for s in x.shape)
    flat = x.reshape(-1)
    if kind == "bf16" and resid is None:  # plain bf16: one cast does it
        bits = flat.view(_U16).copy() if flat.dtype == _BF16 else flat.astype(_BF16).view(_U16)
        return Encoded("bf16", shape, dt.name, bits, None)
    n = flat.size
    cdt = _compute_dtype(dt)
    chunk = min(_ROWS * BLOCK, _nblocks(n) * BLOCK)
    a = np.empty(chunk, cdt)  # the values to encode
    b = np.empty(chunk, cdt)  # quotients, then the decoded values
    if kind == "bf16":
        data = np.empty(n, _U16)
        scales = None
    else:
        data = np.empty(n, _I8)
        scales = np.empty(_nblocks(n), _F32)
    for start in range(0, n, chunk or 1):
        stop = min(start + chunk, n)
        m = stop - start
        if not add and flat.dtype == cdt and (kind == "bf16" or m % BLOCK == 0):
            ya = flat[start:stop]  # read in place
        else:
            ya = a[:m] if kind == "bf16" else a[: _nblocks(m) * BLOCK]
            ya[:m] = flat[start:stop]
            ya[m:] = 0  # pads the last block (zeros change no maximum)
            if add:
                ya[:m] += resid[start:stop]
        yb = b[: ya.size]
        if kind == "bf16":
            out = data[start:stop].view(_BF16)
            out[...] = ya  # rounds to nearest even
            if resid is not None:
                yb[...] = out if dt in (_BF16, cdt) else out.astype(dt)
        else:
            _quantise(ya.reshape(-1, BLOCK), yb.reshape(-1, BLOCK),
                      scales[start // BLOCK: start // BLOCK + _nblocks(m)], start // BLOCK)
            data[start:stop] = yb[:m]
            if resid is not None:  # decode exactly as decode() does
                yb = yb.reshape(-1, BLOCK)
                np.multiply(yb, scales[start // BLOCK: start // BLOCK + len(yb), None],
                            out=yb, dtype=cdt)
                yb = yb.reshape(-1)
                if dt != cdt:
                    yb[:m] = yb[:m].astype(dt)
        if resid is not None:
            r = resid[start:stop]
            with np.errstate(invalid="ignore", over="ignore"):  # bf16: inf - inf
                np.subtract(ya[:m], yb[:m], out=r)
            if kind == "bf16" and not (np.isfinite(r.max()) and np.isfinite(r.min())):
                r[~np.isfinite(r)] = 0  # NaN/overflow is sent on, but not carried forever
    return Encoded(kind, shape, dt.name, data, scales)


def _quantise(y: np.ndarray, q: np.ndarray, s_out: np.ndarray, first: int) -> None:
    """int8-quantise the rows (blocks) of ``y``: scales into ``s_out``, the
    (integral, float) codes into ``q``."""
    cdt = y.dtype
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        m = np.maximum(y.max(axis=1), -y.min(axis=1))  # max |y|; NaN stays NaN
        s = m / 127
        s32 = s.astype(_F32)
    if not np.isfinite(s32).all():
        bad = first + int(np.flatnonzero(~np.isfinite(s32))[0])
        raise ValueError(
            f"cannot int8-compress: block {bad} (elements {bad * BLOCK} to "
            f"{(bad + 1) * BLOCK - 1} of the flattened array) holds NaN or infinity"
            + (" or values beyond the float32 range" if cdt == _F64 else "")
            + '. Non-finite deltas usually mean training diverged; otherwise send this '
              'array uncompressed or use compression="bf16".')
    # never let the stored scale be smaller than max|y|/127, so that every code
    # fits in [-127, 127] and the error stays <= scale/2 (float64 rounding down
    # to float32, tiny maxima underflowing to 0)
    low = (s32 < s) | ((s32 == 0) & (m > 0))
    if low.any():
        s32[low] = np.nextafter(s32[low], np.float32(np.inf))
    s_out[...] = s32
    div = s32.astype(cdt)
    div[div == 0] = 1  # all-zero blocks: codes 0
    np.divide(y, div[:, None], out=q)
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)


def decode(enc: Encoded) -> np.ndarray:
    """Decompress an :class:`Encoded` back to its original dtype and shape.

    ``enc`` is checked for consistency with itself first (so a malformed one
    raises ``ValueError`` rather than decoding garbage); to also check that it is
    what you expect, call :func:`check_encoded` with the expected shape and dtype.

    Returns
    -------
    numpy.ndarray
        A new array of dtype ``enc.dtype`` and shape ``enc.shape``.

    Examples
    --------
    >>> x = np.array([[0.0, 1.5, -127.0], [0.25, 3.0, 0.4]])
    >>> decode(encode(x, "int8"))       # scale 1.0: the nearest integers
    array([[   0.,    2., -127.],
           [   0.,    3.,    0.]])
    """
    _check_structure(enc)
    dt = _FLOATS[enc.dtype]
    if enc.kind == "bf16":
        return enc.data.view(_BF16).astype(dt).reshape(enc.shape)
    return _int8_decode(enc.data, enc.scales, dt).reshape(enc.shape)


def _int8_decode(codes: np.ndarray, scales: np.ndarray, dt: np.dtype) -> np.ndarray:
    n = codes.size
    nfull = n // BLOCK
    cdt = _compute_dtype(dt)
    out = np.empty(n, dt)
    full = codes[: nfull * BLOCK].reshape(nfull, BLOCK)
    ofull = out[: nfull * BLOCK].reshape(nfull, BLOCK)
    sfull = scales[:nfull, None]
    if dt == cdt:  # float32 / float64: straight into the output
        np.multiply(full, sfull, out=ofull, dtype=cdt)
    else:  # 16-bit floats: via a float32 buffer, a chunk at a time
        tmp = np.empty((min(_ROWS, max(nfull, 1)), BLOCK), cdt)
        for i in range(0, nfull, _ROWS):
            t = tmp[: len(full[i:i + _ROWS])]
            np.multiply(full[i:i + _ROWS], sfull[i:i + _ROWS], out=t, dtype=cdt)
            ofull[i:i + _ROWS] = t
    if nfull * BLOCK < n:
        out[nfull * BLOCK:] = np.multiply(codes[nfull * BLOCK:], scales[nfull], dtype=cdt)
    return out


def nbytes(enc: Encoded) -> int:
    """Bytes of an :class:`Encoded` on the wire: data plus scales.

    Examples
    --------
    >>> x = np.zeros(1000, np.float32)             # 4000 bytes
    >>> nbytes(encode(x, "bf16")), nbytes(encode(x, "int8"))
    (2000, 1016)
    """
    return int(enc.data.nbytes) + (0 if enc.scales is None else int(enc.scales.nbytes))


def _shape_tuple(shape, what: str) -> tuple:
    if not isinstance(shape, tuple) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0
            for s in shape):
        raise ValueError(f"{what} must be a tuple of non-negative ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _check_structure(enc) -> None:
    """ValueError unless ``enc`` is an Encoded whose parts fit its own kind,
    shape and dtype.  Sizes are only compared, never used to allocate."""
    if not isinstance(enc, Encoded):
        raise ValueError(f"expected a daskdl.compression.Encoded, got {type(enc).__name__}")
    if not (isinstance(enc.kind, str) and enc.kind in ("bf16", "int8")):
        raise ValueError(f'Encoded.kind is {enc.kind!r}; it must be "bf16" or "int8" '
                         "(sender and receiver may run different daskdl versions)")
    shape = _shape_tuple(enc.shape, "Encoded.shape")
    if not (isinstance(enc.dtype, str) and enc.dtype in _FLOATS):
        raise ValueError(f"Encoded.dtype is {enc.dtype!r}; it must be one of {sorted(_FLOATS)}")
    n = math.prod(shape)
    data, scales = enc.data, enc.scales
    want = _U16 if enc.kind == "bf16" else _I8
    if type(data) is not np.ndarray:
        raise ValueError(f"Encoded.data must be a numpy array, got {type(data).__name__}")
    if data.dtype != want:
        raise ValueError(f"Encoded.data of kind {enc.kind!r} must have dtype {want} "
                         f"(native byte order), got {data.dtype.str!r}")
    if data.ndim != 1 or data.size != n:
        raise ValueError(f"Encoded.data has shape {data.shape} but shape {shape} needs "
                         f"{n} {want} values in a 1-d array (truncated or corrupted message?)")
    if enc.kind == "bf16":
        if scales is not None:
            raise ValueError("Encoded.scales must be None for kind 'bf16', got "
                             f"{type(scales).__name__}")
        return
    nb = _nblocks(n)
    if type(scales) is not np.ndarray:
        raise ValueError("Encoded.scales of kind 'int8' must be a numpy array, got "
                         f"{type(scales).__name__}")
    if scales.dtype != _F32:
        raise ValueError("Encoded.scales must have dtype float32 (native byte order), got "
                         f"{scales.dtype.str!r}")
    if scales.ndim != 1 or scales.size != nb:
        raise ValueError(f"Encoded.scales has shape {scales.shape} but {n} values need "
                         f"{nb} scales (one per {BLOCK}) in a 1-d array")
    if nb and not (np.isfinite(scales).all() and scales.min() >= 0):
        raise ValueError("Encoded.scales must be finite and >= 0; got NaN, infinite or "
                         "negative scales (corrupted message?)")


def check_encoded(enc, shape, dtype) -> None:
    """Check an :class:`Encoded` received from another process before decoding it.

    Parameters
    ----------
    enc
        What was received.
    shape : tuple of int
        The shape the decoded array must have.
    dtype : numpy dtype or its name
        The dtype the decoded array must have (a float dtype).

    Raises
    ------
    ValueError
        Naming what is wrong: not an Encoded, unknown kind, other shape or
        dtype than expected, ``data`` or ``scales`` of the wrong dtype or size
        (truncated), NaN, infinite or negative scales.  Nothing is allocated
        from the sizes in ``enc``.

    Examples
    --------
    >>> e = encode(np.ones((4, 3), np.float32), "int8")
    >>> check_encoded(e, (4, 3), np.float32)
    >>> check_encoded(e, (3, 4), "float32")
    Traceback (most recent call last):
    ...
    ValueError: Encoded.shape is (4, 3) but (3, 4) was expected
    """
    expected = _shape_tuple(tuple(shape), "the expected shape")
    want = _float_dtype(dtype)
    if want is None:
        raise ValueError(f"an Encoded was received for an array of dtype {dtype}, but only "
                         f"float arrays {sorted(_FLOATS)} are ever compressed")
    _check_structure(enc)  # types first, so that the comparisons below are safe
    if enc.shape != expected:
        raise ValueError(f"Encoded.shape is {enc.shape!r} but {expected} was expected")
    if enc.dtype != want.name:
        raise ValueError(f"Encoded.dtype is {enc.dtype!r} but {want.name!r} was expected")


def decompress(items: Sequence) -> list[np.ndarray]:
    """Decode the :class:`Encoded` items of a list; other items are passed through.

    The inverse of :meth:`ErrorFeedback.compress`.  Check untrusted items with
    :func:`check_encoded` first.

    Examples
    --------
    >>> out = decompress([encode(np.full(3, 0.5), "bf16"), np.arange(2)])
    >>> out[0], out[1]
    (array([0.5, 0.5, 0.5]), array([0, 1]))
    """
    return [decode(it) if isinstance(it, Encoded) else it for it in items]


class ErrorFeedback:
    """Compress lists of pieces step after step, carrying rounding errors over.

    For each float piece, the residual kept from the previous call *at the same
    position* is added before encoding, and what the encoding loses becomes the
    new residual.  So nothing is lost in the long run: the sum of the decoded
    outputs over many calls stays within one step's rounding error of the sum
    of the inputs.

    Parameters
    ----------
    kind : None, "bf16" or "int8"
        ``None`` passes everything through (and counts the bytes).
    feedback : bool
        ``False`` keeps no residual: plain compression, each call on its own.

    Attributes
    ----------
    sent_bytes : int
        Bytes of all outputs so far (:func:`nbytes` of each Encoded, ``nbytes``
        of the pieces passed through).
    raw_bytes : int
        Bytes of all inputs so far.

    Notes
    -----
    A residual is reset when the piece at its position changes shape or
    dtype, or stops being a float array.  Residuals are kept in float32
    (float64 for float64 pieces), one buffer per position, updated in place.
    If a call raises (int8 and a non-finite piece), the counters stay as they
    were and all residuals are forgotten (they may be partly updated), which
    loses at most one step's rounding error.

    Examples
    --------
    A small value in the same int8 block as a large one rounds to 0 each step;
    with error feedback it still arrives, a step at a time:

    >>> x = np.zeros(256, np.float32); x[0] = 1.0; x[1] = 0.001
    >>> ef = ErrorFeedback("int8")
    >>> total = sum(decompress(ef.compress([x]))[0] for _ in range(100))
    >>> round(float(total[1]), 3)                # 100 * 0.001
    0.102
    >>> plain = ErrorFeedback("int8", feedback=False)
    >>> float(sum(decompress(plain.compress([x]))[0] for _ in range(100))[1])
    0.0
    """

    def __init__(self, kind, feedback: bool = True):
        self.kind = check_kind(kind)
        self.feedback = bool(feedback)
        self._residuals: dict[int, np.ndarray] = {}
        self.sent_bytes = 0
        self.raw_bytes = 0

    def __repr__(self) -> str:
        return (f"ErrorFeedback({self.kind!r}, feedback={self.feedback}, "
                f"sent_bytes={self.sent_bytes}, ratio={self.ratio:.2f})")

    @property
    def ratio(self) -> float:
        """``raw_bytes / sent_bytes``; 1.0 before anything was sent."""
        return self.raw_bytes / self.sent_bytes if self.sent_bytes else 1.0

    def reset(self) -> None:
        """Forget the residuals (e.g. when the parameters were replaced)."""
        self._residuals = {}

    def compress(self, pieces: Sequence[np.ndarray]) -> list:
        """Encode the float pieces, adding and updating the residuals.

        Parameters
        ----------
        pieces : list of numpy.ndarray
            The same positions are expected to hold the same leaves from call
            to call.

        Returns
        -------
        list
            One item per piece: an :class:`Encoded` for float pieces, the piece
            itself for the others (and for every piece when ``kind`` is None).
        """
        out: list = []
        new: dict[int, np.ndarray] = {}
        raw = sent = 0
        try:
            for i, piece in enumerate(pieces):
                x = np.asarray(piece)
                raw += x.nbytes
                dt = _float_dtype(x.dtype) if self.kind is not None else None
                if dt is None:
                    out.append(piece)
                    sent += x.nbytes
                    continue
                if self.feedback:
                    # the residual is updated in place: no new buffer each step
                    cdt = _compute_dtype(dt)
                    r = self._residuals.get(i)
                    add = r is not None and r.shape == x.shape and r.dtype == cdt
                    if not add:
                        r = np.empty(x.shape, cdt)
                    enc = _encode(x, self.kind, dt, r.reshape(-1), add)
                    new[i] = r
                else:
                    enc = _encode(x, self.kind, dt)
                out.append(enc)
                sent += nbytes(enc)
        except BaseException:
            self._residuals = {}  # partly updated: forget them (a step's rounding at most)
            raise
        if self.feedback:
            self._residuals = new
        self.raw_bytes += raw
        self.sent_bytes += sent
        return out
