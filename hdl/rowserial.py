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

from dataclasses import dataclass, field

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .basetile import requantize_rtl
from .romtile import check_positive, shift_left, tree_sum, wrap

__all__ = ["RowFormat", "ROW_FORMATS", "RowSpec", "RowImage", "RowSerialTile", "RowSerialLinear",
           "row_image", "row_reference", "stage_cycles", "FILL_CYCLES"]

E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12)
ROW_ARCH_WORD_LINES = 1024     # the base die's word lines per tile (the estimate's default)


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

    ``fields`` holds the word lines' contents as arrays ``[chains, chain_tiles, lines, n]``:
    ``code`` (cell code indices), ``m`` and ``e`` (scale words), ``scol`` and ``sval`` (outlier
    slots: column, two's-complement code); ``words[p][k]`` packs them into the integers the
    ROM holds (``RowSpec.fields`` layout). ``mult/nshift/bias[p]`` are the row constants of
    chain ``p`` by row slot."""

    spec: RowSpec
    out_dim: int
    in_dim: int
    chains: int
    chain_tiles: int
    passes: int
    slots: int                       # row slots per chain
    fields: dict = field(repr=False)
    mult: np.ndarray = field(repr=False)
    nshift: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(repr=False)
    _words: list | None = field(default=None, repr=False)

    @property
    def lines(self) -> int:
        return self.slots * self.passes

    @property
    def words(self) -> list[list[list[int]]]:
        if self._words is None:
            f = self.fields
            self._words = [[_pack_words(self.spec, f["code"][p, k], f["m"][p, k], f["e"][p, k], f["scol"][p, k],
                                        f["sval"][p, k]) for k in range(self.chain_tiles)]
                           for p in range(self.chains)]
        return self._words


def stage_cycles(rows: int, in_dim: int, *, chains: int, chain_tiles: int, cols: int) -> int:
    """Cycles of one matrix-vector product on the row-serial fabric, from the start pulse to
    the last output: one word line per cycle, then :data:`FILL_CYCLES`."""
    passes = -(-in_dim // (chain_tiles * cols))
    return -(-rows // chains) * passes + FILL_CYCLES


FILL_CYCLES = 3    # after the last word line: tile register, chain accumulator, requantiser


class _WordError(ValueError):
    def __init__(self, line: int, what: str):
        super().__init__(what)
        self.line, self.what = line, what


def _encode_codes(spec: RowSpec, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes [rows, cols] -> (cell code indices, slot columns, slot values) of word lines."""
    fmt = spec.fmt
    rows, cols = codes.shape
    scol = np.zeros((rows, fmt.slots), np.int64)
    sval = np.zeros((rows, fmt.slots), np.int64)
    if fmt.multiply:
        return codes & ((1 << fmt.code_bits) - 1), scol, sval
    # one lookup over int8 codes: index of the value, -1 where the word has none (an outlier)
    table = np.full(256, -1, np.int16)
    for k, v in reversed(list(enumerate(fmt.values))):          # the first index of a value
        table[v + 128] = k
    if codes.size and (codes.min() < -128 or codes.max() > 127):
        r, c = np.argwhere((codes < -128) | (codes > 127))[0]
        raise _WordError(int(r), f"code {int(codes[r, c])} does not fit the {fmt.name} word")
    idx = table[(codes + 128).astype(np.uint8)].astype(np.int64)
    base = idx >= 0
    if not base.all():
        idx[~base] = table[128]                                  # an outlier's cell holds zero
    if not fmt.slots:
        if not base.all():
            r, c = np.argwhere(~base)[0]
            raise _WordError(int(r), f"code {int(codes[r, c])} has no value in the {fmt.name} word format {fmt.values}")
        return idx, scol, sval
    out = ~base
    count = out.sum(axis=1)
    if count.max(initial=0) > fmt.slots:
        r = int(np.argmax(count))
        raise _WordError(r, f"{int(count[r])} outliers; the {fmt.name} word line has {fmt.slots} slots "
                            "(quantise with at most that many per word line)")
    lo6, hi6 = -(1 << (fmt.slot_bits - 1)), 1 << (fmt.slot_bits - 1)
    wide = out & ((codes < lo6) | (codes >= hi6))
    if wide.any():
        r, c = np.argwhere(wide)[0]
        raise _WordError(int(r), f"code {int(codes[r, c])} does not fit a {fmt.slot_bits}-bit outlier slot")
    r, c = np.nonzero(out)                                       # row-major: a row's outliers in order
    rank = np.arange(r.size) - np.searchsorted(r, r)
    scol[r, rank] = c
    sval[r, rank] = codes[r, c] & ((1 << fmt.slot_bits) - 1)
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
            raise _WordError(int(row), f"the units of scale word {w} have different group scales "
                                       f"{shared[row, w].tolist()}; the {fmt.name} word stores one per "
                                       f"{spec.scale_span} columns")
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
        raise _WordError(int(r), f"group scale {gs[r, u]} does not fit the {fmt.name} scale word "
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
    # row o = s * chains + p, columns (q * chain_tiles + k) * C: word line s * passes + q of tile (p, k)
    K, L = chain_tiles, slots * passes
    cells = cp.reshape(slots, chains, passes, K, C).transpose(1, 3, 0, 2, 4).reshape(chains * K * L, C)
    scales = gp.reshape(slots, chains, passes, K, C // U).transpose(1, 3, 0, 2, 4).reshape(chains * K * L, C // U)
    try:
        idx, scol, sval = _encode_codes(spec, cells)
        mm, ee = _encode_scales(spec, scales)
    except _WordError as err:                   # name the linear's row and columns, not the word line
        p, rest = divmod(err.line, K * L)
        k, line = divmod(rest, L)
        s_, q = divmod(line, passes)
        c0 = (q * K + k) * C
        raise ValueError(f"row {s_ * chains + p}, columns {c0}..{c0 + C - 1}: {err.what}") from None
    shape = (chains, K, L)
    fields = {"code": idx.reshape(*shape, -1), "m": mm.reshape(*shape, -1), "e": ee.reshape(*shape, -1),
              "scol": scol.reshape(*shape, -1), "sval": sval.reshape(*shape, -1)}

    def per_chain(v, fill=0):
        a = np.full(slots * chains, fill, np.int64)
        a[:out_dim] = np.asarray(v, np.int64)
        return a.reshape(slots, chains).T.copy()

    return RowImage(spec, out_dim, in_dim, chains, chain_tiles, passes, slots, fields,
                    per_chain(mult), per_chain(nshift), None if bias is None else per_chain(bias))


# --- a numpy model of the row-serial linear, computed from its ROM image ----------------------
def _sext(v: np.ndarray, bits: int) -> np.ndarray:
    return np.where(v >> (bits - 1) & 1, v - (1 << bits), v)


def _decode_words(img: RowImage) -> tuple[np.ndarray, np.ndarray]:
    """The word lines' cell values (code value, outlier slots added to their columns) and each
    (chain, tile, slot, pass, unit)'s group scale ``m << e``."""
    spec, fmt, f = img.spec, img.spec.fmt, img.fields
    C, U = spec.cols, spec.unit
    if fmt.multiply:
        w = _sext(f["code"], fmt.code_bits)
    else:
        w = np.array(fmt.values, np.int64)[f["code"]]               # [P, K, L, C]
    if fmt.slots:                                                   # a slot adds its code to its column
        sval = _sext(f["sval"], fmt.slot_bits).reshape(-1, fmt.slots)
        scol = f["scol"].reshape(-1, fmt.slots)
        w, lines = w.reshape(-1, C).copy(), np.arange(scol.shape[0])
        for j in range(fmt.slots):
            w[lines, scol[:, j]] += sval[:, j]
    gs = f["m"] << f["e"] if fmt.m_bits else np.int64(1) << f["e"]
    gs = np.repeat(gs, spec.scale_span // U, axis=-1).reshape(img.chains, img.chain_tiles, img.slots, img.passes,
                                                               spec.units)
    return w, gs


def row_reference(img: RowImage, x, sh, emin) -> np.ndarray:
    """y int64 [T, out] of the row-serial linear from its ROM image's word lines: each tile's
    partial sum per word line, the chain sum over tiles and passes (modulo ``2**acc_bits``),
    then ``hdl.reference.requantize``."""
    from .reference import requantize
    spec = img.spec
    x, sh, emin = (np.asarray(a, np.int64) for a in (x, sh, emin))
    T, C, U, K, Q, S, P = x.shape[0], spec.cols, spec.unit, img.chain_tiles, img.passes, img.slots, img.chains
    xp = np.zeros((T, Q * K * C), np.int64)
    xp[:, :img.in_dim] = x
    shp = np.zeros((T, Q * K * C // U), np.int64)
    shp[:, :img.in_dim // U] = sh
    w, gs = _decode_words(img)
    # one tile, one word line, one unit: an exact float64 product (|w| <= 2**6, |x| <= 2**7 and at
    # most 64 terms stay far below 2**53), batched over (tile, pass, unit) for BLAS
    w = w.reshape(P, K, S, Q, spec.units, U).transpose(1, 3, 4, 0, 2, 5).reshape(K, Q, spec.units, P * S, U)
    xq = xp.reshape(T, Q, K, spec.units, U).transpose(2, 1, 3, 4, 0)            # [K, Q, nu, U, T]
    part = np.rint(np.matmul(w.astype(np.float64), xq.astype(np.float64))).astype(np.int64)
    part = part.reshape(K, Q, spec.units, P, S, T)
    gs = gs.transpose(1, 3, 4, 0, 2)[..., None]                                # [K, Q, nu, P, S, 1]
    shq = shp.reshape(T, Q, K, spec.units).transpose(2, 1, 3, 0)[:, :, :, None, None, :]
    with np.errstate(over="ignore"):
        acc = ((part * gs) << shq).sum(axis=(0, 1, 2))                          # [P, S, T]
    acc = acc.transpose(2, 0, 1)
    acc = acc.transpose(0, 2, 1).reshape(T, -1)[:, :img.out_dim]    # [T, S * P]: o = s * P + p
    half = 1 << (spec.acc_bits - 1)
    acc = (acc + half) % (1 << spec.acc_bits) - half
    mult = img.mult.T.reshape(-1)[:img.out_dim]
    nshift = img.nshift.T.reshape(-1)[:img.out_dim]
    bias = None if img.bias is None else img.bias.T.reshape(-1)[:img.out_dim]
    return requantize(acc, mult, nshift, emin, bias)


@dataclass
class RowDense:
    """A row-serial image as one dense matrix (for a fast model of many tokens): ``w[i, o]`` is
    the weight's code value (slots added) times its unit's scale, both read from the image's
    word lines; float64 holding exact integers. ``row_dense_apply`` equals ``row_reference``."""

    w: np.ndarray
    wmax: int
    unit: int
    acc_bits: int
    mult: np.ndarray
    nshift: np.ndarray
    bias: np.ndarray | None


def row_dense(img: RowImage) -> RowDense:
    spec = img.spec
    C, U, K, Q, S, P = spec.cols, spec.unit, img.chain_tiles, img.passes, img.slots, img.chains
    w, gs = _decode_words(img)
    W = w.reshape(P, K, S, Q, spec.units, U) * gs[..., None]
    # output o = s * P + p; input i = (q * K + k) * C + unit * U + u
    W = W.transpose(2, 0, 3, 1, 4, 5).reshape(S * P, Q * K * C)[:img.out_dim, :img.in_dim]
    wmax = int(np.abs(W).max(initial=0))
    return RowDense(np.ascontiguousarray(W.T, dtype=np.float64), wmax, U, spec.acc_bits,
                    img.mult.T.reshape(-1)[:img.out_dim].copy(), img.nshift.T.reshape(-1)[:img.out_dim].copy(),
                    None if img.bias is None else img.bias.T.reshape(-1)[:img.out_dim].copy())


def row_dense_apply(d: RowDense, x, sh, emin) -> np.ndarray:
    """y int64 [T, out] from MXINT ``x`` [T, in], unit shifts ``sh`` [T, in/unit], ``emin`` [T]."""
    from .reference import requantize
    x, sh = np.asarray(x, np.int64), np.asarray(sh, np.int64)
    xs = x << np.repeat(sh, d.unit, axis=1)
    xmax = int(np.abs(xs).max(initial=0))
    if xmax * d.wmax * max(xs.shape[1], 1) < (1 << 53):       # every partial sum exact in float64
        acc = np.matmul(xs.astype(np.float64), d.w).astype(np.int64)
    else:
        with np.errstate(over="ignore"):
            acc = np.matmul(xs, d.w.astype(np.int64))           # exact modulo 2**64
    half = 1 << (d.acc_bits - 1)
    acc = (acc + half) % (1 << d.acc_bits) - half
    return requantize(acc, d.mult, d.nshift, emin, d.bias)


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
        total = tree_sum(shifted)
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
    ``folded=False`` builds the base view: every tile's ROM is a writable array, loaded before
    the tokens through ``cfg_we``, ``cfg_tile`` (``p * chain_tiles + k``), ``cfg_addr`` and
    ``cfg_data`` (one word line per cycle); the row constants stay the chain's ROM.
    """

    LATENCY = 0

    def __init__(self, img: RowImage, *, folded: bool = True):
        self.img, self.folded = img, folded
        s = img.spec
        self.tiles = [[RowSerialTile(s, img.words[p][k] if folded else None)
                       for k in range(img.chain_tiles)] for p in range(img.chains)]
        cfg = {} if folded else {
            "cfg_we": In(1), "cfg_tile": In(unsigned(max(1, (img.chains * img.chain_tiles - 1).bit_length()))),
            "cfg_addr": In(unsigned(s.addr_bits)), "cfg_data": In(unsigned(32)).array(-(-s.word_bits // 32))}
        super().__init__({**cfg,
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
                if not self.folded:
                    m.d.comb += [tile.cfg_we.eq(self.cfg_we & (self.cfg_tile == p * K + k)),
                                 tile.cfg_addr.eq(self.cfg_addr),
                                 tile.cfg_data.eq(Cat(*self.cfg_data)[:s.word_bits])]
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
                        stats: dict | None = None) -> tuple[np.ndarray, int]:
    """Run a ``RowSerialLinear`` on tokens x [T, in], sh [T, in/unit], emin [T]: each token is
    held for exactly ``stage_cycles`` cycles with ``start`` on its first, so any other cycle
    count would misalign the outputs. ``folded=False``: the base view, its word lines loaded
    first (one per cycle; ``stats['load_cycles']``). Returns (y int64 [T, out], token cycles)."""
    from .sim import SimulationMismatch, run_rows
    stats = {} if stats is None else stats
    x, sh, emin = (np.asarray(a, np.int64) for a in (x, sh, emin))
    T = x.shape[0]
    n = stage_cycles(img.out_dim, img.in_dim, chains=img.chains, chain_tiles=img.chain_tiles, cols=img.spec.cols)
    start = np.zeros((T, n), np.int64)
    start[:, 0] = 1
    inputs = {"x": np.repeat(x, n, axis=0), "sh": np.repeat(sh, n, axis=0),
              "emin": np.repeat(emin, n, axis=0), "start": start.reshape(-1)}
    load = 0
    if not folded:
        K, L = img.chain_tiles, img.lines
        load = img.chains * K * L
        tile = np.repeat(np.arange(img.chains * K), L)
        addr = np.tile(np.arange(L), img.chains * K)
        chunks = -(-img.spec.word_bits // 32)
        data = np.array([[(w >> (32 * j)) & 0xFFFFFFFF for j in range(chunks)]
                         for chain in img.words for words in chain for w in words], np.int64).reshape(load, chunks)

        def pad(v):
            return np.concatenate([v, np.zeros((T * n,) + v.shape[1:], np.int64)])
        inputs = {k: np.concatenate([np.zeros((load,) + v.shape[1:], np.int64), v]) for k, v in inputs.items()}
        inputs.update(cfg_we=pad(np.ones(load, np.int64)), cfg_tile=pad(tile), cfg_addr=pad(addr), cfg_data=pad(data))
    dut = RowSerialLinear(img, folded=folded)
    got, cycles = run_rows(dut, inputs, engine=engine, stats=stats, name="row_linear" if folded else "row_linear_base")
    if got.shape[0] != T * img.slots:
        raise SimulationMismatch(f"{got.shape[0]} row slots with ready=1, expected {T * img.slots} "
                                 f"({T} tokens x {img.slots} slots in {n} cycles each)")
    stats["load_cycles"] = load
    y = got.reshape(T, img.slots * img.chains)[:, :img.out_dim]
    return y, cycles - load
