"""The weight-stationary systolic array of the systolic backend: y = x @ W, one token per cycle.

PE ``(k, j)`` of the ``n x n`` grid holds ``W[k][j]``. Activation ``x[k]`` enters PE row ``k``
skewed by ``k`` cycles and moves one PE to the right per cycle; partial sums move one PE down
per cycle, so the token presented at edge ``t`` is at PE ``(k, j)`` on edge ``t + k + j``.
Column ``j`` leaves the grid on edge ``t + n - 1 + j``; ``n - 1 - j`` deskew registers align
all columns on edge ``t + 2n - 2``.

Weight loads travel the same wavefront as tokens: the row written by a load at edge ``L``
reaches PE ``(k, j)`` on edge ``L + k + j``, so every PE sees loads and tokens in the order
they were presented. A token uses exactly the weights loaded before it, loads may follow a
token on the next cycle (no drain, no double buffer, no swap signal), and a single row may be
reloaded between two tokens.
"""
from __future__ import annotations

from functools import cache

import numpy as np
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .romtile import check_int_array, check_positive

__all__ = ["SystolicArray", "systolic_latency", "tile_cycles", "tile_job", "systolic_reference"]

MAX_ACC_BITS = 64        # both simulators return int64 outputs


def systolic_latency(n: int) -> int:
    """Register stages from a token's input edge to its ``y``: ``2n - 1`` (skew + grid + deskew
    along the longest path, PE ``(0, 0)`` to PE ``(n-1, n-1)``)."""
    return 2 * check_positive("Systolic array size n", n) - 1


