"""GPTQ (Frantar et al. 2022): round columns one at a time, pushing each column's error onto
the columns not yet rounded through the inverse Hessian of the layer input, H = X^T X / n.

Scales and outliers come from a :class:`Plan` fixed up front ("static groups"), so columns can
be visited in any order; they are visited by decreasing H[i, i] ("act order").
"""
from __future__ import annotations

import numpy as np

from .plan import Plan

DAMP = 0.01          # fraction of mean(diag H) added to the diagonal
BLOCK = 128          # columns per lazy batch update


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U.

    Dead inputs (H[i, i] == 0) get H[i, i] = 1: their error then stays on their own column."""
    h = np.array(hessian, dtype=np.float64)
    d = np.diag(h).copy()
    d[d == 0] = 1.0
    h[np.diag_indices_from(h)] = d + damp * d.mean()
    lower_inv = np.linalg.inv(np.linalg.cholesky(h))
    return np.linalg.cholesky(lower_inv.T @ lower_inv).T


def gptq_codes(w: np.ndarray, hessian: np.ndarray, plan: Plan, *, act_order: bool = True,
               block: int = BLOCK) -> np.ndarray:
    """Integer codes [out, in] of ``w`` rounded column by column against ``plan``."""
    n = w.shape[1]
    perm = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(n)
    u = inverse_hessian_factor(np.asarray(hessian)[np.ix_(perm, perm)])
    work = np.array(w, dtype=np.float64)[:, perm]
    codes = np.zeros(w.shape, dtype=np.int8)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1 = work[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1))
        for j in range(i2 - i1):
            col = perm[i1 + j: i1 + j + 1]
            c = plan.round(w1[:, j:j + 1], col)
            e = (w1[:, j] - c[:, 0] * plan.steps(col)[:, 0]) / u[i1 + j, i1 + j]
            w1[:, j:] -= np.outer(e, u[i1 + j, i1 + j:i2])
            err1[:, j] = e
            codes[:, col[0]] = c[:, 0]
        work[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes
