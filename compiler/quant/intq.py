"""Symmetric integer formats int2..int8, per output channel or per group along the input.

Codes use the full two's complement range [-2**(b-1), 2**(b-1) - 1] with the step
absmax / (2**(b-1) - 1/2) (GPTQ's symmetric grid): +absmax lands half a step past the top code
and is clipped by exactly half a step, so RTN error never exceeds half a step anywhere.
"""
from __future__ import annotations

import numpy as np

from .numerics import bf16_ceil
from .plan import GridRounder, Plan, grouped, integer_group_scales, search_steps
from .tensor import int_range

# clipping ratios tried by the scale search (rtn=False); 1.0 is plain absmax
INT_ALPHAS = np.linspace(0.5, 1.2, 15)


def int_rounder(bits: int) -> GridRounder:
    """clip(rint(w / step), -2**(b-1), 2**(b-1) - 1)."""
    return GridRounder(1, *int_range(bits))


def plan_int(w: np.ndarray, bits: int, group_size: int, imp: np.ndarray, rtn: bool) -> Plan:
    """Scales of the int<bits> format; per channel when ``group_size`` is the input width."""
    out, n_in = w.shape
    rounder = int_rounder(bits)
    w3, imp3 = grouped(w, group_size), imp.reshape(-1, group_size)
    step = np.abs(w3).max(axis=2) / ((1 << (bits - 1)) - 0.5)
    if not rtn:
        step = search_steps(w3, imp3, step, rounder, INT_ALPHAS, strided=True)
    if group_size == n_in:
        group_scale = np.ones((out, 1), dtype=np.int32)
        row_scale = bf16_ceil(step[:, 0])
    elif rtn:
        group_scale, row_scale = integer_group_scales(step)
    else:
        group_scale, row_scale = integer_group_scales(step, w3, imp3, rounder)
    return Plan(f"int{bits}", group_size, group_scale, row_scale, rounder)
