# amaranth: UnusedElaboratable=no
"""The weight-stationary systolic array (hdl/systolic.py): both simulators bit-exact against the
numpy reference, RTL cycles against ``tile_cycles``, weight reloads with tokens in flight."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.hdl.sim import run_rows, verilator_available
from tapeout.hdl.systolic import (SystolicArray, systolic_latency, systolic_reference, tile_cycles,
                                  tile_job)


def random_job(rng, n: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(W [n, n], x [tokens, n]) int8, with the extremes -128 / 127 in both."""
    W = rng.integers(-128, 128, (n, n))
    W[0, 0], W[-1, -1] = -128, 127
    x = rng.integers(-128, 128, (tokens, n))
    x[0], x[-1] = -128, 127                       # full-scale rows: the largest column sums
    return W, x


def run_jobs(array, jobs, engine: str, stats: dict | None = None):
    """Back-to-back tile jobs in one run: (y [sum of tokens, n], cycles). Compared in Python:
    the Verilator driver's own check assumes one output per stimulus row, and preload rows
    have none."""
    rows = [tile_job(W, x) for W, x in jobs]
    inputs = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    return run_rows(array, inputs, engine=engine, stats={} if stats is None else stats,
                    name="systolic")


def test_n4_amaranth_bit_exact_and_cycles():
    rng = np.random.default_rng(1)
    n, tokens = 4, 12
    W, x = random_job(rng, n, tokens)
    assert (W < 0).any() and (x == -128).any() and (x == 127).any()
    y, cycles = run_jobs(SystolicArray(n), [(W, x)], "amaranth")
    expect = systolic_reference(x, W)
    assert y.size == tokens * n                   # every token's every column was collected
    assert np.array_equal(y, expect)
    assert cycles == tile_cycles(n, tokens) == n + tokens + 2 * n - 1


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_sizes(n):
    rng = np.random.default_rng(n)
    W, x = random_job(rng, n, 5)
    y, cycles = run_jobs(SystolicArray(n), [(W, x)], "amaranth")
    assert np.array_equal(y, systolic_reference(x, W)) and y.size == 5 * n
    assert cycles == tile_cycles(n, 5)


def test_reload_right_after_last_token():
    """Three jobs back to back (the middle one a single token): each reload starts on the cycle
    after the previous job's last token, while its tokens are still in the grid."""
    rng = np.random.default_rng(2)
    n = 4
    jobs = [random_job(rng, n, t) for t in (6, 1, 5)]
    y, cycles = run_jobs(SystolicArray(n), jobs, "amaranth")
    expect = np.concatenate([systolic_reference(x, W) for W, x in jobs])
    assert y.size == 12 * n
    assert np.array_equal(y, expect)
    assert cycles == 3 * n + 12 + systolic_latency(n)     # the drain is paid once


def test_single_row_reload_between_tokens():
    """A load is ordered with the tokens around it, even a lone row between two tokens."""
    rng = np.random.default_rng(3)
    n = 3
    W, x = random_job(rng, n, 2)
    W2 = W.copy()
    W2[1] = rng.integers(-128, 128, n)
    job = tile_job(W, x[:1])
    reload = {"x": np.zeros((1, n), np.int64), "w_load": np.array([1]), "w_row": np.array([1]),
              "w": W2[1:2]}
    rows = {k: np.concatenate([job[k], reload[k], tile_job(W2, x[1:])[k][n:]]) for k in job}
    y, _ = run_rows(SystolicArray(n), rows, engine="amaranth", stats={}, name="systolic")
    expect = np.concatenate([systolic_reference(x[:1], W), systolic_reference(x[1:], W2)])
    assert np.array_equal(y, expect)


def test_accumulator_wraps_like_reference():
    rng = np.random.default_rng(4)
    n, acc_bits = 4, 12                           # column sums of int8 products overflow 12 bits
    W, x = random_job(rng, n, 8)
    y, _ = run_jobs(SystolicArray(n, acc_bits=acc_bits), [(W, x)], "amaranth")
    expect = systolic_reference(x, W, acc_bits=acc_bits)
    assert np.array_equal(y, expect)
    assert not np.array_equal(expect, x @ W)      # the test really wraps


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64), st.lists(st.integers(-(1 << 40), 1 << 40), min_size=6, max_size=6))
def test_reference_is_modular_twos_complement(acc_bits, v):
    x, W = np.array([v[:2]]), np.array([v[2:4], v[4:6]])
    exact = [sum(int(x[0, k]) * int(W[k, j]) for k in range(2)) for j in range(2)]
    wrapped = [(e + (1 << (acc_bits - 1))) % (1 << acc_bits) - (1 << (acc_bits - 1)) for e in exact]
    assert systolic_reference(x, W, acc_bits).tolist() == [wrapped]


