"""The row-serial mask-ROM fabric (spec: docs/layout.md, "Row-serial fabric").

A tile is ``word_lines x cols`` ROM cells. Each cycle its word-line decoder selects one word
line: the cells of that line put their codes on the column buses, each column *selects* the
product line of its code (``x * value``: multiply by selection, the lines formed once per
column from shifts and one adder per odd multiple), one adder tree per scale unit sums the
columns, the unit's group scale (``m << e``) and the activation block shift are applied once
per unit after the tree, and the units are added: one partial sum per cycle for the whole tile.
Every per-weight fact sits in the ROM word of its line, so a tile's logic is shared by all its
rows. w3o6 outliers are slots in the word (column, 6-bit code) whose products enter their
unit's tree.

A linear ``[out, in]`` runs on ``chains`` chains of ``chain_tiles`` tiles: the tiles of a
chain read the same word line, their partial sums are added down the chain, and the chain's
accumulator adds the ``passes`` that an input wider than the chain needs, then one requantiser
per chain turns the row's accumulator into its int32 output. Row ``o`` is handled by chain
``o % chains`` at row slot ``o // chains``; word line ``slot * passes + pass``. So a linear
takes :func:`stage_cycles` cycles: one word line per cycle plus the pipeline fill.

``RowSpec`` is the one description of the tile that both the RTL and the estimate read: the
RTL is built from it, and :meth:`RowSpec.counts` counts the same adders, multipliers and
registers the RTL instantiates (tests hold the counts against Yosys's ``stat``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .basetile import INT32_MAX, INT32_MIN, requantize_rtl
from .romtile import check_positive, shift_left, tree_sum, wrap

__all__ = ["RowFormat", "ROW_FORMATS", "RowSpec", "RowImage", "RowSerialTile", "RowSerialLinear",
           "row_image", "row_reference", "stage_cycles", "FILL_CYCLES"]

E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12)


@dataclass(frozen=True)
class RowFormat:
    """How a family's weights sit in a word line.

    ``values[k]`` is the integer a cell with code ``k`` contributes (``2**code_bits`` entries);
    ``slots`` outlier slots per word line hold (column, signed ``slot_bits`` code) pairs that
    replace their cell's value (w3o6's 6-bit outliers); the group scale of a unit is stored as
    ``m << e`` with ``m < 2**m_bits`` and ``e < 2**e_bits``. ``multiply``: the column forms
    ``x * code`` with a multiplier shared by every row of the tile (alphabets too large to
    select from: int5 .. int8)."""

    name: str
    code_bits: int
    values: tuple[int, ...]
    m_bits: int
    e_bits: int
    slots: int = 0
    slot_bits: int = 6
    multiply: bool = False
    scale_group: int = 0          # columns sharing one stored scale word (0: one per unit)

    def magnitudes(self) -> tuple[int, ...]:
        """The product lines a column builds: every non-zero |value|, ascending."""
        return tuple(sorted({abs(v) for v in self.values if v}))


def _twos(bits: int, scale: int = 1) -> tuple[int, ...]:
    return tuple(scale * (k - (1 << bits) if k >> (bits - 1) else k) for k in range(1 << bits))


def _int_format(bits: int) -> RowFormat:
    return RowFormat(f"int{bits}", bits, _twos(bits), m_bits=8, e_bits=0, multiply=bits > 4)


ROW_FORMATS: dict[str, RowFormat] = {
    # base c3 in [-4, 3] contributes 4 * c3; outliers c6 in [-32, 31] sit in 7 slots per 64
    # weights: the quantiser's cap at the default 4.4 % (compiler/quant/w3o6.py default_cap)
    "w3o6": RowFormat("w3o6", 3, _twos(3, 4), m_bits=8, e_bits=0, slots=7, scale_group=64),
    # sign-magnitude E2M1 (doubled): nvfp4 scales m * 2**e (4-bit significand), mxfp4 2**e
    "fp4": RowFormat("fp4", 4, E2M1_DOUBLED + tuple(-v for v in E2M1_DOUBLED), m_bits=4, e_bits=5),
    **{f"int{b}": _int_format(b) for b in range(2, 9)},
}


def _sadd_width(a: int, b: int) -> int:
    """Width of Amaranth's sum of two signed values of widths a and b."""
    return max(a, b) + 1


def _tree_widths(widths: list[int]) -> list[int]:
    """The adder widths ``tree_sum`` builds for signed leaves of ``widths`` (its pairing order)."""
    adders, terms = [], list(widths)
    while len(terms) > 1:
        pairs = [_sadd_width(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)]
        adders += pairs
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return adders


