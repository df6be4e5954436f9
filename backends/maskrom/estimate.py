"""Chip estimates for the mask-ROM target from model shapes alone (spec: docs/estimates.md).

A first-order model: counts of cells, adders, multipliers, registers and SRAM bits follow from
the layer shapes and the base-die family (docs/layout.md); areas, energies and leakage come
from a technology table (``tech/*.json``, every constant with its source and whether it is
cited or assumed); speed comes from a cycle model of one token passing the layers. No
weights are needed, so chips for models far larger than this machine can be sized.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# model shapes and format costs live in backends/model_shape.py (shared with the dataflow estimate)
from tapeout.backends.model_shape import (FORMATS, FormatCost, ModelShape, derive_linears,  # noqa: F401
                                          format_cost, kv_cache_bytes, shape_from_hf_config, shape_from_summary)
from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.quant.formats import W3O6_OUTLIER_FRAC

from .base import Family, family_for

TECH_DIR = Path(__file__).with_name("tech")
CONFIG_DIR = Path(__file__).with_name("configs")

# ----------------------------------------------------------------------------------------------
# Technology tables
# ----------------------------------------------------------------------------------------------

TECH_KEYS = {
    "clock_hz": "clock of the whole chip",
    "vdd_v": "core supply",
    "logic_density_mtr_per_mm2": "realised logic density",
    "sram_bitcell_um2": "6T high-density SRAM bit cell",
    "sram_array_efficiency": "bit-cell area / macro area",
    "rom_cell_um2": "via-programmed ROM cell (1 transistor + via)",
    "rom_array_efficiency": "ROM cell area / array area",
    "energy_scale_from_45nm": "per-operation energy at this node / at 45 nm",
    "e_add_bit_45nm_j": "adder energy per bit at 45 nm",
    "e_mult_bitproduct_45nm_j": "multiplier energy per partial-product bit at 45 nm",
    "e_sram_bit_45nm_j": "SRAM access energy per bit (8 KB bank) at 45 nm",
    "e_rom_bit_ratio": "ROM read energy per bit / SRAM access energy per bit",
    "e_flop_bit_45nm_j": "register write energy per bit at 45 nm",
    "wire_cap_f_per_um": "wire capacitance",
    "wire_activity": "0->1 transitions per wire per token",
    "leakage_logic_w_per_mm2": "leakage of logic",
    "leakage_sram_w_per_mm2": "leakage of SRAM arrays",
    "leakage_rom_w_per_mm2": "leakage of ROM arrays",
    "io_area_mm2": "host interface area",
    "io_power_w": "host interface static power",
    "e_io_bit_j": "host interface energy per bit",
    "reticle_mm2": "largest die one exposure field allows",
}


def load_tech(name_or_path: str | Path | dict) -> dict:
    """A technology table by name (``n5``, ``n7``, ``n16``: ``backends/maskrom/tech/NAME.json``)
    or path, checked: every constant of :data:`TECH_KEYS` with a numeric ``value``, a ``kind``
    (``cited``, ``derived`` or ``assumption``) and a ``source``. Returns the table with a flat
    ``values`` dict added."""
    if isinstance(name_or_path, dict):
        table, where = dict(name_or_path), str(name_or_path.get("path") or name_or_path.get("name") or "<dict>")
    else:
        p = Path(name_or_path)
        if not p.suffix and not p.exists():
            p = TECH_DIR / f"{name_or_path}.json"
            if not p.exists():
                known = ", ".join(sorted(q.stem for q in TECH_DIR.glob("*.json")))
                raise TapeoutError(f"unknown technology {str(name_or_path)!r}; tables: {known} "
                                   "(or pass the path of a JSON table, see docs/tech.md)")
        where = str(p)
        try:
            table = json.loads(p.read_text())
        except FileNotFoundError:
            raise TapeoutError("technology table not found; pass n5, n7, n16 or the path of a JSON table",
                               file=where) from None
        except (OSError, json.JSONDecodeError) as err:
            raise TapeoutError(f"technology table is not valid JSON ({err})", file=where) from None
        table["path"] = where
    consts = table.get("constants")
    if not isinstance(consts, dict):
        raise TapeoutError("technology table has no 'constants' object (see docs/tech.md)", file=where)
    for key, what in TECH_KEYS.items():
        c = consts.get(key)
        if c is None:
            raise TapeoutError(f"technology table is missing constant {key!r} ({what}); "
                               "every table needs all keys listed in docs/tech.md", file=where)
        if not isinstance(c, dict) or isinstance(c.get("value"), bool) \
                or not isinstance(c.get("value"), (int, float)) or c["value"] < 0 or not c.get("source") \
                or c.get("kind") not in ("cited", "derived", "assumption"):
            raise TapeoutError(f"technology constant {key!r} needs a non-negative numeric 'value', a 'kind' "
                               "(cited, derived or assumption) and a 'source'", file=where)
    table.setdefault("name", Path(where).stem)
    table["values"] = {k: float(c["value"]) for k, c in consts.items() if isinstance(c, dict) and "value" in c}
    return table


# ----------------------------------------------------------------------------------------------
# Circuit primitives: transistor counts (static CMOS) and energies
# ----------------------------------------------------------------------------------------------

T_FULL_ADDER, T_FLOP, T_MUX2, T_AND2 = 28, 24, 12, 6     # transistors (mirror adder, TG flip-flop)


def t_adder(bits: float) -> float:
    return T_FULL_ADDER * bits


def t_mult(a: int, b: int) -> float:
    """Array multiplier: a*b partial-product ANDs and (a-1)*b full adders."""
    return T_AND2 * a * b + T_FULL_ADDER * max(a - 1, 0) * b


def shifter_bits(width_in: int, stages: int, width_max: int) -> int:
    """Mux bits of a left barrel shifter: stage k widens the value by 2**k bits, up to ``width_max``."""
    return sum(min(width_max, width_in + (1 << (k + 1)) - 1) for k in range(stages))


def t_shifter(width_in: int, stages: int, width_max: int) -> float:
    return T_MUX2 * shifter_bits(width_in, stages, width_max)


def t_reg(bits: float) -> float:
    return T_FLOP * bits


def tree_adder_bits(inputs: int, width: int) -> int:
    """Full-adder bits of a binary tree summing ``inputs`` values of ``width`` bits."""
    total, n, w = 0, inputs, width
    while n > 1:
        total += (n // 2) * w
        n, w = (n + 1) // 2, w + 1
    return total


def generator_adders(alphabet: tuple[int, ...]) -> int:
    """Adders that form x * v for every v of the alphabet from shifts of x: one per distinct odd
    part of |v| above 1 (3 = 2 + 1, 5 = 4 + 1, 7 = 8 - 1, 11 = 8 + 3, ...). A negative line is
    the bitwise inverse of its positive line, the +1 entering the row's adder tree as a carry."""
    odd = set()
    for v in alphabet:
        m = abs(v)
        while m and m % 2 == 0:
            m //= 2
        if m > 1:
            odd.add(m)
    return len(odd)


