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

from .plan import (AlphabetRounder, Chunk, GridRounder, Plan, group_chunks, grouped, integer_group_scales,
                   safe_div, search_steps)
from .tensor import W3O6_BASE, W3O6_OUTLIER, W3O6_RATIO

# base-step clipping ratios tried per group, relative to absmax(non-outliers) / 3.5
W3O6_ALPHAS = np.linspace(0.3, 1.2, 19)
SELECT_ROUNDS = 2        # saliency -> outliers -> scales, twice (scales move when outliers leave)


def w3o6_rounder() -> GridRounder:
    """Codes on the fine step u: base weights 4 * clip(rint(w / (4 u)), -4, 3), outliers
    clip(rint(w / u), -32, 31); rint is round-half-to-even."""
    return GridRounder(W3O6_RATIO, *W3O6_BASE, outlier=W3O6_OUTLIER)


def default_cap(k: int, groups: int, group_size: int) -> int:
    """Largest outlier count a group may hold: 2**b - 1 for the smallest count width b that
    leaves room for twice the average, so busy groups can take more than their share while
    the per-group count field stays narrow (docs/formats.md has the measurement)."""
    if k == 0:
        return 0
    width = max(1, math.ceil(math.log2(2 * k / groups + 1)))
    return max(min(group_size, (1 << width) - 1), math.ceil(k / groups))


TOP_BY_ARGMAX = 8           # up to this cap, a group's top entries are found by repeated argmax
SELECT_ROWS = 1 << 12       # groups per slice of the per-group ranking


def group_top(flat: np.ndarray, cap: int) -> np.ndarray:
    """Flat positions of the ``cap`` largest entries of each row of ``flat`` [n, g], ties to the
    lower index: the entries a stable descending sort ranks below ``cap``."""
    n, g = flat.shape
    if cap >= g:
        return np.arange(flat.size)
    tops = []
    for r in range(0, n, SELECT_ROWS):
        part = flat[r:r + SELECT_ROWS]
        rows = np.arange(len(part))
        if cap <= TOP_BY_ARGMAX and (part > -np.inf).all():   # argmax: first of equal maxima
            work, cols = part.copy(), np.empty((len(part), cap), dtype=np.int64)
            for j in range(cap):
                cols[:, j] = work.argmax(axis=1)
                work[rows, cols[:, j]] = -np.inf
        else:                                                 # NaN or -inf: the sort's order
            cols = np.argsort(-part, axis=1, kind="stable")[:, :cap]
        tops.append(((r + rows)[:, None] * g + cols).ravel())
    return np.concatenate(tops)


def select_outliers(saliency: np.ndarray, k: int, cap: int) -> np.ndarray:
    """Boolean mask of the ``k`` most salient weights, at most ``cap`` per group.

    ``saliency`` is [out, n_groups, group_size]; exactly ``k`` weights are chosen whenever
    ``k <= cap * n_groups`` (the caller guarantees it). Candidates are each group's ``cap``
    largest (ties to the lower index); of those the ``k`` largest win. When the k-th value is
    tied across the cut, the tie goes the way ``np.argpartition`` breaks it."""
    mask = np.zeros(saliency.size, dtype=bool)
    if k == 0:
        return mask.reshape(saliency.shape)
    flat = saliency.reshape(-1, saliency.shape[-1])
    pos = group_top(flat, cap)
    neg = -flat.reshape(-1)[pos]
    cut = np.partition(neg, k - 1)[k - 1]
    won = neg <= cut
    if cut < np.inf and np.count_nonzero(won) == k:        # the k largest are unambiguous
        mask[pos[won]] = True
    else:                                  # -cand of the reference: +inf off the candidates
        neg_cand = np.full(saliency.size, np.inf)
        neg_cand[pos] = neg
        mask[np.argpartition(neg_cand, k - 1)[:k]] = True
    return mask.reshape(saliency.shape)


