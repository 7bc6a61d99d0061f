"""daskdl.compression: bf16/int8 encoding of deltas, validation, error feedback."""

from __future__ import annotations

import doctest
import pickle

import ml_dtypes
import numpy as np
import pytest

from daskdl import compression
from daskdl.compression import (
    BLOCK,
    KINDS,
    Encoded,
    ErrorFeedback,
    check_encoded,
    check_kind,
    decode,
    decompress,
    encode,
    nbytes,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(), (0,), (0, 5), (1,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (3, 100, 7),
          (5 * BLOCK + 17,), (2, BLOCK)]


def _rand(shape, dtype, seed=0, spread=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if spread:  # magnitudes over many orders, so blocks have very different scales
        x = x * 10.0 ** rng.uniform(-6, 6, size=shape)
    return np.asarray(x).astype(dtype)


def _block_view(a: np.ndarray) -> np.ndarray:
    """a flattened and zero-padded to (nblocks, BLOCK), in float64."""
    flat = a.reshape(-1).astype(np.float64)
    nb = -(-flat.size // BLOCK)
    out = np.zeros(nb * BLOCK)
    out[: flat.size] = flat
    return out.reshape(nb, BLOCK)


# --------------------------------------------------------------------------- kinds

def test_kinds_and_check_kind():
    assert KINDS == (None, "bf16", "int8")
    assert BLOCK == 256
    for k in KINDS:
        assert check_kind(k) == k
    for bad in ("fp8", "BF16", "", 8, ["int8"], np.array(["int8"])):
        with pytest.raises(ValueError, match=r'compression=None \| "bf16" \| "int8"'):
            check_kind(bad)


def test_encode_rejects_bad_kind_and_non_floats():
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="no compression"):
        encode(x, None)
    with pytest.raises(ValueError, match="compression=None"):
        encode(x, "int4")
    for dt in (np.int8, np.int32, np.int64, np.uint16, bool, np.complex64):
        for kind in ("bf16", "int8"):
            with pytest.raises(TypeError, match="uncompressed"):
                encode(np.ones(3, dt), kind)


# --------------------------------------------------------------------------- bf16

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_roundtrip(shape, dtype):
    x = _rand(shape, dtype)
    e = encode(x, "bf16")
    assert e.kind == "bf16" and e.shape == shape and e.dtype == np.dtype(dtype).name
    assert e.data.dtype == np.uint16 and e.data.shape == (x.size,) and e.scales is None
    assert nbytes(e) == 2 * x.size
    check_encoded(e, shape, dtype)
    y = decode(e)
    assert y.dtype == dtype and y.shape == shape
    nz = x != 0
    assert np.all(np.abs(y - x)[nz] <= 2.0 ** -8 * np.abs(x)[nz])
    assert np.all(y[~nz] == 0)


def test_bf16_rounds_to_nearest_even():
    # ulp of bfloat16 at 1 is 2**-7: ties go to the even mantissa
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20,
                  1 + 2 ** -9], np.float32)
    want = [1.0, 1 + 2 ** -6, -1.0, 1 + 2 ** -7, 1.0]
    assert decode(encode(x, "bf16")).tolist() == want
    # float32 bits agree with ml_dtypes' cast (round to nearest even) everywhere
    r = _rand(10_000, np.float32, seed=3)
    assert np.array_equal(encode(r, "bf16").data, r.astype(BF16).view(np.uint16))


def test_bf16_float64_is_rounded_once():
    # via float32 this would round twice: 1 + 2**-8 + 2**-30 -> 1 + 2**-8 (tie) -> 1.0
    x = np.array([1 + 2 ** -8 + 2 ** -30, -(1 + 2 ** -8 + 2 ** -30)])
    assert decode(encode(x, "bf16")).tolist() == [1 + 2 ** -7, -(1 + 2 ** -7)]
    # and in general the result is a nearest bfloat16 of the float64 value
    r = _rand(20_000, np.float64, seed=4, spread=False)
    bits = encode(r, "bf16").data
    got = bits.view(BF16).astype(np.float64)
    up = (bits + 1).view(BF16).astype(np.float64)  # neighbours away from / towards 0
    down = (bits - 1).view(BF16).astype(np.float64)
    err = np.abs(got - r)
    assert np.all(err <= np.abs(up - r)) and np.all(err <= np.abs(down - r))