def _csd_terms(m: int) -> list[tuple[int, int]]:
    """``m`` (odd, > 1) as signed powers of two, fewest terms (canonical signed digits)."""
    terms, k = [], 0
    while m:
        if m & 1:
            d = 2 - (m & 3)               # +1 or -1
            terms.append((d, k))
            m -= d
        m >>= 1
        k += 1
    return terms


@dataclass(frozen=True)
class RowSpec:
    """The base die's row-serial tile: geometry, widths and the family's word format."""

    fmt: RowFormat
    word_lines: int = 1024
    cols: int = 64
    unit: int = 32
    act_bits: int = 8
    shift_bits: int = 5
    acc_bits: int = 48

    def __post_init__(self):
        check_positive("Word lines", self.word_lines)
        check_positive("Tile columns", self.cols)
        check_positive("Tile unit", self.unit)
        if self.cols % self.unit:
            raise ValueError(f"Tile unit must divide the tile columns ({self.cols}), not {self.unit!r}")

    # --- the word line --------------------------------------------------------------------
    @property
    def units(self) -> int:
        return self.cols // self.unit

    @property
    def scale_span(self) -> int:
        """Columns per stored scale word: the format's scale group when the tile holds whole
        groups, else one word per unit."""
        g = self.fmt.scale_group
        return g if g > self.unit and self.cols % g == 0 and g % self.unit == 0 else self.unit

    @property
    def scale_words(self) -> int:
        return self.cols // self.scale_span

    @property
    def col_bits(self) -> int:
        return max(1, (self.cols - 1).bit_length())

    @property
    def slot_width(self) -> int:
        return self.col_bits + self.fmt.slot_bits

    def fields(self) -> dict[str, tuple[int, int, int]]:
        """name -> (offset, width, count) of the word line, low bits first."""
        f, off = {}, 0
        for name, width, count in (("code", self.fmt.code_bits, self.cols),
                                   ("m", self.fmt.m_bits, self.scale_words), ("e", self.fmt.e_bits, self.scale_words),
                                   ("slot", self.slot_width, self.fmt.slots)):
            f[name] = (off, width, count)
            off += width * count
        return f

    @property
    def word_bits(self) -> int:
        return sum(w * n for _, w, n in self.fields().values())

    @property
    def addr_bits(self) -> int:
        return max(1, (self.word_lines - 1).bit_length())

    # --- datapath widths (as the RTL builds them) ------------------------------------------
    def odd_lines(self) -> list[int]:
        """The odd multiples above 1 a column forms with adders (3 for w3o6 and fp4)."""
        return sorted({m >> ((m & -m).bit_length() - 1) for m in self.fmt.magnitudes()} - {1})

    def odd_width(self, o: int) -> int:
        """Unsigned width of the line |x| * o (|x| takes act_bits bits: |-2**(act-1)|)."""
        return self.act_bits if o == 1 else self.act_bits + o.bit_length()

    def line_width(self, mag: int) -> int:
        tz = (mag & -mag).bit_length() - 1
        return tz + self.odd_width(mag >> tz)

    @property
    def bus_width(self) -> int:
        """The column bus: the widest product line."""
        return max(self.line_width(v) for v in self.fmt.magnitudes())

    @property
    def leaf_width(self) -> int:
        if self.fmt.multiply:
            return self.act_bits + self.fmt.code_bits
        return self.bus_width + 1

    @property
    def slot_product_width(self) -> int:
        return self.act_bits + self.fmt.slot_bits

    def unit_leaves(self) -> list[int]:
        """Signed leaf widths of one unit's tree: the cells, the slots routed to it, the carry
        count of the negated (one's-complement) cells."""
        leaves = [self.leaf_width] * self.unit + [self.slot_product_width] * self.fmt.slots
        if not self.fmt.multiply:
            leaves.append(self.unit.bit_length() + 1)
        return leaves

    @property
    def part_width(self) -> int:
        return _tree_widths(self.unit_leaves())[-1] if len(self.unit_leaves()) > 1 else self.unit_leaves()[0]

    @property
    def scaled_width(self) -> int:
        return self.part_width + self.fmt.m_bits + 1 if self.fmt.m_bits else self.part_width

    @property
    def shift_amount_bits(self) -> int:
        return max(self.fmt.e_bits, self.shift_bits) + 1 if self.fmt.e_bits else self.shift_bits

    @property
    def select_cases(self) -> int:
        """Cases of a column's select: the lines, plus zero when the code index covers them all
        (Yosys folds the last entry of a partly covered index into the default)."""
        n = len(self.fmt.magnitudes())
        return n + 1 if n + 1 == 1 << n.bit_length() else n

    def multipliers(self) -> dict[str, tuple[int, int]]:
        """Yosys multiplier cell name -> its operand widths."""
        fmt, A = self.fmt, self.act_bits
        out = {}
        if fmt.multiply:
            out[f"$mul_{A + fmt.code_bits}"] = (A, fmt.code_bits)
        if fmt.slots:
            out[f"$mul_{self.slot_product_width}"] = (A, fmt.slot_bits)
        if fmt.m_bits:
            out[f"$mul_{self.scaled_width}"] = (self.part_width, fmt.m_bits + 1)
        return out

    def cells(self) -> dict[str, int]:
        """The word-level cells of one tile, named as Yosys's ``stat -width`` names them after
        ``proc; flatten; opt; wreduce`` (type_width, pmux type_width_cases): what the RTL
        instantiates, counted from this description alone. Comparators and the small code
        decode ROMs are in :meth:`counts` (``decode``)."""
        from collections import Counter
        fmt, nu, A = self.fmt, self.units, self.act_bits
        c: Counter = Counter()
        if fmt.multiply:
            c[f"$mul_{A + fmt.code_bits}"] += self.cols
        else:
            c[f"$neg_{A}"] += self.cols                        # |x| per column
            c[f"$mux_{A}"] += self.cols
            for o in self.odd_lines():
                terms = _csd_terms(o)
                op = "$add" if terms[0][0] > 0 else "$sub"
                c[f"{op}_{self.odd_width(o)}"] += self.cols * (len(terms) - 1)
            c[f"$pmux_{self.bus_width}_{self.select_cases}"] += self.cols
            c["$xor_1"] += self.cols                          # sign of the line
            c[f"$xor_{self.leaf_width}"] += self.cols         # one's complement of a negative line
            for w in _tree_widths([1] * self.unit):           # count of the +1s
                c[f"$add_{w}"] += nu
        if fmt.slots:
            c[f"$pmux_{A}_{self.cols}"] += fmt.slots          # the slot's column
            c[f"$mul_{self.slot_product_width}"] += fmt.slots
            if nu > 1:
                c[f"$mux_{self.slot_product_width}"] += fmt.slots * nu
        for w in _tree_widths(self.unit_leaves()):
            c[f"$add_{w}"] += nu
        if fmt.m_bits:
            c[f"$mul_{self.scaled_width}"] += nu
        if fmt.e_bits:
            c[f"$add_{self.shift_amount_bits}"] += nu
        for k in range(self.shift_amount_bits):
            c[f"$mux_{min(self.acc_bits, self.scaled_width + (1 << (k + 1)) - 2)}"] += nu
        c[f"$add_{self.acc_bits}"] += nu - 1                  # the units' sum, modulo 2**acc_bits
        c[f"$sdff_{self.acc_bits}"] += 1                      # the registered partial sum
        return dict(c)

    def counts(self) -> dict:
        """The tile's components for the estimate: ``cells`` (:meth:`cells`), ``rom_bits``
        (the word-line ROM), ``lut_bits`` (the per-column code decode ROMs), ``decode`` (bits
        of the select comparators), ``word_bits``."""
        fmt = self.fmt
        idx_bits = len(fmt.magnitudes()).bit_length()
        lut = 0 if fmt.multiply else self.cols * len(fmt.values) * (idx_bits + 1)
        # the selects' case comparators ($eq / $logic_not): one per case of every column select
        # and slot column select, one per slot for its unit
        comparators = [] if fmt.multiply else [idx_bits] * (self.cols * self.select_cases)
        comparators += [self.col_bits] * (fmt.slots * self.cols) + ([1] * fmt.slots if self.units > 1 else [])
        return {"cells": self.cells(), "multipliers": self.multipliers(),
                "rom_bits": self.word_lines * self.word_bits, "lut_bits": lut,
                "comparators": len(comparators), "comparator_bits": sum(comparators), "word_bits": self.word_bits}


