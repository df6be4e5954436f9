"""The base die's tile with its vias as data (spec: docs/layout.md, "Base-die RTL").

``RomTile``/``LinearFabric`` fold the two via layers into the RTL as constants: that is the
chip as manufactured, and its Verilog grows with the model (a 576 x 576 linear takes ~15 min
to build under Verilator). ``BaseTile`` is the other view of the same silicon: the base die
alone, every cell with a via *site* onto every product line of its column, and the via layers
as configuration written into per-cell registers (a via present or not is a switch closed or
open). Its RTL depends only on the base family, so one Verilator build serves every tile of
every model of the family; ``TileSlot`` adds the row end (the requantiser with its scale-ROM
words) and the column-tile adder chain's input, and a linear is simulated tile by tile
(``hdl.sim.simulate_linear_slots``).
"""
from __future__ import annotations

from amaranth.hdl import Array, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .reference import LEFT_CLAMP, RIGHT_MAX
from .romtile import check_positive, set_tile_params, shift_left, tree_sum, wrap

__all__ = ["BaseTile", "TileSlot", "requantize_rtl", "INT32_MIN", "INT32_MAX"]

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
MULT_BITS, NSHIFT_BITS = 16, 11      # |mult| < 2**15, |nshift| < 2**10 (LinearFabric's ranges)


def requantize_rtl(m: Module, name: str, acc, mult, nshift, emin, bias, acc_bits: int):
    """The saturated int32 ``y`` of one row (``hdl.reference.requantize``, gate for gate).
    ``mult``, ``nshift`` and ``bias`` are ints (folded constants) or signals (ROM words);
    ``bias`` may be None."""
    v = Signal(signed(acc_bits + MULT_BITS), name=f"v_{name}")
    m.d.comb += v.eq(acc * mult)
    k = Signal(signed(12), name=f"k_{name}")
    m.d.comb += k.eq(nshift - emin)
    amt = Mux(k - 1 > RIGHT_MAX, RIGHT_MAX, k - 1)[:6]
    right = ((v >> amt) + 1) >> 1
    lim = 1 << LEFT_CLAMP
    s = (-k)[:5]
    big = (v != 0) & ((-k >= LEFT_CLAMP) | (v >= lim) | (v < -lim))
    small = v[:LEFT_CLAMP + 1].as_signed() << s
    left = Mux(big, Mux(v < 0, -lim, lim), small)
    r = Signal(signed(66), name=f"r_{name}")
    m.d.comb += r.eq(Mux(k > 0, right, left))
    y = r + (bias if bias is not None else 0)
    return Mux(y > INT32_MAX, INT32_MAX, Mux(y < INT32_MIN, INT32_MIN, y))


def _index_bits(n_lines: int) -> int:
    """Bits of a via index register: 0 = no via, k + 1 = product line k."""
    return max(1, n_lines.bit_length())


class BaseTile(wiring.Component):
    """One ``rows x cols`` base-die tile whose vias are configuration registers.

    Per column ``c`` every product line ``x[c] * coarse[k]`` (and ``x[c] * fine[j]``) exists,
    as on the base die. Cell ``(r, c)`` holds two via registers, ``code[r][c]`` and
    ``fine[r][c]`` (0: no via, k + 1: line k), and row ``r`` holds a group-scale word per unit.
    Then, exactly as ``RomTile``:

        acc[r] = acc_in[r] + sum_u (part[r, u] * gs[r][u]) << sh[u]   (mod 2**acc_bits)

    ``acc_in`` is the column-tile adder chain: the previous tile's ``acc`` of the same rows.

    Configuration: on a clock edge with ``load = 1``, row ``cfg_row`` takes ``cfg_code``,
    ``cfg_fine`` and ``cfg_gs`` (a via map row of ``V_CODE``/``V_FINE`` and its scale-ROM
    words); ``load`` rows carry no token. Latency ``LATENCY = 1`` as ``RomTile``.
    """

    LATENCY = 1

    def __init__(self, rows, cols, unit, *, coarse, fine=(), act_bits=8, shift_bits=5, acc_bits=48,
                 gs_bits=32):
        set_tile_params(self, rows, cols, unit, coarse, fine, act_bits, shift_bits, acc_bits)
        self.gs_bits = check_positive("Group scale bits", gs_bits)
        nu = cols // unit
        members = {
            "x": In(signed(act_bits)).array(cols),
            "sh": In(unsigned(shift_bits)).array(nu),
            "acc_in": In(signed(acc_bits)).array(rows),
            "valid": In(1),
            "load": In(1),
            "cfg_row": In(unsigned(max(1, (rows - 1).bit_length()))),
            "cfg_code": In(unsigned(_index_bits(len(self.coarse)))).array(cols),
            "cfg_gs": In(unsigned(gs_bits)).array(nu),
            "acc": Out(signed(acc_bits)).array(rows),
            "ready": Out(1),
        }
        if self.fine:
            members["cfg_fine"] = In(unsigned(_index_bits(len(self.fine)))).array(cols)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        R, C, U = self.rows, self.cols, self.unit
        nu = C // U
        cb, fb = _index_bits(len(self.coarse)), _index_bits(len(self.fine))
        code = [[Signal(cb, name=f"code_r{r}_c{c}") for c in range(C)] for r in range(R)]
        fine = [[Signal(fb, name=f"fine_r{r}_c{c}") for c in range(C)] for r in range(R)] if self.fine else None
        gs = [[Signal(self.gs_bits, name=f"gs_r{r}_u{u}") for u in range(nu)] for r in range(R)]
        with m.If(self.load):
            for r in range(R):
                with m.If(self.cfg_row == r):
                    for c in range(C):
                        m.d.sync += code[r][c].eq(self.cfg_code[c])
                        if fine:
                            m.d.sync += fine[r][c].eq(self.cfg_fine[c])
                    for u in range(nu):
                        m.d.sync += gs[r][u].eq(self.cfg_gs[u])

        # a cell adds the product line its via reaches, x[c] * alphabet[index]; written as the
        # line's value times x[c] (index 0, no via: 0), which Verilator evaluates from a small
        # table: 11x faster than a 15-way case per cell (23k vs 2.1k cycles/s, 64 x 64 fp4 tile)
        coarse_vals = Array([Const(0, 1)] + [Const(v) for v in self.coarse])
        fine_vals = Array([Const(0, 1)] + [Const(v) for v in self.fine]) if fine else None
        top = max(abs(v) for v in self.coarse) + max((abs(v) for v in self.fine), default=0)
        part_bound = U * (1 << (self.act_bits - 1)) * top      # |part| of a full unit
        for r in range(R):
            shifted = []
            for u in range(nu):
                terms = []
                for c in range(u * U, (u + 1) * U):
                    terms.append(self.x[c] * coarse_vals[code[r][c]])
                    if fine:
                        terms.append(self.x[c] * fine_vals[fine[r][c]])
                part = Signal(signed(part_bound.bit_length() + 1), name=f"part_r{r}_u{u}")
                m.d.comb += part.eq(tree_sum(terms))
                scaled = Signal(signed(len(part) + self.gs_bits + 1), name=f"scaled_r{r}_u{u}")
                m.d.comb += scaled.eq(part * gs[r][u])
                shifted.append(shift_left(m, scaled, self.sh[u], self.acc_bits, f"sh_r{r}_u{u}"))
            total = tree_sum([wrap(s, self.acc_bits) for s in shifted] + [self.acc_in[r]])
            m.d.sync += self.acc[r].eq(total[:self.acc_bits].as_signed())
        m.d.sync += self.ready.eq(self.valid & ~self.load)
        return m


