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


class ResidualAdd(_Pipe):
    """y[i] = sat32(a[i] + b[i]) for ``lanes`` Q16 lanes."""

    LATENCY = 1

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__({"valid": In(1), "a": In(signed(32)).array(lanes), "b": In(signed(32)).array(lanes),
                          "ready": Out(1), "y": Out(signed(32)).array(lanes)})

    def elaborate(self, platform):
        m = Module()
        for i in range(self.lanes):
            m.d.sync += self.y[i].eq(sat32(self.a[i] + self.b[i]))
        self._valid_chain(m, 1)
        return m


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

    def __init__(self, a_bits: int, b_bits: int, q_bits: int):
        self.a_bits, self.b_bits, self.q_bits = a_bits, b_bits, q_bits
        self.LATENCY = q_bits + 2
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

    def __init__(self, v_bits: int):
        self.v_bits = v_bits + (v_bits & 1)
        self.r_bits = self.v_bits // 2
        self.LATENCY = self.r_bits + 1
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
