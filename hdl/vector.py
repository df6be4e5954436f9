"""Integer vector units of the chip in Amaranth, each bit-exact with golden's kernel arithmetic
(spec: docs/golden.md "Number formats"; docs/chip.md "Vector units in RTL").

Every unit is a pipeline: inputs with ``valid = 1`` on one clock edge give their outputs
``LATENCY`` edges later with ``ready = 1``, one set of operands per cycle. That is the interface
``hdl.sim.run_rows`` drives on the Amaranth simulator and under Verilator. The arithmetic is
golden's, written as gates:
- right shifts that round do so half up (``(v + 2**(k-1)) >> k``);
- plain right shifts floor;
- Q16 results saturate to int32.

Units:
- ``ResidualAdd``: saturating Q16 add (residual connections, biases, position embeddings);
- ``MxQuant``: a block of Q16 values to MXINT elements and the block's shift. This is what
  every linear's and attention's inputs go through (``fixed.mx_quantize``);
- ``RopeLane``: ``sat(round((x*c + r*s) / 2**16))``. The sequencer wires ``r`` as the
  rotated partner (``-x[j+h]`` or ``x[j-h]``);
- ``ExpNeg``: ``exp(d)`` in Q30 for Q16 ``d <= 0`` (``fixed.exp_neg_q30``: split into
  ``2**-q * 2**-r``, then a degree-5 Horner polynomial, one stage per step);
- ``DivRound``: ``floor((a + floor(b/2)) / b)`` for ``b > 0`` (``fixed.div_round``), one
  restoring-division stage per quotient bit;
- ``ISqrt``: ``floor(sqrt(v))`` (``fixed.isqrt``), one digit-by-digit stage per result bit;
- ``ArgmaxTree``: the index of the largest of ``n`` values, ties to the lowest index.
"""
from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
Q16, Q30 = 16, 30
EXP2_POLY = (-1017037, 9885125, -59368625, 257885219, -744255587, 1073741694)   # docs/golden.md
LOG2E_Q30 = 1549082005


def sat32(v):
    return Mux(v > INT32_MAX, INT32_MAX, Mux(v < INT32_MIN, INT32_MIN, v))


def half_of(amt, width: int):
    """2**(amt-1) for a shift amount signal ``amt`` > 0, else 0 (the rounding constant)."""
    return Mux(amt > 0, Const(1, width) << (amt - 1)[:len(amt)], 0)


def round_shift(v, k: int):
    """round(v / 2**k) half up, for a constant k >= 0."""
    return (v + (1 << (k - 1))) >> k if k > 0 else v


class _Pipe(wiring.Component):
    """valid -> ready after LATENCY edges."""

    LATENCY = 1

    def _valid_chain(self, m: Module, stages: int):
        v = self.valid
        for i in range(stages):
            nxt = Signal(name=f"valid_{i + 1}")
            m.d.sync += nxt.eq(v)
            v = nxt
        m.d.comb += self.ready.eq(v)


class _Lanes2(_Pipe):
    """y[i] = combine(a[i], b[i]) for ``lanes`` Q16 lanes, registered once."""

    LATENCY = 1

    def __init__(self, lanes: int = 1):
        self.lanes = lanes
        super().__init__({"valid": In(1), "a": In(signed(32)).array(lanes), "b": In(signed(32)).array(lanes),
                          "ready": Out(1), "y": Out(signed(32)).array(lanes)})

    def elaborate(self, platform):
        m = Module()
        for i in range(self.lanes):
            m.d.sync += self.y[i].eq(self.combine(self.a[i], self.b[i]))
        self._valid_chain(m, 1)
        return m


class ResidualAdd(_Lanes2):
    """y[i] = sat32(a[i] + b[i]) for ``lanes`` Q16 lanes."""

    @staticmethod
    def combine(a, b):
        return sat32(a + b)


class MulQ16(_Lanes2):
    """y = sat32(round(a * b / 2**16)) (golden's ``Mul`` on Q16 values), ``lanes`` lanes."""

    @staticmethod
    def combine(a, b):
        return sat32(round_shift(a * b, Q16))


def bit_length(m: Module, v, width: int, name: str):
    """Number of bits of the unsigned ``v`` (0 for 0): a priority encoder."""
    n = Signal(range(width + 1), name=name)
    m.d.comb += n.eq(0)
    for b in range(width):                     # the last assignment wins: the highest set bit
        with m.If(v[b]):
            m.d.comb += n.eq(b + 1)
    return n