# --- the ROM image of a linear -----------------------------------------------------------------
@dataclass
class RowImage:
    """The word lines of one linear on ``chains x chain_tiles`` tiles, and the row constants.

    ``words[p][k]`` is the list of word-line integers of chain ``p``'s tile ``k`` (``lines``
    of them); ``mult/nshift/bias[p]`` the row constants of chain ``p`` by row slot."""

    spec: RowSpec
    out_dim: int
    in_dim: int
    chains: int
    chain_tiles: int
    passes: int
    slots: int                       # row slots per chain
    words: list = field(repr=False)
    mult: np.ndarray = field(repr=False)
    nshift: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)

    @property
    def lines(self) -> int:
        return self.slots * self.passes


def stage_cycles(rows: int, in_dim: int, *, chains: int, chain_tiles: int, cols: int) -> int:
    """Cycles of one matrix-vector product on the row-serial fabric, from the start pulse to
    the last output: one word line per cycle, then :data:`FILL_CYCLES`."""
    passes = -(-in_dim // (chain_tiles * cols))
    return -(-rows // chains) * passes + FILL_CYCLES


FILL_CYCLES = 3    # after the last word line: tile register, chain accumulator, requantiser


def _encode_codes(spec: RowSpec, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes [rows, cols] -> (cell code indices, slot columns, slot values) of a tile's words."""
    fmt = spec.fmt
    lut = {v: k for k, v in reversed(list(enumerate(fmt.values)))}       # first index of a value
    rows, cols = codes.shape
    idx = np.zeros(codes.shape, np.int64)
    scol = np.zeros((rows, fmt.slots), np.int64)
    sval = np.zeros((rows, fmt.slots), np.int64)
    if fmt.multiply:
        return codes & ((1 << fmt.code_bits) - 1), scol, sval
    base = np.isin(codes, list(lut))
    for v, k in lut.items():
        idx[codes == v] = k
    if fmt.slots:
        lo, hi = -(1 << (fmt.slot_bits - 1)), 1 << (fmt.slot_bits - 1)
        for r, c in zip(*np.nonzero(~base)):
            n = int(np.count_nonzero(~base[r, :c]))
            if n >= fmt.slots:
                raise ValueError(f"row {r} has {int(np.count_nonzero(~base[r]))} outliers in {cols} "
                                 f"columns; the {fmt.name} word line has {fmt.slots} slots")
            if not lo <= codes[r, c] < hi:
                raise ValueError(f"code {codes[r, c]} does not fit a {fmt.slot_bits}-bit outlier slot")
            scol[r, n], sval[r, n] = c, codes[r, c] & ((1 << fmt.slot_bits) - 1)
    elif not base.all():
        bad = int(codes[~base][0])
        raise ValueError(f"code {bad} has no value in the {fmt.name} word format {fmt.values}")
    return idx, scol, sval


def _encode_scales(spec: RowSpec, gs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """group scales [rows, units] -> (m, e) with gs = m << e, m < 2**m_bits, e < 2**e_bits."""
    fmt = spec.fmt
    gs = np.asarray(gs, np.int64)
    r = spec.scale_span // spec.unit
    if r > 1:
        shared = gs.reshape(gs.shape[0], -1, r)
        if (shared != shared[:, :, :1]).any():
            row, w = np.argwhere((shared != shared[:, :, :1]).any(-1))[0]
            raise ValueError(f"row {row}: the units of scale word {w} have different group scales "
                             f"{shared[row, w].tolist()}; the {fmt.name} word stores one per {spec.scale_span} columns")
        gs = shared[:, :, 0]
    e = np.zeros(gs.shape, np.int64)
    m = gs.copy()
    if fmt.e_bits:
        for _ in range((1 << fmt.e_bits) - 1):
            even = (m != 0) & (m % 2 == 0) & (m >= (1 << fmt.m_bits))
            if not even.any():
                break
            m = np.where(even, m >> 1, m)
            e = e + even
        # the smallest m also needs e: shift out trailing zeros only while m is too wide
    bad = (m >= (1 << max(fmt.m_bits, 0))) | (e >= (1 << fmt.e_bits) if fmt.e_bits else e > 0)
    if fmt.m_bits == 0:
        bad |= m > 1
    if bad.any():
        r, u = np.argwhere(bad)[0]
        raise ValueError(f"group scale {gs[r, u]} (row {r}, unit {u}) does not fit the {fmt.name} scale word "
                         f"m << e (m < 2**{fmt.m_bits}, e < 2**{fmt.e_bits})")
    return m, e


def _pack_words(spec: RowSpec, idx, m, e, scol, sval) -> list[int]:
    f = spec.fields()
    words = []
    for r in range(idx.shape[0]):
        w = 0
        for name, arr in (("code", idx[r]), ("m", m[r]), ("e", e[r])):
            off, width, _ = f[name]
            for j, v in enumerate(arr.tolist()):
                w |= (int(v) & ((1 << width) - 1)) << (off + j * width) if width else 0
        off, width, _ = f["slot"]
        for j in range(spec.fmt.slots):
            v = int(scol[r, j]) | (int(sval[r, j]) << spec.col_bits)
            w |= v << (off + j * width)
        words.append(w)
    return words


def row_image(spec: RowSpec, codes, group_scale, mult, nshift, bias=None, *, chains: int,
              chain_tiles: int) -> RowImage:
    """Lay linear ``codes`` [out, in] (``group_scale`` per (row, unit) of ``spec.unit``
    columns) out on ``chains`` chains of ``chain_tiles`` tiles. Raises ValueError when a
    code, an outlier count or a group scale does not fit the word format."""
    codes = np.asarray(codes, np.int64)
    out_dim, in_dim = codes.shape
    C, U = spec.cols, spec.unit
    if in_dim % U:
        raise ValueError(f"the tile unit {U} does not divide the {in_dim} input features")
    span = chain_tiles * C
    passes = -(-in_dim // span)
    slots = -(-out_dim // chains)
    if slots * passes > spec.word_lines:
        raise ValueError(f"a {out_dim}x{in_dim} linear on {chains} chains needs {slots * passes} word "
                         f"lines; the tile has {spec.word_lines}")
    cp = np.zeros((slots * chains, passes * span), np.int64)
    cp[:out_dim, :in_dim] = codes
    gp = np.zeros((slots * chains, passes * span // U), np.int64)
    gp[:out_dim, :in_dim // U] = np.asarray(group_scale, np.int64)
    words = []
    for p in range(chains):
        chain = []
        for k in range(chain_tiles):
            rows_c, rows_g = [], []
            for s in range(slots):
                o = s * chains + p
                for q in range(passes):
                    c0 = (q * chain_tiles + k) * C
                    rows_c.append(cp[o, c0:c0 + C])
                    rows_g.append(gp[o, c0 // U:(c0 + C) // U])
            idx, scol, sval = _encode_codes(spec, np.array(rows_c))
            mm, ee = _encode_scales(spec, np.array(rows_g))
            chain.append(_pack_words(spec, idx, mm, ee, scol, sval))
        words.append(chain)

    def per_chain(v, fill=0):
        a = np.full(slots * chains, fill, np.int64)
        a[:out_dim] = np.asarray(v, np.int64)
        return a.reshape(slots, chains).T.copy()

    return RowImage(spec, out_dim, in_dim, chains, chain_tiles, passes, slots, words,
                    per_chain(mult), per_chain(nshift), None if bias is None else per_chain(bias))


# --- a numpy model of the row-serial linear, computed from its ROM image ----------------------
def _decode(spec: RowSpec, words: list[int]) -> dict[str, np.ndarray]:
    f = spec.fields()
    out = {}
    for name, (off, width, count) in f.items():
        a = np.zeros((len(words), count), np.int64)
        if width:
            for r, w in enumerate(words):
                for j in range(count):
                    a[r, j] = (w >> (off + j * width)) & ((1 << width) - 1)
        out[name] = a
    return out


def _sext(v: np.ndarray, bits: int) -> np.ndarray:
    return np.where(v >> (bits - 1) & 1, v - (1 << bits), v)


def row_reference(img: RowImage, x, sh, emin) -> np.ndarray:
    """y int64 [T, out] of the row-serial linear, word line by word line from its ROM image
    (the modular chain accumulator, then ``hdl.reference.requantize``)."""
    from .reference import requantize
    spec, fmt = img.spec, img.spec.fmt
    x, sh, emin = (np.asarray(a, np.int64) for a in (x, sh, emin))
    T, C, U, span = x.shape[0], spec.cols, spec.unit, img.chain_tiles * spec.cols
    xp = np.zeros((T, img.passes * span), np.int64)
    xp[:, :img.in_dim] = x
    shp = np.zeros((T, img.passes * span // U), np.int64)
    shp[:, :img.in_dim // U] = sh
    vals = np.array(fmt.values, np.int64)
    acc = np.zeros((T, img.chains, img.slots), np.int64)
    for p in range(img.chains):
        for k in range(img.chain_tiles):
            d = _decode(spec, img.words[p][k])
            cells = _sext(d["code"], fmt.code_bits) if fmt.multiply else vals[d["code"]]
            gs = np.repeat(d["m"] << d["e"] if fmt.m_bits else (1 << d["e"]), spec.scale_span // U, axis=1)
            scol = d["slot"] & ((1 << spec.col_bits) - 1)
            sval = _sext(d["slot"] >> spec.col_bits, fmt.slot_bits)
            for s in range(img.slots):
                for q in range(img.passes):
                    w = s * img.passes + q
                    c0 = (q * img.chain_tiles + k) * C
                    xs = xp[:, c0:c0 + C]
                    prod = xs * cells[w][None, :]
                    for j in range(fmt.slots):
                        prod[:, scol[w, j]] += xs[:, scol[w, j]] * sval[w, j]
                    part = prod.reshape(T, spec.units, U).sum(-1)
                    amt = shp[:, c0 // U:(c0 + C) // U]
                    acc[:, p, s] += ((part * gs[w][None, :]) << amt).sum(-1)
    acc = acc.transpose(0, 2, 1).reshape(T, -1)[:, :img.out_dim]        # slot-major: o = s * P + p
    half = 1 << (spec.acc_bits - 1)
    acc = (acc + half) % (1 << spec.acc_bits) - half
    mult = img.mult.T.reshape(-1)[:img.out_dim]
    nshift = img.nshift.T.reshape(-1)[:img.out_dim]
    bias = None if img.bias is None else img.bias.T.reshape(-1)[:img.out_dim]
    return requantize(acc, mult, nshift, emin, bias)


# --- RTL -------------------------------------------------------------------------------------
class RowSerialTile(wiring.Component):
    """One row-serial tile: ``spec.word_lines`` word lines of ``spec.cols`` cells.

    Each cycle the word line at ``addr`` is read; ``part`` (registered, ``LATENCY = 1``) is
    ``sum_u (sum_c value(code[c]) * x[c] + slots) * m[u] << (e[u] + sh[u])`` modulo
    ``2**acc_bits``.

    ``words`` given: the folded view, the word lines as ROM constants (the chip as made).
    ``words`` None: the base view, the same datapath with the ROM as a writable array
    (``cfg_we``, ``cfg_addr``, ``cfg_data``): one RTL for every model of the family.
    """

    LATENCY = 1

    def __init__(self, spec: RowSpec, words: list[int] | None = None):
        self.spec = spec
        if words is not None:
            if len(words) > spec.word_lines:
                raise ValueError(f"{len(words)} word lines for a tile of {spec.word_lines}")
            if any(not 0 <= w < (1 << spec.word_bits) for w in words):
                raise ValueError(f"a word line does not fit {spec.word_bits} bits")
        self.words = None if words is None else list(words) + [0] * (spec.word_lines - len(words))
        members = {
            "x": In(signed(spec.act_bits)).array(spec.cols),
            "sh": In(unsigned(spec.shift_bits)).array(spec.units),
            "addr": In(unsigned(spec.addr_bits)),
            "part": Out(signed(spec.acc_bits)),
        }
        if words is None:
            members.update(cfg_we=In(1), cfg_addr=In(unsigned(spec.addr_bits)),
                           cfg_data=In(unsigned(spec.word_bits)))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        s, fmt = self.spec, self.spec.fmt
        rom = Memory(shape=unsigned(s.word_bits), depth=s.word_lines,
                     init=self.words if self.words is not None else [])
        m.submodules.rom = rom
        rd = rom.read_port(domain="comb")
        m.d.comb += rd.addr.eq(self.addr)
        if self.words is None:
            wr = rom.write_port()
            m.d.comb += [wr.addr.eq(self.cfg_addr), wr.data.eq(self.cfg_data), wr.en.eq(self.cfg_we)]
        word = rd.data
        f = s.fields()

        def field_of(name, j):
            off, width, _ = f[name]
            return word[off + j * width: off + (j + 1) * width]

        leaves = [[] for _ in range(s.units)]
        if fmt.multiply:
            for c in range(s.cols):
                prod = Signal(signed(s.leaf_width), name=f"prod_c{c}")
                m.d.comb += prod.eq(self.x[c] * field_of("code", c).as_signed())
                leaves[c // s.unit].append(prod)
        else:
            mags = fmt.magnitudes()
            mag_of = [mags.index(abs(v)) + 1 if v else 0 for v in fmt.values]
            neg_of = [1 if v < 0 else 0 for v in fmt.values]
            mag_lut = Array([Const(k, range(len(mags) + 1)) for k in mag_of])
            neg_lut = Array([Const(k, 1) for k in neg_of])
            lw = s.bus_width
            signs = [[] for _ in range(s.units)]
            for c in range(s.cols):
                lines = self._lines(m, self.x[c], mags, c)
                code = field_of("code", c)
                sel = Signal(unsigned(lw), name=f"bus_c{c}")
                m.d.comb += sel.eq(Array([Const(0, lw)] + lines)[mag_lut[code]])
                neg = Signal(name=f"neg_c{c}")
                # the line's sign: x's own sign times the code's, so the line holds |x * v|
                m.d.comb += neg.eq(neg_lut[code] ^ self.x[c][-1])
                leaf = Signal(signed(s.leaf_width), name=f"leaf_c{c}")
                m.d.comb += leaf.eq(Cat(sel, Const(0, 1)) ^ neg.replicate(s.leaf_width))
                leaves[c // s.unit].append(leaf)
                signs[c // s.unit].append(neg)      # ~v + 1 = -v: the +1 of every negated leaf
        for j in range(fmt.slots):
            slot = field_of("slot", j)
            col, val = slot[:s.col_bits], slot[s.col_bits:].as_signed()
            xsel = Signal(signed(s.act_bits), name=f"slot{j}_x")
            m.d.comb += xsel.eq(Array(list(self.x))[col])
            prod = Signal(signed(s.slot_product_width), name=f"slot{j}_prod")
            m.d.comb += prod.eq(xsel * val)
            unit_of = col >> (s.unit.bit_length() - 1) if s.units > 1 else Const(0, 1)
            for u in range(s.units):
                leaves[u].append(Mux(unit_of == u, prod, 0))
        shifted = []
        for u in range(s.units):
            terms = list(leaves[u])
            if not fmt.multiply:
                carry = Signal(unsigned(s.unit.bit_length()), name=f"carry_u{u}")
                m.d.comb += carry.eq(tree_sum(signs[u]))
                terms.append(Cat(carry, Const(0, 1)).as_signed())
            part = Signal(signed(s.part_width), name=f"part_u{u}")
            m.d.comb += part.eq(tree_sum(terms))
            scaled = part
            if fmt.m_bits:
                scaled = Signal(signed(s.scaled_width), name=f"scaled_u{u}")
                m_word = field_of("m", u * s.unit // s.scale_span)
                m.d.comb += scaled.eq(part * Cat(m_word, Const(0, 1)).as_signed())
            amount = self.sh[u]
            if fmt.e_bits:
                amount = Signal(unsigned(s.shift_amount_bits), name=f"amount_u{u}")
                m.d.comb += amount.eq(field_of("e", u * s.unit // s.scale_span) + self.sh[u])
            shifted.append(shift_left(m, scaled, amount, s.acc_bits, f"sh_u{u}"))
        total = tree_sum(list(shifted))
        m.d.sync += self.part.eq(total[:s.acc_bits].as_signed())
        return m

    def _lines(self, m: Module, x, mags: tuple[int, ...], c: int) -> list:
        """The column's product lines |x| * mag, one adder per odd multiple above 1."""
        s = self.spec
        ax = Signal(unsigned(s.act_bits), name=f"absx_c{c}")
        m.d.comb += ax.eq(Mux(x[-1], -x, x))
        odd: dict[int, Signal] = {1: ax}
        out = []
        for mag in mags:
            tz = (mag & -mag).bit_length() - 1
            o = mag >> tz
            if o not in odd:
                terms = _csd_terms(o)
                acc = None
                for d, k in sorted(terms, key=lambda t: -t[1]):
                    t = Cat(Const(0, k), ax) if k else ax
                    acc = t if acc is None else (acc + t if d > 0 else acc - t)
                sig = Signal(unsigned(s.odd_width(o)), name=f"line_c{c}_x{o}")
                m.d.comb += sig.eq(acc)
                odd[o] = sig
            line = Cat(Const(0, tz), odd[o]) if tz else odd[o]
            out.append(line)
        return out


class RowSerialLinear(wiring.Component):
    """A linear on the row-serial fabric: ``img.chains`` chains of ``img.chain_tiles``
    ``RowSerialTile``s, a chain accumulator and one requantiser per chain.

    Protocol: with ``start = 1`` on a clock edge while idle, ``x``, ``sh`` and ``emin`` are
    latched (the stationary activation registers) and the sequencer walks the word lines, one
    per cycle. Row slot ``s`` of chain ``p`` (output ``s * chains + p``) appears on ``y[p]``
    with ``ready = 1``; slots come in order, all chains together. A token takes exactly
    ``stage_cycles(...)`` cycles from its start edge to the edge that presents its last slot.
    ``words`` None builds the base view (writable ROM) for every tile.
    """

    LATENCY = 0

    def __init__(self, img: RowImage, *, folded: bool = True):
        self.img = img
        s = img.spec
        self.tiles = [[RowSerialTile(s, img.words[p][k] if folded else None)
                       for k in range(img.chain_tiles)] for p in range(img.chains)]
        super().__init__({
            "x": In(signed(s.act_bits)).array(img.in_dim),
            "sh": In(unsigned(s.shift_bits)).array(img.in_dim // s.unit),
            "emin": In(signed(8)),
            "start": In(1),
            "valid": In(1),
            "y": Out(signed(32)).array(img.chains),
            "ready": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        img, s = self.img, self.img.spec
        C, U, K, Q = s.cols, s.unit, img.chain_tiles, img.passes
        span = K * C
        xr = [Signal(signed(s.act_bits), name=f"xr{i}") for i in range(img.in_dim)]
        shr = [Signal(unsigned(s.shift_bits), name=f"shr{i}") for i in range(img.in_dim // U)]
        emin = Signal(signed(8))
        busy = Signal()
        slot = Signal(range(max(img.slots, 2)))
        q = Signal(range(max(Q, 2)))
        addr = Signal(unsigned(s.addr_bits))
        with m.If(~busy & self.start):
            m.d.sync += [busy.eq(1), slot.eq(0), q.eq(0), addr.eq(0), emin.eq(self.emin)]
            m.d.sync += [r.eq(v) for r, v in zip(xr, self.x)] + [r.eq(v) for r, v in zip(shr, self.sh)]
        with m.Elif(busy):
            m.d.sync += addr.eq(addr + 1)
            with m.If(q == Q - 1):
                m.d.sync += q.eq(0)
                m.d.sync += slot.eq(slot + 1)
                with m.If(slot == img.slots - 1):
                    m.d.sync += busy.eq(0)
            with m.Else():
                m.d.sync += q.eq(q + 1)
        # pipeline tags: (valid, last pass, slot) one stage per register
        v1, q1, slot1 = Signal(), Signal.like(q), Signal.like(slot)
        m.d.sync += [v1.eq(busy), q1.eq(q), slot1.eq(slot)]
        v2, slot2 = Signal(), Signal.like(slot)
        m.d.sync += [v2.eq(v1 & (q1 == Q - 1)), slot2.eq(slot1)]
        zero = Const(0, signed(s.act_bits))
        for p in range(img.chains):
            parts = []
            for k in range(K):
                tile = m.submodules[f"tile_p{p}_k{k}"] = self.tiles[p][k]
                m.d.comb += tile.addr.eq(addr)
                for c in range(C):
                    srcs = [(xr[j] if (j := (qq * K + k) * C + c) < img.in_dim else zero) for qq in range(Q)]
                    m.d.comb += tile.x[c].eq(Array(srcs)[q] if Q > 1 else srcs[0])
                for u in range(s.units):
                    srcs = [(shr[j] if (j := ((qq * K + k) * C) // U + u) < len(shr) else Const(0, s.shift_bits))
                            for qq in range(Q)]
                    m.d.comb += tile.sh[u].eq(Array(srcs)[q] if Q > 1 else srcs[0])
                parts.append(tile.part)
            # the tiles' parts are registered: they belong to the word line of the previous cycle
            acc = Signal(signed(s.acc_bits), name=f"acc_p{p}")
            chain = wrap(tree_sum(parts), s.acc_bits)
            with m.If(v1):
                m.d.sync += acc.eq(Mux(q1 == 0, chain, (acc + chain)[:s.acc_bits]).as_signed())
            mult = Array([Const(int(v), signed(16)) for v in img.mult[p]])[slot2]
            nsh = Array([Const(int(v), signed(11)) for v in img.nshift[p]])[slot2]
            bias = None if img.bias is None else Array([Const(int(v), signed(32)) for v in img.bias[p]])[slot2]
            m.d.sync += self.y[p].eq(requantize_rtl(m, f"p{p}", acc, mult, nsh, emin, bias, s.acc_bits))
        m.d.sync += self.ready.eq(v2)
        return m


def simulate_row_linear(img: RowImage, x, sh, emin, *, engine: str = "amaranth", folded: bool = True,
                        stats: dict | None = None, expected=None) -> tuple[np.ndarray, int]:
    """Run a ``RowSerialLinear`` on tokens x [T, in], sh [T, in/unit], emin [T]: each token is
    held for exactly ``stage_cycles`` cycles with ``start`` on its first, so any other cycle
    count would misalign the outputs. Returns (y int64 [T, out], cycles)."""
    from .sim import run_rows, SimulationMismatch
    stats = {} if stats is None else stats
    x, sh, emin = (np.asarray(a, np.int64) for a in (x, sh, emin))
    T = x.shape[0]
    n = stage_cycles(img.out_dim, img.in_dim, chains=img.chains, chain_tiles=img.chain_tiles, cols=img.spec.cols)
    start = np.zeros((T, n), np.int64)
    start[:, 0] = 1
    inputs = {"x": np.repeat(x, n, axis=0), "sh": np.repeat(sh, n, axis=0),
              "emin": np.repeat(emin, n, axis=0), "start": start.reshape(-1)}
    if img.spec.fmt is not None and not folded:
        raise NotImplementedError("load the base view's word lines with load_words before running it")
    dut = RowSerialLinear(img, folded=folded)
    exp = None
    if expected is not None:
        e = np.zeros((T, img.slots * img.chains), np.int64)
        e[:, :img.out_dim] = np.asarray(expected, np.int64)
        exp = e.reshape(T * img.slots, img.chains)
    got, cycles = run_rows(dut, inputs, engine=engine, stats=stats, name="row_linear", expected=exp)
    if got.shape[0] != T * img.slots:
        raise SimulationMismatch(f"{got.shape[0]} row slots with ready=1, expected {T * img.slots} "
                                 f"({T} tokens x {img.slots} slots in {n} cycles each)")
    y = got.reshape(T, img.slots * img.chains)[:, :img.out_dim]
    return y, cycles
