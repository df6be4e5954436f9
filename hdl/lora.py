"""The LoRA unit: ``y + B (A x)`` from factors in an SRAM, after a fabric linear (spec:
docs/lora.md; golden: ``compiler.lora.apply``).

``LoraUnit(f, in_dim, bits)`` for one adapted linear (``f`` a ``compiler.lora.LoraLinear``: its
arrays are the SRAM's contents at power-up, as `tapeout adapt` wrote them). Interface:
- ``start`` (one cycle) with the linear's MXINT input held on ``xe`` (elements), ``xs`` (block
  shifts), ``emin`` (their least shift) and the fabric's outputs on ``y``;
- ``ready`` pulses ``lora.cycles(out, in, r) - 1`` cycles after the start cycle, with ``out`` = sat32(y + d).

Inside, an FSM over the SRAM banks (bank j of A holds rank rows j, j + P, ...; a word is one row
with its scale; every bank reads one word a cycle):
1. ``A``: ``macs // in`` rank rows a cycle: ``u_r = requant(sum_k (xe_k << (xs - emin)) A_rk)``;
2. ``MX``: u through ``r / mx_block(r)`` MXINT quantisers (``MxQuant``, 2 cycles);
3. ``B``: ``macs // r`` output rows a cycle: ``d_o = requant(sum_j (ue_j << (us - emin_u)) B_oj)``
   added to ``y_o``, saturated;
4. ``DONE``: ``ready``.
The requantiser is ``compiler.lora.requant``: the shift clamped to [-31, 62], a left shift that
saturates. Accumulators are 48 bits (golden refuses anything wider).
"""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from tapeout.compiler import lora
from tapeout.compiler.golden.fixed import mx_block

from .vector import MxQuant, half_of, sat32

__all__ = ["LoraUnit"]

ACC = 48


def _banks(rows: np.ndarray, mult: np.ndarray, shift: np.ndarray, per: int) -> tuple[list[list[int]], int]:
    """``per`` SRAM banks, bank j holding rows j, j + per, ...: a word is one row's int8 codes,
    then its mult (16 bits) and shift (8 bits). Reading word w of every bank gives rows
    w*per .. w*per + per - 1 in one cycle."""
    n, width = rows.shape
    row_bits = 8 * width + 24
    banks = []
    for j in range(min(per, n)):
        words = []
        for r in range(j, n, per):
            bits = 0
            for k, c in enumerate(rows[r]):
                bits |= (int(c) & 0xFF) << (8 * k)
            bits |= (int(mult[r]) & 0xFFFF) << (8 * width)
            bits |= (int(shift[r]) & 0xFF) << (8 * width + 16)
            words.append(bits)
        banks.append(words)
    return banks, row_bits


