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
CHUNK = 1 << 16             # weights per slice of the error evaluation: temporaries stay in cache


def safe_div(w: np.ndarray, step: np.ndarray) -> np.ndarray:
    """w / step, with 0 where the step is 0 (all-zero groups)."""
    return w / np.where(step > 0, step, np.inf)


class _OutlierRounding:
    """Shared by the rounders: ``coarse(w, step)`` gives base codes on the fine step ``step``;
    with ``outlier`` = (lo, hi), masked weights get ``clip(rint(w / step), *outlier)``."""

    outlier: tuple[int, int] | None

    def fine(self, w: np.ndarray, step: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(safe_div(w, step)), *self.outlier)

    def __call__(self, w, step, mask=None):
        if mask is True and self.outlier:                   # every weight an outlier
            return self.fine(w, step)
        codes = self.coarse(w, step)
        if mask is None or mask is True or not self.outlier:
            return codes
        at = np.nonzero(np.broadcast_to(mask, codes.shape))  # outliers are few: only there
        codes[at] = self.fine(np.broadcast_to(w, codes.shape)[at], np.broadcast_to(step, codes.shape)[at])
        return codes


@dataclass(frozen=True)
class GridRounder(_OutlierRounding):
    """Codes ``unit * clip(rint(w / (unit * step)), lo, hi)`` (rint is round-half-to-even);
    with ``outlier`` = (lo, hi), masked weights get ``clip(rint(w / step), *outlier)`` instead
    (w3o6's fine-grid outliers). ``unit`` is a power of two, so ``c * (unit * step)`` equals
    ``(unit * c) * step`` exactly, which :func:`chunk_error` uses."""

    unit: int
    lo: int
    hi: int
    outlier: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.unit < 1 or self.unit & (self.unit - 1):
            raise ValueError(f"grid unit must be a power of two, not {self.unit!r}")

    def base(self, w: np.ndarray, step: np.ndarray) -> np.ndarray:
        """clip(rint(w / step), lo, hi) for the coarse step ``step`` (= unit * fine step)."""
        codes = safe_div(w, step)
        np.rint(codes, out=codes)
        return np.clip(codes, float(self.lo), float(self.hi), out=codes)

    def coarse(self, w: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Base codes on the fine step: unit * base(w, unit * step)."""
        codes = self.base(w, self.unit * step)
        if self.unit != 1:
            codes *= self.unit
        return codes


@dataclass(frozen=True)
class AlphabetRounder(_OutlierRounding):
    """Base codes from a non-uniform alphabet: ``levels`` (sorted integers on the fine step)
    and the nearest level to w / step wins (a tie goes to the lower level); masked weights
    are outliers, ``clip(rint(w / step), *outlier)`` as in :class:`GridRounder`."""

    levels: tuple[int, ...]
    outlier: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.levels) < 2 or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"alphabet levels must be sorted and distinct, not {self.levels!r}")

    @property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        lv = np.asarray(self.levels, dtype=np.float64)
        return lv, (lv[1:] + lv[:-1]) / 2

    def coarse(self, w: np.ndarray, step: np.ndarray) -> np.ndarray:
        """The nearest level to w / step (float64 codes on the fine step)."""
        lv, mids = self._table
        return lv[np.searchsorted(mids, safe_div(w, step), side="left")]


@dataclass
class Plan:
    fmt: str
    group_size: int
    group_scale: np.ndarray           # int32 [out, n_groups]
    row_scale: np.ndarray             # float64 [out]
    rounder: Rounder
    outliers: np.ndarray | None = None
    tensor_scale: float | None = None

    def steps(self, cols: np.ndarray | slice = slice(None), rows: slice = slice(None)) -> np.ndarray:
        """float64 [out, k]: value of one code unit for the given columns (and rows)."""
        idx = np.arange(self.group_scale.shape[1] * self.group_size)[cols] // self.group_size
        return self.group_scale[rows][:, idx].astype(np.float64) * self.row_scale[rows, None]

    def round(self, w: np.ndarray, cols: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Integer codes (int8) of the columns ``cols`` of the (possibly updated) weights ``w``
        (rounded a slice of rows at a time, so the float64 temporaries stay small). The codes
        keep the memory order one whole-matrix rounding gives: column-major for a column-major
        ``w`` without outliers (a norm over them sums in memory order)."""
        column_major = self.outliers is None and w.flags.f_contiguous and not w.flags.c_contiguous
        codes = np.empty(w.shape, dtype=np.int8, order="F" if column_major else "C")
        rows = max(1, CHUNK // max(1, w.shape[1]))
        for r in range(0, w.shape[0], rows):
            part = slice(r, r + rows)
            mask = None if self.outliers is None else self.outliers[part, cols]
            codes[part] = self.rounder(w[part], self.steps(cols, part), mask)
        return codes

    def finish(self, codes: np.ndarray) -> QuantTensor:
        out, n_in = codes.shape
        return QuantTensor(self.fmt, (out, n_in), self.group_size, codes.astype(np.int8),
                           self.group_scale.astype(np.int32), self.row_scale.astype(np.float64),
                           self.outliers, self.tensor_scale)


def grouped(a: np.ndarray, group_size: int) -> np.ndarray:
    """[out, in] -> [out, n_groups, group_size] view."""
    return a.reshape(a.shape[0], a.shape[1] // group_size, group_size)


@dataclass(frozen=True)
class Chunk:
    """A cache-sized slice of a matrix's groups: ``w`` holds one group per row (``axis=1``)
    or, for a strided sum, one group per column (``axis=0``)."""

    pos: np.ndarray | slice        # where these groups sit in the list asked for
    sel: np.ndarray | slice        # their flat indices, row * n_groups + group
    w: np.ndarray
    imp: np.ndarray                # shaped like w
    at: tuple | None               # positions of the outliers in w (None: no outlier here)
    axis: int

    def per_group(self, v: np.ndarray) -> np.ndarray:
        """Values [n], one per group, shaped to broadcast against ``w``."""
        return v[:, None] if self.axis == 1 else v[None, :]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """``x`` shaped like ``w`` as [n, group_size]."""
        return x if self.axis == 1 else x.T

    def weighted_square_sum(self, r: np.ndarray) -> np.ndarray:
        """sum_i imp[i] * r[i]**2 per group [n] (``r`` is overwritten), in einsum's order for a
        contiguous group (``axis=1``) or term by term in index order (``axis=0``)."""
        if self.axis == 1:
            return np.einsum("ni,ni->n", np.square(r, out=r), self.imp)
        if r.shape[1] > 1:                           # [g, n] C-contiguous: row after row
            return np.einsum("gn,gn,gn->n", r, r, self.imp)
        total = np.zeros(1)
        for term in np.square(r, out=r) * self.imp:
            total += term
        return total


EINSUM_SLICE = 1 << 20      # rows of this many weights were one slice of the reference einsum


def group_chunks(w3: np.ndarray, imp3: np.ndarray, mask3: np.ndarray | None = None,
                 groups: np.ndarray | None = None, strided: bool = False):
    """The groups of ``w3`` [out, n_groups, g] (all, or the flat indices ``groups``) as
    :class:`Chunk` s of about CHUNK weights, in memory order; ``pos`` indexes the list.

    The errors these chunks sum must equal, bit for bit, the einsum that defined them, and
    einsum sums a group one way when its terms are contiguous and another (term by term) when
    they are strided. They were strided only in the int clip search of a column-major matrix
    (an ONNX MatMul weight seen as [out, in]; ``strided=True``), except in a row that sat alone
    in its einsum slice (EINSUM_SLICE weights); every other sum was contiguous."""
    out, n_groups, g = w3.shape
    idx = np.arange(out * n_groups) if groups is None else np.asarray(groups)
    row, col = idx // n_groups, idx % n_groups
    if w3.flags.c_contiguous or out == 1 or not w3.transpose(1, 2, 0).flags.c_contiguous:
        w2 = np.ascontiguousarray(w3).reshape(-1, g)       # row-major: rows are groups
        m2 = None if mask3 is None else mask3.reshape(-1, g)
        if groups is None:                                 # whole matrix rows: slices
            n = max(1, CHUNK // (n_groups * g)) * n_groups
            imp = np.tile(imp3, (n // n_groups, 1))
            for a in range(0, len(idx), n):
                p = slice(a, min(a + n, len(idx)))
                yield Chunk(p, p, w2[p], imp[:p.stop - a], _outliers(None if m2 is None else m2[p]), 1)
            return
        for p in _spans(np.arange(len(idx)), max(1, CHUNK // g)):
            rs = idx[p]
            yield Chunk(p, rs, w2[rs], imp3[col[p]], _outliers(None if m2 is None else m2[rs]), 1)
        return
    per = max(1, EINSUM_SLICE // (n_groups * g))
    lone = out - 1 if out % per == 1 else -1
    by_cols = strided and per > 1
    wt = w3.transpose(1, 2, 0)                             # [n_groups, g, out], C-contiguous
    order = np.lexsort((row, col))                         # column by column, as memory runs
    if by_cols:
        solo = np.flatnonzero(row == lone)
        if len(solo):
            one = np.ascontiguousarray(w3[lone])
            yield Chunk(solo, idx[solo], one[col[solo]], imp3[col[solo]],
                        _outliers(None if mask3 is None else mask3[lone, col[solo]]), 1)
        order = order[row[order] != lone]
    height = out - (by_cols and lone >= 0)
    for p in _spans(order, max(2, CHUNK // g), height if groups is None else 0):
        o, j = row[p], col[p]
        if j[0] == j[-1] and o[-1] - o[0] == len(p) - 1:   # a run of one column: a slice
            w, imp = wt[j[0], :, o[0]:o[-1] + 1], np.broadcast_to(imp3[j[0]][:, None], (g, len(p)))
        else:
            w, imp = wt[j, :, o].T, imp3[j].T
        m = None if mask3 is None else mask3[o, j]
        if by_cols:
            yield Chunk(p, idx[p], np.ascontiguousarray(w), np.ascontiguousarray(imp),
                        _outliers(None if m is None else m.T), 0)
        else:
            yield Chunk(p, idx[p], np.ascontiguousarray(w.T), np.ascontiguousarray(imp.T),
                        _outliers(m), 1)


def _spans(order: np.ndarray, n: int, height: int = 0) -> list[np.ndarray]:
    """Slices of ``order`` of at most ``n``; with ``height``, ``order`` lists whole columns of
    that many groups one after another and no slice straddles two."""
    if not height:
        return [order[a:a + n] for a in range(0, len(order), n)]
    return [order[a:min(a + n, c + height)] for c in range(0, len(order), height)
            for a in range(c, c + height, n)]


def _outliers(mask: np.ndarray | None) -> tuple | None:
    return np.nonzero(mask) if mask is not None and mask.any() else None


def chunk_error(c: Chunk, step: np.ndarray, rounder: Rounder) -> np.ndarray:
    """Importance-weighted squared error [n] of the groups of ``c`` at the steps [n]."""
    s = c.per_group(step)
    if isinstance(rounder, GridRounder):               # q = c * (unit * s): one pass less
        coarse = rounder.unit * s
        q = rounder.base(c.w, coarse)
        np.multiply(q, coarse, out=q)
    else:
        q = rounder(c.w, s)
        q *= s
    if c.at is not None:                               # outliers: few, so rounded on their own
        s_at = np.broadcast_to(s, c.w.shape)[c.at]
        q[c.at] = rounder(c.w[c.at], s_at, True) * s_at
    return c.weighted_square_sum(np.subtract(c.w, q, out=q))


def group_error(w3: np.ndarray, imp3: np.ndarray, step: np.ndarray, rounder: Rounder,
                mask3: np.ndarray | None = None) -> np.ndarray:
    """Importance-weighted squared error per group, [out, n_groups], for steps [out, n_groups]."""
    err, flat = np.empty(step.size), step.reshape(-1)
    for c in group_chunks(w3, imp3, mask3):
        err[c.pos] = chunk_error(c, flat[c.pos], rounder)
    return err.reshape(step.shape)


def search_steps(w3: np.ndarray, imp3: np.ndarray, step0, rounder: Rounder, alphas,
                 mask3: np.ndarray | None = None, groups: np.ndarray | None = None,
                 strided: bool = False) -> np.ndarray:
    """Per group, the step alpha * step0 (alpha from ``alphas``) with the least weighted error:
    a clipping-ratio grid search (AWQ / OmniQuant-lite) on the activation-weighted error.
    The first alpha wins ties; a group no alpha improves on infinity keeps step0.

    ``step0`` is [out, n_groups], or a function of a :class:`Chunk` giving its groups' steps.
    With ``groups`` (flat group indices) only those groups are searched and the result (like
    an array ``step0``) has one step per listed group. ``strided``: see :func:`group_chunks`."""
    n = w3.shape[0] * w3.shape[1] if groups is None else len(groups)
    best = np.empty(n)
    for c in group_chunks(w3, imp3, mask3, groups, strided):
        s0 = step0(c) if callable(step0) else step0.reshape(-1)[c.pos]
        b, b_err = s0.copy(), np.full(s0.shape, np.inf)
        for a in alphas:
            step = a * s0
            err = chunk_error(c, step, rounder)
            better = err < b_err
            b, b_err = np.where(better, step, b), np.where(better, err, b_err)
        best[c.pos] = b
    return best.reshape(w3.shape[:2]) if groups is None else best


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
