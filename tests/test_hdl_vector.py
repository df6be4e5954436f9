"""The chip's integer vector units in Amaranth (hdl/vector.py) against golden's arithmetic
(compiler/golden/fixed.py), value for value, on the fixed-point corner cases and random
operands; the count of values checked is asserted."""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.golden import fixed as fx
from tapeout.hdl import vector as hv
from tapeout.hdl.sim import run_rows

I32 = (fx.INT32_MIN, fx.INT32_MAX)


def drive(unit, **inputs):
    out, cycles = run_rows(unit, inputs, engine="amaranth", stats={}, name="unit")
    rows = len(next(iter(inputs.values())))
    assert out.shape[0] == rows and cycles == rows + unit.LATENCY
    return out


def first_ready(unit, **inputs) -> int:
    """The cycle (0 = the first input's) on which the unit first raises ready: its latency."""
    from amaranth.sim import Simulator
    rows = len(next(iter(inputs.values())))
    seen = []

    async def bench(ctx):
        for c in range(rows + unit.LATENCY + 8):
            for name, v in inputs.items():
                if c < rows:
                    row = np.atleast_1d(v[c])
                    if row.size == 1 and np.ndim(v) == 1:
                        ctx.set(getattr(unit, name), int(row[0]))
                    else:                                  # an array port: lanes of one chunk
                        for k, x in enumerate(row):
                            ctx.set(getattr(unit, name)[k], int(x))
            ctx.set(unit.valid, int(c < rows))
            if ctx.get(unit.ready) and not seen:
                seen.append(c)
            await ctx.tick()

    sim = Simulator(unit)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    return seen[0]


