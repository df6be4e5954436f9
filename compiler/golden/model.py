"""The integer golden model: runs a fused, quantised graph with integer arithmetic only.

The oracle of every backend (spec: docs/golden.md). Construction ("compile time") turns the
float side data of the graph into integer constants: requantisation multipliers from the
weights' row scales, Q16 norm gains, biases, rope tables and the embedding table. ``run`` then
uses numpy int64 arithmetic only, so results are identical on any machine.

Tensor conventions inside ``run``: float-typed graph tensors are Q16 int64 arrays; integer
graph tensors (token ids, shapes) are plain ints; bool tensors stay bool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import TapeoutError
from ..interp import run_op
from ..ir import Op
from . import fixed as fx

PLUMBING = {"Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze", "Unsqueeze", "Expand",
            "Identity", "Flatten", "Gather", "GatherElements", "GatherND", "Where"}
MASKED = -(1 << 40)          # a score below every real Q16 value: "masked"


@dataclass(frozen=True)
class GoldenConfig:
    """Options of the integer model. ``act_bits``: MXINT element width of matmul inputs."""

    act_bits: int = 8
    block: int = fx.MX_BLOCK

    def __post_init__(self) -> None:
        if not isinstance(self.act_bits, int) or not 4 <= self.act_bits <= 16:
            raise TapeoutError(f"activation bits must be an integer in [4, 16], not {self.act_bits!r}")


@dataclass(frozen=True)
class IntLinear:
    """Integer constants of one quantised linear layer."""

    codes: np.ndarray          # int64 [out, in]
    group_size: int
    group_scale: np.ndarray    # int64 [out, in/group]
    mult: np.ndarray           # int64 [out]: row_scale ~= mult * 2**-shift
    shift: np.ndarray          # int64 [out]
    bias: np.ndarray | None    # Q16 int64 [out]
    scaled_t: np.ndarray       # [in, out] codes * group_scale as floats holding exact integers:
                               # float32 when every value is below 2**24, else float64
    scaled_max: int            # max |codes * group_scale|

    @staticmethod
    def build(codes, group_size, group_scale, mult, shift, bias) -> "IntLinear":
        o_dim, i_dim = codes.shape
        gs = np.repeat(group_scale, group_size, axis=1)[:, :i_dim]
        scaled = codes * gs
        smax = int(np.max(np.abs(scaled))) if scaled.size else 0
        dtype = np.float32 if smax < (1 << 24) else np.float64
        return IntLinear(codes.astype(np.int8) if np.abs(codes).max(initial=0) < 128 else codes, group_size,
                         group_scale, mult, shift, bias, np.ascontiguousarray(scaled.T, dtype=dtype), smax)


class Golden:
    """Integer-only inference of an :class:`~tapeout.compiler.program.IntegerProgram`.

    ``Golden(program)`` runs a program built once per compile; ``Golden(graph, weights,
    config)`` builds one first (``weights`` maps every ``linear`` op name to a QuantTensor-like
    object: ``codes``, ``group_size``, ``group_scale``, ``row_scale``, rows = output channels).
    ``linear_fn`` replaces the linear kernel (a backend's model of a linear, same signature as
    :func:`linear_int`). ``lora`` maps linear op names to their SRAM adapters
    (:class:`~tapeout.compiler.lora.LoraLinear`): those linears add ``B (A x)`` (docs/lora.md).
    """

    def __init__(self, program, weights: Mapping[str, object] | None = None, config: GoldenConfig = GoldenConfig(),
                 *, linear_fn: Callable | None = None, lora: Mapping[str, object] | None = None):
        from ..program import IntegerProgram
        if isinstance(program, Golden):
            program = program.program
        if not isinstance(program, IntegerProgram):
            program = IntegerProgram.build(program, weights or {}, config)
        self.program = program
        self.graph, self.config, self.linears = program.graph, program.config, program.linears
        self.ops = self.order = program.ops
        self.interface = program.interface
        self.linear_fn = linear_fn
        self.lora = dict(lora or {})
        unknown = sorted(set(self.lora) - set(self.linears))
        if unknown:
            raise TapeoutError(f"the adapter names linear {unknown[0]!r}, which the program does not have")

    def const(self, name: str) -> np.ndarray:
        """A constant in golden's representation (float -> Q16, saturating; ints as they are)."""
        return self.program.const(name)

    # --- run ------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], *, outputs: list[str] | None = None,
            keep: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
        """Run on integer feeds (token ids; Q16 ints for float inputs such as a KV cache)."""
        g = self.graph
        consts = g.constants
        wanted = list(g.outputs if outputs is None else outputs)
        env: dict[str, np.ndarray] = {}
        for name in g.inputs:
            v = np.asarray(feeds[name])
            if np.dtype(g.tensors[name].dtype).kind == "f" and v.dtype.kind == "f":
                raise TapeoutError(f"golden input {name!r} must be Q16 integers, not floats "
                                   "(use fixed.to_fixed at the boundary)")
            env[name] = v.astype(np.int64) if v.dtype.kind in "iu" else v
        last_use = {}
        for i, op in enumerate(self.order):
            for t in op.inputs:
                last_use[t] = i
        for i, op in enumerate(self.order):
            args = [None if not t else env[t] if t in env else self.const(t) if t in consts else None
                    for t in op.inputs]
            if op.kind in KERNELS:
                out = KERNELS[op.kind](self, op, *args)
            else:
                out = run_op(op, args)   # data movement: exact on integers
            out = out if isinstance(out, tuple) else (out,)
            for name, value in zip(op.outputs, out):
                if name:
                    env[name] = value
                    if keep is not None:
                        keep(name, value)
            for t in op.inputs:
                if t and last_use.get(t) == i and t not in wanted and t in env and t not in g.inputs:
                    del env[t]
        return {t: env[t] if t in env else self.const(t) for t in wanted}

    def is_float(self, t: str) -> bool:
        return np.dtype(self.graph.tensors[t].dtype).kind == "f"


