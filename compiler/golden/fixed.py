"""Integer arithmetic of the golden model (spec: docs/golden.md). numpy int64 only.

Number formats
- ``Q16``: int32 fixed point with 16 fractional bits (value = n / 2**16), saturating; the
  vector path: residual stream, norms, rope, softmax inputs, activations.
- ``MXINT``: blocks of 32 along the last axis, signed ``bits``-bit elements (int8 by default)
  with one shared power-of-two exponent per block: value = m * 2**(e - 16). The inputs of
  every matrix multiply (linear inputs, q, k, v).
- ``Q30``: probabilities, exponentials and sigmoids in [0, 1] with 30 fractional bits.

Rounding everywhere: round half up, i.e. ``(v + 2**(k-1)) >> k`` with an arithmetic shift.
"""
from __future__ import annotations

import math

import numpy as np

Q = 16                       # fractional bits of Q16
ONE = 1 << Q
Q30 = 30
ONE30 = 1 << Q30
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
ACC_BITS = 48                # stated accumulator width (signed); checked, never silently wrapped
MX_BLOCK = 32

# 2**-f for f in [0, 1): degree-5 least-squares polynomial, Q30 coefficients (max error 1.3e-7)
EXP2_POLY = (-1017037, 9885125, -59368625, 257885219, -744255587, 1073741694)
LOG2E_Q30 = 1549082005       # round(log2(e) * 2**30)


class OverflowInGolden(ArithmeticError):
    """A value left its stated width: a design limit was hit, never silently wrapped."""


