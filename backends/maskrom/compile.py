"""``tapeout compile --target maskrom``: quantised graph -> base die + two via layers + checks."""
from __future__ import annotations

import time
from typing import Callable, ContextManager

import numpy as np

from tapeout.compiler.golden.model import GoldenConfig
from tapeout.compiler.qmodel import QuantizedModel, window_feeds

from .base import BaseDie, choose_base
from .fabric import fabric_model
from .layers import ViaLayers, build_layers, linear_spec, lvs
from .render import die_png, tile_png, write_gds


def kv_cache_bytes(summary: dict, context: int) -> int:
    """int8 keys and values plus one shift byte per 32-block, for every layer at ``context``."""
    total = 0
    for b in summary["structure"]["blocks"]:
        per_token = 2 * b["kv_heads"] * b["head_dim"]
        total += context * (per_token + per_token // 32)
    return total


def specs_of(qm: QuantizedModel):
    g = qm.graph
    out = []
    for name, qt in qm.weights.items():
        op = g.op(name)
        bias = g.constants[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] else None
        out.append(linear_spec(name, qm.roles.get(name, "other"), qt, bias))
    return out


def compile_maskrom(qm: QuantizedModel, summary: dict, out, *, base_name: str | None = None,
                    context: int = 2048, gds_tiles: list[int] | None = None,
                    step: Callable[[str], ContextManager[None]]) -> dict:
    """Write base/, layers/, layout/ and checks into ``out`` (an OutputFolder); returns the report."""
    specs = specs_of(qm)
    hidden = summary["structure"]["hidden"] or max(s.shape[1] for s in specs)
    sram = kv_cache_bytes(summary, context) + 4 * 4 * hidden * 64   # + activation buffers
    base: BaseDie = choose_base(qm.config.fmt, [s.shape for s in specs], sram, base_name)
    with step(f"placing {len(specs)} linears on {base.name} and packing the via layers"):
        layers: ViaLayers = build_layers(base, specs)
    with step("extracting the layers back (LVS)"):
        compared = lvs(layers, specs)
    with step("fabric model vs golden on a sample window"):
        t0 = time.perf_counter()
        graph = qm.graph
        seq = [graph.tensors[i].shape for i in graph.inputs]
        rng = np.random.default_rng(0)
        vocab = graph.tensors[graph.outputs[0]].shape[-1]
        window = rng.integers(0, vocab, int(np.prod(seq[0])))
        feeds = window_feeds(graph, window)
        fab = fabric_model(graph, layers, GoldenConfig()).run(feeds)
        gold = qm.golden().run(feeds)
        outputs_equal = all(np.array_equal(fab[k], gold[k]) for k in gold)
        checked = int(sum(v.size for v in gold.values()))
        fabric_s = time.perf_counter() - t0
    out.write_bytes("base/base.json", base.canonical())
    out.write_bytes("layers/V_CODE.bin", layers.v_code)
    out.write_bytes("layers/V_FINE.bin", layers.v_fine)
    out.write_json("layers/index.json", layers.index())
    used = layers.index()["tiles_used"]
    tiles = list(range(used)) if gds_tiles is None else gds_tiles
    if max(tiles) >= base.tiles:
        from tapeout.compiler.errors import TapeoutError
        raise TapeoutError(f"--gds-tiles: tile {max(tiles)} does not exist; base {base.name} has {base.tiles} tiles")
    with step(f"GDS of {len(tiles)} tile(s) and PNG renderings"):
        vias_drawn = write_gds(layers, tiles, out.path("layout/tiles.gds"))
        out.write_bytes("layout/die.png", die_png(layers))
        out.write_bytes(f"layout/tile{tiles[0]}.png", tile_png(layers, tiles[0]))
    vc_vias = sum(int(np.count_nonzero(s.codes - (s.codes & ((1 << base.family.fine_bits) - 1))))
                  for s in specs)
    fine_vias = sum(int(np.count_nonzero(s.codes & ((1 << base.family.fine_bits) - 1)))
                    for s in specs) if base.family.fine_bits else 0
    report = {
        "target": "maskrom", "format": qm.config.fmt, "base": base.name, "base_sha256": base.sha256,
        "layers_sha256": layers.sha256, "tiles_used": layers.index()["tiles_used"], "tiles": base.tiles,
        "cells": sum(s.codes.size for s in specs), "vias": {"V_CODE": vc_vias, "V_FINE": fine_vias},
        "lvs": {"values_compared": compared, "equal": True},
        "fabric_vs_golden": {"equal": bool(outputs_equal), "values_checked": checked,
                             "seconds": round(fabric_s, 2)},
        "gds_tiles": tiles, "gds_vias_drawn": vias_drawn, "sram_bytes_needed": sram, "context": context,
    }
    if not outputs_equal:
        from tapeout.compiler.errors import TapeoutError
        raise TapeoutError("internal check failed: the fabric model differs from golden (a compiler bug)")
    return report