def test_latency_is_a_class_attribute_of_the_size():
    a, b = SystolicArray(4), SystolicArray(4, acc_bits=40)
    assert type(a) is type(b) and isinstance(a, SystolicArray)
    assert type(a).LATENCY == systolic_latency(4) == 7
    assert type(SystolicArray(16)).LATENCY == 31


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
def test_bad_size(bad):
    msg = rf"^Systolic array size n must be a positive integer, not {re.escape(repr(bad))}$"
    with pytest.raises(TypeError, match=msg):
        SystolicArray(bad)


@pytest.mark.parametrize("kw, exc, msg", [
    ({"act_bits": 0}, TypeError, r"^Activation bits must be a positive integer, not 0$"),
    ({"w_bits": 8.0}, TypeError, r"^Weight bits must be a positive integer, not 8\.0$"),
    ({"acc_bits": -1}, TypeError, r"^Accumulator bits must be a positive integer, not -1$"),
    ({"acc_bits": 65}, ValueError, r"^Accumulator bits must be at most 64 .*, not 65$"),
])
def test_bad_widths(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        SystolicArray(4, **kw)


def test_bad_jobs_and_references():
    W = np.zeros((3, 3), np.int64)
    with pytest.raises(ValueError, match=r"^Systolic weights must be a non-empty square matrix"):
        tile_job(np.zeros((3, 2), np.int64), np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match=r"^Systolic weights must hold values in \[-128, 128\)"):
        tile_job(W + 128, np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match=r"^Systolic activations must have shape \(1, 3\), not \(1, "):
        tile_job(W, np.zeros((1, 4), np.int64))
    with pytest.raises(TypeError, match=r"^Systolic activations must be an integer array"):
        tile_job(W, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"^systolic_reference needs x \[tokens, n\] and W \[n, m\]"):
        systolic_reference(np.zeros((2, 4), np.int64), W)
    with pytest.raises(ValueError, match=r"^Accumulator bits must be at most 64"):
        systolic_reference(np.zeros((2, 3), np.int64), W, acc_bits=65)
    with pytest.raises(TypeError, match=r"^Tile tokens must be a non-negative integer, not -1$"):
        tile_cycles(4, -1)


VERILATOR, WHY = verilator_available()


@pytest.mark.rtl
@pytest.mark.skipif(not VERILATOR, reason=WHY)
def test_n16_verilator_equals_amaranth_and_reference():
    rng = np.random.default_rng(16)
    n = 16
    jobs = [random_job(rng, n, t) for t in (300, 1, 200)]
    expect = np.concatenate([systolic_reference(x, W) for W, x in jobs])
    cycles_expected = 3 * n + 501 + systolic_latency(n)
    runs = {}
    for engine in ("amaranth", "verilator"):
        stats = {}
        y, cycles = run_jobs(SystolicArray(n), jobs, engine, stats)
        runs[engine] = (y, cycles, stats)
        assert cycles == cycles_expected, engine
        assert y.size == 501 * n and np.array_equal(y, expect), engine
    assert np.array_equal(runs["amaranth"][0], runs["verilator"][0])
    v_stats = runs["verilator"][2]
    assert tile_cycles(n, 300) == n + 300 + systolic_latency(n)

    # throughput on a long job (the build is cached from the run above)
    W, x = random_job(rng, n, 50_000)
    long_stats = {}
    y, cycles = run_jobs(SystolicArray(n), [(W, x)], "verilator", long_stats)
    assert cycles == tile_cycles(n, 50_000)
    assert y.size == 50_000 * n and np.array_equal(y, systolic_reference(x, W))
    a_stats = runs["amaranth"][2]
    print(f"\nsystolic n=16: amaranth {cycles_expected / a_stats['run_s']:,.0f} cycles/s "
          f"({cycles_expected} cycles); verilator {cycles / long_stats['run_s']:,.0f} cycles/s "
          f"({cycles} cycles), build {v_stats['build_s']:.1f} s (cached: {v_stats['cached']}), "
          f"convert {v_stats['convert_s']:.1f} s")