class TileSlot(wiring.Component):
    """A ``BaseTile`` and the row end of its rows: the requantiser with its scale-ROM words
    (``mult``, ``nshift``, ``bias`` per row, loaded with the tile's configuration rows as
    ``cfg_mult``, ``cfg_nshift``, ``cfg_bias``).

    Per token: ``acc`` (the tile's chained accumulators, for the next column tile's
    ``acc_in``) and ``y`` (``requantize(acc)``: the linear's output when this is the last
    column tile). Both appear ``LATENCY = 2`` edges after the token, with ``ready = 1``.
    """

    LATENCY = 2

    def __init__(self, rows, cols, unit, *, coarse, fine=(), act_bits=8, shift_bits=5, acc_bits=48,
                 gs_bits=32):
        self.tile = BaseTile(rows, cols, unit, coarse=coarse, fine=fine, act_bits=act_bits,
                             shift_bits=shift_bits, acc_bits=acc_bits, gs_bits=gs_bits)
        self.rows, self.cols, self.unit = rows, cols, unit
        self.coarse, self.fine = self.tile.coarse, self.tile.fine
        self.acc_bits = acc_bits
        members = {name: member for name, member in self.tile.signature.members.items()
                   if name not in ("acc", "ready")}
        members.update({
            "emin": In(signed(8)),
            "cfg_mult": In(signed(MULT_BITS)),
            "cfg_nshift": In(signed(NSHIFT_BITS)),
            "cfg_bias": In(signed(32)),
            "acc": Out(signed(acc_bits)).array(rows),
            "y": Out(signed(32)).array(rows),
            "ready": Out(1),
        })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        tile = m.submodules.tile = self.tile
        for name in tile.signature.members:
            if name in ("acc", "ready"):
                continue
            src, dst = getattr(self, name), getattr(tile, name)
            if tile.signature.members[name].dimensions:
                for k in range(len(dst)):
                    m.d.comb += dst[k].eq(src[k])
            else:
                m.d.comb += dst.eq(src)
        R = self.rows
        mult = [Signal(signed(MULT_BITS), name=f"mult_r{r}") for r in range(R)]
        nshift = [Signal(signed(NSHIFT_BITS), name=f"nshift_r{r}") for r in range(R)]
        bias = [Signal(signed(32), name=f"bias_r{r}") for r in range(R)]
        with m.If(self.load):
            for r in range(R):
                with m.If(self.cfg_row == r):
                    m.d.sync += [mult[r].eq(self.cfg_mult), nshift[r].eq(self.cfg_nshift),
                                 bias[r].eq(self.cfg_bias)]
        emin = Signal(signed(8))                     # aligned with the tile's registered acc
        m.d.sync += emin.eq(self.emin)
        for r in range(R):
            m.d.sync += self.acc[r].eq(tile.acc[r])
            m.d.sync += self.y[r].eq(requantize_rtl(m, f"r{r}", tile.acc[r], mult[r], nshift[r], emin,
                                                    bias[r], self.acc_bits))
        m.d.sync += self.ready.eq(tile.ready)
        return m