def test_bf16_keeps_nan_and_inf_and_16bit_inputs():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    y = decode(encode(x, "bf16"))
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf and y[3] == 0
    assert np.signbit(y[4])
    b = np.array([1.5, -2.25, 3.0], BF16)
    e = encode(b, "bf16")
    assert e.dtype == "bfloat16" and np.array_equal(e.data, b.view(np.uint16))
    assert decode(e).dtype == BF16 and np.array_equal(decode(e), b)
    h = np.array([1.0, 0.1, -3.0], np.float16)
    yh = decode(encode(h, "bf16"))
    assert yh.dtype == np.float16
    assert np.all(np.abs(yh - h) <= 2.0 ** -8 * np.abs(h) + 1e-3 * 2.0 ** -8)


# --------------------------------------------------------------------------- int8

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_roundtrip_error_within_half_a_scale(shape, dtype):
    x = _rand(shape, dtype)
    e = encode(x, "int8")
    n = x.size
    nb = -(-n // BLOCK)
    assert e.kind == "int8" and e.shape == shape and e.dtype == np.dtype(dtype).name
    assert e.data.dtype == np.int8 and e.data.shape == (n,)
    assert e.scales.dtype == np.float32 and e.scales.shape == (nb,)
    assert nbytes(e) == n + 4 * nb
    check_encoded(e, shape, dtype)
    assert np.all(np.abs(e.data.astype(int)) <= 127)
    # scale = max |x| / 127 per block
    xb = _block_view(x)
    np.testing.assert_allclose(e.scales, np.abs(xb).max(axis=1) / 127, rtol=1e-6)
    y = decode(e)
    assert y.dtype == dtype and y.shape == shape
    err = np.abs(_block_view(y) - xb)
    s = e.scales.astype(np.float64)[:, None]
    assert np.all(err <= s * (0.5 + 1e-5))


def test_int8_matches_a_plain_reference_over_many_chunks():
    # more blocks than the encoder works on at once, plus a tail
    x = _rand(3 * compression._ROWS * BLOCK + 1000, np.float32, seed=5)
    e = encode(x, "int8")
    xb = _block_view(x).astype(np.float32)
    s = np.abs(xb).max(axis=1) / np.float32(127)
    codes = np.clip(np.rint(xb / np.where(s == 0, 1, s)[:, None]), -127, 127)
    assert np.array_equal(e.scales, s)
    assert np.array_equal(e.data, codes.astype(np.int8).reshape(-1)[: x.size])
    assert np.array_equal(decode(e), (codes * s[:, None]).reshape(-1)[: x.size])


def test_int8_zero_blocks_and_extremes():
    x = np.zeros(3 * BLOCK, np.float32)
    x[BLOCK + 3] = -2.5
    x[2 * BLOCK:] = np.float32(3e38)  # near the float32 maximum
    e = encode(x, "int8")
    assert e.scales[0] == 0 and np.all(e.data[:BLOCK] == 0)
    y = decode(e)
    assert np.all(y[:BLOCK] == 0) and y[BLOCK + 3] == -2.5
    assert np.all(np.isfinite(y)) and np.allclose(y[2 * BLOCK:], 3e38, rtol=1e-6)
    # values whose scale underflows float32 still decode within half a scale
    tiny = np.array([1e-44, -3e-45, 0.0], np.float32)
    et = encode(tiny, "int8")
    assert et.scales[0] > 0
    assert np.all(np.abs(decode(et) - tiny) <= et.scales[0] / 2)
    t64 = np.array([1e-300, 2e-43, -1e-40])
    e64 = encode(t64, "int8")
    assert np.all(np.abs(decode(e64) - t64) <= float(e64.scales[0]) / 2 * (1 + 1e-6))


def test_int8_refuses_non_finite_and_too_large():
    x = np.ones(3 * BLOCK, np.float32)
    x[BLOCK + 7] = np.nan
    with pytest.raises(ValueError, match=r"block 1 .*NaN or infinity.*diverged"):
        encode(x, "int8")
    x[BLOCK + 7] = np.inf
    with pytest.raises(ValueError, match="block 1"):
        encode(x, "int8")
    with pytest.raises(ValueError, match="float32 range"):
        encode(np.array([1e300, 1.0]), "int8")


def test_int8_16bit_inputs_and_non_contiguous():
    for dt in (np.float16, BF16):
        x = _rand(1000, np.float32, spread=False).astype(dt)
        e = encode(x, "int8")
        assert e.dtype == np.dtype(dt).name
        y = decode(e)
        assert y.dtype == dt
        err = np.abs(_block_view(y) - _block_view(x))
        # plus the final rounding to the 16-bit dtype
        s = e.scales.astype(np.float64)[:, None]
        assert np.all(err <= s * 0.5 + np.abs(_block_view(x)) * 2.0 ** -7)
    a = _rand((300, 40), np.float32, seed=6)
    t = a.T  # not contiguous
    assert np.array_equal(decode(encode(t, "int8")), decode(encode(np.ascontiguousarray(t),
                                                                   "int8")))
    assert np.array_equal(decode(encode(t, "bf16")), t.astype(BF16).astype(np.float32))


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_encoded_does_not_share_memory_with_input(kind):
    for dt in (np.float32, BF16):
        x = np.linspace(-1, 1, 1000).astype(dt)
        e = encode(x, kind)
        before = decode(e).copy()
        x[:] = 7
        assert np.array_equal(decode(e), before)
        d = decode(e)
        d[:] = 0
        assert np.array_equal(decode(e), before)


# --------------------------------------------------------------------------- wire size

def test_ratios_and_pickle_size():
    x = _rand(1_000_000, np.float32, seed=7, spread=False)
    e8, e16 = encode(x, "int8"), encode(x, "bf16")
    assert 3.9 < x.nbytes / nbytes(e8) <= 4.0
    assert x.nbytes / nbytes(e16) == 2.0
    assert 7.8 < x.astype(np.float64).nbytes / nbytes(encode(x.astype(np.float64), "int8"))
    for e in (e8, e16, encode(np.float32(1.0), "int8"), encode(np.zeros(0, np.float32), "bf16")):
        blob = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
        assert len(blob) <= nbytes(e) + 400, (len(blob), nbytes(e))
        back = pickle.loads(blob)
        assert isinstance(back, Encoded)
        check_encoded(back, e.shape, e.dtype)
        assert np.array_equal(decode(back), decode(e))
    assert "nbytes=" in repr(e8) and len(repr(e8)) < 200


# --------------------------------------------------------------------------- check_encoded

def _good():
    return (encode(_rand((5, 100), np.float32, seed=8), "int8"),
            encode(_rand((5, 100), np.float32, seed=8), "bf16"))


def test_check_encoded_accepts_good_ones():
    e8, e16 = _good()
    for e in (e8, e16):
        check_encoded(e, (5, 100), np.float32)
        check_encoded(e, [5, 100], "float32")
        check_encoded(e, (np.int64(5), 100), np.dtype(np.float32))
    b = encode(np.ones(3, BF16), "int8")
    check_encoded(b, (3,), BF16)
    check_encoded(b, (3,), "bfloat16")


@pytest.mark.parametrize("mutate, match", [
    (lambda e: tuple(e), "expected a daskdl.compression.Encoded"),
    (lambda e: None, "expected a daskdl.compression.Encoded"),
    (lambda e: e._replace(kind="int4"), "kind"),
    (lambda e: e._replace(kind=None), "kind"),
    (lambda e: e._replace(kind="bf16"), "dtype uint16"),
    (lambda e: e._replace(shape=(100, 5)), r"shape is \(100, 5\) but \(5, 100\)"),
    (lambda e: e._replace(shape=(5, 101)), "needs 505"),
    (lambda e: e._replace(shape=[5, 100]), "tuple"),
    (lambda e: e._replace(shape=(5, -100)), "non-negative"),
    (lambda e: e._replace(shape=np.array([5, 100])), "tuple"),
    (lambda e: e._replace(dtype="float64"), "'float64' but 'float32'"),
    (lambda e: e._replace(dtype="object"), "Encoded.dtype"),
    (lambda e: e._replace(dtype=np.float32), "Encoded.dtype"),
    (lambda e: e._replace(data=e.data[:-1]), "truncated"),
    (lambda e: e._replace(data=e.data[:0]), "truncated"),
    (lambda e: e._replace(data=e.data.reshape(5, 100)), "1-d"),
    (lambda e: e._replace(data=e.data.astype(np.int16)), "dtype int8"),
    (lambda e: e._replace(data=e.data.astype(np.float32)), "dtype int8"),
    (lambda e: e._replace(data=e.data.view(np.uint8)), "dtype int8"),
    (lambda e: e._replace(data=e.data.tolist()), "numpy array"),
    (lambda e: e._replace(data=np.ma.masked_array(e.data)), "numpy array"),
    (lambda e: e._replace(scales=None), "scales"),
    (lambda e: e._replace(scales=e.scales[:-1]), "need 2 scales"),
    (lambda e: e._replace(scales=np.append(e.scales, np.float32(1))), "need 2 scales"),
    (lambda e: e._replace(scales=e.scales.astype(np.float64)), "float32"),
    (lambda e: e._replace(scales=e.scales.astype(">f4")), "float32"),
    (lambda e: e._replace(scales=np.array([np.nan, 1], np.float32)), "finite"),
    (lambda e: e._replace(scales=np.array([np.inf, 1], np.float32)), "finite"),
    (lambda e: e._replace(scales=np.array([-1, 1], np.float32)), ">= 0"),
])
def test_check_encoded_refuses_bad_int8(mutate, match):
    e8, _ = _good()
    bad = mutate(e8)
    with pytest.raises(ValueError, match=match) as excinfo:
        check_encoded(bad, (5, 100), np.float32)
    if "was expected" not in str(excinfo.value) and "but (5, 100)" not in match:
        with pytest.raises(ValueError):  # decode checks that it is self-consistent
            decode(bad)


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e._replace(kind="int8"), "dtype int8"),
    (lambda e: e._replace(data=e.data[1:]), "truncated"),
    (lambda e: e._replace(data=e.data.view(np.int16)), "dtype uint16"),
    (lambda e: e._replace(data=e.data.view(BF16)), "dtype uint16"),
    (lambda e: e._replace(data=e.data.byteswap().view(">u2")), "dtype uint16"),
    (lambda e: e._replace(scales=np.zeros(2, np.float32)), "None"),
])
def test_check_encoded_refuses_bad_bf16(mutate, match):
    _, e16 = _good()
    with pytest.raises(ValueError, match=match):
        check_encoded(mutate(e16), (5, 100), np.float32)


