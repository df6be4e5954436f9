"""The row-serial chip estimate: the fabric ``hdl/rowserial.py`` builds, priced per component
(spec: docs/estimates.md, "Row-serial fabric").

The chip has every layer in silicon and runs one layer at a time. A layer's linears share one
group of tiles: ``chains`` chains of ``chain_tiles`` tiles, each tile ``word_lines`` word lines
of ``tile_cols`` cells. A stage (the linears that read the same input: q/k/v, o, gate/up,
down) takes ``hdl.rowserial.stage_cycles`` cycles, the function the RTL's cycle count is
tested against; the word lines of a layer's stages are stacked in its tiles. The tile's
adders, multipliers, selects, shifters and registers are ``RowSpec.counts()``: the same
description the RTL is elaborated from, so the estimate prices what the HDL instantiates.
Attention and the vector units are one shared set, used by each layer in turn.
"""
from __future__ import annotations

import math
import re
from typing import Any

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.quant.formats import W3O6_OUTLIER_FRAC
from tapeout.hdl import timing as tm
from tapeout.hdl.rowserial import ROW_ARCH_WORD_LINES, ROW_FORMATS, RowSpec

from .base import family_for
from .estimate import (T_AND2, T_FLOP, T_MUX2, ModelShape, _Chip, _Energy, add_shared_parts, format_cost,
                       t_adder, t_mult, t_reg, tech_and_context)

ROW_ARCH_DEFAULTS: dict[str, int] = {
    "word_lines": ROW_ARCH_WORD_LINES,   # word lines per tile (base die)
    "tile_cols": 64,           # cells per word line
    "chain_tiles": 0,          # tiles per chain (0: ceil(hidden / tile_cols), at most 32)
    "chains": 0,               # chains per layer (0: the fewest whose word lines fit the tiles)
    "head_chains": 0,          # chains of the LM head (0: as for the layers)
    "attn_positions_per_cycle": 32,  # KV positions the attention engine takes per cycle, all heads at once
    "vector_lanes": 256,       # values the shared vector units take per cycle
}
# the options a compiled chip's sequencer and RTL take (the rest shape the base die's fabric)
CHIP_ARCH_KEYS = ("attn_positions_per_cycle", "vector_lanes")

# the stage a linear joins: linears that read the same input run as one stage
STAGE_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "fc_in": "mlp_in",
            "down_proj": "mlp_out", "fc_out": "mlp_out"}
LAYER_STAGES = ("qkv", "o", "mlp_in", "mlp_out")
LAYER_GROUP = re.compile(r"^(L|layers\.)\d+$")     # a decoder/encoder layer's linears
T_WORDLINE = 12       # decoder gate + driver per word line
SEQ_WORD_BITS = 64    # one sequencer instruction: unit, operands' SRAM addresses, widths, cycle count
T_SENSE = 12          # precharge + single-ended sense per bit line
ROUTING = 0.10        # wiring overhead on logic area (assumption)


MAX_CHAIN_TILES = 32


