"""The mask-ROM tile: multiply-select-add through vias (spec: docs/layout.md, "Tile").

Every per-model fact of a tile (which product line each cell's vias reach, the group scales) is
an elaboration-time constant: the RTL of a tile is the base die's datapath with the two metal
layers folded in, exactly as a mask ROM is.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .reference import extract_codes

__all__ = ["RomTile", "tree_sum", "shift_left"]


# --- argument checks (shared with the fabric) -------------------------------------------------
def check_positive(what: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TypeError(f"{what} must be a positive integer, not {value!r}")
    return value


def check_alphabet(what: str, alphabet, *, allow_empty: bool) -> tuple[int, ...]:
    ok = isinstance(alphabet, Sequence) and not isinstance(alphabet, str) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v != 0 for v in alphabet)
    if not ok or (not alphabet and not allow_empty):
        raise TypeError(f"{what} alphabet must be a {'' if allow_empty else 'non-empty '}"
                        f"sequence of non-zero integers, not {alphabet!r}")
    alphabet = tuple(int(v) for v in alphabet)
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"{what} alphabet must not repeat a value, not {alphabet!r}")
    return alphabet


def check_int_array(what: str, value, shape: tuple[int, ...], lo: int, hi: int | None) -> np.ndarray:
    """An integer array of ``shape`` with values in [lo, hi) (hi None: unbounded)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, not {arr.dtype} values")
    if arr.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, not {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < lo or (hi is not None and arr.max() >= hi)):
        rng = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{what} must hold values in {rng}, not values in "
                         f"[{arr.min()}, {arr.max()}]")
    return arr


def set_tile_params(tile, rows, cols, unit, coarse, fine, act_bits, shift_bits, acc_bits) -> None:
    """Check and set the geometry, widths and alphabets shared by RomTile and BaseTile."""
    tile.rows = check_positive("Tile rows", rows)
    tile.cols = check_positive("Tile columns", cols)
    tile.unit = check_positive("Tile unit", unit)
    if cols % unit:
        raise ValueError(f"Tile unit must divide the tile columns ({cols}), not {unit!r}")
    tile.act_bits = check_positive("Activation bits", act_bits)
    tile.shift_bits = check_positive("Shift bits", shift_bits)
    tile.acc_bits = check_positive("Accumulator bits", acc_bits)
    tile.coarse = check_alphabet("Coarse", coarse, allow_empty=False)
    tile.fine = check_alphabet("Fine", fine, allow_empty=True)


# --- arithmetic building blocks ---------------------------------------------------------------
def tree_sum(terms: list):
    """Balanced adder tree (depth log2 n, widths grow by one bit per level); 0 when empty."""
    if not terms:
        return Const(0, 1)
    while len(terms) > 1:
        pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def wrap(value, width: int):
    """``value mod 2**width`` as an unsigned ``width``-bit value (sign-extended if narrower)."""
    if len(value) >= width:
        return value[:width]
    fill = value[-1] if value.shape().signed else Const(0, 1)
    return Cat(value, fill.replicate(width - len(value)))


def shift_left(m: Module, value: Signal, amount, width: int, name: str):
    """``(value << amount) mod 2**width`` as a log shifter: one 2:1 mux stage per bit of
    ``amount``, each ``width`` bits wide (a plain ``<<`` by a 5-bit amount widens by 31 bits,
    which Verilator pays for on every cycle). Each stage is a named signal: a stage's input
    feeds both mux arms, and as a bare expression it would be lowered once per use."""
    v = wrap(value, width)
    for i in range(len(amount)):
        step = 1 << i
        shifted = Const(0, width) if step >= width else Cat(Const(0, step), v[:width - step])
        stage = Signal(width, name=f"{name}_s{i + 1}")
        m.d.comb += stage.eq(Mux(amount[i], shifted, v))
        v = stage
    return v