def product_width(act_bits: int, alphabet: tuple[int, ...]) -> int:
    """Signed width of x * v for every v of the alphabet (x a symmetric act_bits integer)."""
    if not alphabet:
        return 0
    return (((1 << (act_bits - 1)) - 1) * max(abs(v) for v in alphabet)).bit_length() + 1


class _Energy:
    """Per-operation energies at the table's node (J)."""

    def __init__(self, v: dict[str, float]) -> None:
        k = v["energy_scale_from_45nm"]
        self.add_bit = v["e_add_bit_45nm_j"] * k
        self.mult_bp = v["e_mult_bitproduct_45nm_j"] * k
        self.sram_bit = v["e_sram_bit_45nm_j"] * k
        self.rom_bit = self.sram_bit * v["e_rom_bit_ratio"]
        self.flop_bit = v["e_flop_bit_45nm_j"] * k
        self.wire_bit_um = v["wire_activity"] * v["wire_cap_f_per_um"] * v["vdd_v"] ** 2

    def add(self, bits: float) -> float:
        return self.add_bit * bits

    def mult(self, a: int, b: int) -> float:
        return self.mult_bp * a * b

    def shift(self, width_in: int, stages: int, width_max: int) -> float:
        return 0.5 * self.add_bit * shifter_bits(width_in, stages, width_max)   # a mux bit: half an adder bit

    def flop(self, bits: float) -> float:
        return self.flop_bit * bits


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------

ARCH_DEFAULTS: dict[str, int] = {
    "tile_rows": 0, "tile_cols": 0,  # 0: the base family's tile (docs/layout.md: 64 x 64)
    "row_fold": 1,                 # cycles a tile takes for its rows (1: every row has its own datapath)
    "attn_positions_per_cycle": 1,  # KV positions each layer's attention engine consumes per cycle
    "requant_lanes": 64,           # requantisers per linear (outputs leave C per cycle)
    "block_shift_stages": 5,       # barrel-shift stages for the activation block shift (< 32)
    "tree_levels_per_cycle": 2,    # adder-tree levels per pipeline stage at the stated clock
    "lat_requant": 2, "lat_norm": 8, "lat_rope": 2, "lat_softmax": 12, "lat_act": 3, "lat_embed": 2,
}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def tech_and_context(tech, clock_hz, shape: ModelShape, context: int | None) -> tuple[dict, dict, int]:
    """The technology table, its values with ``clock_hz`` applied, and the checked context."""
    table = load_tech(tech)
    v = dict(table["values"])
    if clock_hz is not None:
        if isinstance(clock_hz, bool) or not isinstance(clock_hz, (int, float)) or clock_hz <= 0:
            raise TapeoutError(f"clock must be a positive frequency in Hz, not {clock_hz!r}")
        v["clock_hz"] = float(clock_hz)
    ctx = shape.context if context is None else context
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0:
        raise TapeoutError(f"context must be a positive number of tokens, not {ctx!r}")
    return table, v, ctx