def test_check_encoded_expected_dtype_must_be_float():
    e8, _ = _good()
    with pytest.raises(ValueError, match="only float arrays"):
        check_encoded(e8, (5, 100), np.int32)
    with pytest.raises(ValueError, match="only float arrays"):
        check_encoded(e8, (5, 100), "not-a-dtype")


def test_huge_claimed_sizes_allocate_nothing():
    # a lying sender: sizes are compared with what arrived, never allocated
    for shape in [(10 ** 15,), (2 ** 40, 2 ** 40)]:
        bad8 = Encoded("int8", shape, "float32", np.zeros(3, np.int8), np.zeros(1, np.float32))
        bad16 = Encoded("bf16", shape, "float32", np.zeros(3, np.uint16), None)
        for bad in (bad8, bad16):
            with pytest.raises(ValueError):
                check_encoded(bad, (3,), np.float32)
            with pytest.raises(ValueError, match="truncated"):
                decode(bad)


# --------------------------------------------------------------------------- decompress

def test_decompress_decodes_encoded_and_passes_arrays_through():
    a = np.arange(5)
    b = _rand(300, np.float32)
    out = decompress([a, encode(b, "int8"), encode(b, "bf16"), b])
    assert out[0] is a and out[3] is b
    assert out[1].dtype == np.float32 and out[2].shape == (300,)
    assert decompress([]) == []


