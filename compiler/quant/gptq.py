"""GPTQ (Frantar et al. 2022): round columns one at a time, pushing each column's error onto
the columns not yet rounded through the inverse Hessian of the layer input, H = X^T X / n.

Scales and outliers come from a :class:`Plan` fixed up front ("static groups"), so columns can
be visited in any order; they are visited by decreasing H[i, i] ("act order").
"""
from __future__ import annotations

import threading

import numpy as np

from ..errors import TapeoutError
from .plan import Plan

DAMP = 0.1           # fraction of mean(diag H) added to the diagonal: with ~2k calibration
                     # tokens H of a 1536-wide input is noisy, and shrinking it this far
                     # measured best on unseen text (0.01: KLD +38 %; docs/formats.md)
BLOCK = 128          # columns per lazy batch update


def check_damp(damp, what: str = "GPTQ damping") -> float:
    """``damp`` as a float, if it is a positive number (a fraction of mean(diag H))."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)) or not 0 < damp < 1e6:
        raise TapeoutError(f"{what} must be a positive number, not {damp!r}")
    return float(damp)


def lower_inverse(low: np.ndarray, leaf: int = 128) -> np.ndarray:
    """Inverse of a lower-triangular matrix by halves: inv [[A, 0], [C, D]] is
    [[inv A, 0], [-inv D C inv A, inv D]] (matrix products instead of a general inverse)."""
    n = low.shape[0]
    if n <= leaf:
        return np.linalg.inv(low)
    h = n // 2
    ai, di = lower_inverse(low[:h, :h], leaf), lower_inverse(low[h:, h:], leaf)
    out = np.zeros_like(low)
    out[:h, :h], out[h:, h:] = ai, di
    out[h:, :h] = -(di @ low[h:, :h]) @ ai
    return out


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U.

    Dead inputs (H[i, i] == 0) get H[i, i] = 1: their error then stays on their own column.
    With J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J
    is upper triangular with a positive diagonal: U itself (one Cholesky, one triangular
    inverse)."""
    h = np.array(hessian, dtype=np.float64)
    d = np.diag(h).copy()
    d[d == 0] = 1.0
    h[np.diag_indices_from(h)] = d + damp * d.mean()
    low = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(lower_inverse(low)[::-1, ::-1])


class HessianFactor:
    """The visiting order and inverse-Hessian factor of one layer input, computed once (on
    first use, thread-safely) for all the linears that read it (q, k and v share one)."""

    def __init__(self, hessian: np.ndarray, act_order: bool = True, damp: float = DAMP) -> None:
        self.hessian, self.act_order, self.damp = hessian, act_order, check_damp(damp)
        self._lock = threading.Lock()
        self._value: tuple[np.ndarray, np.ndarray] | None = None

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._value is None:
                h = np.asarray(self.hessian)
                n = h.shape[0]
                perm = np.argsort(-np.diag(h), kind="stable") if self.act_order else np.arange(n)
                self._value = perm, inverse_hessian_factor(h[np.ix_(perm, perm)], self.damp)
            return self._value


def gptq_codes(w: np.ndarray, hessian: "np.ndarray | HessianFactor", plan: Plan, *,
               act_order: bool = True, block: int = BLOCK) -> np.ndarray:
    """Integer codes [out, in] of ``w`` rounded column by column against ``plan``.

    The steps and outlier mask of every column are looked up once, in visiting order, so each
    column costs one rounding of a vector and one rank-1 update of its block."""
    n = w.shape[1]
    factor = hessian if isinstance(hessian, HessianFactor) else HessianFactor(hessian, act_order)
    perm, u = factor.get()
    work = np.array(w, dtype=np.float64)[:, perm]
    steps = np.ascontiguousarray(plan.steps(perm).T)          # [in, out] in visiting order
    masks = None if plan.outliers is None else np.ascontiguousarray(plan.outliers[:, perm].T)
    codes = np.zeros((n, w.shape[0]), dtype=np.int8)           # visiting order, transposed
    rounder = plan.rounder
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = np.ascontiguousarray(work[:, i1:i2].T)             # [cols, out]: a column is a row
        err1 = np.zeros((i2 - i1, w.shape[0]))
        for j in range(i2 - i1):
            i = i1 + j
            step = steps[i]
            m = None if masks is None else masks[i]
            c = rounder(w1[j], step, m if m is not None and m.any() else None)
            e = (w1[j] - c * step) / u[i, i]
            w1[j:] -= np.outer(u[i, i:i2], e)
            err1[j] = e
            codes[i] = c
        work[:, i2:] -= err1.T @ u[i1:i2, i2:]
    out = np.empty(w.shape, dtype=np.int8)
    out[:, perm] = codes.T
    return out
