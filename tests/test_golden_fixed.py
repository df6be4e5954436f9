"""Property tests of the golden model's integer primitives against exact rational arithmetic."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.compiler.golden import fixed as fx

ints = st.integers(min_value=-(1 << 40), max_value=1 << 40)


def round_half_up(fr: Fraction) -> int:
    return math.floor(fr + Fraction(1, 2))


@given(ints, st.integers(min_value=-8, max_value=40))
def test_rshift_round_is_round_half_up(v, k):
    got = int(fx.rshift_round(np.array([v]), k)[0])
    assert got == round_half_up(Fraction(v, 1 << k) if k >= 0 else Fraction(v * (1 << -k)))


@given(st.integers(min_value=-(1 << 50), max_value=1 << 50), st.integers(min_value=1, max_value=1 << 30))
def test_div_round(a, b):
    assert int(fx.div_round(np.array([a]), np.array([b]))[0]) == round_half_up(Fraction(a, b))


@given(st.integers(min_value=0, max_value=(1 << 62)))
def test_isqrt_matches_math_isqrt(v):
    assert int(fx.isqrt(np.array([v]))[0]) == math.isqrt(v)


@given(st.integers(min_value=-(1 << 62), max_value=1 << 62))
def test_bit_length(v):
    assert int(fx.bit_length(np.array([v]))[0]) == abs(v).bit_length()


def test_exp_and_sigmoid_accuracy():
    d = np.arange(-20 * fx.ONE, 1, 97, dtype=np.int64)          # Q16 in [-20, 0]
    e = fx.exp_neg_q30(d) / 2.0**30
    err = np.max(np.abs(e - np.exp(d / 2.0**16)))
    assert err < 4e-7, err
    x = np.arange(-30 * fx.ONE, 30 * fx.ONE, 1013, dtype=np.int64)
    s = fx.sigmoid_q30(x) / 2.0**30
    assert np.max(np.abs(s - 1 / (1 + np.exp(-x / 2.0**16)))) < 4e-7
    assert len(x) > 3000 and len(d) > 10000


@settings(max_examples=60)
@given(st.lists(st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1), min_size=32, max_size=32),
       st.sampled_from([4, 6, 8]))
def test_mx_quantize_fits_and_bounds_error(vals, bits):
    x = np.array(vals, np.int64)
    e, s = fx.mx_quantize(x, bits)
    qmax = (1 << (bits - 1)) - 1
    assert np.all(np.abs(e) <= qmax)
    recon = e << s[0]
    assert np.all(np.abs(recon - x) <= (1 << s[0]) // 2 if s[0] > 0 else recon == x)
    # the shift is the smallest that fits: one less would overflow the element width
    if s[0] > 0:
        assert np.max(np.abs(fx.rshift_round(x, s[0] - 1))) > qmax


def test_multiplier_represents_the_real_value():
    real = np.array([1e-6, 0.01, 0.3333, 1.0, 7.5, 1234.5])
    m, n = fx.multiplier(real)
    assert np.all(np.abs(m) < (1 << 15)) and np.all(np.abs(m) >= (1 << 14))
    assert np.allclose(m * 2.0 ** -n.astype(np.float64), real, rtol=2 ** -14)


def test_int_matmul_float_route_equals_int64_route():
    rng = np.random.default_rng(0)
    checked = 0
    for shift in (0, 10, 20):
        a = rng.integers(-127, 128, (7, 300)) << rng.integers(0, shift + 1, (7, 300))
        b = rng.integers(-255 * 127, 255 * 127, (300, 11))
        exact = np.matmul(a.astype(object), b.astype(object)).astype(np.int64)
        assert np.array_equal(fx.int_matmul(a, b), exact)
        assert np.array_equal(np.matmul(a, b), exact)
        checked += exact.size
    # beyond the exactness bound the int64 route is taken and is still exact
    big = np.full((2, 4), 1 << 40, np.int64)
    assert np.array_equal(fx.int_matmul(big, np.full((4, 2), 1 << 12, np.int64)),
                          np.full((2, 2), 4 << 52, np.int64))
    assert checked == 3 * 7 * 11