# --------------------------------------------------------------------------- error feedback

def test_error_feedback_tracks_the_sum_of_inputs():
    rng = np.random.default_rng(9)
    for kind in ("int8", "bf16"):
        ef = ErrorFeedback(kind)
        sum_in = np.zeros(1000)
        sum_out = np.zeros(1000)
        worst = 0.0
        for _ in range(200):
            x = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-3, 0, 1000)).astype(np.float32)
            (enc,) = ef.compress([x])
            y = decode(enc)
            sum_in += x
            sum_out += y
            # the residual is one step's quantisation error (of x + previous residual)
            r = np.abs(ef._residuals[0]).astype(np.float64)
            worst = max(worst, float(r.max()))
            if kind == "int8":
                assert np.all(r <= np.repeat(enc.scales, BLOCK)[:1000] * (0.5 + 1e-5))
            else:
                assert np.all(r <= np.abs(y).astype(np.float64) * 2.0 ** -8)
        # what was lost so far is exactly what is still held back
        np.testing.assert_allclose(sum_in - sum_out, ef._residuals[0], atol=1e-4)
        assert np.abs(sum_in - sum_out).max() <= worst + 1e-4
        assert np.abs(sum_in - sum_out).max() < 0.05


@pytest.mark.parametrize("kind, x, tiny", [
    # one large value makes the block's scale 1/127: 1e-3 rounds to 0 every time
    ("int8", np.r_[np.float32(1.0), np.full(BLOCK - 1, 1e-3, np.float32)], slice(1, None)),
    # 1 + 2**-10 rounds to 1 in bfloat16
    ("bf16", np.full(10, 1 + 2 ** -10, np.float32), slice(None)),
])
def test_error_feedback_recovers_what_plain_rounding_loses(kind, x, tiny):
    fb, plain = ErrorFeedback(kind), ErrorFeedback(kind, feedback=False)
    (e,) = plain.compress([x])
    one_step = np.abs(decode(e) - x).max()  # what plain rounding loses each step
    assert one_step > 0
    # the most one step can round away: half an int8 scale, half a bfloat16 ulp
    half_step = e.scales.max() / 2 if kind == "int8" else 2.0 ** -8 * np.abs(x).max()
    sum_in = np.zeros(x.shape)
    sum_fb = np.zeros(x.shape)
    sum_plain = np.zeros(x.shape)
    for step in range(1, 301):
        sum_in += x
        sum_fb += decompress(fb.compress([x]))[0]
        sum_plain += decompress(plain.compress([x]))[0]
        assert np.abs(sum_in - sum_fb).max() <= half_step * (1 + 1e-3)
    # without feedback the loss grows with every step
    assert np.abs(sum_in - sum_plain)[tiny].min() >= 299 * one_step
    assert np.abs(sum_in - sum_plain)[tiny].min() > 30 * half_step
    assert not plain._residuals


