"""``tapeout compile --target maskrom``: quantised graph -> base die + two via layers + checks."""
from __future__ import annotations

from typing import Callable, ContextManager

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden.model import Golden, IntLinear, linear_int
from tapeout.compiler.program import IntegerProgram

from tapeout.backends.model_shape import kv_cache_bytes as _kv_bytes

from .base import BaseDie, choose_base
from .fabric import fabric_linear, fabric_model
from . import rowfabric, sequencer
from .layers import LinearSpec, ViaLayers, build_layers, extract, lvs

FULL_CHECK_MAX_WEIGHTS = 20_000_000   # above this, compile checks linear by linear (see --verify)
from .render import die_png, tile_png, write_gds


def kv_cache_bytes(summary: dict, context: int) -> int:
    """The KV cache of the summary's blocks at ``context`` (the rule: model_shape.kv_cache_bytes)."""
    return _kv_bytes([(b["kv_heads"], b["head_dim"]) for b in summary["structure"]["blocks"]], context)


def specs_of(program: IntegerProgram) -> list[LinearSpec]:
    """The chip's view of every linear, in program order: the program's integer constants."""
    out = []
    for name, L in program.linears.items():
        bias = np.zeros(L.codes.shape[0], np.int64) if L.bias is None else np.asarray(L.bias, np.int64)
        out.append(LinearSpec(name, program.roles.get(name, "other"), np.asarray(L.codes, np.int64), L.group_size,
                              np.asarray(L.group_scale, np.int64), np.asarray(L.mult, np.int64),
                              np.asarray(L.shift, np.int64), bias))
    return out


def check_linears(program: IntegerProgram, layers: ViaLayers, tokens: int = 4, also=None) -> int:
    """Each linear alone: fabric model (from the extracted layers) vs golden on random Q16 tokens.
    ``also(li, extracted)`` runs another check on the same extraction; its count is added."""
    gm = Golden(program)
    fab = fabric_linear(layers.base.family)
    rng = np.random.default_rng(0)
    checked = 0
    for li, name in enumerate(layers.names):
        L = program.linears[name]
        e = extract(layers, li)
        L_gold = IntLinear.build(np.asarray(L.codes, np.int64), L.group_size, np.asarray(L.group_scale, np.int64),
                                 e.mult, e.shift, e.bias)
        L_fab = IntLinear.build(e.codes, e.group_size, e.group_scale, e.mult, e.shift, e.bias)
        x = rng.integers(-(4 << 16), 4 << 16, (tokens, e.shape[1]))
        a, b = linear_int(gm, L_gold, x, name), fab(gm, L_fab, x, name)
        if not np.array_equal(a, b):
            raise TapeoutError(f"internal check failed: fabric model differs from golden on {name} (a compiler bug)")
        checked += a.size
        if also is not None:
            also(li, e)
    return checked


def sample_window(program: IntegerProgram, seed: int) -> dict[str, np.ndarray]:
    """Feeds of one random prefill window (seeded): the compile's self-check and stimulus input."""
    graph, itf = program.graph, program.interface
    if itf.mode == "decode":                 # one step with a seeded KV cache (Interface.sample_feeds)
        return program.sample_feeds(seed)
    tok = itf.require_tokens(graph)
    window = np.random.default_rng(seed).integers(0, itf.vocab, int(np.prod(graph.tensors[tok].shape)))
    return itf.window_feeds(graph, window)


def write_stimulus(program: IntegerProgram, layers: ViaLayers, out, tokens: int = 16) -> tuple[int, dict]:
    """Golden's Q16 input and output of every linear on one sample window (``sim/``): what
    ``tapeout simulate`` drives into the RTL and expects back. Returns the values stored and
    ``{linear index: (x, y)}``."""
    graph = program.graph
    names = set(layers.names)
    want: dict[str, list[str]] = {}
    for n in names:                         # q, k and v read one tensor
        want.setdefault(graph.op(n).inputs[0], []).append(n)
    outs = {graph.op(n).outputs[0]: n for n in names}
    seen: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}

    def keep(t, v):
        for n in want.get(t, ()):
            seen[n]["x"] = v
        if t in outs:
            seen[outs[t]]["y"] = v

    Golden(program).run(sample_window(program, 1), keep=keep)
    stored, pairs = 0, {}
    for i, n in enumerate(layers.names):
        xy = []
        for k in ("x", "y"):
            v = seen[n][k]
            v = v.reshape(-1, v.shape[-1])[:tokens].astype(np.int32)
            out.write_npy(f"sim/{i:04d}.{k}.npy", v)
            stored += v.size
            xy.append(v.astype(np.int64))
        pairs[i] = tuple(xy)
    return stored, pairs