class RomTile(wiring.Component):
    """One ``rows x cols`` mask-ROM tile for one token per cycle.

    Per column ``c`` the product lines ``x[c] * coarse[k]`` and ``x[c] * fine[j]`` are formed
    once; cell ``(r, c)`` adds the coarse line ``v_code[r, c]`` and the fine line
    ``v_fine[r, c]`` (``-1``: no via, the cell adds nothing). Per row and unit ``u`` an adder
    tree gives ``part[r, u]``, and ``acc[r] = sum_u (part[r, u] * group_scale[r, u]) << sh[u]``
    modulo ``2**acc_bits`` (two's complement). Modular arithmetic is exact whenever the true
    sum fits ``acc_bits``: the fabric adds tiles modulo the same width, so its row total is
    exact whenever the golden model's 48-bit accumulator check passes.

    Latency: ``LATENCY = 1`` clock. ``acc`` and ``ready`` are registered: the values of the
    inputs sampled at a clock edge where ``valid`` is 1 appear on ``acc`` with ``ready = 1``
    after that edge; a new token may be presented every cycle.

    Parameters
    ----------
    rows, cols : tile size (output channels x input features).
    unit : columns per unit (``gcd(32, group)``); must divide ``cols``.
    coarse, fine : the alphabets (non-zero integers): line ``k`` of a column carries
        ``x * alphabet[k]``. ``fine`` may be empty.
    v_code, v_fine : int arrays ``[rows, cols]``, indices into ``coarse`` / ``fine``, -1 = no via.
    group_scale : int array ``[rows, cols // unit]`` >= 0, the group scale of each row and unit.
    act_bits : width of the signed MXINT elements ``x``.
    shift_bits : width of the unsigned unit shifts ``sh``.
    acc_bits : width of the signed accumulators ``acc``.
    """

    LATENCY = 1

    def __init__(self, rows, cols, unit, *, coarse, fine=(), v_code, v_fine=None, group_scale,
                 act_bits=8, shift_bits=5, acc_bits=48):
        set_tile_params(self, rows, cols, unit, coarse, fine, act_bits, shift_bits, acc_bits)
        shape = (rows, cols)
        self.v_code = check_int_array("Via map v_code", v_code, shape, -1, len(self.coarse))
        if v_fine is None:
            v_fine = np.full(shape, -1, np.int64)
        self.v_fine = check_int_array("Via map v_fine", v_fine, shape, -1, len(self.fine))
        self.group_scale = check_int_array("Group scale", group_scale, (rows, cols // unit), 0, None)
        super().__init__({
            "x": In(signed(act_bits)).array(cols),
            "sh": In(unsigned(shift_bits)).array(cols // unit),
            "valid": In(1),
            "acc": Out(signed(acc_bits)).array(rows),
            "ready": Out(1),
        })

    @property
    def codes(self) -> np.ndarray:
        """int64 [rows, cols]: the codes the vias encode (extraction: coarse + fine)."""
        return extract_codes(self.v_code, self.v_fine, self.coarse, self.fine)

    def elaborate(self, platform):
        m = Module()
        # product lines: only lines that some via reaches are built (an unreached line's
        # generator has no load and synthesis removes it anyway)
        lines: dict[tuple[int, int], Signal] = {}

        def line(c: int, value: int) -> Signal:
            key = (c, value)
            if key not in lines:
                product = self.x[c] * value
                sig = Signal(product.shape(), name=f"line_c{c}_{'m' if value < 0 else 'p'}{abs(value)}")
                m.d.comb += sig.eq(product)
                lines[key] = sig
            return lines[key]

        nu = self.cols // self.unit
        for r in range(self.rows):
            shifted = []
            for u in range(nu):
                gs = int(self.group_scale[r, u])
                if gs == 0:                     # a zero group scale: the unit adds nothing
                    continue
                terms = []
                for c in range(u * self.unit, (u + 1) * self.unit):
                    if self.v_code[r, c] >= 0:
                        terms.append(line(c, self.coarse[self.v_code[r, c]]))
                    if self.v_fine[r, c] >= 0:
                        terms.append(line(c, self.fine[self.v_fine[r, c]]))
                if not terms:
                    continue
                part = tree_sum(terms)
                part_sig = Signal(part.shape(), name=f"part_r{r}_u{u}")
                m.d.comb += part_sig.eq(part)
                product = part_sig * gs
                scaled = Signal(product.shape(), name=f"scaled_r{r}_u{u}")
                m.d.comb += scaled.eq(product)
                shifted.append(shift_left(m, scaled, self.sh[u], self.acc_bits, f"sh_r{r}_u{u}"))
            m.d.sync += self.acc[r].eq(tree_sum(shifted)[:self.acc_bits].as_signed())
        m.d.sync += self.ready.eq(self.valid)
        return m