class _Chip:
    """Collects components: transistors, area by class (logic / sram / rom), dynamic energy."""

    def __init__(self, v: dict[str, float]) -> None:
        self.v, self.parts = v, {}

    def add(self, name: str, *, logic_t: float = 0.0, cell_t: float = 0.0, rom_bits: float = 0.0,
            sram_bits: float = 0.0, extra_area_mm2: float = 0.0, energy: float = 0.0,
            static_w: float = 0.0, counts: dict | None = None) -> None:
        v = self.v
        logic_mm2 = logic_t / (v["logic_density_mtr_per_mm2"] * 1e6)
        rom_mm2 = rom_bits * v["rom_cell_um2"] / v["rom_array_efficiency"] / 1e6
        sram_mm2 = sram_bits * v["sram_bitcell_um2"] / v["sram_array_efficiency"] / 1e6
        leak = (logic_mm2 + extra_area_mm2) * v["leakage_logic_w_per_mm2"] \
            + rom_mm2 * v["leakage_rom_w_per_mm2"] + sram_mm2 * v["leakage_sram_w_per_mm2"]
        self.parts[name] = {
            "area_mm2": logic_mm2 + rom_mm2 + sram_mm2 + extra_area_mm2,
            "transistors": round(logic_t + cell_t + 6 * sram_bits),
            "dynamic_energy_per_token_j": energy,
            "static_w": leak + static_w,
            "counts": {k: (round(x) if isinstance(x, float) and x > 1e3 else x) for k, x in (counts or {}).items()},
        }

    def totals(self, tokens_per_s: float) -> dict[str, float]:
        """Give every component its leakage energy, energy per token and power at
        ``tokens_per_s``; return the chip's sums."""
        t_token = 1 / tokens_per_s
        for c in self.parts.values():
            c["leakage_energy_per_token_j"] = c["static_w"] * t_token
            c["energy_per_token_j"] = c["dynamic_energy_per_token_j"] + c["leakage_energy_per_token_j"]
            c["power_w"] = c["energy_per_token_j"] * tokens_per_s
        return {k: sum(c[k] for c in self.parts.values())
                for k in ("area_mm2", "transistors", "energy_per_token_j", "dynamic_energy_per_token_j", "static_w")}


