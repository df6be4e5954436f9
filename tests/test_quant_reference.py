"""The fast quantisation paths equal their straightforward definitions, bit for bit ("process
replay"): chunked, incremental clip searches; the outlier selection; batched calibration.

The references below are the first, whole-matrix implementations. Their float sums are part
of the result (a near tie between two clipping ratios goes the way the sums round), so the
fast paths must sum every group in the same order, including the order einsum chose from the
memory layout of the weights; hence both layouts, and weights on a coarse grid (many ties).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.compiler.frontend import frontend
from tapeout.compiler.interp import run
from tapeout.compiler.qmodel import calibrate, linear_ops, window_feeds, windows
from tapeout.compiler.quant import quantize
from tapeout.compiler.quant.numerics import bf16_ceil
from tapeout.compiler.quant.plan import GROUP_SCALE_MAX, safe_div
from tapeout.compiler.quant.w3o6 import W3O6_ALPHAS, default_cap, select_outliers

PROPS = settings(max_examples=60, deadline=None)
INT_ALPHAS = np.linspace(0.5, 1.2, 15)


# ---------------------------------------------------------------- the references
def ref_w3o6_rounder(w, step, mask=None):
    base = 4 * np.clip(np.rint(safe_div(w, 4 * step)), -4, 3)
    if mask is None:
        return base
    return np.where(mask, np.clip(np.rint(safe_div(w, step)), -32, 31), base)


def ref_int_rounder(bits):
    return lambda w, step, mask=None: np.clip(np.rint(safe_div(w, step)), -(1 << bits - 1), (1 << bits - 1) - 1)


def ref_group_error(w3, imp3, step, rounder, mask3=None):
    err = np.empty(step.shape)
    rows = max(1, (1 << 20) // (w3.shape[1] * w3.shape[2]))
    for r in range(0, w3.shape[0], rows):
        part = slice(r, r + rows)
        step3 = step[part, :, None]
        q = rounder(w3[part], step3, None if mask3 is None else mask3[part]) * step3
        err[part] = np.einsum("ogi,gi->og", (w3[part] - q) ** 2, imp3)
    return err


def ref_search(w3, imp3, step0, rounder, alphas, mask3=None):
    best, best_err = step0.copy(), np.full(step0.shape, np.inf)
    for a in alphas:
        err = ref_group_error(w3, imp3, a * step0, rounder, mask3)
        better = err < best_err
        best, best_err = np.where(better, a * step0, best), np.where(better, err, best_err)
    return best


def ref_group_scales(step, w3, imp3, rounder, mask3=None):
    row = bf16_ceil(step.max(axis=1) / GROUP_SCALE_MAX)
    safe = np.where(row > 0, row, 1.0)[:, None]
    ratio = step / safe
    hi = np.clip(np.ceil(ratio), 0, GROUP_SCALE_MAX)
    lo = np.where(step > 0, np.clip(np.floor(ratio), 1, GROUP_SCALE_MAX), 0)
    err_hi = ref_group_error(w3, imp3, hi * safe, rounder, mask3)
    err_lo = ref_group_error(w3, imp3, lo * safe, rounder, mask3)
    return np.where(err_lo < err_hi, lo, hi).astype(np.int32), row


def ref_select(saliency, k, cap):
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


def ref_w3o6(w, g, imp, frac):
    """(group_scale, row_scale, outliers, codes) of w3o6 with the clip search."""
    out, n_in = w.shape
    w3, imp3 = w.reshape(out, n_in // g, g), imp.reshape(-1, g)
    k = int(round(frac * out * n_in))
    cap = default_cap(k, out * (n_in // g), g)

    def base_step(mask3):
        amax = np.where(mask3, 0, np.abs(w3)).max(axis=2)
        step = np.where(amax > 0, amax / 3.5 / 4, np.abs(w3).max(axis=2) / 31.5)
        return ref_search(w3, imp3, step, ref_w3o6_rounder, W3O6_ALPHAS, mask3)

    mask3 = np.zeros(w3.shape, dtype=bool)
    step = base_step(mask3)
    for _ in range(2 if k else 0):
        s3 = step[:, :, None]
        e3 = (w3 - ref_w3o6_rounder(w3, s3) * s3) ** 2
        e6 = (w3 - np.clip(np.rint(safe_div(w3, s3)), -32, 31) * s3) ** 2
        mask3 = ref_select((e3 - e6) * imp3, k, cap)
        step = base_step(mask3)
    gs, row = ref_group_scales(step, w3, imp3, ref_w3o6_rounder, mask3)
    mask = mask3.reshape(out, n_in)
    steps = np.repeat(gs.astype(np.float64), g, axis=1) * row[:, None]
    return gs, row, mask, ref_w3o6_rounder(w, steps, mask).astype(np.int8)


def ref_int(w, bits, g, imp):
    """(group_scale, row_scale, codes) of int<bits> per group of ``g`` with the clip search."""
    out, n_in = w.shape
    rounder = ref_int_rounder(bits)
    w3, imp3 = w.reshape(out, n_in // g, g), imp.reshape(-1, g)
    step = ref_search(w3, imp3, np.abs(w3).max(axis=2) / ((1 << bits - 1) - 0.5), rounder, INT_ALPHAS)
    if g == n_in:
        gs, row = np.ones((out, 1), dtype=np.int32), bf16_ceil(step[:, 0])
    else:
        gs, row = ref_group_scales(step, w3, imp3, rounder)
    steps = np.repeat(gs.astype(np.float64), g, axis=1) * row[:, None]
    return gs, row, rounder(w, steps).astype(np.int8)


# ---------------------------------------------------------------- the properties
@st.composite
def matrices(draw, group: int):
    """Weights [out, in] as a C- or Fortran-ordered array (ONNX MatMul weights arrive as the
    latter), often on a coarse grid with a flat importance (exact ties between clipping
    ratios, which a different summation order would break), with zeros and repeated rows."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = draw(st.sampled_from([1, 2, 3, 17, 64, 130]))
    n_in = group * draw(st.integers(1, 6))
    levels = draw(st.sampled_from([0, 3, 8, 20]))
    w = rng.standard_normal((out, n_in)) if not levels else rng.integers(-levels, levels + 1, (out, n_in)) / 8
    w[rng.random(out) < 0.2] = w[0]               # repeated rows: tied saliencies
    imp = draw(st.sampled_from(["flat", "random", "sparse"]))
    imp = {"flat": np.ones(n_in), "random": rng.random(n_in),
           "sparse": rng.random(n_in) * (rng.random(n_in) > 0.3)}[imp]
    w = (w * 2.0 ** draw(st.integers(-12, 6))).astype(np.float32)
    return (np.asfortranarray(w) if draw(st.booleans()) else w), imp