class MxQuant(_Pipe):
    """A block of ``block`` Q16 values -> MXINT ``elems`` (signed ``bits``) and ``shift``:
    shift = max(bit_length(max|x|) - (bits - 1), 0), one more if rounding carries past
    2**(bits-1) - 1; elems = round(x / 2**shift) half up (``fixed.mx_quantize``)."""

    LATENCY = 2

    def __init__(self, block: int = 32, bits: int = 8):
        self.block, self.bits = block, bits
        super().__init__({"valid": In(1), "x": In(signed(32)).array(block),
                          "ready": Out(1), "elems": Out(signed(bits)).array(block), "shift": Out(unsigned(6))})

    def elaborate(self, platform):
        m = Module()
        B, bits = self.block, self.bits
        qmax = (1 << (bits - 1)) - 1
        # stage 1: |x|, their maximum, the shift
        absx = [Signal(unsigned(32), name=f"abs{i}") for i in range(B)]
        for i in range(B):
            m.d.comb += absx[i].eq(Mux(self.x[i] < 0, -self.x[i], self.x[i]))
        level = absx
        while len(level) > 1:                                     # a max tree
            nxt = []
            for j in range(0, len(level), 2):
                if j + 1 < len(level):
                    s = Signal(unsigned(32), name=f"mx{len(level)}_{j}")
                    m.d.comb += s.eq(Mux(level[j] >= level[j + 1], level[j], level[j + 1]))
                    nxt.append(s)
                else:
                    nxt.append(level[j])
            level = nxt
        amax = level[0]
        nb = bit_length(m, amax, 32, "amax_bits")
        sh0 = Signal(unsigned(6))
        m.d.comb += sh0.eq(Mux(nb > bits - 1, nb - (bits - 1), 0))
        rounded = Signal(unsigned(33))
        half = half_of(sh0, 33)
        m.d.comb += rounded.eq((amax + half) >> sh0)
        shift1 = Signal(unsigned(6))
        m.d.comb += shift1.eq(sh0 + (rounded > qmax))
        xr = [Signal(signed(32), name=f"xr{i}") for i in range(B)]
        sh_r = Signal(unsigned(6))
        m.d.sync += sh_r.eq(shift1)
        for i in range(B):
            m.d.sync += xr[i].eq(self.x[i])
        # stage 2: the elements, rounded half up
        for i in range(B):
            halfi = half_of(sh_r, 33)
            v = Signal(signed(34), name=f"rv{i}")
            m.d.comb += v.eq(xr[i] + halfi)
            m.d.sync += self.elems[i].eq((v >> sh_r)[:bits])
        m.d.sync += self.shift.eq(sh_r)
        self._valid_chain(m, 2)
        return m


class RopeLane(_Pipe):
    """y = sat32(round((x*c + r*s) / 2**16)) for ``lanes`` lanes; ``r`` is 33-bit (a negated
    int32)."""

    LATENCY = 2

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__({"valid": In(1), "x": In(signed(32)).array(lanes), "r": In(signed(33)).array(lanes),
                          "c": In(signed(32)).array(lanes), "s": In(signed(32)).array(lanes),
                          "ready": Out(1), "y": Out(signed(32)).array(lanes)})

    def elaborate(self, platform):
        m = Module()
        for i in range(self.lanes):
            p = Signal(signed(67), name=f"p{i}")
            m.d.sync += p.eq(self.x[i] * self.c[i] + self.r[i] * self.s[i])
            m.d.sync += self.y[i].eq(sat32(round_shift(p, Q16)))
        self._valid_chain(m, 2)
        return m


class ExpNeg(_Pipe):
    """e = exp(d) in Q30 for Q16 d <= 0 (``fixed.exp_neg_q30``), ``lanes`` lanes."""

    LATENCY = 1 + len(EXP2_POLY)      # the split, five Horner steps, the final shift

    def __init__(self, lanes: int = 1):
        self.lanes = lanes
        super().__init__({"valid": In(1), "d": In(signed(32)).array(lanes),
                          "ready": Out(1), "e": Out(unsigned(31)).array(lanes)})

    def elaborate(self, platform):
        m = Module()
        F = Q16 + Q30
        for i in range(self.lanes):
            d = self.d[i]
            dc = Mux(d < -64 * (1 << Q16), -64 * (1 << Q16), d)
            t = Signal(unsigned(55), name=f"t{i}")
            m.d.comb += t.eq((-dc) * LOG2E_Q30)                   # -d * log2(e) in Q46
            # stage 1: integer part q and the fraction in Q30 (rounded), carry into q
            frac = round_shift(t[:F], Q16)                         # < 2**30 + 1
            q = Signal(unsigned(10), name=f"q{i}")
            r30 = Signal(unsigned(30), name=f"r{i}")
            m.d.sync += [q.eq((t >> F) + (frac >> Q30)), r30.eq(frac[:Q30])]
            # stages 2..6: Horner, acc = (acc * r >> 30) + c, floor shifts
            acc = Signal(signed(32), name=f"acc{i}_0")
            m.d.comb += acc.eq(EXP2_POLY[0])
            qs, rs = q, r30
            for k, c in enumerate(EXP2_POLY[1:]):
                nacc = Signal(signed(32), name=f"acc{i}_{k + 1}")
                nq = Signal(unsigned(10), name=f"q{i}_{k + 1}")
                nr = Signal(unsigned(30), name=f"r{i}_{k + 1}")
                prod = Signal(signed(64), name=f"prod{i}_{k + 1}")
                m.d.comb += prod.eq(acc * rs)
                m.d.sync += [nacc.eq((prod >> Q30) + c), nq.eq(qs), nr.eq(rs)]
                acc, qs, rs = nacc, nq, nr
            # last stage: 2**-q by a rounding right shift (0 from q >= 62)
            amt = Mux(qs > 62, 62, qs)[:6]
            half = half_of(amt, 63)
            shifted = (acc + half) >> amt
            m.d.sync += self.e[i].eq(Mux(qs >= 62, 0, shifted))
        self._valid_chain(m, self.LATENCY)
        return m


