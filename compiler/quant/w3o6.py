"""w3o6: 3-bit base codes per group plus a chosen fraction of 6-bit outliers on a finer grid.

Base weights are c3 * s with c3 in [-4, 3]; outliers are c6 * s / 4 with c6 in [-32, 31], so the
integer each weight contributes is 4 * c3 or c6 and one accumulator serves both. Outliers are
chosen by activation-aware saliency: the weighted error they save, act_sq[i] * ((w - q3(w))**2 -
(w - q6(w))**2) (OWQ / SpQR style), so a small weight on a loud input channel can win over a
large weight on a quiet one.
"""
from __future__ import annotations

import math

import numpy as np

from .intq import safe_div
from .plan import Plan, grouped, integer_group_scales, search_steps
from .tensor import W3O6_BASE, W3O6_OUTLIER, W3O6_RATIO

# base-step clipping ratios tried per group, relative to absmax(non-outliers) / 3.5
W3O6_ALPHAS = np.linspace(0.3, 1.2, 19)
SELECT_ROUNDS = 2        # saliency -> outliers -> scales, twice (scales move when outliers leave)


def w3o6_rounder():
    """Codes on the fine step u: base weights 4 * clip(rint(w / (4 u)), -4, 3), outliers
    clip(rint(w / u), -32, 31); rint is round-half-to-even."""
    ratio = W3O6_RATIO

    def rounder(w, step, mask=None):
        base = ratio * np.clip(np.rint(safe_div(w, ratio * step)), *W3O6_BASE)
        if mask is None:
            return base
        return np.where(mask, np.clip(np.rint(safe_div(w, step)), *W3O6_OUTLIER), base)
    return rounder


def default_cap(k: int, groups: int, group_size: int) -> int:
    """Largest outlier count a group may hold: 2**b - 1 for the smallest count width b that
    leaves room for twice the average, so busy groups can take more than their share while
    the per-group count field stays narrow (docs/formats.md has the measurement)."""
    if k == 0:
        return 0
    width = max(1, math.ceil(math.log2(2 * k / groups + 1)))
    return max(min(group_size, (1 << width) - 1), math.ceil(k / groups))


def select_outliers(saliency: np.ndarray, k: int, cap: int) -> np.ndarray:
    """Boolean mask of the ``k`` most salient weights, at most ``cap`` per group.

    ``saliency`` is [out, n_groups, group_size]; exactly ``k`` weights are chosen whenever
    ``k <= cap * n_groups`` (the caller guarantees it)."""
    mask = np.zeros(saliency.size, dtype=bool)
    if k == 0:
        return mask.reshape(saliency.shape)
    g = saliency.shape[-1]
    flat = saliency.reshape(-1, g)
    order = np.argsort(-flat, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(g)[None, :], axis=1)
    cand = np.where(rank < cap, flat, -np.inf).ravel()
    mask[np.argpartition(-cand, k - 1)[:k]] = True
    return mask.reshape(saliency.shape)


def plan_w3o6(w: np.ndarray, group_size: int, imp: np.ndarray, outlier_frac: float,
              rtn: bool, *, cap: int | None = None, rounds: int = SELECT_ROUNDS) -> Plan:
    """Outliers and scales of w3o6; ``imp`` (act_sq) weights both the outlier saliency and the
    scale search. Exactly round(outlier_frac * out * in) outliers, at most ``cap`` per group."""
    out, n_in = w.shape
    ratio, rounder = W3O6_RATIO, w3o6_rounder()
    w3, imp3 = grouped(w, group_size), imp.reshape(-1, group_size)
    groups = out * (n_in // group_size)
    k = int(round(outlier_frac * out * n_in))
    cap = default_cap(k, groups, group_size) if cap is None else max(cap, math.ceil(k / groups))

    def base_step(mask3):
        # fine step u = s / 4 with s = absmax(base weights) / 3.5, then (rtn=False) a clip search;
        # a group whose base weights are all zero sizes u for its outliers instead
        amax = np.where(mask3, 0, np.abs(w3)).max(axis=2)
        step = np.where(amax > 0, amax / (-W3O6_BASE[0] - 0.5) / ratio,
                        np.abs(w3).max(axis=2) / (W3O6_OUTLIER[1] + 0.5))
        if rtn:
            return step
        return search_steps(w3, imp3, step, rounder, W3O6_ALPHAS, mask3)

    mask3 = np.zeros(w3.shape, dtype=bool)
    step = base_step(mask3)
    for _ in range(rounds if k else 0):
        s3 = step[:, :, None]
        e3 = (w3 - rounder(w3, s3) * s3) ** 2
        e6 = (w3 - np.clip(np.rint(safe_div(w3, s3)), *W3O6_OUTLIER) * s3) ** 2
        mask3 = select_outliers((e3 - e6) * imp3, k, cap)
        step = base_step(mask3)
    if rtn:
        group_scale, row_scale = integer_group_scales(step)
    else:
        group_scale, row_scale = integer_group_scales(step, w3, imp3, rounder, mask3)
    return Plan("w3o6", group_size, group_scale, row_scale, rounder,
                outliers=mask3.reshape(out, n_in))
