"""The fabric model: a fast numpy model of the ROM tiles, run from the extracted via layers.

It computes what the tiles compute, tile by tile: per unit of ``family.unit`` columns the
multiply-select-add partial sum, the group-scale multiply and the block-shift alignment; per
tile a 48-bit accumulator (checked); per row the adder chain over column tiles and the
requantiser. Its linear plugs into the golden engine's graph walker, so a whole model runs
on it; it must equal the golden model bit for bit (tests and ``tapeout compile`` check it).
"""
from __future__ import annotations

import math

import numpy as np

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import Golden, GoldenConfig, IntLinear
from tapeout.compiler.ir import Graph
from tapeout.compiler.program import IntegerProgram

from .base import Family
from .layers import ViaLayers, extract


def fabric_linear(fam: Family):
    """A ``linear_fn`` for :class:`Golden` that models the tiles of ``fam``."""
    def run(gm: Golden, L: IntLinear, x: np.ndarray, what: str) -> np.ndarray:
        o_dim, i_dim = L.codes.shape
        lead = x.shape[:-1]
        X = x.reshape(-1, i_dim)
        blk = fx.mx_block(i_dim, gm.config.block)
        unit = math.gcd(fam.unit, blk, L.group_size) if L.group_size < fam.unit else math.gcd(fam.unit, blk)
        nu = i_dim // unit
        elems, su, emin = fx.mx_units(X, unit, gm.config.act_bits, gm.config.block)
        gs = L.group_scale[:, (np.arange(nu) * unit) // L.group_size]
        per_tile = fam.tile_cols // unit
        acc = np.zeros((X.shape[0], o_dim), np.int64)
        for t0 in range(0, nu, per_tile):                       # one column tile at a time
            tile_acc = np.zeros_like(acc)
            for u in range(t0, min(t0 + per_tile, nu)):
                sl = slice(u * unit, (u + 1) * unit)
                part = fx.int_matmul(elems[:, sl], L.codes[:, sl].T)   # multiply-select-add
                tile_acc += (part * gs[None, :, u]) << (su[:, u] - emin)[:, None]
            fx.check_acc(tile_acc, f"{what} tile accumulator", fam.acc_bits)
            acc += tile_acc
        fx.check_acc(acc, what)
        y = fx.rshift_round(acc * L.mult[None, :], L.shift[None, :] - emin[:, None])
        if L.bias is not None:
            y = y + L.bias
        return fx.saturate32(y).reshape(*lead, o_dim)
    return run


def fabric_model(program: IntegerProgram | Graph, layers: ViaLayers, config: GoldenConfig = GoldenConfig()) -> Golden:
    """The whole model on the fabric: every linear's ROM content read back from the via layers
    (the program's other constants as they are)."""
    specs = {layers.names[i]: extract(layers, i) for i in range(len(layers.names))}
    fab = fabric_linear(layers.base.family)
    if isinstance(program, IntegerProgram):
        return Golden(program.with_linears(specs), linear_fn=fab)
    return Golden(program, specs, config, linear_fn=fab)
