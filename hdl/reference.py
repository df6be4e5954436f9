"""numpy model of the mask-ROM datapath, bit for bit what the RTL computes (docs/layout.md).

``tile_reference`` and ``fabric_reference`` follow the hardware step by step in int64: the
tile's modular ``acc_bits`` accumulator, the column-tile adder chain, and the requantiser
with its clamped shifters. They equal ``golden.model.linear_int`` on every input where the
golden model's own checks pass (48-bit accumulator, no int64 overflow): tests prove both.
"""
from __future__ import annotations

import math

import numpy as np

from tapeout.compiler.golden import fixed as fx

__all__ = ["ALPHABETS", "decompose", "extract_codes", "unit_size", "mxint_inputs",
           "tile_reference", "requantize", "fabric_reference"]

# (coarse, fine) alphabets of the base die per format (docs/layout.md). The zero code has no
# via and no product line, so 0 is in no alphabet; via indices count from the first value.
ALPHABETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "w3o6": (tuple(4 * b for b in range(-8, 8) if b), (1, 2, 3)),
    "mxfp4": ((-12, -8, -6, -4, -3, -2, -1, 1, 2, 3, 4, 6, 8, 12), ()),
    "nvfp4": ((-12, -8, -6, -4, -3, -2, -1, 1, 2, 3, 4, 6, 8, 12), ()),
    "int4": (tuple(v for v in range(-8, 8) if v), ()),
    "int8": (tuple(16 * h for h in range(-8, 8) if h), tuple(range(1, 16))),
}

# the requantiser's left shifter: |v| >= 2**LEFT_CLAMP or a shift >= LEFT_CLAMP saturates
# int32 whatever the bias (|bias| < 2**31), so the shifter is 64 bits wide, not unbounded
LEFT_CLAMP = 32
RIGHT_MAX = 63                 # a right shift by >= 64 rounds every |v| < 2**62 to 0


