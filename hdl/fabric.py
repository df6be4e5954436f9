"""The fabric of one linear layer: a grid of RomTiles plus per-row requantisation
(spec: docs/layout.md, "Fabric of a linear layer")."""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .basetile import INT32_MAX, INT32_MIN, requantize_rtl
from .romtile import RomTile, check_alphabet, check_int_array, check_positive, tree_sum, wrap

__all__ = ["LinearFabric"]


class LinearFabric(wiring.Component):
    """A linear ``[out, in]`` as a ``ceil(out/tile_rows) x ceil(in/tile_cols)`` grid of
    ``RomTile``s, one token per cycle.

    Every tile is a full ``tile_rows x tile_cols`` base-die tile; the cells of edge tiles
    outside the matrix have no vias and their unused inputs are tied to 0. For row ``o`` the
    column tiles' ``acc`` are added modulo ``2**acc_bits`` (exact whenever the golden model's
    48-bit check passes), then

        y[o] = saturate_int32(round_half_up(acc * mult[o] / 2**(nshift[o] - emin)) + bias[o])

    which is ``golden.model.linear_int`` (``hdl.reference.requantize`` states the shifters).

    Latency: ``LATENCY = 2`` clocks (tile accumulators, then the registered requantiser);
    ``y`` holds the token presented with ``valid = 1`` two edges earlier when ``ready = 1``.
    One token per cycle.

    Parameters
    ----------
    v_code, v_fine : int arrays ``[out, in]``: via indices into ``coarse`` / ``fine`` (-1: none).
    coarse, fine : the alphabets (see ``RomTile``).
    group_scale : int array ``[out, in // unit]`` >= 0.
    unit : features per unit (``gcd(32, group)``); divides ``in`` and ``tile_cols``.
    mult : int array ``[out]``, ``|mult| < 2**15``. nshift : int array ``[out]``, ``|nshift| < 2**10``.
    bias : Q16 int array ``[out]`` within int32, or None.
    tile_rows, tile_cols : tile size (default 64 x 64).
    act_bits, shift_bits, acc_bits : widths of ``x``, ``sh`` and the accumulators.
    """

    LATENCY = 2

    def __init__(self, *, v_code, v_fine=None, coarse, fine=(), group_scale, unit, mult, nshift,
                 bias=None, tile_rows=64, tile_cols=64, act_bits=8, shift_bits=5, acc_bits=48):
        self.tile_rows = check_positive("Tile rows", tile_rows)
        self.tile_cols = check_positive("Tile columns", tile_cols)
        self.unit = check_positive("Fabric unit", unit)
        if tile_cols % unit:
            raise ValueError(f"Fabric unit must divide the tile columns ({tile_cols}), not {unit!r}")
        self.act_bits = check_positive("Activation bits", act_bits)
        self.shift_bits = check_positive("Shift bits", shift_bits)
        self.acc_bits = check_positive("Accumulator bits", acc_bits)
        self.coarse = check_alphabet("Coarse", coarse, allow_empty=False)
        self.fine = check_alphabet("Fine", fine, allow_empty=True)
        v_code = np.asarray(v_code)
        if v_code.ndim != 2 or 0 in v_code.shape:
            raise ValueError(f"Via map v_code must be a non-empty [out, in] array, not shape {v_code.shape}")
        self.out_dim, self.in_dim = shape = v_code.shape
        if self.in_dim % unit:
            raise ValueError(f"Fabric unit must divide the input features ({self.in_dim}), not {unit!r}")
        self.v_code = check_int_array("Via map v_code", v_code, shape, -1, len(self.coarse))
        if v_fine is None:
            v_fine = np.full(shape, -1, np.int64)
        self.v_fine = check_int_array("Via map v_fine", v_fine, shape, -1, len(self.fine))
        self.group_scale = check_int_array("Group scale", group_scale, (self.out_dim, self.in_dim // unit), 0, None)
        self.mult = check_int_array("Multiplier mult", mult, (self.out_dim,), -(1 << 15) + 1, 1 << 15)
        self.nshift = check_int_array("Shift nshift", nshift, (self.out_dim,), -(1 << 10) + 1, 1 << 10)
        self.bias = None if bias is None else check_int_array("Bias", bias, (self.out_dim,), INT32_MIN, INT32_MAX + 1)
        super().__init__({
            "x": In(signed(act_bits)).array(self.in_dim),
            "sh": In(unsigned(shift_bits)).array(self.in_dim // unit),
            "emin": In(signed(8)),
            "valid": In(1),
            "y": Out(signed(32)).array(self.out_dim),
            "ready": Out(1),
        })

    @property
    def grid(self) -> tuple[int, int]:
        """(tile rows, tile columns) of the grid."""
        return -(-self.out_dim // self.tile_rows), -(-self.in_dim // self.tile_cols)

    def tile_args(self, i: int, j: int) -> dict:
        """RomTile arguments of grid tile (i, j): its window of the via maps, padded with no-via cells."""
        R, C, u = self.tile_rows, self.tile_cols, self.unit
        r0, c0 = i * R, j * C
        r1, c1 = min(r0 + R, self.out_dim), min(c0 + C, self.in_dim)
        v_code = np.full((R, C), -1, np.int64)
        v_fine = np.full((R, C), -1, np.int64)
        gs = np.zeros((R, C // u), np.int64)
        v_code[:r1 - r0, :c1 - c0] = self.v_code[r0:r1, c0:c1]
        v_fine[:r1 - r0, :c1 - c0] = self.v_fine[r0:r1, c0:c1]
        gs[:r1 - r0, :(c1 - c0) // u] = self.group_scale[r0:r1, c0 // u:c1 // u]
        return dict(rows=R, cols=C, unit=u, coarse=self.coarse, fine=self.fine, v_code=v_code,
                    v_fine=v_fine, group_scale=gs, act_bits=self.act_bits,
                    shift_bits=self.shift_bits, acc_bits=self.acc_bits)

    def elaborate(self, platform):
        m = Module()
        R, C, u = self.tile_rows, self.tile_cols, self.unit
        n_i, n_j = self.grid
        ready = Signal()
        for i in range(n_i):
            for j in range(n_j):
                tile = m.submodules[f"tile_{i}_{j}"] = RomTile(**self.tile_args(i, j))
                for c in range(min(C, self.in_dim - j * C)):
                    m.d.comb += tile.x[c].eq(self.x[j * C + c])
                for k in range(min(C, self.in_dim - j * C) // u):
                    m.d.comb += tile.sh[k].eq(self.sh[j * C // u + k])
                m.d.comb += tile.valid.eq(self.valid)
                if i == 0 and j == 0:
                    m.d.comb += ready.eq(tile.ready)
        emin = Signal(signed(8))                     # aligned with the tiles' registered acc
        m.d.sync += emin.eq(self.emin)
        for o in range(self.out_dim):
            i, r = divmod(o, R)
            accs = [m.submodules[f"tile_{i}_{j}"].acc[r] for j in range(n_j)]
            total = Signal(signed(self.acc_bits), name=f"acc_{o}")
            m.d.comb += total.eq(wrap(tree_sum(accs), self.acc_bits).as_signed())
            bias = int(self.bias[o]) if self.bias is not None else None
            m.d.sync += self.y[o].eq(requantize_rtl(m, str(o), total, int(self.mult[o]),
                                                    int(self.nshift[o]), emin, bias, self.acc_bits))
        m.d.sync += self.ready.eq(ready)
        return m