# --- integer kernels ----------------------------------------------------------------------------
def linear_int(gm: Golden, L: IntLinear, x: np.ndarray, what: str) -> np.ndarray:
    """Q16 x [..., in] -> Q16 y [..., out] through MXINT inputs and integer weights."""
    o_dim, i_dim = L.codes.shape
    lead = x.shape[:-1]
    X = x.reshape(-1, i_dim)
    unit = fx.linear_unit(i_dim, L.group_size, gm.config.block)
    nu = i_dim // unit
    elems, su, emin = fx.mx_units(X, unit, gm.config.act_bits, gm.config.block)   # su [T, nu], emin [T]
    # fold the block exponents into x (the group scales are already folded into scaled_t):
    # exact integers, so one product over the row gives sum_u gs * part_u * 2**(s_u - emin)
    xs = (elems.reshape(-1, nu, unit) << (su - emin[:, None])[:, :, None]).reshape(-1, i_dim)
    acc = fx.int_matmul(xs, L.scaled_t, bmax=L.scaled_max, b_f64=L.scaled_t)
    fx.check_acc(acc, what)
    y = fx.rshift_round(acc * L.mult[None, :], L.shift[None, :] - emin[:, None])
    if L.bias is not None:
        y = y + L.bias
    return fx.saturate32(y).reshape(*lead, o_dim)


def k_linear(gm: Golden, op: Op, x, w, b=None):
    fn = gm.linear_fn or linear_int
    y = fn(gm, gm.linears[op.name], x, op.name)
    f = gm.lora.get(op.name)
    if f is None:
        return y
    from .. import lora
    return lora.apply(y, f, x, gm.config.act_bits, gm.config.block)


def k_add(gm, op, a, b):
    return fx.saturate32(a + b) if gm.is_float(op.outputs[0]) else a + b


def k_sub(gm, op, a, b):
    return fx.saturate32(a - b) if gm.is_float(op.outputs[0]) else a - b


def k_mul(gm, op, a, b):
    return fx.saturate32(fx.mul_q(a, b, fx.Q)) if gm.is_float(op.outputs[0]) else a * b


def k_neg(gm, op, a):
    return -a