def test_error_feedback_pass_through_and_counters():
    ints = np.arange(10, dtype=np.int64)
    flag = np.array(True)
    x = np.ones((4, 256), np.float32)
    none = ErrorFeedback(None)
    assert none.ratio == 1.0
    out = none.compress([x, ints])
    assert out[0] is x and out[1] is ints
    assert none.raw_bytes == none.sent_bytes == x.nbytes + ints.nbytes and none.ratio == 1.0

    ef = ErrorFeedback("int8")
    assert ef.ratio == 1.0 and ef.sent_bytes == ef.raw_bytes == 0
    out = ef.compress([ints, x, flag])
    assert out[0] is ints and out[2] is flag and isinstance(out[1], Encoded)
    assert ef.raw_bytes == ints.nbytes + x.nbytes + flag.nbytes
    assert ef.sent_bytes == ints.nbytes + nbytes(out[1]) + flag.nbytes
    ef.compress([ints, x, flag])
    assert ef.raw_bytes == 2 * (ints.nbytes + x.nbytes + flag.nbytes)

    big = [_rand(100_000, np.float32, seed=1)]
    for kind, lo, hi in (("int8", 3.9, 4.0), ("bf16", 2.0, 2.0)):
        e = ErrorFeedback(kind)
        for _ in range(3):
            e.compress(big)
        assert lo <= e.ratio <= hi
    with pytest.raises(ValueError, match="compression="):
        ErrorFeedback("fp16")