def plan_base(fmt: str, shapes: list[tuple[int, int]], summary: dict, context: int,
              base_name: str | None) -> tuple[BaseDie, int]:
    """The base die a model of these linear shapes needs, and its SRAM bytes (KV cache at
    ``context`` plus activation buffers); known before quantisation, so bad options fail early."""
    hidden = summary["structure"]["hidden"] or max(s[1] for s in shapes)
    sram = kv_cache_bytes(summary, context) + 4 * 4 * hidden * 64
    return choose_base(fmt, shapes, sram, base_name), sram


CHIP_CLOCK_HZ = 1e9        # the stated design clock of every technology table (docs/tech.md)


def chip_sequencer(program: IntegerProgram, plan: dict, context: int, out, arch: dict | None = None):
    """Write ``chip/`` (sequencer JSON, listing, trace) when the model generates tokens; an
    encoder or an export the chip cannot step token by token gets the reason instead.
    Returns (the report's ``chip`` section, the sequencer or None)."""
    try:
        seq = sequencer.build(program, plan, context=context, arch=arch)
    except sequencer.ChipLoweringError as e:
        return {"generates": False, "reason": str(e)}, None
    sequencer.write(seq, out, CHIP_CLOCK_HZ)
    return {"generates": True, "clock_hz": CHIP_CLOCK_HZ, **sequencer.summary(seq, CHIP_CLOCK_HZ)}, seq


FLOORPLAN_TECH = "n5"      # the technology `tapeout estimate` assumes by default


def die_floorplan(program: IntegerProgram, plan: dict, fmt: str, context: int, seq=None,
                  arch: dict | None = None) -> dict:
    """The die's floorplan from the row-serial estimate of this chip (docs/layout.md, "Floorplan")."""
    import gdstk
    from tapeout.backends.model_shape import shape_from_summary
    from . import floorplan
    from .rowchip import estimate_rowserial
    shape = shape_from_summary(program.summary, context=context)
    if seq is not None and seq.learned_positions(program):     # the estimate's head adds pos_embed
        import dataclasses
        shape = dataclasses.replace(shape, positions=seq.learned_positions(program))
    est = estimate_rowserial(shape, fmt, FLOORPLAN_TECH, context=context, arch=arch)
    group_tiles: dict[str, int] = {}
    for g in dict.fromkeys(plan["group_of"]):
        group_tiles[g] = plan["chains"][g] * plan["chain_tiles"]
    side, blocks = floorplan.place(floorplan.blocks_of(est, group_tiles))
    name = str(program.summary.get("model") or program.graph.name).removesuffix(".onnx")
    title = (f"{name}: {est['area_mm2']:.3g} mm² at {FLOORPLAN_TECH.upper()} ({fmt}, context {context}), "
             f"die {side:.2f} x {side:.2f} mm\nevery block to scale from the estimate's areas (not a placed design)")
    return {"png": floorplan.render(blocks, side, title, "png"), "svg": floorplan.render(blocks, side, title, "svg"),
            "cell": floorplan.gds_cell(blocks, gdstk),
            "report": {"tech": FLOORPLAN_TECH, "side_mm": round(side, 4), "area_mm2": round(est["area_mm2"], 6),
                       "blocks": floorplan.table(blocks)}}


def check_gds_tiles(base: BaseDie, tiles: list[int] | None) -> None:
    if tiles is not None and max(tiles) >= base.tiles:
        raise TapeoutError(f"--gds-tiles: tile {max(tiles)} does not exist; base {base.name} has {base.tiles} tiles")