def decompose(codes: np.ndarray, coarse, fine=()) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes -> (v_code, v_fine) via indices into the alphabets (-1: no via): the one
    decomposition rule of the project (the layer files store index + 1, docs/layout.md).

    The fine alphabet is ``1 .. 2**k - 1`` (k = 0: none): a code's fine value is
    ``code mod 2**k`` and its coarse value the rest, ``2**k * floor(code / 2**k)``; zero has no
    via. Raises ValueError for a code the alphabets cannot express.
    """
    codes = np.asarray(codes, np.int64)
    k = len(fine).bit_length()
    if tuple(fine) != tuple(range(1, 1 << k)) or (not fine and k):
        raise ValueError(f"fine alphabet {tuple(fine)} is not 1 .. 2**k - 1")
    fine_val = codes & ((1 << k) - 1)
    coarse_val = codes - fine_val
    lo = min((*coarse, 0))
    table = np.full(max((*coarse, 0)) - lo + 1, -2, np.int64)    # -2: no product line for this value
    table[0 - lo] = -1
    table[np.asarray(coarse, np.int64) - lo] = np.arange(len(coarse))
    idx = coarse_val - lo
    inside = (idx >= 0) & (idx < table.size)
    v_code = np.where(inside, table[np.clip(idx, 0, table.size - 1)], -2)
    if np.any(v_code == -2):
        bad = int(codes.reshape(-1)[np.flatnonzero(v_code.reshape(-1) == -2)[0]])
        raise ValueError(f"code {bad} is not expressible with coarse alphabet {tuple(coarse)} "
                         f"and fine alphabet {tuple(fine)}")
    return v_code, fine_val - 1


def extract_codes(v_code, v_fine, coarse, fine=()) -> np.ndarray:
    """Via maps -> codes: ``coarse[v_code] + fine[v_fine]`` with -1 contributing 0."""
    lut_c = np.array((*coarse, 0), np.int64)       # index -1 reads the trailing 0
    lut_f = np.array((*fine, 0), np.int64)
    return lut_c[np.asarray(v_code)] + lut_f[np.asarray(v_fine)]


def unit_size(in_dim: int, group_size: int, block: int = fx.MX_BLOCK) -> int:
    """Features per unit: gcd of the MXINT block (as golden picks it for ``in_dim``) and the group."""
    return math.gcd(fx.mx_block(in_dim, block), group_size)


def mxint_inputs(x_q16: np.ndarray, group_size: int, act_bits: int = 8,
                 block: int = fx.MX_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q16 activations [T, in] -> the fabric's inputs, exactly as golden quantises them:
    (MXINT elements int64 [T, in], unit shifts relative to e_min int64 [T, in/unit], e_min [T])."""
    x_q16 = np.asarray(x_q16, np.int64)
    i_dim = x_q16.shape[-1]
    elems, sh = fx.mx_quantize(x_q16, act_bits, block)
    blk = fx.mx_block(i_dim, block)
    unit = math.gcd(blk, group_size)
    su = sh[:, (np.arange(i_dim // unit) * unit) // blk]
    emin = su.min(axis=1)
    return elems, su - emin[:, None], emin


def _wrap(v: np.ndarray, bits: int) -> np.ndarray:
    """Two's complement wrap of int64 values to ``bits`` signed bits."""
    if bits >= 64:
        return v
    m = np.int64(1) << (bits - 1)
    return ((v + m) & ((m << 1) - 1)) - m


def tile_reference(x, sh, *, v_code, v_fine=None, coarse, fine=(), group_scale, unit,
                   acc_bits: int = 48) -> np.ndarray:
    """``acc`` of one tile: x int [T, cols], sh int [T, cols/unit] -> int64 [T, rows].

    ``acc[r] = sum_u (part[r, u] * group_scale[r, u]) << sh[u]`` modulo 2**acc_bits, as the
    RTL computes it (int64 arithmetic wraps modulo 2**64, which preserves the residue)."""
    x = np.atleast_2d(np.asarray(x, np.int64))
    sh = np.atleast_2d(np.asarray(sh, np.int64))
    v_code = np.asarray(v_code)
    v_fine = np.full(v_code.shape, -1) if v_fine is None else v_fine
    codes = extract_codes(v_code, v_fine, coarse, fine)
    rows, cols = codes.shape
    nu = cols // unit
    with np.errstate(over="ignore"):
        part = np.einsum("tuc,ruc->tru", x.reshape(-1, nu, unit), codes.reshape(rows, nu, unit))
        scaled = part * np.asarray(group_scale, np.int64)[None]
        acc = np.sum(_wrap(scaled, acc_bits) << sh[:, None, :], axis=2)
    return _wrap(acc, acc_bits)


def requantize(acc, mult, nshift, emin, bias=None) -> np.ndarray:
    """The fabric's requantiser: acc int64 [T, out] -> int32-saturated y int64 [T, out].

    ``round_half_up(acc * mult / 2**k) + bias`` with ``k = nshift - emin``, as the hardware
    does it: ``((v >> (k - 1)) + 1) >> 1`` for k > 0 (the shift clamped at 63), ``v << -k`` for
    k <= 0 with |v| >= 2**32 or -k >= 32 saturating outright."""
    v = np.asarray(acc, np.int64) * np.asarray(mult, np.int64)[None, :]
    k = np.asarray(nshift, np.int64)[None, :] - np.asarray(emin, np.int64)[:, None]
    right = ((v >> np.clip(k - 1, 0, RIGHT_MAX)) + 1) >> 1
    lim = np.int64(1) << LEFT_CLAMP
    s = np.clip(-k, 0, LEFT_CLAMP - 1)
    big = (v != 0) & ((-k >= LEFT_CLAMP) | (v >= lim) | (v < -lim))
    left = np.where(big, np.where(v < 0, -lim, lim), np.where(big, 0, v) << s)
    y = np.where(k > 0, right, left)
    if bias is not None:
        y = y + np.asarray(bias, np.int64)[None, :]
    return fx.saturate32(y)


def fabric_reference(x, sh, emin, *, v_code, v_fine=None, coarse, fine=(), group_scale, unit,
                     mult, nshift, bias=None, tile_rows: int = 64, tile_cols: int = 64,
                     act_bits: int = 8, shift_bits: int = 5, acc_bits: int = 48) -> np.ndarray:
    """``y`` of a LinearFabric (same keyword arguments): x [T, in], sh [T, in/unit], emin [T]
    -> int64 [T, out]. Tiles are ``tile_rows x tile_cols``; each column tile's ``acc`` is
    added modulo 2**acc_bits, then requantised."""
    x = np.atleast_2d(np.asarray(x, np.int64))
    sh = np.atleast_2d(np.asarray(sh, np.int64))
    emin = np.atleast_1d(np.asarray(emin, np.int64))
    v_code = np.asarray(v_code)
    v_fine = np.full(v_code.shape, -1) if v_fine is None else np.asarray(v_fine)
    gs = np.asarray(group_scale, np.int64)
    o_dim, i_dim = v_code.shape
    acc = np.zeros((x.shape[0], o_dim), np.int64)
    upt = tile_cols // unit
    for j in range(0, i_dim, tile_cols):
        cs, us = slice(j, j + tile_cols), slice(j // unit, j // unit + upt)
        acc += tile_reference(x[:, cs], sh[:, us], v_code=v_code[:, cs], v_fine=v_fine[:, cs],
                              coarse=coarse, fine=fine, group_scale=gs[:, us], unit=unit,
                              acc_bits=acc_bits)
    return requantize(_wrap(acc, acc_bits), mult, nshift, emin, bias)