@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.1])
@PROPS
@given(data=st.data())
def test_w3o6_equals_reference(group, frac, data):
    w, imp = data.draw(matrices(group))
    qt = quantize(w, "w3o6", group_size=group, outlier_frac=frac, act_sq=imp)
    gs, row, mask, codes = ref_w3o6(w.astype(np.float64), group, imp, frac)
    assert np.array_equal(qt.group_scale, gs) and np.array_equal(qt.row_scale, row)
    assert np.array_equal(qt.outliers, mask) and np.array_equal(qt.codes, codes)


@pytest.mark.parametrize("bits,group", [(4, None), (4, 16), (3, 64), (8, 32)])
@PROPS
@given(data=st.data())
def test_int_clip_search_equals_reference(bits, group, data):
    w, imp = data.draw(matrices(group or 64))
    qt = quantize(w, f"int{bits}", group_size=group, act_sq=imp)
    gs, row, codes = ref_int(w.astype(np.float64), bits, group or w.shape[1], imp)
    assert np.array_equal(qt.group_scale, gs) and np.array_equal(qt.row_scale, row)
    assert np.array_equal(qt.codes, codes)


def test_int_clip_search_equals_reference_on_a_row_alone_in_its_slice():
    # 16384 inputs: the reference summed 64 rows per einsum; row 64 of 65 sat alone, contiguous
    rng = np.random.default_rng(3)
    w = np.asfortranarray((np.round(rng.standard_normal((65, 16384)) * 4) / 4).astype(np.float32))
    imp = rng.random(16384)
    qt = quantize(w, "int4", group_size=64, act_sq=imp)
    gs, row, codes = ref_int(w.astype(np.float64), 4, 64, imp)
    assert np.array_equal(qt.group_scale, gs) and np.array_equal(qt.codes, codes)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cap=st.sampled_from([1, 2, 3, 7, 9, 64]),
       kind=st.sampled_from(["float", "ties", "inf", "nan"]))
def test_select_outliers_equals_reference(seed, cap, kind):
    rng = np.random.default_rng(seed)
    sal = rng.standard_normal((int(rng.integers(1, 40)), int(rng.integers(1, 5)), 64))
    if kind == "ties":
        sal = np.round(sal * 2) / 2
    elif kind == "inf":
        sal[rng.random(sal.shape) < 0.05] = -np.inf
        sal[rng.random(sal.shape) < 0.05] = np.inf
    elif kind == "nan":
        sal[rng.random(sal.shape) < 0.05] = np.nan
    k = int(rng.integers(0, min(cap, 64) * sal.shape[0] * sal.shape[1] + 1))
    assert np.array_equal(select_outliers(sal, k, cap), ref_select(sal, k, cap))


def test_calibration_equals_one_window_at_a_time(tiny):
    """Windows run op by op across feeds (and threads) give run()'s statistics exactly."""
    g = frontend(tiny.export("llama", "dynamo", 20, "prefill"))
    wins = windows(np.random.default_rng(0).integers(0, 256, 16 * 7), 16)
    wanted = {op.inputs[0] for op in linear_ops(g)}
    sums: dict[str, np.ndarray] = {}

    def keep(name, value):
        if name in wanted:
            x = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
            sums[name] = sums.get(name, 0) + np.sum(x * x, axis=0)
    for w in wins:
        run(g, window_feeds(g, w), keep=keep)
    stats = calibrate(g, wins)
    assert stats.tokens == 16 * 7 and stats.act_sq.keys() == sums.keys()
    for name, s in sums.items():
        assert np.array_equal(stats.act_sq[name], s / stats.tokens)