class LoraUnit(wiring.Component):
    def __init__(self, f, in_dim: int, bits: int = 8, macs: int = lora.LORA_MACS):
        o, i = f.shape
        r = f.rank
        if i != in_dim:
            raise ValueError(f"LoRA A is [{r}, {i}], the linear's input has {in_dim} features")
        if i > macs or r > macs:
            raise ValueError("the LoRA unit RTL takes rows of at most `macs` values")
        self.f, self.o, self.i, self.r, self.bits, self.macs = f, o, i, r, bits, macs
        self.pa, self.pb = macs // i, macs // r                      # rows a cycle
        self.ca, self.cb = -(-r // self.pa), -(-o // self.pb)
        self.bu = mx_block(r)
        nblk = i // mx_block(i)
        super().__init__({"start": In(1), "xe": In(signed(bits)).array(i), "xs": In(unsigned(6)).array(nblk),
                          "emin": In(signed(8)), "y": In(signed(32)).array(o),
                          "ready": Out(1), "out": Out(signed(32)).array(o)})

    @property
    def cycles(self) -> int:
        """Cycles of the chip's LoRA micro-op: the start cycle through the ready cycle (``lora.cycles``)."""
        return self.ca + self.cb + lora.LORA_LATENCY

    @staticmethod
    def _requant(m: Module, acc, mult, shift, emin, name: str):
        """``lora.requant`` of one 48-bit accumulator: sat32(round(acc * mult / 2**k))."""
        v = Signal(signed(64), name=f"{name}_v")
        m.d.comb += v.eq(acc * mult)
        k = Signal(signed(10), name=f"{name}_k")
        raw = Signal(signed(10), name=f"{name}_kraw")
        m.d.comb += raw.eq(shift - emin)
        m.d.comb += k.eq(Mux(raw < lora.SHIFT_MIN, lora.SHIFT_MIN, Mux(raw > lora.SHIFT_MAX, lora.SHIFT_MAX, raw)))
        kp = Signal(unsigned(6), name=f"{name}_kp")
        m.d.comb += kp.eq(Mux(k > 0, k, 0))
        right = Signal(signed(65), name=f"{name}_r")
        m.d.comb += right.eq((v + half_of(kp, 65)) >> kp)
        clamped = Signal(signed(33), name=f"{name}_c")
        m.d.comb += clamped.eq(Mux(v > (1 << 31), 1 << 31, Mux(v < -(1 << 31), -(1 << 31), v)))
        kn = Signal(unsigned(5), name=f"{name}_kn")
        m.d.comb += kn.eq(Mux(k < 0, -k, 0))
        left = Signal(signed(65), name=f"{name}_l")
        m.d.comb += left.eq(clamped << kn)
        out = Signal(signed(32), name=f"{name}_o")
        m.d.comb += out.eq(sat32(Mux(k > 0, right, left)))
        return out

    def _phase(self, m: Module, c, words: int, per: int, rows: int, ports, inputs, emin, tag: str, store):
        """One product over the SRAM banks: at count ``c`` word ``c`` is read and word ``c - 1``
        arrives, ``per`` rows of it (one per bank). Row q's dot product with ``inputs``,
        requantised, goes to ``store(q, value)`` (a sync statement)."""
        width = len(inputs)
        m.d.sync += c.eq(c + 1)
        with m.If(c > 0):
            with m.Switch(c - 1):
                for w in range(words):
                    with m.Case(w):
                        for j in range(min(per, rows - w * per)):
                            q = w * per + j
                            word = ports[j].data
                            codes = [word[8 * k: 8 * k + 8].as_signed() for k in range(width)]
                            mult = word[8 * width: 8 * width + 16].as_signed()
                            shift = word[8 * width + 16: 8 * width + 24].as_signed()
                            acc = Signal(signed(ACC), name=f"acc{tag}{q}")
                            m.d.comb += acc.eq(sum(inputs[k] * codes[k] for k in range(width)))
                            m.d.sync += store(q, self._requant(m, acc, mult, shift, emin, f"q{tag}{q}"))

    def elaborate(self, platform):
        m = Module()
        f, o, i, r, bits = self.f, self.o, self.i, self.r, self.bits
        banks_a, ra_bits = _banks(f.a_codes, f.a_mult, f.a_shift, self.pa)
        banks_b, rb_bits = _banks(f.b_codes, f.b_mult, f.b_shift, self.pb)
        ports_a, ports_b = [], []
        for name, banks, width, ports in (("a", banks_a, ra_bits, ports_a), ("b", banks_b, rb_bits, ports_b)):
            for j, words in enumerate(banks):
                mem = Memory(shape=unsigned(width), depth=max(len(words), 2), init=words + [0] * max(0, 2 - len(words)))
                m.submodules[f"sram_{name}{j}"] = mem
                ports.append(mem.read_port())
        blk = mx_block(i)
        # the input, every element at the row's least shift (a wire)
        xa = []
        for k in range(i):
            s = Signal(signed(bits + 64), name=f"xa{k}")
            m.d.comb += s.eq(self.xe[k] << (self.xs[k // blk] - self.emin)[:6])
            xa.append(s)
        U = [Signal(signed(32), name=f"u{j}") for j in range(r)]
        Y = [Signal(signed(32), name=f"y{q}") for q in range(o)]
        mxs = [MxQuant(self.bu, bits) for _ in range(r // self.bu)]
        for n, mx in enumerate(mxs):
            m.submodules[f"mx{n}"] = mx
            m.d.comb += mx.valid.eq(0)
            for k in range(self.bu):
                m.d.comb += mx.x[k].eq(U[n * self.bu + k])
        UE = [Signal(signed(bits), name=f"ue{j}") for j in range(r)]
        US = [Signal(unsigned(6), name=f"us{n}") for n in range(len(mxs))]
        emin_u = Signal(unsigned(6))
        ua = []
        for j in range(r):
            s = Signal(signed(bits + 64), name=f"ua{j}")
            m.d.comb += s.eq(UE[j] << (US[j // self.bu] - emin_u)[:6])
            ua.append(s)
        c = Signal(range(max(self.ca, self.cb) + 2))
        for q in range(o):
            m.d.comb += self.out[q].eq(Y[q])
        m.d.comb += [self.ready.eq(0)] + [p.addr.eq(c) for p in ports_a + ports_b]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [c.eq(0)] + [Y[q].eq(self.y[q]) for q in range(o)]
                    m.next = "A"
            with m.State("A"):                      # read word c; word c - 1 arrives: its rows
                self._phase(m, c, self.ca, self.pa, r, ports_a, xa, self.emin, "a",
                            lambda q, d: U[q].eq(d))
                with m.If(c == self.ca):
                    m.next = "MX"
            with m.State("MX"):
                m.d.comb += [mx.valid.eq(1) for mx in mxs]
                m.next = "MX_WAIT"
            with m.State("MX_WAIT"):
                m.next = "MX_TAKE"
            with m.State("MX_TAKE"):                # MxQuant.LATENCY = 2 edges after valid
                for n, mx in enumerate(mxs):
                    m.d.sync += US[n].eq(mx.shift)
                    m.d.sync += [UE[n * self.bu + k].eq(mx.elems[k]) for k in range(self.bu)]
                shifts = [mx.shift for mx in mxs]
                least = shifts[0]
                for s in shifts[1:]:
                    least = Mux(s < least, s, least)
                m.d.sync += [emin_u.eq(least), c.eq(0)]
                m.next = "B"
            with m.State("B"):
                self._phase(m, c, self.cb, self.pb, o, ports_b, ua, emin_u, "b",
                            lambda q, d: Y[q].eq(sat32(Y[q] + d)))
                with m.If(c == self.cb):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.ready.eq(1)
                m.next = "IDLE"
        return m