class DivRound(_Pipe):
    """q = floor((a + floor(b/2)) / b) for b > 0: signed ``a_bits`` a, unsigned ``b_bits`` b;
    ``q_bits``: the quotient's magnitude bits (|a|/b + 1 < 2**q_bits, stated by the caller).
    One restoring stage per quotient bit (LATENCY = q_bits + 2)."""

    @staticmethod
    def latency(q_bits: int) -> int:
        return q_bits + 2

    def __init__(self, a_bits: int, b_bits: int, q_bits: int):
        self.a_bits, self.b_bits, self.q_bits = a_bits, b_bits, q_bits
        self.LATENCY = self.latency(q_bits)
        super().__init__({"valid": In(1), "a": In(signed(a_bits)), "b": In(unsigned(b_bits)),
                          "ready": Out(1), "q": Out(signed(q_bits + 1))})

    def elaborate(self, platform):
        m = Module()
        W, Bb, Qb = self.a_bits + 1, self.b_bits, self.q_bits
        # stage 0: n = a + b//2; floor(n / b) = n >= 0 ? n // b : -((-n + b - 1) // b)
        n = Signal(signed(W + 1))
        m.d.comb += n.eq(self.a + (self.b >> 1))
        neg = Signal()
        mag = Signal(unsigned(W + 1))
        m.d.sync += [neg.eq(n < 0), mag.eq(Mux(n < 0, -n + self.b - 1, n))]
        b = Signal(unsigned(Bb), name="b_0")
        m.d.sync += b.eq(self.b)
        rem, quo, ng = mag, Signal(unsigned(Qb), name="quo_0"), neg
        m.d.comb += quo.eq(0)
        for k in range(Qb - 1, -1, -1):                         # quotient bit k
            trial = Signal(signed(W + Bb + 2), name=f"trial_{k}")
            m.d.comb += trial.eq(rem - (b << k))
            nrem = Signal(unsigned(W + 1), name=f"rem_{k}")
            nquo = Signal(unsigned(Qb), name=f"quo_{Qb - k}")
            nb = Signal(unsigned(Bb), name=f"b_{Qb - k}")
            nng = Signal(name=f"neg_{Qb - k}")
            m.d.sync += [nrem.eq(Mux(trial >= 0, trial, rem)), nquo.eq(quo | Mux(trial >= 0, 1 << k, 0)),
                         nb.eq(b), nng.eq(ng)]
            rem, quo, b, ng = nrem, nquo, nb, nng
        m.d.sync += self.q.eq(Mux(ng, -quo, quo))
        self._valid_chain(m, self.LATENCY)
        return m


class ISqrt(_Pipe):
    """r = floor(sqrt(v)) for unsigned ``v_bits`` v: one digit-by-digit stage per result bit."""

    @staticmethod
    def latency(v_bits: int) -> int:
        return (v_bits + (v_bits & 1)) // 2 + 1

    def __init__(self, v_bits: int):
        self.v_bits = v_bits + (v_bits & 1)
        self.r_bits = self.v_bits // 2
        self.LATENCY = self.latency(v_bits)
        super().__init__({"valid": In(1), "v": In(unsigned(v_bits)), "ready": Out(1), "r": Out(unsigned(self.r_bits))})

    def elaborate(self, platform):
        m = Module()
        R, V = self.r_bits, self.v_bits
        rem = Signal(unsigned(V + 2), name="rem_0")
        root = Signal(unsigned(R), name="root_0")
        val = Signal(unsigned(V), name="val_0")
        m.d.comb += [rem.eq(0), root.eq(0), val.eq(self.v)]
        for k in range(R - 1, -1, -1):                         # bring down two bits, try root*4+1
            cur = Signal(unsigned(V + 2), name=f"cur_{k}")
            m.d.comb += cur.eq((rem << 2) | ((val >> (2 * k)) & 3))
            trial = Signal(signed(V + 4), name=f"trial_{k}")
            m.d.comb += trial.eq(cur - ((root << 2) | 1))
            nrem = Signal(unsigned(V + 2), name=f"rem_{R - k}")
            nroot = Signal(unsigned(R), name=f"root_{R - k}")
            nval = Signal(unsigned(V), name=f"val_{R - k}")
            m.d.sync += [nrem.eq(Mux(trial >= 0, trial, cur)), nroot.eq((root << 1) | (trial >= 0)), nval.eq(val)]
            rem, root, val = nrem, nroot, nval
        m.d.sync += self.r.eq(root)
        self._valid_chain(m, self.LATENCY)
        return m


class ArgmaxTree(_Pipe):
    """The index of the largest of ``n`` signed values and that value; ties go to the lowest
    index (a comparison tree that keeps the left operand on equality)."""

    LATENCY = 1

    def __init__(self, n: int, bits: int = 32):
        self.n, self.bits = n, bits
        super().__init__({"valid": In(1), "x": In(signed(bits)).array(n), "ready": Out(1),
                          "index": Out(unsigned(max(1, (n - 1).bit_length()))), "value": Out(signed(bits))})

    def elaborate(self, platform):
        m = Module()
        ib = max(1, (self.n - 1).bit_length())
        level = []
        for i in range(self.n):
            v = Signal(signed(self.bits), name=f"v0_{i}")
            ix = Signal(unsigned(ib), name=f"i0_{i}")
            m.d.comb += [v.eq(self.x[i]), ix.eq(i)]
            level.append((v, ix))
        depth = 0
        while len(level) > 1:
            depth += 1
            nxt = []
            for j in range(0, len(level), 2):
                if j + 1 == len(level):
                    nxt.append(level[j])
                    continue
                (va, ia), (vb, ib_) = level[j], level[j + 1]
                v = Signal(signed(self.bits), name=f"v{depth}_{j}")
                ix = Signal(unsigned(ib), name=f"i{depth}_{j}")
                m.d.comb += [v.eq(Mux(vb > va, vb, va)), ix.eq(Mux(vb > va, ib_, ia))]
                nxt.append((v, ix))
            level = nxt
        m.d.sync += [self.value.eq(level[0][0]), self.index.eq(level[0][1])]
        self._valid_chain(m, 1)
        return m