def tile_cycles(n: int, tokens: int) -> int:
    """Cycles of one tile job as ``hdl.sim.run_rows`` drives it: ``n`` weight-preload rows,
    ``tokens`` token rows, then the ``LATENCY = 2n - 1`` drain cycles; ``tokens + 3n - 1``.
    Back-to-back jobs in one run overlap: only the last one pays the drain."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise TypeError(f"Tile tokens must be a non-negative integer, not {tokens!r}")
    return n + tokens + systolic_latency(n)


def _signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), 1 << (bits - 1)


def tile_job(W, x, *, act_bits: int = 8, w_bits: int = 8) -> dict[str, np.ndarray]:
    """The ``run_rows`` stimulus of one tile job: ``n`` preload rows (``w_load = 1``, row ``k``
    of ``W``) then one row per token of ``x`` [tokens, n]. Concatenate the dicts of several jobs
    (``np.concatenate`` per key) to run them back to back."""
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"Systolic weights must be a non-empty square matrix, not shape {W.shape}")
    n = W.shape[0]
    W = check_int_array("Systolic weights", W, (n, n), *_signed_range(w_bits))
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"Systolic activations must have shape [tokens, {n}], not {x.shape}")
    x = check_int_array("Systolic activations", x, (x.shape[0], n), *_signed_range(act_bits))
    tokens = x.shape[0]
    load = np.arange(n + tokens) < n
    return {
        "x": np.concatenate([np.zeros((n, n), np.int64), x]),
        "w_load": load.astype(np.int64),
        "w_row": np.where(load, np.arange(n + tokens), 0).astype(np.int64),
        "w": np.concatenate([W, np.zeros((tokens, n), np.int64)]),
    }


def systolic_reference(x, W, acc_bits: int = 32) -> np.ndarray:
    """int64 [tokens, n]: ``x @ W`` modulo ``2**acc_bits`` as signed two's complement (what the
    array's accumulators compute; exact whenever the true sum fits ``acc_bits``). int64
    arithmetic wraps modulo 2**64, so the result is exact for any ``acc_bits <= 64``."""
    check_positive("Accumulator bits", acc_bits)
    if acc_bits > MAX_ACC_BITS:
        raise ValueError(f"Accumulator bits must be at most {MAX_ACC_BITS}, not {acc_bits!r}")
    x, W = np.asarray(x), np.asarray(W)
    if x.ndim != 2 or W.ndim != 2 or x.shape[1] != W.shape[0]:
        raise ValueError(f"systolic_reference needs x [tokens, n] and W [n, m], "
                         f"not {x.shape} and {W.shape}")
    if x.dtype.kind not in "iu" or W.dtype.kind not in "iu":
        raise TypeError(f"systolic_reference needs integer arrays, not {x.dtype} and {W.dtype}")
    with np.errstate(over="ignore"):
        y = x.astype(np.int64) @ W.astype(np.int64)
    k = np.int64(64 - acc_bits)           # sign-extend the low acc_bits bits (int64 shifts wrap)
    with np.errstate(over="ignore"):
        return (y << k) >> k


def _check_args(n, act_bits, w_bits, acc_bits) -> tuple[int, int, int, int]:
    check_positive("Systolic array size n", n)
    check_positive("Activation bits", act_bits)
    check_positive("Weight bits", w_bits)
    check_positive("Accumulator bits", acc_bits)
    if acc_bits > MAX_ACC_BITS:
        raise ValueError(f"Accumulator bits must be at most {MAX_ACC_BITS} (the simulators' "
                         f"int64 outputs), not {acc_bits!r}")
    return n, act_bits, w_bits, acc_bits


@cache
def _sized(cls: type, n: int) -> type:
    """``cls`` with ``LATENCY`` for size ``n`` (``run_rows`` reads ``component.LATENCY``)."""
    latency = systolic_latency(n)
    return type(f"{cls.__name__}{n}", (cls,), {
        "LATENCY": latency, "__module__": cls.__module__,
        "__doc__": f"{cls.__name__} of size {n}: LATENCY = {latency}."})


class SystolicArray(wiring.Component):
    """An ``n x n`` weight-stationary systolic array: ``y[j] = sum_k x[k] * W[k][j]`` modulo
    ``2**acc_bits`` (two's complement; exact when the sum fits).

    Ports: ``x[n]`` (signed ``act_bits``), ``valid``, ``w_load``, ``w_row``, ``w[n]`` (signed
    ``w_bits``); ``y[n]`` (signed ``acc_bits``, one port per column), ``ready``.

    Weight load: on an edge with ``w_load = 1``, PE row ``w_row`` takes ``w[0..n-1]`` (a
    ``w_row >= n`` loads nothing). That cycle carries no token, whatever ``valid`` and ``x`` are.
    A token is an edge with ``valid = 1`` and ``w_load = 0``; tokens may come every cycle, and
    loads may be interleaved with tokens in any order: each token uses the weights loaded
    before it (loads follow the token wavefront, see the module docstring). The datapath
    registers have no reset: weights are undefined until loaded.

    Latency: ``LATENCY = 2n - 1`` clock edges, counting the edge that samples the token: its
    ``y`` is on the outputs with ``ready = 1`` right after the ``LATENCY``-th edge (as
    ``RomTile``'s ``LATENCY = 1``: registered outputs right after the sampling edge). ``y`` is
    meaningless while ``ready = 0``. ``LATENCY`` is a class attribute of the size, as
    ``run_rows`` reads it from the type: ``SystolicArray(n)`` is an instance of the cached
    subclass ``SystolicArray<n>``.
    """

    LATENCY: int            # 2n - 1, set on the per-size subclass made by __new__

    def __new__(cls, n, *, act_bits=8, w_bits=8, acc_bits=32):
        # arguments are checked before the object exists: a rejected array is never an
        # unused Elaboratable; src_loc_at=1 reports an unused one at the caller's line
        n = _check_args(n, act_bits, w_bits, acc_bits)[0]
        return super().__new__(_sized(cls, n), src_loc_at=1)

    def __init__(self, n, *, act_bits=8, w_bits=8, acc_bits=32):
        self.n, self.act_bits, self.w_bits, self.acc_bits = _check_args(n, act_bits, w_bits, acc_bits)
        super().__init__({
            "x": In(signed(act_bits)).array(n),
            "valid": In(1),
            "w_load": In(1),
            "w_row": In(unsigned(max(1, (n - 1).bit_length()))),
            "w": In(signed(w_bits)).array(n),
            "y": Out(signed(acc_bits)).array(n),
            "ready": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.n

        def delay_line(first, name: str, depth: int, *, reset_less: bool = True) -> list:
            """[first, first delayed 1, ..., delayed depth] as named registers."""
            taps = [first]
            for d in range(1, depth + 1):
                reg = Signal(first.shape(), name=f"{name}_d{d}", reset_less=reset_less)
                m.d.sync += reg.eq(taps[-1])
                taps.append(reg)
            return taps

        # load wavefront: one-hot row select delayed by k + j for PE (k, j); w[j] delayed alike
        sel = Signal(n, name="load_sel")
        for k in range(n):
            m.d.comb += sel[k].eq(self.w_load & (self.w_row == k))
        sel_at = delay_line(sel, "load_sel", 2 * n - 2, reset_less=False)
        w_at = [delay_line(self.w[j], f"w_c{j}", n - 1 + j) for j in range(n)]

        # activation skew: row k enters the grid k cycles late
        psum = [None] * n                                   # per column: the sum from above
        for k in range(n):
            act = delay_line(self.x[k], f"x_r{k}", k)[-1]
            for j in range(n):
                weight = Signal(signed(self.w_bits), name=f"weight_{k}_{j}", reset_less=True)
                with m.If(sel_at[k + j][k]):
                    m.d.sync += weight.eq(w_at[j][k + j])
                prod = Signal(signed(self.act_bits + self.w_bits), name=f"prod_{k}_{j}")
                m.d.comb += prod.eq(act * weight)
                out = Signal(signed(self.acc_bits), name=f"psum_{k}_{j}", reset_less=True)
                m.d.sync += out.eq(prod if psum[j] is None else psum[j] + prod)   # .eq wraps
                psum[j] = out
                if j < n - 1:                               # the activation moves right
                    right = Signal(signed(self.act_bits), name=f"act_{k}_{j}", reset_less=True)
                    m.d.sync += right.eq(act)
                    act = right
        # deskew: column j leaves n - 1 - j edges before the last column
        for j in range(n):
            m.d.comb += self.y[j].eq(delay_line(psum[j], f"y_c{j}", n - 1 - j)[-1])
        token = Signal(name="token")
        m.d.comb += token.eq(self.valid & ~self.w_load)
        m.d.comb += self.ready.eq(delay_line(token, "token", 2 * n - 1, reset_less=False)[-1])
        return m
