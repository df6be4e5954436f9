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
FABRICS = ("rowserial", "parallel")
AUTO_FOLDED_TILES = 4      # --rtl auto: folded RTL up to this many tiles per linear, base-die RTL above


def rtl_kind(rtl: str, n_tiles: int) -> str:
    """``folded`` (the via layers as constants: the chip as made, a build per linear) or ``base``
    (the base die's tile with the via layers as data: one build per family, tile by tile)."""
    if rtl not in RTL_KINDS:
        raise TapeoutError(f"--rtl must be one of {', '.join(RTL_KINDS)}, not {rtl!r}")
    if rtl == "auto":
        return "folded" if n_tiles <= AUTO_FOLDED_TILES else "base"
    return rtl


AUTO_FOLDED_WORDS = 1 << 14   # --rtl auto, row-serial: folded ROMs up to this many word lines per linear


def simulate_chip(folder: str | Path, names: list[str] | None, engine: str, progress=None,
                  rtl: str = "auto", fabric: str = "rowserial", tokens: int | None = None) -> dict:
    """The RTL of the chosen linears against golden's stimulus. ``fabric``: ``rowserial`` (the
    chip's row-serial linears, ``hdl/rowserial.py``) or ``parallel`` (the one-token-per-cycle
    tiles, ``hdl/romtile.py``). ``tokens``: drive only the stimulus's first N tokens."""
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise TapeoutError(f"--tokens must be a positive number of tokens, not {tokens!r}")
    from tapeout.hdl.sim import simulate_fabric, verilator_available
    from tapeout.hdl.slots import make_slot, simulate_linear_slots
    if fabric not in FABRICS:
        raise TapeoutError(f"--fabric must be one of {', '.join(FABRICS)}, not {fabric!r}")
    folder = Path(folder)
    layers = load_layers(folder)
    rtl_kind(rtl, 1)                                  # reject a bad --rtl before any work
    plan = None
    if fabric == "rowserial":
        from .rowfabric import chip_plan
        plan = chip_plan(layers)
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
        if tokens is not None and tokens > len(x):
            raise TapeoutError(f"--tokens {tokens}: the stimulus holds {len(x)} tokens (sim/{li:04d}.x.npy)",
                               file=str(folder))
        x, y = x[:tokens], y[:tokens]
        o, i = layers.shapes[li]
        stats: dict = {}
        if plan is not None:
            from tapeout.hdl.rowserial import simulate_row_linear
            from .rowfabric import linear_image
            img = linear_image(layers, li, plan)
            elems, sh, emin = fabric_inputs(x, img.spec.unit, img.spec.act_bits)
            words = img.chains * img.chain_tiles * img.lines
            kind = "folded" if rtl == "folded" or (rtl == "auto" and words <= AUTO_FOLDED_WORDS) else "base"
            label = f"{layers.roles[li]} ({o}x{i}, row-serial {kind} RTL)"
            with (progress(f"RTL {engine}: {label}") if progress else _null()):
                got, cyc = simulate_row_linear(img, elems, sh, emin, engine=engine, folded=kind == "folded",
                                               stats=stats)
            kind = f"row-{kind}"
        else:
            args = via_maps(layers, li)
            elems, sh, emin = fabric_inputs(x, args["unit"], args["act_bits"])
            kind = rtl_kind(rtl, -(-o // args["tile_rows"]) * -(-i // args["tile_cols"]))
            label = f"{layers.roles[li]} ({o}x{i}, {kind} RTL)"
            with (progress(f"RTL {engine}: {label}") if progress else _null()):
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
    return {"engine": engine, "rtl": rtl, "fabric": fabric, "linears": len(rows), "checked": int(checked), "mismatches": int(mismatches),
            "cycles": int(cycles), "seconds": round(time.perf_counter() - t0, 2), "per_linear": rows}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