def _norm_shift(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x >> k per row so that |x'| < 2**15 (scale-invariant norms keep 15 bits of mantissa)."""
    k = np.maximum(fx.bit_length(np.max(np.abs(x), axis=-1, keepdims=True)) - 15, 0)
    return fx.rshift_round(x, k), k


def _eps(op, default: float) -> float:
    """A norm's epsilon, finite and in [0, 8) (golden holds it as eps * 2**60 in an int64)."""
    eps = op.attr("eps", default)
    try:
        ok = math.isfinite(float(eps)) and 0.0 <= float(eps) < 8.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TapeoutError(f"the norm's epsilon is {eps!r}; golden needs a finite epsilon in [0, 8)",
                           node=op.name, op=op.kind)
    return float(eps)


def _inv_rms(xs: np.ndarray, k: np.ndarray, eps: float, extra: int = 8) -> np.ndarray:
    """r ~= rms(x) * 2**(16 - k + extra) for Q16 x = xs * 2**k (eps in real units)."""
    d = xs.shape[-1]
    ms = fx.div_round(np.sum(xs * xs, axis=-1, keepdims=True), d)       # mean(x^2) * 2**(32-2k)
    eps_q = fx.rshift_round(np.int64(round(eps * 2.0**60)), 28 + 2 * k)  # eps * 2**(32-2k)
    return fx.isqrt((ms + eps_q) << (2 * extra))


def k_rmsnorm(gm, op, x, g):
    extra = 8
    xs, k = _norm_shift(x)
    r = np.maximum(_inv_rms(xs, k, _eps(op, 1e-6), extra), 1)
    y = fx.div_round(xs << (extra + fx.Q), r)                            # x / rms in Q16
    return fx.saturate32(fx.mul_q(y, g, fx.Q))


def k_layernorm(gm, op, x, g, b=None):
    extra = 8
    d = x.shape[-1]
    mean = fx.div_round(np.sum(x, axis=-1, keepdims=True), d)
    xs, k = _norm_shift(x - mean)
    r = np.maximum(_inv_rms(xs, k, _eps(op, 1e-5), extra), 1)
    y = fx.mul_q(fx.div_round(xs << (extra + fx.Q), r), g, fx.Q)
    return fx.saturate32(y + b if b is not None else y)


def silu_q16(x):
    return fx.mul_q(x, fx.sigmoid_q30(x), fx.Q30)


GELU_C1 = 48028112           # round(0.044715 * 2**30)
GELU_C2 = 1713444339         # round(2 * sqrt(2 / pi) * 2**30)


def gelu_q16(x):
    """tanh-form GELU: x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (|erf-form - tanh-form| < 3e-4)."""
    xc = np.clip(x, -16 * fx.ONE, 16 * fx.ONE)
    x3 = fx.mul_q(fx.mul_q(xc, xc, fx.Q), xc, fx.Q)
    inner = fx.mul_q(xc + fx.mul_q(x3, GELU_C1, fx.Q30), GELU_C2, fx.Q30)
    return fx.mul_q(x, fx.sigmoid_q30(inner), fx.Q30)


ACTS = {"silu": silu_q16, "gelu": gelu_q16, "gelu_tanh": gelu_q16}


def k_silu(gm, op, x):
    return fx.saturate32(silu_q16(x))


def k_gelu(gm, op, x):
    return fx.saturate32(gelu_q16(x))


def k_gated_mlp(gm, op, gate, up):
    return fx.saturate32(fx.mul_q(ACTS[op.attr("activation", "silu")](gate), up, fx.Q))


def k_rope(gm, op, x, cos, sin):
    rd = op.attr("rotary_dim", x.shape[-1])
    xr, xp = x[..., :rd], x[..., rd:]
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    if op.attr("interleaved", False):
        half = rd // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = np.empty(np.broadcast_shapes(xr.shape, (1,) * (xr.ndim - c.ndim) + c.shape[:-1] + (rd,)), np.int64)
        out[..., 0::2] = fx.rshift_round(x1 * c - x2 * s, fx.Q)
        out[..., 1::2] = fx.rshift_round(x2 * c + x1 * s, fx.Q)
    else:
        if cos.shape[-1] == rd // 2:
            cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        h = rd // 2
        rot = np.concatenate([-xr[..., h:], xr[..., :h]], axis=-1)
        out = fx.rshift_round(xr * cos + rot * sin, fx.Q)
    out = fx.saturate32(out)
    return np.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


def softmax_q15(z: np.ndarray) -> np.ndarray:
    """Integer softmax over the last axis of Q16 scores (MASKED entries get 0) -> Q15."""
    valid = z > MASKED // 2
    m = np.max(np.where(valid, z, np.iinfo(np.int64).min), axis=-1, keepdims=True)
    m = np.where(np.any(valid, axis=-1, keepdims=True), m, 0)
    e = np.where(valid, fx.exp_neg_q30(np.where(valid, z - m, 0)), 0)
    total = np.sum(e, axis=-1, keepdims=True)
    return np.where(total > 0, fx.div_round(e << 15, np.maximum(total, 1)), 0)


def k_attention(gm: Golden, op: Op, q, k, v, mask=None):
    bits, blk = gm.config.act_bits, gm.config.block
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = np.repeat(k, hq // hkv, axis=1)
        v = np.repeat(v, hq // hkv, axis=1)
    qe, qs = fx.mx_quantize(q, bits, blk)
    ke, ks = fx.mx_quantize(k, bits, blk)
    ve, vs = fx.mx_quantize(v, bits, blk)
    d = q.shape[-1]
    b = fx.mx_block(d, blk)
    nb = d // b
    parts, exps = [], []
    for j in range(nb):
        sl = slice(j * b, (j + 1) * b)
        parts.append(fx.int_matmul(qe[..., sl], np.swapaxes(ke[..., sl], -1, -2)))  # [B,H,S,T]
        exps.append(qs[..., j][..., :, None] + ks[..., j][..., None, :])
    emin = np.minimum.reduce(exps)
    acc = sum(p << (e - emin) for p, e in zip(parts, exps))
    fx.check_acc(acc, f"{op.name} scores")
    scale = op.attr("scale", 1.0 / math.sqrt(d))
    ms, ns = fx.multiplier(np.float64(scale))
    z = fx.rshift_round(acc * ms, ns - emin + fx.Q)                          # Q16 scaled scores
    s_len, t_len = z.shape[-2:]
    if op.attr("causal", False):
        keep = np.tril(np.ones((s_len, t_len), bool), k=t_len - s_len)
        z = np.where(keep, z, MASKED)
    if mask is not None and op.attr("key_mask", False):
        mask = (mask != 0)[:, None, None, :]                                 # [B, T] keep flags
    if mask is not None:
        z = np.where(mask, z, MASKED) if mask.dtype == bool else np.where(mask <= MASKED // 2, MASKED, z + mask)
    p = softmax_q15(z)                                                       # Q15
    out = np.empty(q.shape[:-1] + (v.shape[-1],), np.int64)
    for j in range(v.shape[-1] // b):
        sl = slice(j * b, (j + 1) * b)
        vmin = vs[..., j].min(axis=-1)                                       # [B,H]
        v_al = ve[..., sl] << (vs[..., j] - vmin[..., None])[..., None]
        acc_v = fx.check_acc(fx.int_matmul(p, v_al), f"{op.name} values", bits=63)
        out[..., sl] = fx.rshift_round(acc_v, 15 - vmin[..., None, None])
    return fx.saturate32(out)


# op kind -> integer kernel ``fn(gm, op, *inputs)``: the one table golden dispatches through
# (data-movement ops in PLUMBING run through compiler.interp, exact on integers)
KERNELS: dict[str, Callable] = {
    "linear": k_linear,
    "Add": k_add,
    "Sub": k_sub,
    "Mul": k_mul,
    "Neg": k_neg,
    "rmsnorm": k_rmsnorm,
    "layernorm": k_layernorm,
    "silu": k_silu,
    "gelu": k_gelu,
    "gated_mlp": k_gated_mlp,
    "rope": k_rope,
    "attention": k_attention,
}
