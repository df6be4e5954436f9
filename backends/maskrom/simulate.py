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


def simulate_chip(folder: str | Path, names: list[str] | None, engine: str, progress=None) -> dict:
    from tapeout.hdl.sim import simulate_fabric, verilator_available
    folder = Path(folder)
    layers = load_layers(folder)
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
        tokens = list(zip(elems, sh, emin))
        stats: dict = {}
        label = f"{layers.roles[li]} ({layers.shapes[li][0]}x{layers.shapes[li][1]})"
        ctx = progress(f"RTL {engine}: {label}") if progress else _null()
        with ctx:
            got, cyc = simulate_fabric(args, tokens, engine=engine, stats=stats)
        bad = int(np.count_nonzero(got != y))
        rows.append({"linear": layers.names[li], "role": layers.roles[li], "shape": list(layers.shapes[li]),
                     "tokens": len(tokens), "checked": int(got.size), "mismatches": bad, "cycles": int(cyc),
                     "cycles_per_s": round(stats.get("cycles_per_s", 0.0), 1)})
        checked += got.size
        mismatches += bad
        cycles += cyc
    if checked == 0:
        raise TapeoutError("simulated nothing: no values were checked")
    return {"engine": engine, "linears": len(rows), "checked": int(checked), "mismatches": int(mismatches),
            "cycles": int(cycles), "seconds": round(time.perf_counter() - t0, 2), "per_linear": rows}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