def default_chain_tiles(hidden: int, cols: int) -> int:
    """Tiles per chain when the architecture leaves it open: the model's width, at most 32."""
    return min(MAX_CHAIN_TILES, -(-hidden // cols))


def check_arch(arch: dict | None) -> dict[str, int]:
    a = {**ROW_ARCH_DEFAULTS, **(arch or {})}
    unknown = set(a) - set(ROW_ARCH_DEFAULTS)
    if unknown:
        raise TapeoutError(f"unknown row-serial architecture option(s) {sorted(unknown)}; known: "
                           + ", ".join(ROW_ARCH_DEFAULTS))
    for key, value in a.items():
        low = 0 if key in ("chain_tiles", "chains", "head_chains") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TapeoutError(f"architecture option {key} must be an integer >= {low}, not {value!r}")
    return a


def stages_of(linears: list[tuple[str, int, int]]) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """group (layer prefix, or the linear itself) -> stage -> [(rows, in)] of its linears."""
    groups: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for name, o, i in linears:
        prefix, _, role = name.rpartition(".")
        group = prefix or name
        stage = STAGE_OF.get(role, role or name)
        key = f"{stage}@{i}"
        groups.setdefault(group, {}).setdefault(key, []).append((o, i))
    return groups


def _lines(stages: dict[str, list[tuple[int, int]]], chains: int, span: int) -> int:
    return sum(-(-sum(o for o, _ in lins) // chains) * -(-lins[0][1] // span) for lins in stages.values())


def fit_chains(stages: dict, word_lines: int, span: int) -> int:
    """The fewest chains whose stacked word lines fit ``word_lines``."""
    hi = max(sum(o for o, _ in lins) for lins in stages.values())
    if _lines(stages, hi, span) > word_lines:
        raise TapeoutError(f"a layer does not fit tiles of {word_lines} word lines even with one chain per "
                           "row; raise word_lines")
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _lines(stages, mid, span) > word_lines else (lo, mid)
    return lo


def cell_transistors(name: str, count: int, multipliers: dict[str, tuple[int, int]]) -> float:
    """Transistors of ``count`` Yosys word-level cells ``name`` (``$add_15``, ``$pmux_12_4``...)."""
    kind, *dims = name[1:].split("_")
    w = int(dims[0])
    if kind in ("add", "sub", "neg"):
        return count * t_adder(w)
    if kind == "mul":
        return count * t_mult(*multipliers[name])
    if kind in ("mux", "xor"):
        return count * T_MUX2 * w
    if kind == "pmux":
        return count * T_MUX2 * w * int(dims[1])      # AND-OR select: one gate pair per input bit
    if kind in ("dff", "sdff"):
        return count * T_FLOP * w
    raise TapeoutError(f"no transistor price for cell {name}")


def tile_transistors(c: dict, word_lines: int) -> dict[str, float]:
    """Transistors of one tile's logic from ``RowSpec.counts()``, by kind."""
    out = {"adders": 0.0, "multipliers": 0.0, "selects": 0.0, "registers": 0.0}
    kind_of = {"add": "adders", "sub": "adders", "neg": "adders", "mul": "multipliers", "mux": "selects",
               "pmux": "selects", "xor": "selects", "dff": "registers", "sdff": "registers"}
    for name, n in c["cells"].items():
        out[kind_of[name[1:].split("_")[0]]] += cell_transistors(name, n, c["multipliers"])
    out["selects"] += c["comparator_bits"] * T_AND2 + c["lut_bits"]     # a w-bit match: w AND inputs
    out["rom_periphery"] = word_lines * T_WORDLINE + c["word_bits"] * T_SENSE
    return out


def estimate_rowserial(shape: ModelShape, fmt: str, tech="n7", *, context: int | None = None,
                       clock_hz: float | None = None, outlier_frac: float = W3O6_OUTLIER_FRAC,
                       arch: dict | None = None) -> dict[str, Any]:
    """Area, transistors, speed and power of the row-serial mask-ROM chip (docs/estimates.md)."""
    fc = format_cost(fmt)
    table, v, ctx = tech_and_context(tech, clock_hz, shape, context)
    a = check_arch(arch)
    fam = family_for(fmt)
    C = a["tile_cols"]
    if C % fam.unit:
        raise TapeoutError(f"tile columns must be a multiple of the family's {fam.unit}-column unit, not {C}")
    K = a["chain_tiles"] or default_chain_tiles(shape.hidden, C)
    a["chain_tiles"] = K
    spec = RowSpec(ROW_FORMATS[fam.name], word_lines=a["word_lines"], cols=C, unit=fam.unit,
                   act_bits=fam.act_bits, acc_bits=fam.acc_bits)
    counts = spec.counts()
    tt = tile_transistors(counts, spec.word_lines)
    adder_bits = sum(int(k[1:].split("_")[1]) * n for k, n in counts["cells"].items()
                     if k.split("_")[0] in ("$add", "$sub", "$neg"))
    E, chip = _Energy(v), _Chip(v)
    span, acc, W = K * C, spec.acc_bits, spec.word_lines

    # ---- layer groups: chains, tiles, word lines, cycles
    groups = stages_of(shape.linears)
    plan = {}
    for g, st in groups.items():
        fixed = a["head_chains"] if g == "lm_head" and a["head_chains"] else a["chains"]
        P = fixed or fit_chains(st, W, span)
        used = _lines(st, P, span)
        if used > W:
            raise TapeoutError(f"{g}: {used} word lines on {P} chains; the tiles have {W} (raise chains or word_lines)")
        plan[g] = {"chains": P, "tiles": P * K, "word_lines_used": used,
                   "stages": {s.split("@")[0]: tm.linear(lins[0][1], sum(o for o, _ in lins), a["vector_lanes"],
                                                         chains=P, chain_tiles=K, cols=C)
                              for s, lins in st.items()},
                   "max_in": max(lins[0][1] for lins in st.values())}
    tiles = sum(p["tiles"] for p in plan.values())
    chains = sum(p["chains"] for p in plan.values())
    tile_cycles = sum(p["tiles"] * p["word_lines_used"] for p in plan.values())     # tile reads per token

    # ---- the fabric
    rom_bits = tiles * counts["rom_bits"]
    weights = shape.weights
    chip.add("weight_rom", cell_t=rom_bits, rom_bits=rom_bits, energy=tile_cycles * spec.word_bits * E.rom_bit,
             counts={"tiles": tiles, "word_lines": W, "word_bits": spec.word_bits, "bits": rom_bits,
                     "bits_per_weight_stored": rom_bits / weights if weights else 0.0,
                     "word_lines_used": sum(p["tiles"] * p["word_lines_used"] for p in plan.values())})
    chip.add("rom_periphery", logic_t=tiles * tt["rom_periphery"],
             counts={"word_line_drivers": tiles * W, "sense_amps": tiles * spec.word_bits})
    e_tile = (E.add(adder_bits) + sum(E.mult(*counts["multipliers"][k]) * n for k, n in counts["cells"].items()
                                      if k.startswith("$mul"))
              + E.shift(spec.scaled_width, spec.shift_amount_bits, acc) * spec.units + E.flop(acc))
    nz = 1 - fc.coarse_zero
    dp = tt["adders"] + tt["multipliers"] + tt["selects"] + tt["registers"]
    chip.add("tile_datapaths", logic_t=tiles * dp, energy=tile_cycles * e_tile * nz,
             counts={"tiles": tiles, "per_tile_transistors": round(dp),
                     "adder_bits_per_tile": adder_bits,
                     "multipliers_per_tile": sum(n for k, n in counts["cells"].items() if k.startswith("$mul"))})
    t_chain = (sum(t_adder(acc + 1) for _ in range(K - 1)) + t_adder(acc + 1) + t_reg(acc)
               + t_mult(acc, 16) + 2 * t_adder(32) + t_reg(32) + 3 * t_reg(8))
    outs = sum(o for _, o, _ in shape.linears)
    const_bits = outs * (16 + 11 + 32)
    chip.add("chains", logic_t=chains * t_chain, rom_bits=const_bits, cell_t=const_bits,
             energy=sum(p["chains"] * p["word_lines_used"] for p in plan.values()) * E.add(acc * K)
             + outs * (E.mult(acc, 16) + 2 * E.add(32)),
             counts={"chains": chains, "requantisers": chains, "row_constant_bits": const_bits})
    t_x = 0.0
    for p in plan.values():
        passes = -(-p["max_in"] // span)
        t_x += t_reg(p["max_in"] * spec.act_bits + p["max_in"] // fam.unit * spec.shift_bits) \
            + (span * spec.act_bits * (passes - 1) * T_MUX2 if passes > 1 else 0)
    chip.add("x_registers", logic_t=t_x, energy=sum(p["max_in"] for p in plan.values()) * E.flop(spec.act_bits),
             counts={"groups": len(plan)})
    memo = add_shared_parts(chip, shape, fmt, fc, v, E, ctx=ctx, outlier_frac=outlier_frac,
                            positions_per_cycle=a["attn_positions_per_cycle"], engines=1, lanes=a["vector_lanes"])
    # the sequencer: one instruction word per op of the token program (docs/chip.md), a program
    # counter, the position counter, the KV-cache address and a cycle counter per instruction
    instrs = shape.layers * (len(LAYER_STAGES) + 7) + 5
    seq_t = 4 * t_reg(32) + 2 * t_adder(32)
    chip.add("sequencer", logic_t=seq_t, rom_bits=instrs * SEQ_WORD_BITS, cell_t=instrs * SEQ_WORD_BITS,
             energy=instrs * E.flop(32), counts={"instructions": instrs, "word_bits": SEQ_WORD_BITS})
    logic_mm2 = sum(c["area_mm2"] for n, c in chip.parts.items() if n in ("rom_periphery", "tile_datapaths",
                                                                          "chains", "x_registers", "attention",
                                                                          "vector_units", "sequencer"))
    chip.add("routing", extra_area_mm2=ROUTING * logic_mm2, counts={"fraction_of_logic": ROUTING})

    # ---- cycles: one token, layer after layer
    # the RTL's micro-op cycles (hdl.timing): the chip's sequencer counts the same
    h, H, KV, D, I, V = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, a["vector_lanes"]
    act = "silu" if shape.gated_mlp else "gelu"

    def layer_cycles(attended: int, st: dict[str, int]) -> dict[str, int]:
        out = {"norm_1": tm.norm(h, shape.norm, V), "qkv_proj": st.get("qkv", 0)}
        if not shape.positions:                    # rope models rotate q, then k; learned positions do not
            out["rope"] = tm.rope(H * D, V) + tm.rope(KV * D, V)
        out.update(attention=tm.attention(attended, H, KV, D, V, a["attn_positions_per_cycle"]),
                   o_proj=st.get("o", 0), residual_1=tm.elementwise(h, V), norm_2=tm.norm(h, shape.norm, V))
        if I:
            out.update(mlp_in=st.get("mlp_in", 0), act=tm.act(I, act, V), mlp_out=st.get("mlp_out", 0),
                       residual_2=tm.elementwise(h, V))
        for name, c in st.items():                 # a linear of another role: a stage of its own
            if name not in LAYER_STAGES:
                out[name] = c
        return out

    layer_groups = [g for g in plan if LAYER_GROUP.match(g)]
    per_layer = {g: layer_cycles(ctx, plan[g]["stages"]) for g in layer_groups}
    mean_layer = {g: layer_cycles(max(1, ctx // 2), plan[g]["stages"]) for g in layer_groups}
    head = {"embed": tm.embed(h, V)}
    if shape.positions:                            # a learned position embedding added to the token's
        head["pos_embed"] = tm.elementwise(h, V, table=True)
    head["final_norm"] = tm.norm(h, shape.norm, V)
    for g in plan:                                 # the head's linears (lm_head, an MLM transform, ...)
        if g not in per_layer:
            head.update(plan[g]["stages"])
    if "lm_head" in plan:
        head["argmax"] = tm.argmax(shape.vocab, V)
    cycles = sum(sum(c.values()) for c in per_layer.values()) + sum(head.values())
    mean_cycles = sum(sum(c.values()) for c in mean_layer.values()) + sum(head.values())
    clock = v["clock_hz"]
    tps = clock / cycles
    # several users in flight: each layer group serves one user at a time; the shared attention
    # engine and vector units serve every layer of every user
    linear_busy = max(sum(c for s, c in plan[g]["stages"].items()) for g in plan)
    shared = ("norm_1", "rope", "attention", "residual_1", "norm_2", "act", "residual_2")
    shared_busy = sum(c.get(k, 0) for c in per_layer.values() for k in shared)
    busiest = max(linear_busy, shared_busy)
    users = max(1, math.floor(cycles / busiest))
    pipeline = {"busiest_cycles": busiest, "bottleneck": "shared attention and vector units"
                if shared_busy >= linear_busy else "one layer group's linear stages",
                "users": users, "aggregate_tokens_per_s": clock / busiest * min(1.0, users * busiest / cycles),
                "kv_sram_bytes_for_users": users * memo["kv_bytes"]}

    comps = chip.parts
    total = chip.totals(tps)
    all_rom = rom_bits + const_bits + memo["emb_bits"] + memo["norm_bits"] + memo["rope_bits"]
    one = next(iter(per_layer.values())) if per_layer else {}
    return {
        "model": shape.name, "format": fmt, "target": "maskrom", "fabric": "rowserial",
        "tech": {"name": table["name"], "path": table.get("path"), "node": table.get("node")},
        "clock_hz": clock, "context": ctx,
        "area_mm2": total["area_mm2"], "transistors": total["transistors"],
        "transistors_per_weight": total["transistors"] / weights if weights else 0.0,
        "rom_bits": round(all_rom), "sram_bytes": memo["kv_bytes"] + memo["act_bytes"],
        "energy_per_token_j": total["energy_per_token_j"], "tokens_per_s": tps,
        "tokens_per_s_mean": clock / mean_cycles, "cycles_per_token": cycles,
        "power_w": total["energy_per_token_j"] * tps, "static_power_w": total["static_w"],
        "dynamic_energy_per_token_j": total["dynamic_energy_per_token_j"],
        "fits_reticle": total["area_mm2"] <= v["reticle_mm2"],
        "weights": weights,
        "bits_per_weight": sum(o * i * fc.bits_per_weight(o, i, outlier_frac) for _, o, i in shape.linears) / max(weights, 1),
        "base_family": fam.name, "arch": a,
        "tile": {"word_lines": W, "cols": C, "unit": spec.unit, "word_bits": spec.word_bits,
                 "slots": spec.fmt.slots, "cells": counts["cells"], "comparators": counts["comparators"],
                 "lut_bits": counts["lut_bits"], "rom_bits": counts["rom_bits"],
                 "transistors": {k: round(x) for k, x in tt.items()}},
        "groups": plan if len(plan) <= 4 else
        {"layers": len(layer_groups), "first": plan[layer_groups[0]] if layer_groups else {},
         "lm_head": plan.get("lm_head", {})},
        "cycles": {"per_layer": one, "layers": len(layer_groups), "head": head, "total": cycles,
                   "mean_total": mean_cycles},
        "pipeline": pipeline, "components": comps,
        "assumptions": _assumptions(a, spec, table, ctx),
    }


def _assumptions(a: dict, spec: RowSpec, table: dict, ctx: int) -> list[str]:
    out = [
        "first-order model: counts from the RTL's own description (hdl/rowserial.py RowSpec.counts), areas "
        "from densities, energies from per-op energies; no placement, timing closure or yield",
        f"row-serial tiles of {spec.word_lines} word lines x {spec.cols} cells, {a['chain_tiles']} tiles per "
        f"chain; a layer's stages share its tiles and run one after another; one word line per cycle",
        f"a word line holds {spec.cols} x {spec.fmt.code_bits}-bit codes, {spec.units} scale words "
        f"({spec.fmt.m_bits}+{spec.fmt.e_bits} bits) and {spec.fmt.slots} outlier slots: {spec.word_bits} bits, "
        "one via-programmed 1T ROM cell per bit; every tile is built with all its word lines",
        f"decode of one user at the last position of a context of {ctx} tokens (worst case)",
        f"attention: one shared engine, {a['attn_positions_per_cycle']} KV positions per cycle for all heads; "
        f"vector units: one shared set of {a['vector_lanes']} lanes",
        f"routing: +{ROUTING:.0%} of the logic area; ROM periphery area inside the ROM array efficiency",
        "transistor counts: 28T full adder, 24T flip-flop, 12T mux / AND-OR select input bit, array multipliers, "
        f"{T_WORDLINE}T per word-line driver, {T_SENSE}T per bit-line sense, 6T SRAM bit, 1T ROM bit",
    ]
    for key, c in table["constants"].items():
        if isinstance(c, dict) and c.get("kind") == "assumption":
            out.append(f"tech {table['name']}: {key} = {c['value']:g} {c.get('unit', '')} (assumption: {c['source']})")
    return out


# ----------------------------------------------------------------------------------------------
# Reference chips and the text `tapeout estimate` prints
# ----------------------------------------------------------------------------------------------

# published figures (docs/hc1.md has the sources and what each figure means)
REFERENCES: dict[str, dict[str, Any]] = {
    "hc1": {"name": "Taalas HC1", "model": "Llama-3.1-8B", "node": "TSMC N6", "area_mm2": 815.0,
            "transistors": 53e9, "weights": 8.03e9, "tokens_per_s": 17000.0, "power_w": 250.0,
            "context": 1024, "source": "docs/hc1.md"},
}


def compare(result: dict, ref: str) -> dict:
    """Our figures beside a reference chip's, with the ratio (ours / theirs)."""
    r = REFERENCES.get(ref)
    if r is None:
        raise TapeoutError(f"unknown reference chip {ref!r}; known: {', '.join(REFERENCES)}")
    rows = {}
    for key, ours, theirs in (("area_mm2", result["area_mm2"], r["area_mm2"]),
                              ("transistors", result["transistors"], r["transistors"]),
                              ("transistors_per_weight", result["transistors"] / max(result["weights"], 1),
                               r["transistors"] / r["weights"]),
                              ("tokens_per_s", result["tokens_per_s"], r["tokens_per_s"]),
                              ("power_w", result["power_w"], r["power_w"])):
        rows[key] = {"ours": ours, "reference": theirs, "ratio": ours / theirs}
    return {"reference": ref, "name": r["name"], "model": r["model"], "node": r["node"],
            "context": r["context"], "source": r["source"], "rows": rows}


def format_rowserial(result: dict) -> str:
    """The text `tapeout estimate` prints for the row-serial fabric."""
    from .estimate import _si, component_lines, summary_lines, totals_lines
    r, t = result, result["tile"]
    tile = (f"tile      {t['word_lines']} word lines x {t['cols']} cells, {t['word_bits']}-bit words "
            f"({t['slots']} outlier slots), {r['arch']['chain_tiles']} tiles per chain; "
            f"{r['components']['weight_rom']['counts']['tiles']:,} tiles, "
            f"{r['components']['chains']['counts']['chains']:,} chains")
    lines = summary_lines(r, "fabric row-serial") + [tile] \
        + totals_lines(r, f" ({r['transistors_per_weight']:.2f} per weight)") + component_lines(r)
    p = r["pipeline"]
    lines.append(f"pipelined: up to {p['users']} users in flight, {p['aggregate_tokens_per_s']:,.0f} tokens/s "
                 f"aggregate (bottleneck: {p['bottleneck']}; needs {p['kv_sram_bytes_for_users'] / 2**20:,.0f} MiB "
                 "of KV SRAM)")
    if "compare" in r:
        c = r["compare"]
        lines += ["", f"compared with {c['name']} ({c['model']}, {c['node']}, context {c['context']}; "
                      f"figures: {c['source']})",
                  f"{'':24s} {'this chip':>12s} {c['reference']:>12s} {'ratio':>7s}"]
        for key, row in c["rows"].items():
            fmt_ = (lambda x: _si(x, "")) if key == "transistors" else (lambda x: f"{x:,.1f}")
            lines.append(f"{key:24s} {fmt_(row['ours']):>12s} {fmt_(row['reference']):>12s} {row['ratio']:7.2f}")
    return "\n".join(lines)