def rshift_round(v: np.ndarray, k) -> np.ndarray:
    """round(v / 2**k), half up; ``k`` may be an array and may be negative (then a left shift)."""
    v = np.asarray(v, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    pos = np.maximum(k, 0)
    half = np.where(pos > 0, np.left_shift(np.int64(1), np.maximum(pos - 1, 0)), 0)
    right = np.right_shift(v + half, pos)
    return np.where(k >= 0, right, np.left_shift(v, np.maximum(-k, 0)))


def div_round(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """round(a / b) half up for b > 0 (floor division of a + b//2)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    return np.floor_divide(a + b // 2, b)


def saturate32(v: np.ndarray) -> np.ndarray:
    return np.clip(v, INT32_MIN, INT32_MAX).astype(np.int64)


def check_acc(v: np.ndarray, what: str, bits: int = ACC_BITS) -> np.ndarray:
    if v.size and int(np.max(np.abs(v))) >= (1 << (bits - 1)):
        raise OverflowInGolden(f"{what}: accumulator exceeds {bits} bits")
    return v


def bit_length(v: np.ndarray) -> np.ndarray:
    """Number of bits of |v| (0 for 0), exact for int64."""
    a = np.abs(np.asarray(v, np.int64))
    n = np.zeros(a.shape, np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = a >= (np.int64(1) << s)
        n += np.where(big, s, 0)
        a = np.where(big, a >> s, a)
    return n + (a > 0)


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) for int64 v >= 0, by Newton's method from a power-of-two start."""
    v = np.asarray(v, np.int64)
    x = np.left_shift(np.int64(1), (bit_length(v) + 1) // 2)   # >= sqrt(v)
    for _ in range(64):
        y = (x + v // np.maximum(x, 1)) >> 1
        if np.all(y >= x):
            break
        x = np.minimum(x, y)
    return np.where(v > 0, x, 0)


def exp_neg_q30(d: np.ndarray) -> np.ndarray:
    """exp(d) in Q30 for Q16 inputs d <= 0 (I-BERT style: exp(d) = 2**(d log2 e) = 2**-q * 2**-r)."""
    # exp(-64) < 2**-92 is 0 in Q30: clipping keeps -d*log2(e)*2**46 inside int64
    t = -np.maximum(np.asarray(d, np.int64), -64 * ONE) * LOG2E_Q30   # -d*log2(e) in Q46, >= 0
    q = t >> (Q + Q30)                                               # integer part
    r30 = rshift_round(t & ((np.int64(1) << (Q + Q30)) - 1), Q)      # fraction in Q30
    q = q + (r30 >> Q30)                                             # rounding carried into the integer
    r30 = r30 & (ONE30 - 1)
    acc = np.full(r30.shape, EXP2_POLY[0], np.int64)
    for c in EXP2_POLY[1:]:
        acc = (acc * r30 >> Q30) + c
    return np.where(q >= 62, 0, rshift_round(acc, np.minimum(q, 62)))


def sigmoid_q30(x: np.ndarray) -> np.ndarray:
    """sigmoid(x) in Q30 for Q16 x: 1 / (1 + exp(-|x|)), mirrored for x < 0."""
    x = np.asarray(x, np.int64)
    e = exp_neg_q30(-np.abs(x))                                      # exp(-|x|) in Q30
    pos = div_round(np.int64(1) << (2 * Q30), ONE30 + e)
    neg = div_round(e << Q30, ONE30 + e)
    return np.where(x >= 0, pos, neg)


def mul_q(a: np.ndarray, b: np.ndarray, frac: int) -> np.ndarray:
    """round(a * b / 2**frac)."""
    return rshift_round(np.asarray(a, np.int64) * np.asarray(b, np.int64), frac)


def to_fixed(x: np.ndarray, frac: int = Q) -> np.ndarray:
    """A float constant (weights' side data, tables) as fixed point; compile time only."""
    return np.round(np.asarray(x, np.float64) * (1 << frac)).astype(np.int64)


def multiplier(real: np.ndarray, mant_bits: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """real ~= M * 2**-n with M < 2**mant_bits (compile time: derives the integer constants)."""
    real = np.asarray(real, np.float64)
    m, e = np.frexp(real)                       # real = m * 2**e, 0.5 <= |m| < 1
    M = np.round(m * (1 << mant_bits)).astype(np.int64)
    n = (mant_bits - e).astype(np.int64)
    fix = np.abs(M) == (1 << mant_bits)         # rounding carried: renormalise
    M = np.where(fix, M // 2, M)
    n = np.where(fix, n - 1, n)
    return np.where(real == 0, 0, M), np.where(real == 0, 0, n)


def mx_quantize(x: np.ndarray, bits: int = 8, block: int = MX_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Q16 tensor -> (elements int64 [..., D], exponents int64 [..., D/block]).

    value = elem * 2**(exp - 16); exp = shift >= 0 chosen per block so that the rounded
    elements fit ``bits`` signed bits (qmax = 2**(bits-1) - 1, symmetric).
    """
    x = np.asarray(x, np.int64)
    d = x.shape[-1]
    if d % block:
        block = d if d < block else np.gcd(d, block)
    xb = x.reshape(*x.shape[:-1], d // block, block)
    qmax = (1 << (bits - 1)) - 1
    amax = np.max(np.abs(xb), axis=-1)
    shift = np.maximum(bit_length(amax) - (bits - 1), 0)
    # rounding may carry amax to 2**(bits-1): one more bit of shift then
    carry = rshift_round(amax, shift) > qmax
    shift = shift + carry
    elems = rshift_round(xb, shift[..., None])
    return elems.reshape(x.shape), shift


def mx_block(d: int, block: int = MX_BLOCK) -> int:
    return block if d % block == 0 else (d if d < block else int(np.gcd(d, block)))


EXACT_F64 = 1 << 53


def int_matmul(a: np.ndarray, b: np.ndarray, bmax: int | None = None,
               b_f64: np.ndarray | None = None) -> np.ndarray:
    """Exact integer ``a @ b`` for int64 operands.

    When max|a| * max|b| * K < 2**53 every product and partial sum is an integer that float64
    represents exactly, so a float64 GEMM returns the exact integer result whatever its
    summation order (identical on any IEEE-754 machine); otherwise int64 matmul is used. Both
    routes give the same integers (tests/test_golden.py checks it).
    """
    k = a.shape[-1]
    amax = int(np.max(np.abs(a))) if a.size else 0
    if bmax is None:
        bmax = int(np.max(np.abs(b))) if b.size else 0
    if amax * bmax * max(k, 1) < EXACT_F64:
        bf = (b_f64 if b_f64 is not None else b).astype(np.float64, copy=False)
        return np.matmul(a.astype(np.float64), bf).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def linear_unit(i_dim: int, group_size: int, block: int = MX_BLOCK) -> int:
    """The MXINT unit of a linear: the largest run of inputs that shares one activation block
    exponent and one weight group scale, ``gcd(mx_block(i_dim, block), group_size)`` -- the
    rule golden, the systolic array and the dataflow chip all cut a linear's inputs by."""
    return math.gcd(mx_block(i_dim, block), group_size)


def mx_units(x: np.ndarray, unit: int, bits: int = 8, block: int = MX_BLOCK):
    """MXINT elements of Q16 ``x`` [T, D], the block shift of each ``unit``-wide slice
    [T, D/unit] and each row's minimum shift [T]: the inputs every linear datapath takes."""
    elems, sh = mx_quantize(x, bits, block)
    blk = mx_block(x.shape[-1], block)
    units = np.arange(x.shape[-1] // unit) * unit
    su = sh[:, units // blk]
    return elems, su, su.min(axis=1)