def estimate(shape: ModelShape, fmt: str, tech: dict | str | Path = "n5", *, context: int | None = None,
             clock_hz: float | None = None, outlier_frac: float = W3O6_OUTLIER_FRAC,
             arch: dict[str, int] | None = None) -> dict[str, Any]:
    """Area, transistors, ROM bits, SRAM bytes, energy per token, tokens/s per user and power of
    a mask-ROM chip holding ``shape`` in format ``fmt``, per component (docs/estimates.md).

    ``context`` (default: ``shape.context``) sizes the KV cache and is the attended length
    (the last token of a full context: the worst case); ``clock_hz`` overrides the table's
    clock; ``outlier_frac`` is w3o6's outlier fraction; ``arch`` overrides
    :data:`ARCH_DEFAULTS` (e.g. ``{"row_fold": 64}`` for row-serial tiles).
    """
    fc = format_cost(fmt)
    table, v, ctx = tech_and_context(tech, clock_hz, shape, context)
    if not 0 <= outlier_frac <= 1:
        raise TapeoutError(f"outlier fraction must be in [0, 1], not {outlier_frac!r}")
    a = {**ARCH_DEFAULTS, **(arch or {})}
    unknown = set(a) - set(ARCH_DEFAULTS)
    if unknown:
        raise TapeoutError(f"unknown architecture option(s) {sorted(unknown)}; known: {', '.join(ARCH_DEFAULTS)}")
    for key, value in a.items():
        low = 0 if key in ("tile_rows", "tile_cols") or key.startswith("lat_") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TapeoutError(f"architecture option {key} must be an integer >= {low}, not {value!r}")
    fam: Family = family_for(fmt)
    R, C = a["tile_rows"] or fam.tile_rows, a["tile_cols"] or fam.tile_cols
    U, act, acc = fam.unit, fam.act_bits, fam.acc_bits
    if C % U:
        raise TapeoutError(f"tile columns must be a multiple of the family's {U}-column unit, not {C}")
    a["tile_rows"], a["tile_cols"] = R, C
    V = fam.vector_lanes
    fold = a["row_fold"]
    if R % fold:
        raise TapeoutError(f"row_fold must be a positive divisor of the tile's {R} rows, not {fold!r}")
    E = _Energy(v)
    chip = _Chip(v)
    lin = shape.linears
    L, h, H, KV, D, I = shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    fine_frac = fc.fine * (outlier_frac if fmt == "w3o6" else 1.0)

    # ---- the fabric: weight cells, product lines, adder trees, scales, accumulators, requant
    tiles = sum(_ceil(o, R) * _ceil(i, C) for _, o, i in lin)
    weights = shape.weights
    cells_built = tiles * R * C
    rom_bits_w = sum(o * i * fc.bits_per_weight(o, i, outlier_frac) for _, o, i in lin)
    pw_c, pw_f = product_width(act, fam.coarse), product_width(act, fam.fine)
    lines_c, lines_f = len(fam.coarse), len(fam.fine)
    units_tile = C // U
    part_w = pw_c + int(math.log2(U)) + (1 if fam.fine else 0)
    line_bits_col = lines_c * pw_c + lines_f * pw_f
    rows_hw = R // fold                                   # row datapaths per tile
    used_cols = sum(_ceil(o, R) * i for _, o, i in lin)  # tile columns that see an input per token
    units_used = sum(o * _ceil(i, U) for _, o, i in lin)
    row_tiles = sum(o * _ceil(i, C) for _, o, i in lin)

    # per-tile logic (built for every tile of the base die)
    gen_c, gen_f = generator_adders(fam.coarse), generator_adders(fam.fine)
    neg_bits = sum(pw_c for x in fam.coarse if x < 0) + sum(pw_f for x in fam.fine if x < 0)
    # per column: the adders, the inverters of negative lines, a driver (two inverters) per line bit
    t_gen = C * (gen_c * t_adder(pw_c) + gen_f * t_adder(pw_f) + 2 * neg_bits + 4 * line_bits_col)
    tree_c, tree_f = tree_adder_bits(U, pw_c), (tree_adder_bits(U, pw_f) + part_w if fam.fine else 0)
    t_tree = rows_hw * units_tile * t_adder(tree_c + tree_f)
    scaled_w = part_w + fc.scale_mult_bits
    shift_stages = fc.scale_shift_stages + a["block_shift_stages"]
    t_scale_unit = t_mult(part_w, fc.scale_mult_bits) + t_shifter(scaled_w, shift_stages, acc)
    t_scale = rows_hw * (units_tile * t_scale_unit + (units_tile - 1) * t_adder(acc))
    t_acc = rows_hw * (t_adder(acc) + t_reg(acc))       # one chain stage per row datapath

    vias = {"vias_code": weights * (1 - fc.coarse_zero), "vias_fine": weights * fine_frac}
    if fold == 1:
        # a cell is a via site joining its row's tree input to one product line
        cell_bits, t_select, e_cells = cells_built, 0.0, 0.0
    else:
        # row-serial tiles: a word-line ROM holds each weight's line indices (the via maps' packing),
        # read once per token; per row datapath and column a multiplexer picks the line
        index_bits = len(fam.coarse).bit_length() + len(fam.fine).bit_length()
        cell_bits = cells_built * index_bits
        t_select = tiles * rows_hw * C * (lines_c * pw_c + lines_f * pw_f) * T_MUX2
        e_cells = weights * (index_bits * E.rom_bit
                             + E.shift(pw_c, math.ceil(math.log2(lines_c + 1)), pw_c)
                             + (E.shift(pw_f, math.ceil(math.log2(lines_f + 1)), pw_f) if fam.fine else 0.0))
    chip.add("rom_cells", logic_t=t_select, cell_t=cell_bits, rom_bits=cell_bits, energy=e_cells,
             counts={"cells": cell_bits, "weights": weights, "tiles": tiles, **vias})
    # product lines: the generators' adds plus charging the lines along the tile's height
    fabric_logic = tiles * (t_gen + t_tree + t_scale + t_acc) + t_select
    tile_um2 = (fabric_logic / tiles / v["logic_density_mtr_per_mm2"]
                + cell_bits / tiles * v["rom_cell_um2"] / v["rom_array_efficiency"])   # MTr/mm^2 == Tr/um^2
    tile_height_um = R * math.sqrt(tile_um2 / (R * C))     # cells' share of the tile taken square
    e_lines = used_cols * (gen_c * E.add(pw_c) + gen_f * E.add(pw_f)
                           + line_bits_col * tile_height_um * E.wire_bit_um)
    chip.add("product_lines", logic_t=tiles * t_gen, energy=e_lines,
             counts={"generator_adders": tiles * C * (gen_c + gen_f), "lines_per_column": lines_c + lines_f,
                     "line_bits": pw_c, "tile_height_um": round(tile_height_um, 2)})
    # zero inputs do not toggle: the coarse tree's energy scales with its non-zero inputs; a fine via
    # toggles its own path of log2(unit) adders, and the coarse + fine combine add runs per unit
    fine_path = sum(pw_f + k for k in range(int(math.log2(U))))
    e_tree = units_used * E.add(tree_c) * (1 - fc.coarse_zero) + (
        weights * fine_frac * E.add(fine_path) + units_used * min(1.0, fine_frac * U) * E.add(part_w)
        if fam.fine else 0.0)
    chip.add("adder_trees", logic_t=tiles * t_tree, energy=e_tree,
             counts={"adders": tiles * rows_hw * units_tile * ((U - 1) * (2 if fam.fine else 1) + (1 if fam.fine else 0)),
                     "adds_per_token": units_used * (U - 1)})
    e_scale = units_used * (E.mult(part_w, fc.scale_mult_bits)
                            + E.shift(scaled_w, shift_stages, acc)) \
        + (units_used - row_tiles) * E.add(acc)
    scale_rom = tiles * R * units_tile * fam.group_scale_bits
    chip.add("scale_units", logic_t=tiles * t_scale, energy=e_scale,
             counts={"multipliers": tiles * rows_hw * units_tile if fc.scale_mult_bits else 0,
                     "shifters": tiles * rows_hw * units_tile, "multiplier_bits": [part_w, fc.scale_mult_bits]})
    chip.add("accumulators", logic_t=tiles * t_acc, energy=row_tiles * (E.add(acc) + E.flop(acc)),
             counts={"accumulators": tiles * rows_hw, "bits": acc})
    n_lin, lanes = len(lin), a["requant_lanes"]
    # per linear: the row results held at the end of the chain, a mux to the lanes, the lanes
    t_rq = sum(o * t_reg(acc) + max(o - lanes, 0) * acc * T_MUX2
               + min(lanes, o) * (t_mult(acc, 16) + 2 * t_adder(32)) for _, o, _ in lin)
    outs = sum(o for _, o, _ in lin)
    chip.add("requant", logic_t=t_rq,
             energy=outs * (E.flop(acc) + E.mult(acc, 16) + 2 * E.add(32) + 0.5 * E.add(acc)),
             counts={"linears": n_lin, "lanes": n_lin * lanes})
    # scale ROM: group-scale words and (M, n, bias) per row, as vias on constant inputs
    const_bits = scale_rom + outs * (16 + 6 + 32)
    chip.add("scale_rom", rom_bits=const_bits, counts={"bits": const_bits})

    memo = add_shared_parts(chip, shape, fmt, fc, v, E, ctx=ctx, outlier_frac=outlier_frac,
                            positions_per_cycle=a["attn_positions_per_cycle"], engines=L, lanes=V)
    emb_bits, norm_bits, rope_bits = memo["emb_bits"], memo["norm_bits"], memo["rope_bits"]
    kv_bytes, act_bytes, P = memo["kv_bytes"], memo["act_bytes"], a["attn_positions_per_cycle"]

    # ---- cycle model: one token through the layers (docs/estimates.md)
    # product lines 1, the unit tree and the unit combine (log2 C levels), scale multiply 1,
    # shift and accumulate 1, then the other row groups of a folded tile one per cycle
    lat_tile = 1 + _ceil(math.ceil(math.log2(C)), a["tree_levels_per_cycle"]) + 2 + (fold - 1)

    def linear_cycles(n_in: int) -> int:
        return _ceil(n_in, C) + lat_tile + a["lat_requant"]

    def attention_cycles(attended: int) -> int:
        return _ceil(H * D, lanes) + a["lat_rope"] + _ceil(attended, P) + a["lat_softmax"]

    def layer_stages(attended: int) -> dict[str, int]:
        st = {"norm_1": _ceil(h, V) + a["lat_norm"], "qkv_proj": linear_cycles(h),
              "attention": attention_cycles(attended), "o_proj": linear_cycles(H * D),
              "norm_2": _ceil(h, V) + a["lat_norm"]}
        if I:
            st["mlp_in"] = linear_cycles(h)
            st["mlp_out"] = linear_cycles(I) + a["lat_act"]
        return st

    stages = layer_stages(ctx)
    head = {"embed": a["lat_embed"], "final_norm": _ceil(h, V) + a["lat_norm"]}
    if shape.vocab:
        head["lm_head"] = linear_cycles(h) + _ceil(shape.vocab, lanes)
        head["argmax"] = _ceil(int(math.log2(max(lanes, 2))), a["tree_levels_per_cycle"]) + 1
    cycles = L * sum(stages.values()) + sum(head.values())
    mean_cycles = L * sum(layer_stages(max(1, ctx // 2)).values()) + sum(head.values())
    clock = v["clock_hz"]
    tps = clock / cycles
    # several users' tokens can be in flight at once, one per busy stage: the busiest stage bounds
    # the aggregate rate, if the KV cache holds every user's context
    busiest = max(list(stages.values()) + list(head.values()))
    users = math.ceil(cycles / busiest)
    pipeline = {"busiest_stage_cycles": busiest, "users": users, "aggregate_tokens_per_s": clock / busiest,
                "kv_sram_bytes_for_users": users * kv_bytes}

    # ---- totals
    comps = chip.parts
    total = chip.totals(tps)
    rom_bits = rom_bits_w + emb_bits + norm_bits + rope_bits
    sram_bytes = kv_bytes + act_bytes
    assumptions = _assumptions(shape, fmt, fc, table, a, ctx, outlier_frac, fam, R, C)
    if total["area_mm2"] > v["reticle_mm2"]:
        assumptions.insert(0, f"the die ({total['area_mm2']:,.0f} mm^2) exceeds one reticle "
                              f"({v['reticle_mm2']:.0f} mm^2): it would need {math.ceil(total['area_mm2'] / v['reticle_mm2'])} "
                              "chips or a row-serial fabric (arch row_fold)")
    return {
        "model": shape.name, "format": fmt, "target": "maskrom",
        "tech": {"name": table["name"], "path": table.get("path"), "node": table.get("node")},
        "clock_hz": clock, "context": ctx,
        "area_mm2": total["area_mm2"], "transistors": total["transistors"],
        "rom_bits": round(rom_bits), "sram_bytes": sram_bytes,
        "energy_per_token_j": total["energy_per_token_j"], "tokens_per_s": tps,
        "tokens_per_s_mean": clock / mean_cycles, "cycles_per_token": cycles,
        "power_w": total["energy_per_token_j"] * tps, "static_power_w": total["static_w"],
        "dynamic_energy_per_token_j": total["dynamic_energy_per_token_j"],
        "fits_reticle": total["area_mm2"] <= v["reticle_mm2"],
        "weights": weights, "bits_per_weight": rom_bits_w / weights if weights else 0.0,
        "base_family": fam.name, "arch": a,
        "cycles": {"per_layer": stages, "layers": L, "head": head, "total": cycles, "mean_total": mean_cycles},
        "pipeline": pipeline,
        "components": comps, "assumptions": assumptions,
    }



def add_shared_parts(chip: "_Chip", shape: ModelShape, fmt: str, fc: FormatCost, v: dict, E: "_Energy", *,
                     ctx: int, outlier_frac: float, positions_per_cycle: int, engines: int, lanes: int) -> dict:
    """The chip beside its weight fabric: embedding and constant ROMs, KV and activation SRAM,
    attention engines, vector units, host interface. ``engines``: attention engines and vector
    unit sets (one per layer when all layers run at once; one, shared, when they run in turn);
    the activation buffers hold that many layers' vectors."""
    L, h, H, KV, D, I = shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    act, V, P = family_for(fmt).act_bits, lanes, positions_per_cycle
    # ---- embedding and constant ROMs (read-out ROMs: one 1T cell per bit)
    emb_rows = shape.vocab + shape.positions
    bpw_emb = fc.bits_per_weight(max(shape.vocab, 1), h, outlier_frac)
    emb_bits = emb_rows * h * bpw_emb
    chip.add("embedding_rom", cell_t=emb_bits, rom_bits=emb_bits,
             energy=(h * bpw_emb * (2 if shape.positions else 1)) * E.rom_bit if emb_rows else 0.0,
             counts={"rows": emb_rows, "bits": emb_bits, "bits_per_weight": round(bpw_emb, 4)})
    norm_bits = (2 * L + 1) * h * 32 * (2 if shape.norm == "layernorm" else 1)
    rope_bits = 0 if shape.positions else ctx * D * 16        # cos and sin, Q16 halves
    chip.add("constants_rom", cell_t=rope_bits, rom_bits=norm_bits + rope_bits,
             energy=L * D * 16 * E.rom_bit,
             counts={"norm_bits": norm_bits, "rope_bits": rope_bits})

    # ---- SRAM: KV cache and activation buffers
    kv_per_token = L * 2 * KV * D
    kv_bytes = kv_cache_bytes([(KV, D)] * L, ctx)             # int8 + one shift byte per 32-block
    kv_read_bits = 8 * ctx * (kv_per_token + kv_per_token // 32)
    kv_write_bits = 8 * (kv_per_token + kv_per_token // 32)
    chip.add("kv_sram", sram_bits=8 * kv_bytes, energy=(kv_read_bits + kv_write_bits) * E.sram_bit,
             counts={"bytes": kv_bytes, "read_bits_per_token": kv_read_bits})
    mlp_vec = (3 * I if shape.gated_mlp else 2 * I)
    vec_words = 3 * h + (H + 2 * KV) * D + H * D + h + mlp_vec + h    # one layer's vectors (Q16)
    act_bytes = min(engines, L) * 2 * vec_words * 4 + 2 * shape.vocab * 4           # double buffered, logits
    chip.add("act_sram", sram_bits=8 * act_bytes,
             energy=(L * vec_words + shape.vocab) * 32 * 2 * E.sram_bit,
             counts={"bytes": act_bytes})

    # ---- attention engines (one per layer) and vector units
    t_attn_layer = P * (2 * H * D * (t_mult(act, act) + t_adder(32))) + H * D * t_reg(32) \
        + P * H * (3 * t_mult(16, 16) + 2 * t_adder(32)) + H * (2 * t_reg(32) + 2 * t_mult(32, 32)) \
        + V * t_mult(32, 16)
    e_attn = L * ctx * (2 * H * D * (E.mult(act, act) + E.add(32)) + H * (3 * E.mult(16, 16) + 2 * E.add(32))) \
        + L * H * D * E.mult(32, 16)
    chip.add("attention", logic_t=engines * t_attn_layer, energy=e_attn,
             counts={"engines": engines, "macs_per_cycle": engines * P * 2 * H * D, "macs_per_token": L * ctx * 2 * H * D})
    lane = {"norm": 2 * t_mult(32, 16) + t_adder(48), "rope": 2 * t_mult(32, 16) + t_adder(32),
            "act": 3 * t_mult(16, 16) + 2 * t_mult(32, 16), "residual": t_adder(32),
            "mx_quantise": 2 * t_adder(32) + t_reg(32)}
    per_layer = V * (2 * lane["norm"] + lane["rope"] + lane["act"] + 2 * lane["residual"] + 4 * lane["mx_quantise"]) \
        + 2 * 4 * t_mult(32, 32)
    t_vec = engines * per_layer + V * (lane["norm"] + 2 * t_adder(32) + t_reg(32)) + 4 * t_mult(32, 32)
    e_norm = h * (2 * E.mult(32, 16) + E.add(48))
    e_vec = (2 * L + 1) * e_norm + L * ((H + KV) * D * (2 * E.mult(32, 16) + E.add(32))
                                        + I * (3 * E.mult(16, 16) + 2 * E.mult(32, 16))
                                        + 2 * h * E.add(32) + (2 * h + H * D + I) * 2 * E.add(32)) \
        + shape.vocab * E.add(32)
    chip.add("vector_units", logic_t=t_vec, energy=e_vec, counts={"lanes": V, "units_per_layer": 10})
    io_t = v["io_area_mm2"] * v["logic_density_mtr_per_mm2"] * 1e6 * 0.25
    chip.add("io", cell_t=io_t, extra_area_mm2=v["io_area_mm2"], energy=64 * v["e_io_bit_j"],
             static_w=v["io_power_w"], counts={"bits_per_token": 64})
    return {"emb_bits": emb_bits, "norm_bits": norm_bits, "rope_bits": rope_bits, "kv_bytes": kv_bytes,
            "act_bytes": act_bytes}


def _assumptions(shape: ModelShape, fmt: str, fc: FormatCost, table: dict, a: dict, ctx: int,
                 outlier_frac: float, fam: Family, R: int, C: int) -> list[str]:
    out = [
        "first-order model: counts from shapes, areas from densities, energies from per-op energies; "
        "no placement, routing, timing closure or yield",
        f"decode of one user at the last position of a full context of {ctx} tokens (worst case); "
        "tokens_per_s_mean averages over positions 1..context",
        f"fabric per docs/layout.md, base family {fam.name}: {R}x{C} tiles, "
        f"{len(fam.coarse)}+{len(fam.fine)} product lines per column, units of {fam.unit} columns, "
        f"{fam.acc_bits}-bit accumulators; row_fold={a['row_fold']} "
        + ("(every row has its own adder tree: one token per tile per cycle)" if a["row_fold"] == 1
           else f"({R // a['row_fold']} row datapaths per tile, each serving {a['row_fold']} rows in turn)"),
        ("a weight cell is one transistor plus its via(s), on the ROM-cell footprint of the table"
         if a["row_fold"] == 1 else
         "row-serial cells: each weight's line indices in a word-line ROM (1T per bit), a line multiplexer "
         "per row datapath and column") + "; edge tiles are built whole",
        "product lines: one adder per distinct odd multiple of x in the alphabet, negative lines inverted "
        "(the +1 enters the row tree as a carry), one driver per line bit; lines span the tile height",
        "rom_bits is storage-equivalent: weights x bits/weight of docs/formats.md"
        + (f" (w3o6 at {outlier_frac:.0%} outliers)" if fmt == "w3o6" else "")
        + f"; the fabric holds one cell per weight and one via per non-zero code ({fc.coarse_zero:.1%} of "
        f"{fmt} codes are zero on Gaussian weights)",
        "group-scale multipliers sized to the format's significant scale bits; scale words stored "
        f"at the family's {fam.group_scale_bits} bits per (row, unit) as via-programmed constants",
        "embedding stored once more as a read-out ROM in the weight format, also when tied to lm_head "
        "(the golden model currently keeps it in Q16)",
        "KV cache int8 plus one shift byte per 32-block, in SRAM; activations double-buffered in Q16",
        f"attention: one engine per layer, {a['attn_positions_per_cycle']} KV position(s) per cycle "
        "for all heads (online softmax, K and V read together)",
        f"vector units: {fam.vector_lanes} lanes per unit, 10 units per layer (norms, rope, activation, "
        "residual, MX quantise)",
        "transistor counts: 28T full adder, 24T flip-flop, 12T mux, array multipliers, 6T SRAM bit, "
        "1T ROM bit; logic area = transistors / realised density",
        "energy: Horowitz ISSCC 2014 45 nm per-op energies times the table's scale; adder-tree energy "
        "scaled by the fraction of non-zero inputs; leakage per area class; host interface static power",
    ]
    if not shape.positions and shape.norm == "layernorm":
        out.append("no learned position table counted (not visible in the shape)")
    for key, c in table["constants"].items():
        if isinstance(c, dict) and c.get("kind") == "assumption":
            out.append(f"tech {table['name']}: {key} = {c['value']:g} {c.get('unit', '')} (assumption: {c['source']})")
    return out


# ----------------------------------------------------------------------------------------------
# Human-readable table
# ----------------------------------------------------------------------------------------------


def _si(x: float, unit: str) -> str:
    for div, pre in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"), (1e-6, "u"),
                     (1e-9, "n"), (1e-12, "p")):
        if abs(x) >= div:
            return f"{x / div:.3g} {pre}{unit}"
    return f"{x:.3g} {unit}"


def shown_path(path: str | None) -> str:
    """A table's path as the user would type it: relative to the working folder when inside it."""
    if not path:
        return "built in"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary_lines(r: dict, tech_tail: str) -> list[str]:
    """The totals block of an estimate's text: model, tech, area, transistors, speed, energy."""
    return [
        f"model     {r['model']}  format {r['format']}  ({r['bits_per_weight']:.3f} bits/weight, "
        f"{r['weights'] / 1e6:,.1f}M weights in the fabric)",
        f"tech      {r['tech']['name']} ({shown_path(r['tech']['path'])})  clock {_si(r['clock_hz'], 'Hz')}  "
        f"context {r['context']}  base family {r['base_family']}  {tech_tail}",
    ]


def totals_lines(r: dict, transistors_tail: str = "") -> list[str]:
    return [
        f"area      {r['area_mm2']:,.1f} mm^2{'' if r['fits_reticle'] else '  (exceeds one reticle)'}",
        f"transistors {_si(r['transistors'], '')}{transistors_tail}   ROM {_si(r['rom_bits'], 'bit')}   "
        f"SRAM {r['sram_bytes'] / 2**20:,.1f} MiB",
        f"speed     {r['tokens_per_s']:,.0f} tokens/s per user ({r['cycles_per_token']:,} cycles/token; "
        f"{r['tokens_per_s_mean']:,.0f} mean over the context)",
        f"energy    {_si(r['energy_per_token_j'], 'J')}/token ({_si(r['dynamic_energy_per_token_j'], 'J')} dynamic)"
        f"   power {r['power_w']:,.2f} W (static {r['static_power_w']:,.2f} W)",
    ]


def component_lines(r: dict) -> list[str]:
    """The per-component table and the cycles line of an estimate's text."""
    lines = ["", f"{'component':15s} {'area mm^2':>11s} {'%':>5s} {'transistors':>12s} {'energy/token':>13s} "
                 f"{'(dynamic)':>11s} {'power W':>9s}"]
    for name, c in r["components"].items():
        share = 100 * c["area_mm2"] / r["area_mm2"] if r["area_mm2"] else 0
        lines.append(f"{name:15s} {c['area_mm2']:11.2f} {share:5.1f} {_si(c['transistors'], ''):>12s} "
                     f"{_si(c['energy_per_token_j'], 'J'):>13s} {_si(c['dynamic_energy_per_token_j'], 'J'):>11s} "
                     f"{c['power_w']:9.3f}")
    st = r["cycles"]["per_layer"]
    lines += ["", "cycles per layer: " + ", ".join(f"{k} {v}" for k, v in st.items())
              + f"; x {r['cycles']['layers']} layers; head: " + ", ".join(f"{k} {v}" for k, v in r["cycles"]["head"].items())]
    return lines


def format_table(result: dict) -> str:
    """The text `tapeout estimate` prints: totals, then one line per component."""
    r = result
    lines = summary_lines(r, f"row_fold {r['arch']['row_fold']}") + totals_lines(r) + component_lines(r)
    p = r["pipeline"]
    lines.append(f"pipelined: up to {p['users']} users in flight, {p['aggregate_tokens_per_s']:,.0f} tokens/s "
                 f"aggregate (needs {p['kv_sram_bytes_for_users'] / 2**20:,.0f} MiB of KV SRAM)")
    return "\n".join(lines)


def add_lora(result: dict, shape: ModelShape, rank: int, targets: list[str], tech="n5",
             clock_hz: float | None = None) -> dict:
    """The LoRA SRAM beside the ROM (docs/lora.md) added to an estimate: SRAM bytes and area for
    rank ``rank`` on the linears whose role ends in one of ``targets``, its read energy and
    leakage, the LoRA unit (``lora.LORA_MACS`` int8 MACs) and the cycles it adds per token."""
    from tapeout.compiler import lora
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TapeoutError(f"--lora-rank must be a positive integer, not {rank!r}")
    roles = {name.rsplit(".", 1)[-1] for name, _, _ in shape.linears}
    bad = [t for t in targets if t not in roles]
    if bad or not targets:
        raise TapeoutError(f"--lora-targets names {bad[0] if bad else 'nothing'}; this model's linears are "
                           f"{', '.join(sorted(roles))}")
    chosen = [(n, o, i) for n, o, i in shape.linears if n.rsplit(".", 1)[-1] in targets]
    table, v, _ = tech_and_context(tech, clock_hz, shape, result["context"])
    E = _Energy(v)
    nbytes = sum(lora.sram_bytes(o, i, rank) for _, o, i in chosen)
    sram_mm2 = 8 * nbytes * v["sram_bitcell_um2"] / v["sram_array_efficiency"] / 1e6
    macs = lora.LORA_MACS
    unit_t = macs * (t_mult(8, 8) + t_adder(32)) + 2 * t_mult(32, 16) + 2 * 64 * t_reg(32)
    unit_mm2 = unit_t / (v["logic_density_mtr_per_mm2"] * 1e6)
    added = sum(lora.cycles(o, i, rank, macs) for _, o, i in chosen)
    energy = 8 * nbytes * E.sram_bit + sum(rank * (i + o) for _, o, i in chosen) * (E.mult(8, 8) + E.add(32))
    leak = sram_mm2 * v["leakage_sram_w_per_mm2"] + unit_mm2 * v["leakage_logic_w_per_mm2"]
    cycles = result["cycles_per_token"] + added
    clock = result["clock_hz"]
    out = {"rank": rank, "targets": list(targets), "linears": len(chosen), "sram_bytes": nbytes,
           "sram_mib": nbytes / 2**20, "sram_mm2": sram_mm2, "unit_mm2": unit_mm2, "unit_macs_per_cycle": macs,
           "unit_transistors": round(unit_t), "leakage_w": leak, "energy_per_token_j": energy,
           "cycles_per_token_added": added, "area_mm2_with": result["area_mm2"] + sram_mm2 + unit_mm2,
           "cycles_per_token_with": cycles, "tokens_per_s_with": clock / cycles}
    result["lora"] = out
    return out


def lora_lines(r: dict) -> list[str]:
    x = r["lora"]
    return [f"LoRA      rank {x['rank']} on {','.join(x['targets'])} ({x['linears']} linears): SRAM "
            f"{x['sram_mib']:,.2f} MiB = {x['sram_mm2']:,.2f} mm^2, LoRA unit ({x['unit_macs_per_cycle']} MACs) "
            f"{x['unit_mm2']:,.3f} mm^2; +{x['cycles_per_token_added']:,} cycles/token -> "
            f"{x['tokens_per_s_with']:,.0f} tokens/s, die {x['area_mm2_with']:,.1f} mm^2"]
