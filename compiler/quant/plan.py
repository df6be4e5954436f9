"""A quantisation plan: the scales (and w3o6 outliers) of a matrix, fixed before any rounding.

Every format first plans its scales from the float weights, then rounds columns against the
plan. Round-to-nearest rounds all columns at once; GPTQ rounds them one at a time while it
updates the not-yet-rounded columns, against the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .numerics import bf16_ceil
from .tensor import GROUP_SCALE_BITS, QuantTensor

# rounder(w, step, outlier_mask or None) -> integer codes; broadcasts over any shape
Rounder = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]

GROUP_SCALE_MAX = (1 << GROUP_SCALE_BITS) - 1
CHUNK = 1 << 20             # weights per slice of the error evaluation


@dataclass
class Plan:
    fmt: str
    group_size: int
    group_scale: np.ndarray           # int32 [out, n_groups]
    row_scale: np.ndarray             # float64 [out]
    rounder: Rounder
    outliers: np.ndarray | None = None
    tensor_scale: float | None = None

    def steps(self, cols: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float64 [out, k]: value of one code unit for the given columns."""
        idx = np.arange(self.group_scale.shape[1] * self.group_size)[cols] // self.group_size
        return self.group_scale[:, idx].astype(np.float64) * self.row_scale[:, None]

    def round(self, w: np.ndarray, cols: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Integer codes (int8) of the columns ``cols`` of the (possibly updated) weights ``w``."""
        mask = None if self.outliers is None else self.outliers[:, cols]
        return self.rounder(w, self.steps(cols), mask).astype(np.int8)

    def finish(self, codes: np.ndarray) -> QuantTensor:
        out, n_in = codes.shape
        return QuantTensor(self.fmt, (out, n_in), self.group_size, codes.astype(np.int8),
                           self.group_scale.astype(np.int32), self.row_scale.astype(np.float64),
                           self.outliers, self.tensor_scale)


def grouped(a: np.ndarray, group_size: int) -> np.ndarray:
    """[out, in] -> [out, n_groups, group_size] view."""
    return a.reshape(a.shape[0], a.shape[1] // group_size, group_size)


def group_error(w3: np.ndarray, imp3: np.ndarray, step: np.ndarray, rounder: Rounder,
                mask3: np.ndarray | None = None) -> np.ndarray:
    """Importance-weighted squared error per group, [out, n_groups], for steps [out, n_groups]."""
    err = np.empty(step.shape)
    rows = max(1, CHUNK // (w3.shape[1] * w3.shape[2]))     # bound the temporaries
    for r in range(0, w3.shape[0], rows):
        part = slice(r, r + rows)
        step3 = step[part, :, None]
        q = rounder(w3[part], step3, None if mask3 is None else mask3[part]) * step3
        err[part] = np.einsum("ogi,gi->og", (w3[part] - q) ** 2, imp3)
    return err


def search_steps(w3: np.ndarray, imp3: np.ndarray, step0: np.ndarray, rounder: Rounder,
                 alphas: np.ndarray, mask3: np.ndarray | None = None) -> np.ndarray:
    """Per group, the step alpha * step0 (alpha from ``alphas``) with the least weighted error:
    a clipping-ratio grid search (AWQ / OmniQuant-lite) on the activation-weighted error."""
    best, best_err = step0.copy(), np.full(step0.shape, np.inf)
    for a in alphas:
        err = group_error(w3, imp3, a * step0, rounder, mask3)
        better = err < best_err
        best, best_err = np.where(better, a * step0, best), np.where(better, err, best_err)
    return best


def integer_group_scales(step: np.ndarray, w3: np.ndarray | None = None,
                         imp3: np.ndarray | None = None, rounder: Rounder | None = None,
                         mask3: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real per-group steps [out, n_groups] -> (uint8-range group_scale, bfloat16 row_scale).

    row_scale = bf16_ceil(max_g step / 255) and group_scale = ceil(step / row_scale), so the
    quantised step is never finer than the planned one (no new clipping). With ``w3`` given,
    floor is also tried and the one with the smaller weighted error kept.
    """
    row = bf16_ceil(step.max(axis=1) / GROUP_SCALE_MAX)
    safe = np.where(row > 0, row, 1.0)[:, None]
    ratio = step / safe
    hi = np.clip(np.ceil(ratio), 0, GROUP_SCALE_MAX)
    if w3 is not None:
        lo = np.clip(np.floor(ratio), 1, GROUP_SCALE_MAX)
        lo = np.where(step > 0, lo, 0)
        err_hi = group_error(w3, imp3, hi * safe, rounder, mask3)
        err_lo = group_error(w3, imp3, lo * safe, rounder, mask3)
        hi = np.where(err_lo < err_hi, lo, hi)
    return hi.astype(np.int32), row
