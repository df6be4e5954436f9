"""FP4 formats: mxfp4 (OCP MX v1.0) and nvfp4 (NVIDIA), both with E2M1 elements.

Doubled E2M1 values are the integers {0, +-1, +-2, +-3, +-4, +-6, +-8, +-12}, so the codes of the
integer decomposition are 2 * element and the scales absorb the 1/2.
"""
from __future__ import annotations

import numpy as np

from .numerics import E2M1_MAX, E4M3_MAX, e2m1_codes, e4m3_round, e4m3_split, floor_log2
from .plan import Plan, grouped
from .tensor import FP4_BLOCK

E2M1_EMAX = 2                   # largest E2M1 exponent: 6 = 1.5 * 2**2
E8M0_MIN, E8M0_MAX = -127, 127  # 0xFF is NaN
MX_SPREAD = 30                  # group_scale = 2**(e - e_min_row) must fit an int32


def e2m1_rounder(w, step, mask=None):
    """Element = RNE_E2M1(float32(w) / float32(2 * step)), saturating at +-6; code = 2 * element.

    2 * step is the block's full scale (2**e for mxfp4, E4M3 * tensor scale for nvfp4); the
    division is one float32 operation, as a float32 kernel would do it."""
    scale = np.asarray(2 * step, dtype=np.float32)
    ratio = np.asarray(w, dtype=np.float32) / np.where(scale > 0, scale, np.float32(np.inf))
    return e2m1_codes(ratio)


def mx_exponents(w: np.ndarray) -> np.ndarray:
    """E8M0 exponents [out, in / 32]: floor(log2(amax)) - 2 per the OCP MX v1.0 conversion,
    clamped to [-127, 127] and to within 2**30 of the row's largest block (see docs)."""
    amax = np.abs(grouped(w, FP4_BLOCK["mxfp4"])).max(axis=2).astype(np.float64)
    live = amax > 0
    e = np.where(live, floor_log2(np.where(live, amax, 1.0)) - E2M1_EMAX, E8M0_MIN)
    e = np.clip(e, E8M0_MIN, E8M0_MAX)
    e = np.maximum(e, e.max(axis=1, keepdims=True) - MX_SPREAD)
    # an all-zero block takes its row's smallest live exponent: no effect on the decomposition
    e_min = np.where(live, e, E8M0_MAX + 1).min(axis=1, keepdims=True)
    e_min = np.where(e_min > E8M0_MAX, 0, e_min)
    return np.where(live, e, e_min)


def mx_plan_from_exponents(e: np.ndarray) -> Plan:
    e_min = e.min(axis=1)
    group_scale = np.left_shift(1, e - e_min[:, None]).astype(np.int32)
    row_scale = np.ldexp(0.5, e_min)
    return Plan("mxfp4", FP4_BLOCK["mxfp4"], group_scale, row_scale, e2m1_rounder)


def plan_mxfp4(w: np.ndarray) -> Plan:
    return mx_plan_from_exponents(mx_exponents(w))


def nv_tensor_scale(w: np.ndarray) -> np.float32:
    """FP32 per-tensor scale amax / (6 * 448), so the largest block scale is E4M3's maximum
    (1 for an all-zero tensor; never below the smallest float32 subnormal)."""
    amax = np.float32(np.abs(w).max(initial=0))
    if amax == 0:
        return np.float32(1.0)
    return max(amax / np.float32(E2M1_MAX * E4M3_MAX), np.float32(2.0 ** -149))


def nv_block_bytes(w: np.ndarray, tensor_scale: np.float32) -> np.ndarray:
    """E4M3 block scales [out, in / 16]: RNE(amax_block / 6 / tensor_scale) in float32."""
    amax = np.abs(grouped(np.asarray(w, dtype=np.float32), FP4_BLOCK["nvfp4"])).max(axis=2)
    return e4m3_round(amax / np.float32(E2M1_MAX) / tensor_scale)


def nv_plan_from_bytes(block_bytes: np.ndarray, tensor_scale: float) -> Plan:
    m, e = e4m3_split(block_bytes)
    live = m > 0
    e_min = np.where(live, e, 99).min(axis=1)
    e_min = np.where(e_min == 99, 0, e_min)
    group_scale = (m << np.maximum(e - e_min[:, None], 0)) * live
    row_scale = np.float64(tensor_scale) * np.ldexp(0.5, e_min)
    return Plan("nvfp4", FP4_BLOCK["nvfp4"], group_scale.astype(np.int32), row_scale,
                e2m1_rounder, tensor_scale=float(tensor_scale))


def plan_nvfp4(w: np.ndarray) -> Plan:
    ts = nv_tensor_scale(w)
    return nv_plan_from_bytes(nv_block_bytes(w, ts), ts)


def nv_block_bytes_of(plan_or_qt) -> np.ndarray:
    """E4M3 bytes of an nvfp4 decomposition: block scale = group_scale * row_scale * 2 / ts."""
    block = plan_or_qt.group_scale * (plan_or_qt.row_scale[:, None] * 2 / plan_or_qt.tensor_scale)
    return e4m3_round(block.astype(np.float32))


def mx_exponents_of(plan_or_qt) -> np.ndarray:
    """E8M0 exponents of an mxfp4 decomposition: log2(group_scale * row_scale * 2)."""
    return floor_log2(plan_or_qt.group_scale * plan_or_qt.row_scale[:, None] * 2)