def saliency(c: Chunk, step: np.ndarray, rounder=None) -> np.ndarray:
    """act_sq[i] * ((w - q3(w))**2 - (w - q6(w))**2) of the groups of ``c`` at steps [n]
    (q3 by ``rounder``'s base codes, the uniform w3o6 grid by default)."""
    s = c.per_group(step)
    e3 = (rounder or w3o6_rounder()).coarse(c.w, s)     # (4 c3) * u == c3 * (4 u) exactly
    e3 *= s
    np.subtract(c.w, e3, out=e3)
    np.square(e3, out=e3)
    e6 = safe_div(c.w, s)
    np.rint(e6, out=e6)
    np.clip(e6, *W3O6_OUTLIER, out=e6)
    e6 *= s
    np.subtract(c.w, e6, out=e6)
    np.square(e6, out=e6)
    e3 -= e6
    e3 *= c.imp
    return e3


def plan_w3o6(w: np.ndarray, group_size: int, imp: np.ndarray, outlier_frac: float,
              rtn: bool, *, cap: int | None = None, rounds: int = SELECT_ROUNDS,
              levels: tuple[int, ...] | None = None) -> Plan:
    """Outliers and scales of w3o6; ``imp`` (act_sq) weights both the outlier saliency and the
    scale search. Exactly round(outlier_frac * out * in) outliers, at most ``cap`` per group.

    A group's step depends only on its own weights and outliers, so after the first round only
    the groups whose outliers changed are searched again (and their saliency recomputed)."""
    out, n_in = w.shape
    w = np.ascontiguousarray(w)        # every w3o6 error sums contiguous groups: read rows
    ratio, rounder = W3O6_RATIO, w3o6_rounder()
    top = None                          # the fine-step value absmax maps to at first
    if levels is not None:
        rounder = AlphabetRounder(tuple(levels), W3O6_OUTLIER)
        lo, hi = levels[0], levels[-1]
        top = max(-lo - (levels[1] - lo) / 2, hi - (hi - levels[-2]) / 2)
    w3, imp3 = grouped(w, group_size), imp.reshape(-1, group_size)
    groups = out * (n_in // group_size)
    k = int(round(outlier_frac * out * n_in))
    cap = default_cap(k, groups, group_size) if cap is None else max(cap, math.ceil(k / groups))

    def step0(c: Chunk) -> np.ndarray:
        # fine step u = s / 4 with s = absmax(base weights) / 3.5; a group whose base weights
        # are all zero sizes u for its outliers instead
        a = np.abs(c.w)
        whole = a.max(axis=c.axis)
        if c.at is not None:
            a[c.at] = 0
        amax = whole if c.at is None else a.max(axis=c.axis)
        base = amax / (-W3O6_BASE[0] - 0.5) / ratio if levels is None else amax / top
        return np.where(amax > 0, base,
                        whole / (W3O6_OUTLIER[1] + 0.5))

    def base_step(mask3, sel):             # then (rtn=False) a clip search
        return search_steps(w3, imp3, step0, rounder, () if rtn else W3O6_ALPHAS, mask3, sel)

    mask3 = np.zeros(w3.shape, dtype=bool)
    step, changed = base_step(mask3, None), None          # changed None: every group
    sal = np.empty((groups, group_size)) if k else None
    for _ in range(rounds if k else 0):
        flat = step.reshape(-1)
        for c in group_chunks(w3, imp3, groups=changed):
            sal[c.sel] = c.rows(saliency(c, flat[c.sel], rounder))
        new = select_outliers(sal.reshape(w3.shape), k, cap)
        changed = np.flatnonzero((new != mask3).any(axis=2))
        mask3 = new
        if len(changed):
            flat[changed] = base_step(mask3, changed)
    if rtn:
        group_scale, row_scale = integer_group_scales(step)
    else:
        group_scale, row_scale = integer_group_scales(step, w3, imp3, rounder, mask3)
    return Plan("w3o6", group_size, group_scale, row_scale, rounder,
                outliers=mask3.reshape(out, n_in))
