"""Tiles taken from the microcode, replayed on the Amaranth systolic array (``hdl/systolic.py``):
the RTL's partial sums against the ISA simulator's, and the cycle model's cycles for the
PRELOAD/MATMUL chain against the RTL's measured cycles (docs/isa.md, "RTL replay")."""
from __future__ import annotations

import numpy as np

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import Golden

from .lower import CycleModel, linear_geometry
from .machine import Machine

__all__ = ["replay_tiles"]


def replay_tiles(gm: Golden, machine: Machine, feeds: dict, *, layer_name: str | None = None, tiles: int = 3,
                 engine: str = "amaranth") -> dict:
    """Replay the first ``tiles`` (output tile 0, K tiles 0..tiles-1) PRELOAD/MATMUL pairs of a
    linear (default: the first) on the RTL, back to back as the array runs them."""
    from tapeout.hdl.sim import run_rows
    from tapeout.hdl.systolic import SystolicArray, tile_job
    n = machine.n
    name = layer_name or next(op.name for op in gm.order if op.kind == "linear")
    op = gm.graph.op(name)
    inputs: dict = {}
    gm.run(feeds, outputs=[op.inputs[0]], keep=lambda t, v: inputs.__setitem__(t, v) if t == op.inputs[0] else None)
    x = inputs.get(op.inputs[0], feeds.get(op.inputs[0]))
    geo = linear_geometry(gm, name, machine)
    X = np.asarray(x, np.int64).reshape(-1, geo["in"])
    elems, _, _ = fx.mx_units(X, geo["unit"], gm.config.act_bits, gm.config.block)
    codes = np.asarray(gm.linears[name].codes, np.int64)
    kt, T = geo["kt"], X.shape[0]
    tiles = min(tiles, geo["n_k"])
    rows = codes[:n]
    jobs, expect = [], []
    for k in range(tiles):
        ks = slice(k * kt, (k + 1) * kt)
        W = np.zeros((n, n), np.int64)                  # W[kk][j] = code of output j, input kk
        W[:kt, :rows.shape[0]] = rows[:, ks].T
        xx = np.zeros((T, n), np.int64)
        xx[:, :kt] = elems[:, ks]
        jobs.append(tile_job(W, xx))
        expect.append(np.pad(elems[:, ks] @ rows[:, ks].T, ((0, 0), (0, n - rows.shape[0]))))  # ISA sim's part
    stim = {key: np.concatenate([j[key] for j in jobs]) for key in jobs[0]}
    stats: dict = {}
    got, cycles = run_rows(SystolicArray(n), stim, engine=engine, stats=stats, name="systolic")
    expect = np.concatenate(expect)
    cost = CycleModel(gm, machine)                       # the ISA simulator's cycle model
    layer = next(j for j, o in enumerate(gm.order) if o.name == name)
    isa_cycles = tiles * (cost("PRELOAD", layer) + cost("MATMUL", layer, t=T)) + machine.latency
    return {"layer": name, "tiles": tiles, "tokens": T, "checked": int(got.size),
            "mismatches": int(np.count_nonzero(got != expect)) if got.shape == expect.shape else int(expect.size),
            "rtl_cycles": int(cycles), "isa_cycles": int(isa_cycles),
            "cycle_error": (isa_cycles - cycles) / cycles, "engine": engine}