def delay(m: Module, sig, n: int, name: str):
    """``sig`` delayed by ``n`` clock edges (a shift register)."""
    for i in range(n):
        nxt = Signal(sig.shape(), name=f"{name}_d{i + 1}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


GELU_C1 = 48028112           # round(0.044715 * 2**30)   (docs/golden.md)
GELU_C2 = 1713444339         # round(2 * sqrt(2 / pi) * 2**30)


class Activation(_Pipe):
    """SiLU or GELU of Q16 ``x``, optionally gated (``gated_mlp``: ``sat(round(act(x) * up / 2**16))``).

    The sigmoid is ``fixed.sigmoid_q30``: ``e = exp(-|z|)`` from an ``ExpNeg``, then
    ``round(2**60 / (2**30 + e))`` for ``z >= 0`` or ``round(e * 2**30 / (2**30 + e))`` below, by
    one ``DivRound``. SiLU: ``z = x``; GELU (tanh form): ``z = round(C2 * (xc + round(C1 * xc**3)))``
    with ``xc`` = x clipped to +-16, in four stages ahead. Then ``round(x * sigmoid / 2**30)``.
    """

    @staticmethod
    def latency(kind: str) -> int:
        """The GELU stages, the exp, the divider, the product with x and the output register."""
        return (4 if kind == "gelu" else 0) + ExpNeg.LATENCY + DivRound.latency(31) + 2

    def __init__(self, kind: str = "silu", gated: bool = False):
        if kind not in ("silu", "gelu"):
            raise ValueError(f"activation must be silu or gelu, not {kind!r}")
        self.kind, self.gated = kind, gated
        self._pre = 4 if kind == "gelu" else 0
        self._div = DivRound(62, 32, 31)
        self.LATENCY = self.latency(kind)
        ports = {"valid": In(1), "x": In(signed(32))}
        if gated:
            ports["up"] = In(signed(32))
        ports.update(ready=Out(1), y=Out(signed(32)))
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        x = self.x
        if self.kind == "gelu":
            lim = 16 << Q16
            xc = Mux(x > lim, lim, Mux(x < -lim, -lim, x))
            xc1, x2 = Signal(signed(32)), Signal(signed(48))
            m.d.sync += [xc1.eq(xc), x2.eq(round_shift(xc * xc, Q16))]
            xc2, x3 = Signal(signed(32)), Signal(signed(48))
            m.d.sync += [xc2.eq(xc1), x3.eq(round_shift(x2 * xc1, Q16))]
            t = Signal(signed(48))
            m.d.sync += t.eq(xc2 + round_shift(x3 * GELU_C1, Q30))
            z = Signal(signed(48))
            m.d.sync += z.eq(round_shift(t * GELU_C2, Q30))
        else:
            z = x
        zc = Mux(z > INT32_MAX, INT32_MAX, Mux(z < INT32_MIN, INT32_MIN, z))   # |z| < 2**31 by range
        m.submodules.exp = exp = ExpNeg(1)
        negabs = Signal(signed(33))
        m.d.comb += negabs.eq(Mux(zc < 0, zc, -zc))
        m.d.comb += [exp.valid.eq(delay(m, self.valid, self._pre, "v_pre")), exp.d[0].eq(negabs)]
        zpos = Signal()
        m.d.comb += zpos.eq(zc >= 0)
        pos = delay(m, zpos, ExpNeg.LATENCY, "zpos")
        e = exp.e[0]
        m.submodules.div = div = self._div
        m.d.comb += [div.valid.eq(exp.ready),
                     div.a.eq(Mux(pos, Const(1 << 60, 62), e << Q30)), div.b.eq((1 << Q30) + e)]
        lag = self._pre + ExpNeg.LATENCY + div.LATENCY
        xd = delay(m, self.x, lag, "x")
        sig = div.q
        act = Signal(signed(64))
        m.d.sync += act.eq(round_shift(xd * sig, Q30))
        if self.gated:
            upd = delay(m, self.up, lag + 1, "up")
            m.d.sync += self.y.eq(sat32(round_shift(act * upd, Q16)))
        else:
            m.d.sync += self.y.eq(sat32(act))
        self._valid_chain(m, self.LATENCY)
        return m


class NormUnit(_Pipe):
    """RMSNorm or LayerNorm of one vector of ``d`` Q16 values, with the op's gains (and bias)
    and its eps folded in as ROM constants (``golden.model.k_rmsnorm`` / ``k_layernorm``).

    The vector streams in ``lanes`` values per cycle (``valid``; ``s = ceil(d / lanes)`` chunks,
    the last one padded) into the unit's buffer. The unit then makes its passes over the chunks:
    - the load keeps the sum (LayerNorm) or the largest ``|x|`` (RMSNorm);
    - (LayerNorm only) the mean ``round(sum / d)`` by a ``DivRound``, then a pass for the
      largest ``|x - mean|``;
    - the shift ``k`` that brings the largest magnitude under 2**15;
    - ``xs = round((x - mean) / 2**k)`` and the sum of squares, a chunk per cycle;
    - ``ms = round(sumsq / d)``, ``r = max(isqrt((ms + eps_k) << 16), 1)``, where ``eps_k`` is
      a 48-entry ROM of eps in the scale of each ``k``.

    The outputs then stream out a chunk per cycle (``ready``), through one division pipeline
    per lane: ``sat(round(round((xs << 24) / r) * g / 2**16) [+ b])``. ``LATENCY`` is the
    cycles from the first chunk in to the first chunk out. The unit takes one vector at a time."""

    @staticmethod
    def latency(d: int, kind: str, lanes: int = 1) -> int:
        """First chunk in -> first chunk out: the load (s chunks), the mean and the centring
        pass (LayerNorm), the shift, the squares pass (s), ms, the square root, the division
        pipeline, the output register."""
        s = -(-d // lanes)
        mean = 1 + DivRound.latency(33) + s if kind == "layernorm" else 0
        return s + mean + 1 + s + DivRound.latency(33) + ISqrt.latency(50) + 2 + DivRound.latency(41) + 1

    def __init__(self, d: int, gain, bias=None, *, eps, kind: str = "rmsnorm", lanes: int = 1):
        import numpy as np
        if kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be rmsnorm or layernorm, not {kind!r}")
        self.d, self.kind = d, kind
        self.lanes = max(1, min(int(lanes), d))
        self.steps = -(-d // self.lanes)
        L, S = self.lanes, self.steps
        gain = np.asarray(gain, np.int64).reshape(-1, d)         # one row per op sharing the unit
        self.ops = gain.shape[0]

        def chunks(rows):                                     # [ops, d] -> [ops * S, L] padded with 0
            pad = np.zeros((rows.shape[0], S * L), np.int64)
            pad[:, :d] = rows
            return pad.reshape(-1, L)
        self.gain = chunks(gain)
        self.bias = None if bias is None else chunks(np.asarray(bias, np.int64).reshape(-1, d))
        eps = [float(e) for e in np.broadcast_to(np.asarray(eps, np.float64), (self.ops,))]
        self.eps_k = []
        for e in eps:
            g0 = int(round(e * 2.0 ** 60))
            self.eps_k += [((g0 + (1 << (27 + 2 * k))) >> (28 + 2 * k)) for k in range(48)]   # rshift_round
        self._mean = DivRound(44, 12, 33)
        self._ms = DivRound(44, 12, 33)
        self._sqrt = ISqrt(50)
        self._div = [DivRound(41, 26, 41) for _ in range(L)]
        self.LATENCY = self.latency(d, kind, L)
        ports = {"valid": In(1), "x": In(signed(32)).array(L)}
        if self.ops > 1:
            ports["sel"] = In(range(self.ops))                     # which op's gains, bias and eps
        super().__init__({**ports, "ready": Out(1), "y": Out(signed(32)).array(L)})

    def elaborate(self, platform):
        from amaranth.hdl import Cat
        from amaranth.lib.memory import Memory
        m = Module()
        d, L, S = self.d, self.lanes, self.steps
        W = 35
        m.submodules.buf = mem = Memory(shape=unsigned(W * L), depth=max(S, 2), init=[])
        rd, wr = mem.read_port(domain="comb"), mem.write_port()
        sel = self.sel if self.ops > 1 else 0

        def rom(name, rows, width):
            words = [sum((int(v) & ((1 << width) - 1)) << (width * k) for k, v in enumerate(r)) for r in rows]
            mm = m.submodules[name] = Memory(shape=unsigned(width * L), depth=max(len(words), 2),
                                             init=words + [0] * (len(words) < 2))
            return mm.read_port(domain="comb")

        def lane(word, k, width):
            return word[k * width:(k + 1) * width].as_signed()

        gain_rp = rom("gain", self.gain, 33)
        bias_rp = rom("bias", self.bias, 33) if self.bias is not None else None
        m.submodules.eps = eps_mem = Memory(shape=unsigned(61), depth=len(self.eps_k), init=self.eps_k)
        eps_rp = eps_mem.read_port(domain="comb")
        i = Signal(range(S + 2))
        m.d.comb += [rd.addr.eq(i), wr.addr.eq(i), wr.en.eq(0)]
        cur = [lane(rd.data, k, W) for k in range(L)]
        live = [Signal(name=f"live{k}") for k in range(L)]          # lane k of chunk i holds an element
        for k in range(L):
            m.d.comb += live[k].eq(i * L + k < d)
        acc = Signal(signed(48))
        amax = Signal(unsigned(34))
        k = Signal(unsigned(6))
        sumsq = Signal(unsigned(44))
        r = Signal(unsigned(25))

        def chunk_max(vals):
            """max(amax, |v| of the live lanes) as a comparison tree."""
            level = []
            for q, v in enumerate(vals):
                a_ = Signal(unsigned(34), name=f"abs{q}")
                m.d.comb += a_.eq(Mux(live[q], Mux(v < 0, -v, v), 0))
                level.append(a_)
            level.append(amax)
            while len(level) > 1:
                nxt = []
                for j in range(0, len(level), 2):
                    if j + 1 < len(level):
                        t = Signal(unsigned(34))
                        m.d.comb += t.eq(Mux(level[j] >= level[j + 1], level[j], level[j + 1]))
                        nxt.append(t)
                    else:
                        nxt.append(level[j])
                level = nxt
            return level[0]

        m.submodules.mean = mean = self._mean
        m.submodules.ms = msd = self._ms
        m.submodules.sqrt = sq = self._sqrt
        for q, dv in enumerate(self._div):
            m.submodules[f"div{q}"] = dv
            m.d.comb += dv.valid.eq(0)
        m.d.comb += [mean.valid.eq(0), msd.valid.eq(0), sq.valid.eq(0), self.ready.eq(0)]
        out_i = Signal(range(S + 2))
        with m.FSM():
            with m.State("LOAD"):
                with m.If(self.valid):
                    xin = [Mux(live[q], self.x[q], 0) for q in range(L)]
                    m.d.comb += wr.en.eq(1)
                    words = []
                    for q in range(L):
                        w_ = Signal(signed(W), name=f"xin{q}")
                        m.d.comb += w_.eq(xin[q])
                        words.append(w_)
                    m.d.comb += wr.data.eq(Cat(*words))
                    m.d.sync += i.eq(i + 1)
                    if self.kind == "layernorm":
                        m.d.sync += acc.eq(acc + sum(words))
                    else:
                        m.d.sync += amax.eq(chunk_max(words))
                    with m.If(i == S - 1):
                        m.d.sync += i.eq(0)
                        m.next = "MEAN" if self.kind == "layernorm" else "SHIFT"
            if self.kind == "layernorm":
                with m.State("MEAN"):
                    m.d.comb += [mean.valid.eq(i == 0), mean.a.eq(acc), mean.b.eq(d)]
                    m.d.sync += i.eq(1)
                    with m.If(mean.ready):
                        m.d.sync += [i.eq(0), acc.eq(mean.q)]
                        m.next = "MAX"
                with m.State("MAX"):                   # centre, largest magnitude
                    cs = []
                    for q in range(L):
                        c = Signal(signed(W), name=f"c{q}")
                        m.d.comb += c.eq(Mux(live[q], cur[q] - acc, 0))
                        cs.append(c)
                    m.d.comb += [wr.en.eq(1), wr.data.eq(Cat(*cs))]
                    m.d.sync += [i.eq(i + 1), amax.eq(chunk_max(cs))]
                    with m.If(i == S - 1):
                        m.d.sync += i.eq(0)
                        m.next = "SHIFT"
            with m.State("SHIFT"):
                nb = bit_length(m, amax, 34, "norm_amax_bits")
                m.d.sync += k.eq(Mux(nb > 15, nb - 15, 0))
                m.next = "SQUARES"
            with m.State("SQUARES"):
                xs = []
                for q in range(L):
                    x_ = Signal(signed(W), name=f"xs{q}")
                    m.d.comb += x_.eq(Mux(live[q], (cur[q] + half_of(k, 34)) >> k, 0))
                    xs.append(x_)
                m.d.comb += [wr.en.eq(1), wr.data.eq(Cat(*xs))]
                m.d.sync += [sumsq.eq(sumsq + sum(x_ * x_ for x_ in xs)), i.eq(i + 1)]
                with m.If(i == S - 1):
                    m.d.sync += i.eq(0)
                    m.next = "MS"
            with m.State("MS"):
                m.d.comb += [msd.valid.eq(i == 0), msd.a.eq(sumsq), msd.b.eq(d)]
                m.d.sync += i.eq(1)
                with m.If(msd.ready):
                    m.d.sync += [i.eq(0), sumsq.eq(msd.q)]
                    m.next = "SQRT"
            with m.State("SQRT"):
                m.d.comb += [eps_rp.addr.eq(sel * 48 + k), sq.valid.eq(i == 0), sq.v.eq((sumsq + eps_rp.data) << 16)]
                m.d.sync += i.eq(1)
                with m.If(sq.ready):
                    m.d.sync += [i.eq(0), r.eq(Mux(sq.r == 0, 1, sq.r))]
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):                   # a division pipeline per lane, a chunk per cycle
                for q, dv in enumerate(self._div):
                    m.d.comb += [dv.valid.eq(i < S), dv.a.eq(cur[q] << 24), dv.b.eq(r)]
                m.d.sync += i.eq(Mux(i < S, i + 1, i))
                m.d.comb += gain_rp.addr.eq(sel * S + out_i)
                if bias_rp is not None:
                    m.d.comb += bias_rp.addr.eq(sel * S + out_i)
                with m.If(self._div[0].ready):
                    for q, dv in enumerate(self._div):
                        prod = Signal(signed(80), name=f"prod{q}")
                        m.d.comb += prod.eq(dv.q * lane(gain_rp.data, q, 33))
                        y = round_shift(prod, Q16) + (lane(bias_rp.data, q, 33) if bias_rp is not None else 0)
                        m.d.sync += self.y[q].eq(sat32(y))
                    m.d.sync += out_i.eq(out_i + 1)
                with m.If(out_i == S):
                    m.d.sync += [i.eq(0), out_i.eq(0), acc.eq(0), amax.eq(0), sumsq.eq(0)]
                    m.next = "LOAD"
        # ready: one cycle after the division's output is registered
        rdy = Signal()
        m.d.sync += rdy.eq(self._div[0].ready)
        m.d.comb += self.ready.eq(rdy)
        return m


class AttentionEngine(wiring.Component):
    """Every query head of one attention op over its KV cache, ``positions`` cached positions
    per cycle (``golden.model.k_attention`` for one query row; docs/chip.md).

    The KV cache is the engine's: keys and values MXINT-quantised per position, kv head and
    block of ``block`` (elements and one shift), written through ``ports`` block-write ports
    (``kv_en``; ``kv_v`` = 0 for a key block, 1 for a value block; ``kv_addr`` = position *
    kv_heads * blocks + kv head * blocks + block). With ``start``, the engine attends the
    positions ``0..t`` with the query held on ``qe``/``qs`` (all heads), in three passes over
    the positions, ``positions`` at a time for all heads at once:
    - scores: each block's dot product ``sum(qe * ke) << (qs + ks - emin)`` with ``emin`` the
      least of the pair's block shifts, then ``z = round(acc * M / 2**(n - emin + 16))``; the
      running maximum per head and the least value shift per kv head and block (``vmin``);
    - ``e = exp(z - max)`` through ``ExpNeg`` lanes, and their sum per head;
    - ``p = round(e * 2**15 / sum)`` through ``DivRound`` lanes, and ``acc += p * (ve << (vs -
      vmin))`` per output element;
    then ``round(acc / 2**(15 - vmin))``, saturated, on ``out`` with ``ready`` for one cycle.
    ``cycles(t)`` is exact: start edge to the ready cycle."""

    @staticmethod
    def cycles(attended: int, positions: int) -> int:
        s = -(-attended // positions)
        return 1 + s + (s + ExpNeg.LATENCY) + (s + DivRound.latency(17)) + 1

    def __init__(self, heads: int, kv_heads: int, d: int, ctx: int, scale_m: int, scale_n: int, *,
                 block: int, bits: int = 8, positions: int = 8, ports: int = 1):
        self.H, self.Hkv, self.d, self.ctx, self.bits = heads, kv_heads, d, ctx, bits
        self.block, self.nb = block, d // block
        self.P = max(1, min(int(positions), ctx))
        self.chunks = -(-ctx // self.P)
        self.scale_m, self.scale_n = int(scale_m), int(scale_n)
        self.nk = kv_heads * self.nb
        self.ports = ports
        super().__init__({
            "kv_en": In(1).array(ports), "kv_v": In(1).array(ports),
            "kv_addr": In(range(max(ctx * self.nk, 2))).array(ports),
            "kv_e": In(unsigned(block * bits)).array(ports), "kv_s": In(unsigned(6)).array(ports),
            "qe": In(signed(bits)).array(heads * d), "qs": In(unsigned(6)).array(heads * self.nb),
            "start": In(1), "t": In(range(max(ctx, 2))),
            "ready": Out(1), "out": Out(signed(32)).array(heads * d)})

    def elaborate(self, platform):
        from amaranth.hdl import Cat
        from amaranth.lib.memory import Memory
        m = Module()
        H, Hkv, D, B, nb, bits, P, nk = self.H, self.Hkv, self.d, self.block, self.nb, self.bits, self.P, self.nk
        rep = H // Hkv
        NC = self.chunks
        mems = {}
        for name, width in (("ke", B * bits), ("ve", B * bits), ("ks", 6), ("vs", 6)):
            mm = m.submodules[name] = Memory(shape=unsigned(width), depth=max(self.ctx * nk, 2), init=[])
            for w in range(self.ports):
                wp = mm.write_port()
                is_v = name in ("ve", "vs")
                m.d.comb += [wp.en.eq(self.kv_en[w] & (self.kv_v[w] if is_v else ~self.kv_v[w])),
                             wp.addr.eq(self.kv_addr[w]),
                             wp.data.eq(self.kv_e[w] if name in ("ke", "ve") else self.kv_s[w])]
            mems[name] = mm
        zm = [Memory(shape=unsigned(48 * P), depth=max(NC, 2), init=[]) for _ in range(H)]
        em = [Memory(shape=unsigned(31 * P), depth=max(NC, 2), init=[]) for _ in range(H)]
        for h in range(H):
            m.submodules[f"z{h}"], m.submodules[f"e{h}"] = zm[h], em[h]
        t = Signal.like(self.t)
        i = Signal(range(NC + 2))                    # chunk issued
        o = Signal(range(NC + 2))                    # chunk of results
        rc = Signal(range(NC + 2))                   # the chunk the KV reads address
        # the KV words of chunk rc: [p][hk][b]
        words = {name: [[[None] * nb for _ in range(Hkv)] for _ in range(P)] for name in mems}
        for p in range(P):
            pos = Signal(range(max(NC * P, 2) + P), name=f"pos{p}")
            m.d.comb += pos.eq(rc * P + p)
            for hk in range(Hkv):
                for b in range(nb):
                    for name, mm in mems.items():
                        rp = mm.read_port(domain="comb")
                        m.d.comb += rp.addr.eq(pos * nk + hk * nb + b)
                        words[name][p][hk][b] = rp.data

        def live(chunk, p):
            return chunk * P + p <= t

        def lane(word, k, width=bits):
            return word[k * width:(k + 1) * width].as_signed()

        zmax = [Signal(signed(48), name=f"zmax{h}") for h in range(H)]
        total = [Signal(unsigned(40), name=f"total{h}") for h in range(H)]
        vmin = [[Signal(unsigned(6), name=f"vmin{hk}_{b}") for b in range(nb)] for hk in range(Hkv)]
        acc = [[Signal(signed(64), name=f"pv{h}_{k}") for k in range(D)] for h in range(H)]
        m.submodules.exp = exp = ExpNeg(H * P)
        divs = [DivRound(48, 40, 17) for _ in range(H * P)]
        for n_, dv in enumerate(divs):
            m.submodules[f"div{n_}"] = dv
            m.d.comb += dv.valid.eq(0)
        m.d.comb += [exp.valid.eq(0), self.ready.eq(0), rc.eq(i)]
        zw = [zm[h].write_port() for h in range(H)]
        ew = [em[h].write_port() for h in range(H)]
        zr = [zm[h].read_port(domain="comb") for h in range(H)]
        er = [em[h].read_port(domain="comb") for h in range(H)]
        for h in range(H):
            m.d.comb += [zw[h].en.eq(0), zw[h].addr.eq(i), ew[h].en.eq(0), ew[h].addr.eq(o),
                         zr[h].addr.eq(i), er[h].addr.eq(i)]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [t.eq(self.t), i.eq(0), o.eq(0)]
                    m.next = "SCORE"
            with m.State("SCORE"):                       # P positions of every head per cycle
                for h in range(H):
                    hk = h // rep
                    zs, zmx = [], zmax[h]
                    for p in range(P):
                        exps = [Signal(unsigned(7), name=f"sx{h}_{p}_{j}") for j in range(nb)]
                        for j in range(nb):
                            m.d.comb += exps[j].eq(self.qs[h * nb + j] + words["ks"][p][hk][j])
                        emin = exps[0]
                        for j in range(1, nb):
                            nm = Signal(unsigned(7), name=f"emin{h}_{p}_{j}")
                            m.d.comb += nm.eq(Mux(exps[j] < emin, exps[j], emin))
                            emin = nm
                        terms = []
                        for j in range(nb):
                            part = sum(self.qe[h * D + j * B + k] * lane(words["ke"][p][hk][j], k) for k in range(B))
                            terms.append(part << (exps[j] - emin)[:6])
                        sc = Signal(signed(48), name=f"sc{h}_{p}")
                        m.d.comb += sc.eq(sum(terms))
                        amt = Signal(signed(10), name=f"amt{h}_{p}")
                        m.d.comb += amt.eq(self.scale_n - emin + Q16)
                        prod = Signal(signed(64), name=f"sp{h}_{p}")
                        m.d.comb += prod.eq(sc * self.scale_m)
                        zz = Signal(signed(48), name=f"zz{h}_{p}")
                        m.d.comb += zz.eq(Mux(amt > 0, (prod + half_of(amt[:7], 64)) >> amt[:7], prod << (-amt)[:7]))
                        zs.append(zz)
                        nz = Signal(signed(48), name=f"zm{h}_{p}")
                        m.d.comb += nz.eq(Mux(live(i, p) & (((i == 0) & (p == 0)) | (zz > zmx)), zz, zmx))
                        zmx = nz
                    m.d.comb += [zw[h].en.eq(1), zw[h].data.eq(Cat(*zs))]
                    m.d.sync += zmax[h].eq(zmx)
                for hk in range(Hkv):
                    for b in range(nb):
                        vm = vmin[hk][b]
                        for p in range(P):
                            s_ = words["vs"][p][hk][b]
                            nv = Signal(unsigned(6), name=f"vm{hk}_{b}_{p}")
                            m.d.comb += nv.eq(Mux(live(i, p) & (((i == 0) & (p == 0)) | (s_ < vm)), s_, vm))
                            vm = nv
                        m.d.sync += vmin[hk][b].eq(vm)
                m.d.sync += i.eq(i + 1)
                with m.If(i * P + P > t):                # the last chunk
                    m.d.sync += [i.eq(0), o.eq(0)] + [total[h].eq(0) for h in range(H)]
                    m.next = "EXP"
            with m.State("EXP"):                         # e = exp(z - max), P lanes per head
                lo = -64 * (1 << Q16)                     # exp of anything below is 0 in Q30 anyway
                issuing = Signal(name="exp_issue")
                m.d.comb += issuing.eq(i * P <= t)
                for h in range(H):
                    for p in range(P):
                        diff = Signal(signed(49), name=f"df{h}_{p}")
                        m.d.comb += diff.eq(zr[h].data[p * 48:(p + 1) * 48].as_signed() - zmax[h])
                        m.d.comb += exp.d[h * P + p].eq(Mux(diff < lo, lo, diff))
                m.d.comb += exp.valid.eq(issuing)
                m.d.sync += i.eq(Mux(issuing, i + 1, i))
                with m.If(exp.ready):
                    for h in range(H):
                        es = [Mux(live(o, p), exp.e[h * P + p], 0) for p in range(P)]
                        m.d.comb += ew[h].en.eq(1)
                        ev = []
                        for p in range(P):
                            s_ = Signal(unsigned(31), name=f"ev{h}_{p}")
                            m.d.comb += s_.eq(es[p])
                            ev.append(s_)
                        m.d.comb += ew[h].data.eq(Cat(*ev))
                        m.d.sync += total[h].eq(total[h] + sum(ev))
                    m.d.sync += o.eq(o + 1)
                    with m.If(o * P + P > t):
                        m.d.sync += [i.eq(0), o.eq(0)] + [a.eq(0) for row in acc for a in row]
                        m.next = "PV"
            with m.State("PV"):                          # p = round(e * 2**15 / total); acc += p v
                issuing = Signal(name="pv_issue")
                m.d.comb += [issuing.eq(i * P <= t), rc.eq(o)]
                for h in range(H):
                    for p in range(P):
                        dv = divs[h * P + p]
                        m.d.comb += [dv.valid.eq(issuing), dv.a.eq(er[h].data[p * 31:(p + 1) * 31] << 15),
                                     dv.b.eq(total[h])]
                m.d.sync += i.eq(Mux(issuing, i + 1, i))
                with m.If(divs[0].ready):
                    for h in range(H):
                        hk = h // rep
                        for k in range(D):
                            j = k // B
                            terms = [Mux(live(o, p), divs[h * P + p].q, 0)
                                     * (lane(words["ve"][p][hk][j], k % B) << (words["vs"][p][hk][j] - vmin[hk][j])[:6])
                                     for p in range(P)]
                            m.d.sync += acc[h][k].eq(acc[h][k] + sum(terms))
                    m.d.sync += o.eq(o + 1)
                    with m.If(o * P + P > t):
                        m.next = "OUT"
            with m.State("OUT"):
                for h in range(H):
                    hk = h // rep
                    for k in range(D):
                        j = k // B
                        amt = Signal(signed(8), name=f"oamt{h}_{k}")
                        m.d.comb += amt.eq(15 - vmin[hk][j])
                        r = Mux(amt > 0, (acc[h][k] + half_of(amt[:6], 64)) >> amt[:6], acc[h][k] << (-amt)[:6])
                        m.d.sync += self.out[h * D + k].eq(sat32(r))
                m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.ready.eq(1)
                m.next = "IDLE"
        return m
