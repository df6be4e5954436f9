"""The vector unit of the ISA and dataflow simulators: the integer semantics of their vector
instructions, written from the number formats and kernels of docs/golden.md.

It shares no code with the golden model (``compiler/golden``): the simulators compute with
this module, golden with its own, and every compile compares the two bit for bit. A change to
either that departs from the documented semantics therefore fails the compile's check (and
the tests), instead of passing silently because both sides called the same function.

Conventions (docs/golden.md, "Number formats"): Q16 values are int64 arrays of int32 range,
every right shift rounds half up (towards +inf), a division ``a / b`` rounds as
``floor((a + floor(b / 2)) / b)``, Q16 results saturate to int32.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["VectorOverflow", "round_shift", "round_div", "clamp32", "bits_of", "floor_sqrt", "exact_matmul",
           "block_width", "mx", "mx_rows", "requant", "scale_multiplier", "exp_q30", "sigmoid", "softmax",
           "key_mask", "masked_scores", "attention", "KERNELS", "MASKED", "Q16"]

Q16 = 16
ACC_BITS, PV_BITS = 48, 63       # the accumulators' stated widths (signed)
MASKED = -(1 << 40)              # a masked score: below every Q16 value
MX = 32                          # MXINT block
# 2**-f on [0, 1) as a degree-5 polynomial, Q30 coefficients, highest power first (docs/golden.md)
POLY = (-1017037, 9885125, -59368625, 257885219, -744255587, 1073741694)
LOG2E = 1549082005               # log2(e) in Q30
GELU_A = 48028112                # 0.044715 in Q30
GELU_B = 1713444339              # 2 * sqrt(2 / pi) in Q30
EXACT = 2.0 ** 53


class VectorOverflow(ArithmeticError):
    """An accumulator outside its stated width."""


# --- rounding ------------------------------------------------------------------------------------
def _i64(v) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def round_shift(v, k) -> np.ndarray:
    """v / 2**k rounded half up; ``k <= 0`` multiplies by 2**-k."""
    v, k = np.broadcast_arrays(_i64(v), _i64(k))
    right = np.maximum(k, 0)
    bias = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    down = np.floor_divide(v + bias, np.left_shift(np.int64(1), right))
    return np.where(k > 0, down, v * np.left_shift(np.int64(1), np.maximum(-k, 0)))


def round_div(a, b) -> np.ndarray:
    """a / b rounded half up, b > 0."""
    b = _i64(b)
    return np.floor_divide(_i64(a) + b // 2, b)


def clamp32(v) -> np.ndarray:
    return np.minimum(np.maximum(_i64(v), -(1 << 31)), (1 << 31) - 1)


def mul_round(a, b, frac: int) -> np.ndarray:
    return round_shift(_i64(a) * _i64(b), frac)


def bits_of(v) -> np.ndarray:
    """Bits of |v| (0 for 0): float64's exponent, exact below 2**53, corrected above."""
    a = np.abs(_i64(v))
    _, e = np.frexp(a.astype(np.float64))
    e = e.astype(np.int64)
    # float rounding may carry a value just below 2**e up to 2**e: step back where it did
    e = np.where((e > 0) & (np.right_shift(a, np.maximum(e - 1, 0)) == 0), e - 1, e)
    return np.where(a == 0, 0, e)


def floor_sqrt(v) -> np.ndarray:
    """floor(sqrt(v)) for 0 <= v < 2**62: float64's root, corrected by one either way."""
    v = _i64(v)
    s = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    s = np.where(s * s > v, s - 1, s)
    return np.where((s + 1) * (s + 1) <= v, s + 1, s)