def q16_cases(rng, n, extra=()):
    base = [0, 1, -1, fx.INT32_MAX, fx.INT32_MIN, fx.ONE, -fx.ONE, (1 << 15), -(1 << 15), 127, -128, 255, -256,
            *extra]
    rand = np.concatenate([rng.integers(-(1 << 31), 1 << 31, n // 2),
                           rng.integers(-(1 << 20), 1 << 20, n // 4),
                           rng.integers(-300, 300, n - n // 2 - n // 4)])
    return np.concatenate([np.array(base, np.int64), rand])


def test_residual_add_saturates_like_golden():
    rng = np.random.default_rng(0)
    a = q16_cases(rng, 200)
    b = np.concatenate([a[::-1][:len(a) // 2], rng.integers(-(1 << 31), 1 << 31, len(a) - len(a) // 2)])
    lanes = 4
    A, B = a[: len(a) // lanes * lanes].reshape(-1, lanes), b[: len(a) // lanes * lanes].reshape(-1, lanes)
    got = drive(hv.ResidualAdd(lanes), a=A, b=B)
    want = fx.saturate32(A + B)
    assert np.array_equal(got, want) and got.size == A.size
    assert (want == fx.INT32_MAX).any() and (want == fx.INT32_MIN).any()        # saturation exercised


@pytest.mark.parametrize("bits", [8, 4])
def test_mx_quantiser_equals_golden(bits):
    rng = np.random.default_rng(bits)
    B = 32
    blocks = [np.zeros(B, np.int64), np.full(B, fx.INT32_MIN), np.full(B, fx.INT32_MAX),
              np.full(B, 7 << 16), np.arange(B) - 16]
    blk = np.zeros(B, np.int64)
    blk[3] = (1 << (bits - 1)) - 1 << 5 | 1 << 4            # rounding carries past qmax: one more shift
    blocks.append(blk)
    for scale in (1, 1 << 8, 1 << 16, 1 << 24, 1 << 30):
        for _ in range(6):
            blocks.append(rng.integers(-scale, scale, B))
    X = np.stack(blocks)
    out = drive(hv.MxQuant(B, bits), x=X)
    elems, shift = fx.mx_quantize(X, bits, B)
    assert np.array_equal(out[:, :B], elems) and np.array_equal(out[:, B], shift[:, 0])
    assert out.size == X.shape[0] * (B + 1)


def test_rope_lane_equals_golden():
    rng = np.random.default_rng(2)
    n, lanes = 96, 4
    x = q16_cases(rng, n)[: n]
    partner = rng.permutation(x)
    r = np.concatenate([-partner[: n // 2], partner[n // 2:]])                # -x[j+h] or x[j-h]
    ang = rng.uniform(-np.pi, np.pi, n)
    c, s = fx.to_fixed(np.cos(ang)), fx.to_fixed(np.sin(ang))
    c[:4], s[:4] = fx.ONE, 0                                                   # position 0
    c[4:8], s[4:8] = -fx.ONE, fx.ONE                                           # the largest table values
    sh = lambda v: v.reshape(-1, lanes)                                        # noqa: E731
    got = drive(hv.RopeLane(lanes), x=sh(x), r=sh(r), c=sh(c), s=sh(s))
    want = fx.saturate32(fx.rshift_round(x * c + r * s, fx.Q))
    assert np.array_equal(got.reshape(-1), want) and got.size == n


def test_exp_unit_equals_golden():
    rng = np.random.default_rng(3)
    d = np.concatenate([[0, -1, -2, -(1 << 15), -fx.ONE, -64 * fx.ONE, -64 * fx.ONE - 1, fx.INT32_MIN,
                         -43 * fx.ONE, -42 * fx.ONE - 12345],
                        -rng.integers(0, 1 << 16, 60), -rng.integers(0, 40 << 16, 60),
                        -rng.integers(0, 1 << 31, 30)]).astype(np.int64)
    got = drive(hv.ExpNeg(2), d=d.reshape(-1, 2)).reshape(-1)
    want = fx.exp_neg_q30(d)
    assert np.array_equal(got, want) and got.size == d.size
    assert want[0] == hv.EXP2_POLY[-1] and (want == 0).any()     # exp(0): the polynomial at 0; underflow to 0


def test_divider_equals_golden_div_round():
    rng = np.random.default_rng(4)
    # the norm's division: (x << 24) / r with |x| < 2**15 and 1 <= r < 2**24
    a = np.concatenate([[0, 1, -1, (1 << 39) - 1, -(1 << 39), 5, -5, 6, -6],
                        rng.integers(-(1 << 39), 1 << 39, 80)]).astype(np.int64)
    b = np.concatenate([[1, 1, 1, 1, 1, 2, 2, 4, 4], rng.integers(1, 1 << 24, 40),
                        rng.integers(1, 64, 40)]).astype(np.int64)
    unit = hv.DivRound(40, 24, 40)
    got = drive(unit, a=a, b=b).reshape(-1)
    want = fx.div_round(a, b)
    assert np.array_equal(got, want) and got.size == a.size


def test_isqrt_equals_golden():
    rng = np.random.default_rng(5)
    k = rng.integers(0, 1 << 31, 40)
    v = np.concatenate([[0, 1, 2, 3, 4, 15, 16, 17, (1 << 62) - 1, (1 << 61)], k * k, k * k - 1, k * k + 2 * k,
                        rng.integers(0, 1 << 62, 40)]).astype(np.int64)
    v = np.clip(v, 0, (1 << 62) - 1)
    got = drive(hv.ISqrt(62), v=v).reshape(-1)
    assert np.array_equal(got, fx.isqrt(v)) and got.size == v.size


def test_argmax_ties_go_to_the_lowest_index():
    rng = np.random.default_rng(6)
    n = 12
    X = [np.zeros(n, np.int64), np.full(n, fx.INT32_MIN), np.full(n, fx.INT32_MAX)]
    tie = rng.integers(-100, 100, n)
    tie[[3, 7, 9]] = 500
    X.append(tie)
    X += [rng.integers(-(1 << 31), 1 << 31, n) for _ in range(20)]
    X = np.stack(X)
    got = drive(hv.ArgmaxTree(n), x=X)
    assert np.array_equal(got[:, 0], np.argmax(X, axis=1)) and np.array_equal(got[:, 1], X.max(axis=1))
    assert got[3, 0] == 3 and got[0, 0] == 0


@pytest.mark.parametrize("kind, gated", [("silu", False), ("silu", True), ("gelu", False), ("gelu", True)])
def test_activation_units_equal_golden(kind, gated):
    from tapeout.compiler.golden.model import ACTS
    rng = np.random.default_rng(7)
    x = np.concatenate([q16_cases(rng, 60, extra=(16 << 16, -(16 << 16), (16 << 16) + 1, 3 << 16, -(3 << 16))),
                        rng.integers(-(8 << 16), 8 << 16, 40)]).astype(np.int64)
    up = rng.permutation(x)
    unit = hv.Activation(kind, gated)
    got = drive(unit, **({"x": x, "up": up} if gated else {"x": x})).reshape(-1)
    assert first_ready(hv.Activation(kind, gated), **({"x": x, "up": up} if gated else {"x": x})) == unit.LATENCY
    act = ACTS[kind](x)
    want = fx.saturate32(fx.mul_q(act, up, fx.Q)) if gated else fx.saturate32(act)
    assert np.array_equal(got, want) and got.size == x.size


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("case", ["random", "tiny", "huge", "equal"])
@pytest.mark.parametrize("lanes", [1, 5, 24])
def test_norm_unit_equals_golden(kind, case, lanes):
    from types import SimpleNamespace
    from tapeout.compiler.golden.model import k_layernorm, k_rmsnorm
    rng = np.random.default_rng(8)
    d = 24
    x = {"random": rng.integers(-(3 << 16), 3 << 16, d), "tiny": rng.integers(-3, 4, d),
         "huge": np.where(rng.random(d) < 0.5, fx.INT32_MIN, fx.INT32_MAX),
         "equal": np.full(d, 5 << 16)}[case].astype(np.int64)
    g = fx.to_fixed(rng.uniform(-2, 2, d))
    b = fx.to_fixed(rng.uniform(-1, 1, d)) if kind == "layernorm" else None
    eps = 1e-5 if kind == "layernorm" else 1e-6
    op = SimpleNamespace(attr=lambda key, default=None: eps if key == "eps" else default)
    want = (k_layernorm(None, op, x[None], g, b) if kind == "layernorm" else k_rmsnorm(None, op, x[None], g))[0]
    unit = hv.NormUnit(d, g, b, eps=eps, kind=kind, lanes=lanes)
    chunks = np.zeros(unit.steps * unit.lanes, np.int64)         # lanes values a cycle, the last chunk padded
    chunks[:d] = x
    chunks = chunks.reshape(unit.steps, unit.lanes)
    got = drive(unit, x=chunks).reshape(-1)[:d]
    assert np.array_equal(got, want) and got.size == d
    # LATENCY is exact (hdl.timing counts on it), not just an upper bound
    assert first_ready(hv.NormUnit(d, g, b, eps=eps, kind=kind, lanes=lanes), x=chunks) == unit.LATENCY


def test_mul_unit_equals_golden():
    rng = np.random.default_rng(9)
    a = q16_cases(rng, 80)
    b = rng.permutation(a)
    got = drive(hv.MulQ16(1), a=a, b=b).reshape(-1)
    assert np.array_equal(got, fx.saturate32(fx.mul_q(a, b, fx.Q))) and got.size == a.size


def run_engine(eng, ke, ks, ve, vs, qe, qs):
    """Write T positions of keys and values into an AttentionEngine's KV cache, one block per
    cycle, then start it on positions 0..T-1; returns (out [H*D], cycles start edge -> ready)."""
    from amaranth.sim import Simulator
    Hkv, T, D = ke.shape
    B, nb, H = eng.block, eng.nb, eng.H
    got = {}

    async def bench(ctx):
        for t in range(T):
            for hk in range(Hkv):
                for b in range(nb):
                    for is_v, (E, Sh) in enumerate(((ke, ks), (ve, vs))):
                        word = sum((int(E[hk, t, b * B + j]) & 255) << (8 * j) for j in range(B))
                        ctx.set(eng.kv_en[0], 1)
                        ctx.set(eng.kv_v[0], is_v)
                        ctx.set(eng.kv_addr[0], (t * Hkv + hk) * nb + b)
                        ctx.set(eng.kv_e[0], word)
                        ctx.set(eng.kv_s[0], int(Sh[hk, t, b]))
                        await ctx.tick()
        ctx.set(eng.kv_en[0], 0)
        for h in range(H):
            for j in range(D):
                ctx.set(eng.qe[h * D + j], int(qe[h, j]))
            for b in range(nb):
                ctx.set(eng.qs[h * nb + b], int(qs[h, b]))
        ctx.set(eng.t, T - 1)
        ctx.set(eng.start, 1)
        await ctx.tick()
        ctx.set(eng.start, 0)
        for c in range(1, 40 * T + 200):
            if ctx.get(eng.ready):
                got["out"], got["cycles"] = [ctx.get(eng.out[k]) for k in range(H * D)], c
                return
            await ctx.tick()

    sim = Simulator(eng)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    assert "out" in got, "the attention engine never raised ready"
    return np.array(got["out"], np.int64), got["cycles"]


@pytest.mark.parametrize("H, Hkv, d, T, P, ctx, spread", [
    (2, 1, 16, 5, 2, 8, 1 << 16),        # grouped query heads, a partial last chunk
    (4, 2, 16, 9, 4, 12, 4 << 16),
    (1, 1, 32, 1, 8, 8, 1 << 16),        # one position: p = 1
    (2, 2, 64, 6, 3, 8, 1 << 24),        # two blocks per head, wide scores
    (4, 2, 16, 16, 8, 16, 1 << 16),      # the whole context, whole chunks
])
def test_attention_engine_equals_golden(H, Hkv, d, T, P, ctx, spread):
    """All heads at once, P positions a cycle, over a KV cache written block by block: every
    output equals golden's k_attention for the query at the last position, and the cycles are
    AttentionEngine.cycles (hdl.timing counts on it)."""
    import math
    from types import SimpleNamespace
    from tapeout.compiler.golden.model import k_attention
    rng = np.random.default_rng(H * d * T + P)
    q = rng.integers(-spread, spread, (1, H, 1, d))
    k = rng.integers(-spread, spread, (1, Hkv, T, d))
    v = rng.integers(-spread, spread, (1, Hkv, T, d))
    if T > 2:
        k[0, :, 1] = k[0, :, 0]                                      # equal scores
    scale = 1.0 / math.sqrt(d)
    op = SimpleNamespace(name="att", attr=lambda key, default=None: {"causal": True, "scale": scale}.get(key, default))
    gm = SimpleNamespace(config=SimpleNamespace(act_bits=8, block=32))
    want = k_attention(gm, op, q, k, v)[0, :, 0].reshape(-1)
    B = fx.mx_block(d, 32)
    qe, qs = fx.mx_quantize(q[0, :, 0], 8, 32)
    ke, ks = fx.mx_quantize(k[0], 8, 32)
    ve, vs = fx.mx_quantize(v[0], 8, 32)
    M, n = fx.multiplier(np.float64(scale))
    eng = hv.AttentionEngine(H, Hkv, d, ctx, int(M), int(n), block=B, positions=P)
    got, cycles = run_engine(eng, ke, ks, ve, vs, qe, qs)
    assert np.array_equal(got, want) and got.size == H * d
    assert cycles == hv.AttentionEngine.cycles(T, P)
