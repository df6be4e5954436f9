"""``tapeout simulate``: the RTL of chosen linears, driven by golden's stimulus, checked value by value."""
from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden import fixed as fx

from .layers import load_layers, via_maps


def select(layers, names: list[str] | None) -> list[int]:
    """Linear indices for --layer values: op names, roles (layers.0.q_proj) or role prefixes (layers.0)."""
    if not names:
        return list(range(len(layers.names)))
    chosen = []
    for n in names:
        hits = [i for i, (op, role) in enumerate(zip(layers.names, layers.roles))
                if n in (op, role) or role.startswith(n + ".")]
        if not hits:
            raise TapeoutError(f"--layer {n!r} matches no linear; use an op name, a role such as "
                               f"{layers.roles[0]!r} or a prefix such as 'layers.0'")
        chosen += [i for i in hits if i not in chosen]
    return chosen


def fabric_inputs(x_q16: np.ndarray, unit: int, act_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Golden's MXINT quantisation of a linear's Q16 input, as the fabric's ports take it."""
    i_dim = x_q16.shape[-1]
    if math.gcd(unit, fx.mx_block(i_dim)) != unit:
        raise TapeoutError(f"the fabric unit {unit} does not divide the input blocks of {i_dim} features")
    elems, su, emin = fx.mx_units(x_q16.astype(np.int64), unit, act_bits)
    return elems, su - emin[:, None], emin


RTL_KINDS = ("auto", "folded", "base")
AUTO_FOLDED_TILES = 4      # --rtl auto: folded RTL up to this many tiles per linear, base-die RTL above


def rtl_kind(rtl: str, n_tiles: int) -> str:
    """``folded`` (the via layers as constants: the chip as made, a build per linear) or ``base``
    (the base die's tile with the via layers as data: one build per family, tile by tile)."""
    if rtl not in RTL_KINDS:
        raise TapeoutError(f"--rtl must be one of {', '.join(RTL_KINDS)}, not {rtl!r}")
    if rtl == "auto":
        return "folded" if n_tiles <= AUTO_FOLDED_TILES else "base"
    return rtl


def simulate_chip(folder: str | Path, names: list[str] | None, engine: str, progress=None,
                  rtl: str = "auto") -> dict:
    from tapeout.hdl.sim import simulate_fabric, verilator_available
    from tapeout.hdl.slots import make_slot, simulate_linear_slots
    folder = Path(folder)
    layers = load_layers(folder)
    rtl_kind(rtl, 1)                                  # reject a bad --rtl before any work
    slot = None                                       # one base-die tile slot per chip (one family)
    if engine == "verilator":
        ok, why = verilator_available()
        if not ok:
            raise TapeoutError(f"--engine verilator: {why}")
    rows, checked, mismatches, cycles, t0 = [], 0, 0, 0, time.perf_counter()
    for li in select(layers, names):
        try:
            x = np.load(io.BytesIO((folder / f"sim/{li:04d}.x.npy").read_bytes()))
            y = np.load(io.BytesIO((folder / f"sim/{li:04d}.y.npy").read_bytes()))
        except FileNotFoundError:
            raise TapeoutError(f"no golden stimulus for linear {li} (sim/{li:04d}.x.npy); recompile with "
                               "this tapeout version", file=str(folder)) from None
        args = via_maps(layers, li)
        elems, sh, emin = fabric_inputs(x, args["unit"], args["act_bits"])
        o, i = layers.shapes[li]
        kind = rtl_kind(rtl, -(-o // args["tile_rows"]) * -(-i // args["tile_cols"]))
        stats: dict = {}
        label = f"{layers.roles[li]} ({o}x{i}, {kind} RTL)"
        ctx = progress(f"RTL {engine}: {label}") if progress else _null()
        with ctx:
            if kind == "folded":
                got, cyc = simulate_fabric(args, list(zip(elems, sh, emin)), engine=engine, stats=stats)
            else:
                slot = slot or make_slot(args)
                got, cyc = simulate_linear_slots(args, elems, sh, emin, engine=engine, stats=stats, slot=slot)
        if got.shape != y.shape:
            raise TapeoutError(f"RTL of {layers.roles[li]} returned {got.shape} values for golden's {y.shape}")
        bad = int(np.count_nonzero(got != y))
        rows.append({"linear": layers.names[li], "role": layers.roles[li], "shape": [o, i], "rtl": kind,
                     "tokens": len(elems), "checked": int(got.size), "mismatches": bad, "cycles": int(cyc),
                     "cycles_per_s": round(stats.get("cycles_per_s", 0.0), 1)})
        checked += got.size
        mismatches += bad
        cycles += cyc
    if checked == 0:
        raise TapeoutError("simulated nothing: no values were checked")
    return {"engine": engine, "rtl": rtl, "linears": len(rows), "checked": int(checked), "mismatches": int(mismatches),
            "cycles": int(cycles), "seconds": round(time.perf_counter() - t0, 2), "per_linear": rows}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