def check(v: np.ndarray, what: str, bits: int = ACC_BITS) -> np.ndarray:
    if v.size and int(np.abs(v).max()) >> (bits - 1):
        raise VectorOverflow(f"{what}: accumulator exceeds {bits} bits")
    return v


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact integer product: in float64 when no partial sum can reach 2**53, else int64."""
    a, b = _i64(a), _i64(b)
    bound = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * max(a.shape[-1], 1)
    if bound < EXACT:
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    return np.matmul(a, b)


# --- MXINT ---------------------------------------------------------------------------------------
def block_width(d: int, block: int = MX) -> int:
    """The MXINT block along a feature axis of ``d``: ``block``, or the largest width dividing
    both when it does not divide ``d`` (``d`` itself when narrower)."""
    if d % block == 0:
        return block
    return d if d < block else math.gcd(d, block)


def mx(x, bits: int = 8, block: int = MX) -> tuple[np.ndarray, np.ndarray]:
    """Q16 [..., D] -> (elements [..., D], block shifts [..., D / block]). A block's shift is the
    least e >= 0 for which max|x| / 2**e, rounded half up, is at most 2**(bits-1) - 1."""
    x = _i64(x)
    d = x.shape[-1]
    w = block_width(d, block)
    xb = x.reshape(*x.shape[:-1], d // w, w)
    top = np.abs(xb).max(axis=-1)
    limit = (1 << (bits - 1)) - 1
    e = np.maximum(bits_of(top) - bits, 0)           # no smaller shift can fit
    for _ in range(3):                               # at most two steps up from that bound
        e = e + (round_shift(top, e) > limit)
    return round_shift(xb, e[..., None]).reshape(x.shape), e


def mx_rows(x, unit: int, bits: int = 8, block: int = MX):
    """A linear's MXINT input: elements [T, D], the shift of each ``unit``-wide run of inputs
    [T, D / unit] and each row's least shift [T]."""
    el, e = mx(x, bits, block)
    w = block_width(x.shape[-1], block)
    per_unit = e[:, (np.arange(x.shape[-1] // unit) * unit) // w]
    return el, per_unit, per_unit.min(axis=1)


def requant(acc, mult, shift, emin, bias=None) -> np.ndarray:
    """Accumulator [T, o] -> Q16: round(acc * mult / 2**(shift - emin)) + bias, saturated."""
    y = round_shift(_i64(acc) * _i64(mult)[None, :], _i64(shift)[None, :] - _i64(emin)[:, None])
    return clamp32(y if bias is None else y + _i64(bias))


def scale_multiplier(real: float, bits: int = 15) -> tuple[int, int]:
    """A real scale as ``M * 2**-n`` with |M| < 2**bits (M rounded to nearest, ties to even)."""
    if real == 0:
        return 0, 0
    m, e = math.frexp(real)
    M = int(np.rint(m * (1 << bits)))
    n = bits - e
    if abs(M) == 1 << bits:
        M, n = M // 2, n - 1
    return M, n


# --- exp, sigmoid, softmax -------------------------------------------------------------------------
def exp_q30(d) -> np.ndarray:
    """exp(d) in Q30 for Q16 d <= 0: 2**-(q + r) with t = -d log2(e) in Q46 split into its
    integer q and its fraction r rounded to Q30 (a carry moves into q); 2**-r by Horner's rule
    on ``POLY`` truncating each product to Q30; then rounded right by q (0 from q = 62 on)."""
    t = -np.maximum(_i64(d), -64 << Q16) * LOG2E
    frac_bits = Q16 + 30
    q = t >> frac_bits
    r = round_shift(t - (q << frac_bits), Q16)
    q, r = q + (r >> 30), r & ((1 << 30) - 1)
    p = np.full(r.shape, POLY[0], np.int64)
    for c in POLY[1:]:
        p = np.floor_divide(p * r, 1 << 30) + c
    return np.where(q >= 62, 0, round_shift(p, np.minimum(q, 62)))


def sigmoid(x) -> np.ndarray:
    """Q16 -> Q30: 2**60 / (2**30 + exp(-x)) for x >= 0, exp(x) 2**30 / (2**30 + exp(x)) below."""
    x = _i64(x)
    e = exp_q30(-np.abs(x))
    one = np.int64(1) << 30
    return np.where(x >= 0, round_div(np.int64(1) << 60, one + e), round_div(e * one, one + e))


def softmax(z) -> np.ndarray:
    """Q16 scores -> Q15 probabilities over the last axis; MASKED entries (and fully masked rows) 0."""
    z = _i64(z)
    live = z > MASKED // 2
    top = np.where(live, z, MASKED).max(axis=-1, keepdims=True)
    e = np.where(live, exp_q30(np.where(live, z - top, 0)), 0)
    total = e.sum(axis=-1, keepdims=True)
    return np.where(total > 0, round_div(e * (1 << 15), np.maximum(total, 1)), 0)


def key_mask(op, mask):
    """An attention's mask input as the kernels apply it: with ``key_mask`` a [B, T] input (the
    chip's ``attention_mask``) whose non-zero entries keep key t of row b, as [B, 1, 1, T] flags."""
    if mask is None or not op.attr("key_mask", False):
        return mask
    return (np.asarray(mask) != 0)[:, None, None, :]


def masked_scores(z: np.ndarray, causal: bool, mask=None) -> np.ndarray:
    """A causal mask (lower-right aligned) and an explicit one: bool keeps True, a Q16 additive
    mask adds, entries at or below MASKED/2 (from -inf) mask."""
    if causal:
        s, t = z.shape[-2:]
        z = np.where(np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s), z, MASKED)
    if mask is not None:
        mask = np.asarray(mask)
        z = np.where(mask, z, MASKED) if mask.dtype == bool else np.where(mask <= MASKED // 2, MASKED, z + mask)
    return z


# --- the vector kernels: fn(ip, op, *inputs) -----------------------------------------------------
def _float_out(ip, op) -> bool:
    return np.dtype(ip.graph.tensors[op.outputs[0]].dtype).kind == "f"


def _norm_core(x: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) in Q16 (docs/golden.md, rmsnorm steps 1-4)."""
    k = np.maximum(bits_of(np.abs(x).max(axis=-1, keepdims=True)) - 15, 0)
    xs = round_shift(x, k)
    ms = round_div((xs * xs).sum(axis=-1, keepdims=True), x.shape[-1])
    eps_units = round_shift(np.int64(round(eps * 2.0 ** 60)), 28 + 2 * k)
    r = np.maximum(floor_sqrt((ms + eps_units) << 16), 1)
    return round_div(xs << (8 + Q16), r)


def v_rmsnorm(ip, op, x, g):
    return clamp32(mul_round(_norm_core(_i64(x), op.attr("eps", 1e-6)), g, Q16))


def v_layernorm(ip, op, x, g, b=None):
    x = _i64(x)
    centred = x - round_div(x.sum(axis=-1, keepdims=True), x.shape[-1])
    y = mul_round(_norm_core(centred, op.attr("eps", 1e-5)), g, Q16)
    return clamp32(y if b is None else y + _i64(b))


def silu(x) -> np.ndarray:
    return mul_round(x, sigmoid(x), 30)


def gelu(x) -> np.ndarray:
    """x sigmoid(2 sqrt(2/pi) (x + 0.044715 x**3)), the cube's input clipped to +-16."""
    x = _i64(x)
    c = np.clip(x, -16 << Q16, 16 << Q16)
    cube = mul_round(mul_round(c, c, Q16), c, Q16)
    return mul_round(x, sigmoid(mul_round(c + mul_round(cube, GELU_A, 30), GELU_B, 30)), 30)


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu}


def v_gated_mlp(ip, op, gate, up):
    return clamp32(mul_round(ACTIVATIONS[op.attr("activation", "silu")](gate), up, Q16))


def v_rope(ip, op, x, cos, sin):
    x, cos, sin = _i64(x), _i64(cos), _i64(sin)
    rd = op.attr("rotary_dim", x.shape[-1])
    if cos.ndim == 3:                                # [B, S, r] -> one table for every head
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    if op.attr("interleaved", False):
        c, s = cos[..., :half], sin[..., :half]
        even, odd = rot[..., 0::2], rot[..., 1::2]
        pairs = np.stack(np.broadcast_arrays(round_shift(even * c - odd * s, Q16),
                                             round_shift(odd * c + even * s, Q16)), axis=-1)
        out = pairs.reshape(*pairs.shape[:-2], rd)
    else:
        if cos.shape[-1] == half:
            cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        turned = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        out = round_shift(rot * cos + turned * sin, Q16)
    out = clamp32(out)
    if not rest.shape[-1]:
        return out
    return np.concatenate([out, np.broadcast_to(rest, out.shape[:-1] + rest.shape[-1:])], axis=-1)


def attention(ip, op, q, k, v, mask=None):
    """docs/golden.md, "attention": MXINT q, k, v; block products aligned to their least
    shift; the scale's multiplier to Q16; masks; softmax; P.V per block of v, aligned to the
    block's least shift over the keys, rounded back to Q16."""
    bits, block = ip.config.act_bits, ip.config.block
    q, k, v = _i64(q), _i64(k), _i64(v)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    qe, qs = mx(q, bits, block)
    ke, ks = mx(k, bits, block)
    ve, vs = mx(v, bits, block)
    d = q.shape[-1]
    w = block_width(d, block)
    shifts = qs[..., :, None, :] + ks[..., None, :, :]                     # [B, H, S, T, blocks]
    low = shifts.min(axis=-1)
    acc = np.zeros(low.shape, np.int64)
    for j in range(d // w):
        cols = slice(j * w, (j + 1) * w)
        acc += exact_matmul(qe[..., cols], np.swapaxes(ke[..., cols], -1, -2)) << (shifts[..., j] - low)
    check(acc, f"{op.name} scores")
    M, n = scale_multiplier(float(op.attr("scale", 1.0 / math.sqrt(d))))
    z = round_shift(acc * M, n - low + Q16)
    p = softmax(masked_scores(z, op.attr("causal", False), key_mask(op, mask)))
    out = np.zeros(q.shape[:-1] + (v.shape[-1],), np.int64)
    for j in range(v.shape[-1] // w):
        cols = slice(j * w, (j + 1) * w)
        least = vs[..., j].min(axis=-1)                                    # [B, H]
        aligned = ve[..., cols] << (vs[..., j] - least[..., None])[..., None]
        pv = check(exact_matmul(p, aligned), f"{op.name} values", PV_BITS)
        out[..., cols] = round_shift(pv, (15 - least)[..., None, None])
    return clamp32(out)


def v_add(ip, op, a, b):
    s = _i64(a) + _i64(b)
    return clamp32(s) if _float_out(ip, op) else s


def v_sub(ip, op, a, b):
    s = _i64(a) - _i64(b)
    return clamp32(s) if _float_out(ip, op) else s


def v_mul(ip, op, a, b):
    return clamp32(mul_round(a, b, Q16)) if _float_out(ip, op) else _i64(a) * _i64(b)


def v_neg(ip, op, a):
    return -_i64(a)


# op kind -> the vector unit's kernel; data movement runs through compiler.interp (exact on integers)
KERNELS: dict[str, Callable] = {
    "Add": v_add, "Sub": v_sub, "Mul": v_mul, "Neg": v_neg,
    "rmsnorm": v_rmsnorm, "layernorm": v_layernorm,
    "silu": lambda ip, op, x: clamp32(silu(x)), "gelu": lambda ip, op, x: clamp32(gelu(x)),
    "gated_mlp": v_gated_mlp, "rope": v_rope, "attention": attention,
}


# --- LoRA unit ------------------------------------------------------------------------------------
def _lora_stage(x, codes, mult, shift, bits: int, block: int = MX):
    """One low-rank matrix-vector product of the LoRA unit: Q16 ``x`` [T, n] as MXINT, every
    element brought to its row's least block shift, times the int8 ``codes`` [m, n]; each output
    requantised by its row's (mult, shift): Q16 [T, m]."""
    el, e = mx(x, bits, block)
    w = block_width(x.shape[-1], block)
    least = e.min(axis=1)
    aligned = el << np.repeat(e - least[:, None], w, axis=1)
    acc = np.einsum("tn,mn->tm", aligned, _i64(codes))
    if acc.size and int(np.abs(acc).max()) >= 1 << 47:
        raise VectorOverflow("LoRA accumulator exceeds 48 bits")
    v = acc * _i64(mult)[None, :]
    k = np.minimum(np.maximum(_i64(shift)[None, :] - least[:, None], -31), 62)   # a total requantiser
    up = np.minimum(np.maximum(v, -(1 << 31)), 1 << 31) * np.left_shift(np.int64(1), np.maximum(-k, 0))
    return clamp32(np.where(k > 0, round_shift(v, np.maximum(k, 0)), up))


def lora(y, x, f, bits: int = 8, block: int = MX) -> np.ndarray:
    """The LoRA unit after a fabric linear: ``y + B (A x)`` from the SRAM's factors ``f`` (a
    LoraLinear read from the adapter image), saturated to 32 bits (docs/lora.md)."""
    x = _i64(x)
    lead, n = x.shape[:-1], x.shape[-1]
    u = _lora_stage(x.reshape(-1, n), f.a_codes, f.a_mult, f.a_shift, bits, block)
    d = _lora_stage(u, f.b_codes, f.b_mult, f.b_shift, bits, block)
    return clamp32(_i64(y) + d.reshape(*lead, -1))