def compile_maskrom(program: IntegerProgram, out, *, base_name: str | None = None,
                    context: int = 2048, gds_tiles: list[int] | None = None, verify: str = "auto",
                    step: Callable[[str], ContextManager[None]], arch: dict | None = None) -> dict:
    """Write base/, layers/, layout/ and checks into ``out`` (an OutputFolder); returns the report."""
    fmt, summary = program.quant["format"], program.summary
    specs = specs_of(program)
    base, sram = plan_base(fmt, [s.shape for s in specs], summary, context, base_name)
    check_gds_tiles(base, gds_tiles)
    with step(f"placing {len(specs)} linears on {base.name} and packing the via layers"):
        layers: ViaLayers = build_layers(base, specs)
    with step("extracting the layers back (LVS)"):
        compared = lvs(layers, specs)
    del specs                  # int64 copies of every code: free them before the golden runs
    fine = (1 << base.family.fine_bits) - 1    # a code's low bits are its V_FINE via, the rest V_CODE
    codes = [program.linears[n].codes for n in layers.names]
    cells = sum(c.size for c in codes)
    vc_vias = sum(int(np.count_nonzero(c & ~fine)) for c in codes)
    fine_vias = sum(int(np.count_nonzero(c & fine)) for c in codes) if base.family.fine_bits else 0
    if verify == "auto":
        verify = "full" if cells <= FULL_CHECK_MAX_WEIGHTS else "linears"
    with step("golden stimulus for RTL simulation (sim/)"):
        stimulus, pairs = write_stimulus(program, layers, out)
    plan = rowfabric.chip_plan(layers)
    with step("sequencer: the token program of the whole chip (chip/)"):
        chip, seq = chip_sequencer(program, plan, context, out, arch)
    rows = {"values_checked": 0, "equal": None}
    outputs_equal, checked = True, 0
    if verify == "full":
        with step("whole-model fabric model vs golden on a sample window"):
            feeds = sample_window(program, 0)
            fab = fabric_model(program, layers).run(feeds)
            gold = Golden(program).run(feeds)
            outputs_equal = all(np.array_equal(fab[k], gold[k]) for k in gold)
            checked = int(sum(v.size for v in gold.values()))
        with step(f"row-serial word-line images of {len(layers.names)} linears vs golden ({plan['tiles']} tiles)"):
            rows = rowfabric.check_images(layers, plan, pairs)
    elif verify == "linears":
        image_values = []
        with step(f"fabric model and row-serial word-line images vs golden, linear by linear "
                  f"({len(layers.names)} linears, {plan['tiles']} row-serial tiles)"):
            checked = check_linears(program, layers, also=lambda li, e: image_values.append(
                rowfabric.check_image(layers, plan, li, *pairs[li], e)))
        rows = {"values_checked": int(sum(image_values)), "equal": True}
    del pairs
    out.write_bytes("base/base.json", base.canonical())
    out.write_bytes("layers/V_CODE.bin", layers.v_code)
    out.write_bytes("layers/V_FINE.bin", layers.v_fine)
    out.write_json("layers/index.json", layers.index())
    used = layers.index()["tiles_used"]
    tiles = list(range(used)) if gds_tiles is None else gds_tiles
    with step(f"GDS of {len(tiles)} tile(s) and PNG renderings"):
        fp = die_floorplan(program, plan, fmt, chip.get("context", context), seq, arch)
        vias_drawn = write_gds(layers, tiles, out.path("layout/tiles.gds"), extra=[fp["cell"]])
        out.write_bytes("layout/die.png", fp["png"])
        out.write_bytes("layout/die.svg", fp["svg"])
        out.write_bytes("layout/tiles.png", die_png(layers))
        out.write_bytes(f"layout/tile{tiles[0]}.png", tile_png(layers, tiles[0]))
    report = {
        "target": "maskrom", "format": fmt, "base": base.name, "base_sha256": base.sha256,
        "layers_sha256": layers.sha256, "tiles_used": layers.index()["tiles_used"], "tiles": base.tiles,
        "cells": cells, "vias": {"V_CODE": vc_vias, "V_FINE": fine_vias},
        "lvs": {"values_compared": compared, "equal": True},
        "fabric_vs_golden": {"mode": verify, "equal": bool(outputs_equal), "values_checked": checked},
        "rowserial": {**rowfabric.describe(plan), "values_checked": rows["values_checked"], "equal": rows["equal"],
                      "linear_cycles": rowfabric.linear_cycles(layers, plan)},
        "chip": chip, "floorplan": fp["report"],
        "sim_stimulus_values": stimulus, "gds_tiles": tiles, "gds_vias_drawn": vias_drawn, "sram_bytes_needed": sram, "context": context,
    }
    if not outputs_equal:
        raise TapeoutError("internal check failed: the fabric model differs from golden (a compiler bug)")
    return report
