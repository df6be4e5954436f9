"""Golden's kernels against references written from docs/golden.md in plain Python integers.

Golden is the oracle for every backend, so nothing else in the suite can catch a change in
its own arithmetic: the vector unit (backends/vector.py) is checked *against* golden. Here the
expected values come from docs/golden.md alone -- Python's unbounded ints, no numpy, nothing
imported from golden but the function under test and the documented constants -- plus a few
literal values worked out by hand from the spec.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden import model as gmod

# --- the spec, in plain integers (docs/golden.md) ---------------------------------------------
POLY = (-1017037, 9885125, -59368625, 257885219, -744255587, 1073741694)   # docs: Constants
LOG2E = 1549082005
C1, C2 = 48028112, 1713444339
MASKED = -(1 << 40)


def r_shift(v: int, k: int) -> int:              # round half up, arithmetic shift
    return (v + (1 << (k - 1))) >> k if k > 0 else v << -k


def r_div(a: int, b: int) -> int:
    return (a + b // 2) // b


def r_isqrt(v: int) -> int:
    return math.isqrt(v) if v > 0 else 0


def r_exp(d: int) -> int:                        # exp(d / 2^16) in Q30, d <= 0
    t = -max(d, -64 << 16) * LOG2E               # Q46
    q, frac = t >> 46, t & ((1 << 46) - 1)
    r = r_shift(frac, 16)
    q, r = q + (r >> 30), r & ((1 << 30) - 1)
    acc = POLY[0]
    for c in POLY[1:]:
        acc = (acc * r >> 30) + c                # truncating product (the documented rule)
    return 0 if q >= 62 else r_shift(acc, q)


def r_sigmoid(x: int) -> int:
    e = r_exp(-abs(x))
    return r_div(1 << 60, (1 << 30) + e) if x >= 0 else r_div(e << 30, (1 << 30) + e)


def r_mx(xs: list[int], bits: int = 8) -> tuple[list[int], int]:
    qmax = (1 << (bits - 1)) - 1
    amax = max(abs(v) for v in xs)
    e = 0
    while r_shift(amax, e) > qmax:               # least e >= 0 whose rounded max fits
        e += 1
    return [r_shift(v, e) for v in xs], e


def sat(v: int) -> int:
    return max(-(1 << 31), min((1 << 31) - 1, v))


def r_mulq(a: int, b: int, f: int) -> int:
    return r_shift(a * b, f)


def r_rmsnorm(x: list[int], g: list[int], eps: float) -> list[int]:
    k = max(max(abs(v) for v in x).bit_length() - 15, 0)
    xs = [r_shift(v, k) for v in x]
    ms = r_div(sum(v * v for v in xs), len(xs))
    eps_q = r_shift(round(eps * 2.0 ** 60), 28 + 2 * k)
    r = max(r_isqrt((ms + eps_q) << 16), 1)
    return [sat(r_mulq(r_div(v << 24, r), gi, 16)) for v, gi in zip(xs, g)]


def r_softmax(z: list[int]) -> list[int]:
    valid = [v > MASKED // 2 for v in z]
    if not any(valid):
        return [0] * len(z)
    m = max(v for v, ok in zip(z, valid) if ok)
    e = [r_exp(v - m) if ok else 0 for v, ok in zip(z, valid)]
    tot = sum(e)
    return [r_div(v << 15, tot) for v in e]


def r_silu(x: int) -> int:
    return sat(r_mulq(x, r_sigmoid(x), 30))


def r_gelu(x: int) -> int:
    xc = max(-16 << 16, min(16 << 16, x))
    x3 = r_mulq(r_mulq(xc, xc, 16), xc, 16)
    inner = r_mulq(xc + r_mulq(x3, C1, 30), C2, 30)
    return sat(r_mulq(x, r_sigmoid(inner), 30))


Q16 = st.integers(-(1 << 31), (1 << 31) - 1)
SMALL = st.integers(-(40 << 16), 40 << 16)


# --- literal values worked out by hand ---------------------------------------------------------
def test_pinned_literals():
    # exp(0): r = 0, so Horner returns the constant coefficient, q = 0
    assert int(fx.exp_neg_q30(np.int64(0))) == 1073741694
    # exp(-64) and below: 0 (q >= 62)
    assert int(fx.exp_neg_q30(np.int64(-64 << 16))) == 0
    assert int(fx.exp_neg_q30(np.int64(-(1 << 31)))) == 0
    # sigmoid(0) = round(2^60 / (2^30 + 1073741694)): 2^60 / 2147483518 = 536870944.500002
    assert int(fx.sigmoid_q30(np.int64(0))) == 536870945 == r_div(1 << 60, (1 << 30) + 1073741694)
    # half up: 5 >> 1 -> 3, -5 >> 1 -> -2, 3 >> 1 -> 2, -3 >> 1 -> -1
    assert fx.rshift_round(np.array([5, -5, 3, -3]), 1).tolist() == [3, -2, 2, -1]
    assert fx.div_round(np.array([7, -7, 5, -5]), np.array([2, 2, 10, 10])).tolist() == [4, -3, 1, 0]
    # MXINT: max 255 rounds to 128 at e = 1 (> 127), so e = 2; -255 / 4 = -63.75 -> -64
    e, s = fx.mx_quantize(np.array([[255, -255] + [0] * 30]))
    assert s.tolist() == [[2]] and e[0, :2].tolist() == [64, -64]
    # an all-equal score row: each of 4 gets 2^15 / 4
    assert gmod.softmax_q15(np.array([[7, 7, 7, 7]])).tolist() == [[8192] * 4]
    # a fully masked row is all 0; masked entries get 0
    assert gmod.softmax_q15(np.array([[MASKED, MASKED]])).tolist() == [[0, 0]]
    assert gmod.softmax_q15(np.array([[MASKED, 5]])).tolist() == [[0, 32768]]
    # multiplier: 0.75 = 24576 * 2^-15; 1.0 carries to 32768 -> 16384 * 2^-14
    M, n = fx.multiplier(np.array([0.75, 1.0, 0.0]))
    assert M.tolist() == [24576, 16384, 0] and n.tolist() == [15, 14, 0]


# --- primitives against the plain-integer spec -------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(-(1 << 50), 1 << 50), st.integers(-8, 40))
def test_rshift_round(v, k):
    assert int(fx.rshift_round(np.int64(v), k)) == r_shift(v, k)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 62) - 1))
def test_isqrt_is_floor_sqrt(v):
    assert int(fx.isqrt(np.array([v]))[0]) == r_isqrt(v)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(80 << 16), 0), min_size=1, max_size=16))
def test_exp(ds):
    assert fx.exp_neg_q30(np.array(ds)).tolist() == [r_exp(d) for d in ds]


@settings(max_examples=300, deadline=None)
@given(st.lists(Q16, min_size=1, max_size=16))
def test_sigmoid_silu_gelu(xs):
    a = np.array(xs)
    assert fx.sigmoid_q30(a).tolist() == [r_sigmoid(x) for x in xs]
    op = SimpleNamespace(attr=lambda n, d=None: d)
    assert gmod.k_silu(None, op, a).tolist() == [r_silu(x) for x in xs]
    assert gmod.k_gelu(None, op, a).tolist() == [r_gelu(x) for x in xs]


@settings(max_examples=200, deadline=None)
@given(st.lists(Q16, min_size=32, max_size=32), st.integers(4, 16))
def test_mx_quantize(xs, bits):
    elems, sh = fx.mx_quantize(np.array([xs]), bits)
    ref_e, ref_s = r_mx(xs, bits)
    assert int(sh[0, 0]) == ref_s and elems[0].tolist() == ref_e
    assert min(elems[0]) > -(1 << (bits - 1))          # symmetric: -2^(bits-1) never produced


@settings(max_examples=150, deadline=None)
@given(st.lists(SMALL, min_size=2, max_size=24), st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rmsnorm(xs, eps):
    g = [((i * 7919) % 131072) - 30000 for i in range(len(xs))]
    op = SimpleNamespace(attr=lambda n, d=None: eps if n == "eps" else d)
    got = gmod.k_rmsnorm(None, op, np.array([xs]), np.array(g))
    assert got[0].tolist() == r_rmsnorm(xs, g, eps)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(SMALL, st.just(MASKED)), min_size=1, max_size=24))
def test_softmax(z):
    assert gmod.softmax_q15(np.array([z]))[0].tolist() == r_softmax(z)


@settings(max_examples=100, deadline=None)
@given(st.lists(SMALL, min_size=8, max_size=8), st.integers(-(1 << 16), 1 << 16))
def test_rope_half_split(xs, c):
    s = (1 << 16) - abs(c)
    cos, sin = np.full((1, 1, 4), c), np.full((1, 1, 4), s)
    op = SimpleNamespace(attr=lambda n, d=None: d)
    got = gmod.k_rope(None, op, np.array(xs).reshape(1, 1, 1, 8), cos, sin).reshape(-1).tolist()
    rot = [-v for v in xs[4:]] + xs[:4]
    assert got == [sat(r_shift(x * c + r * s, 16)) for x, r in zip(xs, rot)]


def test_linear_int_against_spec():
    """One linear, worked from the formula in docs/golden.md (two blocks, two groups)."""
    rng = np.random.default_rng(3)
    T, I, O = 3, 64, 5
    x = rng.integers(-(6 << 16), 6 << 16, (T, I))
    x[1, 32:] //= 1000                                  # two blocks with different shifts
    codes = rng.integers(-4, 4, (O, I))
    G = rng.integers(1, 9, (O, 2))                      # group size 32
    M = rng.integers(1 << 13, 1 << 15, O)
    n = rng.integers(18, 24, O)
    L = SimpleNamespace(codes=codes, group_size=32, mult=M, shift=n, bias=None)
    scaled = (codes * np.repeat(G, 32, axis=1)).T
    L.scaled_t, L.scaled_max = scaled, int(np.abs(scaled).max())
    gm = SimpleNamespace(config=SimpleNamespace(block=32, act_bits=8))
    got = gmod.linear_int(gm, L, x, "t")
    for t in range(T):
        blocks = [r_mx([int(v) for v in x[t, b * 32:(b + 1) * 32]]) for b in range(2)]
        emin = min(e for _, e in blocks)
        for o in range(O):
            acc = sum(m * (1 << (e - emin)) * int(codes[o, b * 32 + i]) * int(G[o, b])
                      for b, (ms, e) in enumerate(blocks) for i, m in enumerate(ms))
            want = sat(r_shift(acc * int(M[o]), int(n[o]) - emin))
            assert int(got[t, o]) == want, (t, o)
    assert got.size == T * O == 15
