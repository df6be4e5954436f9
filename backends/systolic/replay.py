"""Tiles taken from the microcode, replayed on the systolic array RTL (``hdl/systolic.py``) on
the Amaranth simulator or on Verilator: the RTL's partial sums against the ISA simulator's, and
the cycle model's cycles for the PRELOAD/MATMUL chain against the RTL's measured cycles
(docs/isa.md, "RTL replay")."""
from __future__ import annotations

import time

import numpy as np

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import Golden
from tapeout.compiler.program import IntegerProgram

from .lower import CycleModel, attention_geometry
from .machine import Machine
from .weights import WeightImage, build_image

__all__ = ["replay_tiles"]


def _linear_blocks(ip: IntegerProgram, op, machine: Machine, feeds: dict, tiles: int, image: WeightImage):
    """(stationary [out, kt], streamed [T, kt]) of output tile 0, K tiles 0..tiles-1; the
    stationary codes are strip 0 of the weight image, as its LOAD_W moves them."""
    inputs: dict = {}
    Golden(ip).run(feeds, outputs=[op.inputs[0]], keep=lambda t, v: inputs.__setitem__(t, v) if t == op.inputs[0] else None)
    x = inputs.get(op.inputs[0], feeds.get(op.inputs[0]))
    layer = next(j for j, o in enumerate(ip.ops) if o.name == op.name)
    geo = image.geometry(layer, ip.config.block, machine)
    X = np.asarray(x, np.int64).reshape(-1, geo["in"])
    elems, _, _ = fx.mx_units(X, geo["unit"], ip.config.act_bits, ip.config.block)
    rows = image.strip(layer, 0).codes
    kt = geo["kt"]
    return [(rows[:, k * kt:(k + 1) * kt], elems[:, k * kt:(k + 1) * kt]) for k in range(min(tiles, geo["n_k"]))]


def _score_blocks(ip: IntegerProgram, op, machine: Machine, feeds: dict, tiles: int, image=None):
    """Q.K^T of KV head group 0, key tile 0, d-tiles 0..tiles-1: (K block [keys, w], the
    group's query elements [rows, w]) exactly as the attention's PRELOAD/MATMULs carry them."""
    a = attention_geometry(ip, op, machine)
    if a is None:
        raise ValueError(f"attention {op.name} runs as one VEC (its shapes are outside the array tiling)")
    vals: dict = {}
    want = set(op.inputs[:2])
    Golden(ip).run(feeds, outputs=list(want), keep=lambda t, v: vals.__setitem__(t, v) if t in want else None)
    q, k = (np.asarray(vals.get(t, feeds.get(t)), np.int64) for t in op.inputs[:2])
    qe, _ = fx.mx_quantize(q, ip.config.act_bits, ip.config.block)
    ke, _ = fx.mx_quantize(k, ip.config.act_bits, ip.config.block)
    w, n = a["width"], machine.n
    rows = qe[0, :a["rep"]].reshape(a["rows"], a["d"])
    keys = ke[0, 0, :n]
    return [(keys[:, u * w:(u + 1) * w], rows[:, u * w:(u + 1) * w]) for u in range(min(tiles, a["n_dt"]))]


def replay_tiles(ip: IntegerProgram, machine: Machine, feeds: dict, *, layer_name: str | None = None, tiles: int = 3,
                 engine: str = "amaranth", image: bytes | WeightImage | None = None) -> dict:
    """Replay the first ``tiles`` PRELOAD/MATMUL pairs of a linear (output tile 0, K tiles
    0..tiles-1; default layer: the first linear) or of an attention's Q.K^T (group 0, key tile
    0, d-tiles 0..tiles-1) on the RTL, back to back as the array runs them. A linear's weights
    come from ``image`` (OUT/weights.bin; default: the image the compiler writes for ``ip``)."""
    from tapeout.hdl.sim import run_rows
    from tapeout.hdl.systolic import SystolicArray, tile_job
    n = machine.n
    name = layer_name or next(op.name for op in ip.ops if op.kind == "linear")
    op = ip.graph.op(name)
    layer = next(j for j, o in enumerate(ip.ops) if o.name == name)
    if not isinstance(image, WeightImage):
        image = WeightImage(build_image(ip, machine) if image is None else image, machine)
    blocks = (_score_blocks if op.kind == "attention" else _linear_blocks)(ip, op, machine, feeds, tiles, image)
    jobs, expect = [], []
    for w, x in blocks:                                 # w [outputs, kt], x [T, kt]
        W = np.zeros((n, n), np.int64)                  # W[kk][j] = stationary value of output j, input kk
        W[:w.shape[1], :w.shape[0]] = w.T
        xx = np.zeros((x.shape[0], n), np.int64)
        xx[:, :x.shape[1]] = x
        jobs.append(tile_job(W, xx))
        expect.append(np.pad(x @ w.T, ((0, 0), (0, n - w.shape[0]))))          # the ISA simulator's part
    stim = {key: np.concatenate([j[key] for j in jobs]) for key in jobs[0]}
    stats: dict = {}
    t0 = time.perf_counter()
    got, cycles = run_rows(SystolicArray(n), stim, engine=engine, stats=stats, name="systolic")
    wall = time.perf_counter() - t0
    expect = np.concatenate(expect)
    T = blocks[0][1].shape[0]
    cost = CycleModel(ip, machine)                       # the ISA simulator's cycle model
    isa_cycles = len(blocks) * (cost("PRELOAD", layer) + cost("MATMUL", layer, t=T)) + machine.latency
    run_s = stats.get("run_s", wall)
    return {"layer": name, "kind": op.kind, "tiles": len(blocks), "tokens": T, "checked": int(got.size),
            "mismatches": int(np.count_nonzero(got != expect)) if got.shape == expect.shape else int(expect.size),
            "rtl_cycles": int(cycles), "isa_cycles": int(isa_cycles),
            "cycle_error": (isa_cycles - cycles) / cycles, "engine": engine,
            "run_s": round(run_s, 4), "cycles_per_s": round(cycles / run_s) if run_s else None,
            "build_s": round(stats.get("build_s", 0.0), 2), "build_cached": stats.get("cached")}
