"""A whole linear on the base-die RTL, tile by tile (spec: docs/layout.md, "Base-die RTL").

One ``TileSlot`` (a ``BaseTile`` plus its row end) is elaborated per base family; the linear's
``ceil(out/R) x ceil(in/C)`` tiles are run through it in column-tile order. For column tile
``j`` every row block ``i`` gets its configuration (the via map rows of tile ``(i, j)`` and its
scale-ROM words, ``R`` cycles with ``load = 1``) followed by the tokens, whose ``acc_in`` is
the ``acc`` the RTL produced for tile ``(i, j - 1)``: the adder chain of the fabric, with the
wires between tiles recorded. The last column tile's ``y`` is the linear's output.
"""
from __future__ import annotations

import numpy as np

from .basetile import TileSlot
from .sim import run_rows

__all__ = ["make_slot", "simulate_linear_slots"]


def make_slot(args: dict) -> TileSlot:
    """The TileSlot of the base family behind ``args`` (a ``via_maps`` dict)."""
    return TileSlot(args["tile_rows"], args["tile_cols"], args["unit"], coarse=args["coarse"],
                    fine=args["fine"], act_bits=args["act_bits"], acc_bits=args["acc_bits"],
                    gs_bits=args.get("gs_bits", 32))


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, np.int64)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def _job(slot: TileSlot, args: dict, i: int, j: int, x, sh, emin, acc_in) -> dict[str, np.ndarray]:
    """Stimulus rows of tile (i, j): R configuration rows, then the T tokens."""
    R, C, U = slot.rows, slot.cols, slot.unit
    T = x.shape[0]
    r0, c0, u0 = i * R, j * C, j * C // U
    rs, cs, us = slice(r0, r0 + R), slice(c0, c0 + C), slice(u0, u0 + C // U)
    n = R + T
    rows = {
        "x": np.zeros((n, C), np.int64), "sh": np.zeros((n, C // U), np.int64),
        "acc_in": np.zeros((n, R), np.int64), "load": np.zeros(n, np.int64),
        "cfg_row": np.zeros(n, np.int64), "cfg_code": np.zeros((n, C), np.int64),
        "cfg_gs": np.zeros((n, C // U), np.int64), "emin": np.zeros(n, np.int64),
        "cfg_mult": np.zeros(n, np.int64), "cfg_nshift": np.zeros(n, np.int64),
        "cfg_bias": np.zeros(n, np.int64),
    }
    rows["load"][:R] = 1
    rows["cfg_row"][:R] = np.arange(R)
    rows["cfg_code"][:R] = _pad(args["v_code"][rs, cs] + 1, (R, C))
    rows["cfg_gs"][:R] = _pad(args["group_scale"][rs, us], (R, C // U))
    rows["cfg_mult"][:R] = _pad(np.asarray(args["mult"])[rs], (R,))
    rows["cfg_nshift"][:R] = _pad(np.asarray(args["nshift"])[rs], (R,))
    if args.get("bias") is not None:
        rows["cfg_bias"][:R] = _pad(np.asarray(args["bias"])[rs], (R,))
    if slot.fine:
        rows["cfg_fine"] = np.zeros((n, C), np.int64)
        rows["cfg_fine"][:R] = _pad(args["v_fine"][rs, cs] + 1, (R, C))
    rows["x"][R:] = _pad(x[:, cs], (T, C))
    rows["sh"][R:] = _pad(sh[:, us], (T, C // U))
    rows["acc_in"][R:] = acc_in
    rows["emin"][R:] = emin
    return rows


def simulate_linear_slots(args: dict, x, sh, emin, *, engine: str = "verilator", stats: dict | None = None,
                          slot: TileSlot | None = None, max_column_tiles: int | None = None
                          ) -> tuple[np.ndarray, int]:
    """``y`` int64 [T, out] of the linear ``args`` (a ``via_maps`` dict) on MXINT tokens
    ``x`` [T, in], ``sh`` [T, in/unit], ``emin`` [T], computed by the base-die RTL.

    ``stats`` receives ``cycles``, ``run_s``, ``build_s``, ``convert_s``, ``tiles`` and
    ``cycles_per_s``. ``max_column_tiles`` stops after that many column tiles (for speed
    measurements; the result is then partial sums and is not returned as ``y``).
    """
    stats = {} if stats is None else stats
    slot = slot or make_slot(args)
    x, sh = np.asarray(x, np.int64), np.asarray(sh, np.int64)
    emin = np.asarray(emin, np.int64)
    out_dim, in_dim = args["v_code"].shape
    R, C = slot.rows, slot.cols
    n_i, n_j = -(-out_dim // R), -(-in_dim // C)
    T = x.shape[0]
    acc = np.zeros((n_i, T, R), np.int64)
    y = None
    cycles, run_s, build_s, convert_s, tiles = 0, 0.0, 0.0, 0.0, 0
    for j in range(n_j if max_column_tiles is None else min(n_j, max_column_tiles)):
        jobs = [_job(slot, args, i, j, x, sh, emin, acc[i]) for i in range(n_i)]
        rows = {k: np.concatenate([job[k] for job in jobs]) for k in jobs[0]}
        st: dict = {}
        got, cyc = run_rows(slot, rows, engine=engine, stats=st, name="tile_slot")
        if got.shape[0] != n_i * T:
            raise RuntimeError(f"tile slot returned {got.shape[0]} token rows for {n_i * T}")
        got = got.reshape(n_i, T, 2 * R)
        acc, y = got[:, :, :R], got[:, :, R:]
        cycles += cyc
        run_s += st["run_s"]
        build_s += st.get("build_s", 0.0) + st.get("compile_s", 0.0)
        convert_s += st.get("convert_s", 0.0)
        tiles += n_i
    stats.update(engine=engine, cycles=cycles, run_s=run_s, build_s=build_s, convert_s=convert_s,
                 tiles=tiles, cycles_per_s=cycles / run_s if run_s else float("inf"))
    y = y.transpose(1, 0, 2).reshape(T, n_i * R)[:, :out_dim]
    return y, cycles