def test_error_feedback_keeps_residuals_per_position_and_resets():
    x = np.r_[np.float32(1.0), np.full(BLOCK - 1, 1e-3, np.float32)]
    ef = ErrorFeedback("int8")
    ef.compress([x, x])
    r0 = ef._residuals[0].copy()
    assert np.abs(r0).max() > 0 and set(ef._residuals) == {0, 1}
    # a piece of another shape at position 1: its residual starts afresh
    other = np.full(BLOCK + 1, 1e-3, np.float32)
    (_, e1) = ef.compress([x, other])
    np.testing.assert_array_equal(decode(e1), decode(encode(other, "int8")))
    np.testing.assert_allclose(ef._residuals[0], 2 * r0, rtol=1e-5)
    # an int piece drops the residual of its position
    ef.compress([x, np.arange(3)])
    assert set(ef._residuals) == {0}
    ef.reset()
    assert not ef._residuals
    (e0,) = ef.compress([x])
    np.testing.assert_array_equal(decode(e0), decode(encode(x, "int8")))


def test_error_feedback_does_not_mutate_inputs_and_handles_16bit():
    x = _rand(1000, np.float32, seed=2)
    keep = x.copy()
    ef = ErrorFeedback("int8")
    for _ in range(3):
        ef.compress([x])
    assert np.array_equal(x, keep)
    for kind in ("int8", "bf16"):
        b = np.full(300, 1 + 2 ** -9, np.float32).astype(BF16)  # rounds to 1 in bf16
        b[0] = 4
        eb = ErrorFeedback(kind)
        total = np.zeros(300)
        for _ in range(64):
            (e,) = eb.compress([b])
            assert e.dtype == "bfloat16" and decode(e).dtype == BF16
            total += decode(e).astype(np.float64)
        want = 64 * b.astype(np.float64)
        assert np.abs(total - want).max() <= 0.05


def test_error_feedback_failure_resets_and_nan_does_not_stick():
    x = np.r_[np.float32(1.0), np.full(BLOCK - 1, 1e-3, np.float32)]
    ef = ErrorFeedback("int8")
    ef.compress([x, x])
    counts = (ef.raw_bytes, ef.sent_bytes)
    bad = x.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ef.compress([x, bad])
    # counters unchanged, residuals (partly updated) forgotten: a fresh start
    assert (ef.raw_bytes, ef.sent_bytes) == counts and not ef._residuals
    (e,) = ef.compress([x])
    np.testing.assert_array_equal(decode(e), decode(encode(x, "int8")))
    # bf16 sends NaN on, but does not carry it into the next step
    eb = ErrorFeedback("bf16")
    y = np.full(4, 1 + 2 ** -10, np.float32)
    (e,) = eb.compress([np.array([np.nan, np.inf, 3.4e38, 1], np.float32)])
    assert np.isnan(decode(e)[0]) and np.isinf(decode(e)[1])
    assert np.all(np.isfinite(eb._residuals[0]))
    (e,) = eb.compress([y])
    assert np.all(np.isfinite(decode(e)))


def test_module_docstring_examples():
    failed, tried = doctest.testmod(compression, optionflags=doctest.ELLIPSIS)
    assert tried > 5 and failed == 0


@pytest.mark.parametrize("kind", ["int8", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
def test_error_feedback_residual_is_exactly_what_decoding_lost(kind, dtype):
    # several chunks plus a partial block, two steps: r' = (x + r) - decode(enc)
    n = 2 * compression._ROWS * BLOCK + 300
    cdt = np.float64 if dtype == np.float64 else np.float32
    ef = ErrorFeedback(kind)
    r = np.zeros(n, cdt)
    buf = None
    for seed in (10, 11):
        x = _rand(n, np.float32, seed=seed, spread=False).astype(dtype)
        (e,) = ef.compress([x])
        if seed == 10:  # the first step is plain encoding
            np.testing.assert_array_equal(e.data, encode(x, kind).data)
            buf = ef._residuals[0]
        y = x.astype(cdt) + r
        want = y - decode(e).astype(cdt)
        assert e.dtype == np.dtype(dtype).name and decode(e).dtype == dtype
        assert ef._residuals[0].dtype == cdt
        np.testing.assert_array_equal(ef._residuals[0], want)
        assert ef._residuals[0] is buf  # updated in place, no new buffer per step
        r = want
