"""Mask-ROM tile and fabric RTL (Amaranth simulator) against the numpy datapath model, and the
numpy model against golden.model.linear_int."""
from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import GoldenConfig, IntLinear, linear_int
from tapeout.hdl.fabric import LinearFabric
from tapeout.hdl.reference import (ALPHABETS, decompose, extract_codes, fabric_reference,
                                   mxint_inputs, requantize, tile_reference, unit_size)
from tapeout.hdl.romtile import RomTile
from tapeout.hdl.sim import SimulationMismatch, simulate_fabric, simulate_tile

GOLDEN = types.SimpleNamespace(config=GoldenConfig())      # linear_int only reads gm.config
CODE_RANGE = {"w3o6": (-32, 31), "mxfp4": None, "nvfp4": None, "int4": (-8, 7), "int8": (-128, 127)}
E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12])


def random_codes(rng, fmt: str, shape) -> np.ndarray:
    if CODE_RANGE[fmt] is None:
        return rng.choice(E2M1_DOUBLED, shape)
    if fmt == "w3o6":                      # base weights 4 * c3, ~15% outliers c6
        base = 4 * rng.integers(-4, 4, shape)
        return np.where(rng.random(shape) < 0.15, rng.integers(-32, 32, shape), base)
    lo, hi = CODE_RANGE[fmt]
    return rng.integers(lo, hi + 1, shape)


def random_linear(rng, fmt: str, out: int, inn: int, group: int, *, tile_rows: int, tile_cols: int):
    """(IntLinear, LinearFabric arguments) of one random quantised linear layer."""
    coarse, fine = ALPHABETS[fmt]
    codes = random_codes(rng, fmt, (out, inn))
    gs = rng.integers(0, 256, (out, inn // group))
    # row scales over a wide range, so that k = nshift - emin takes both signs (left and
    # right shifts in the requantiser) and large rows saturate
    mult, shift = fx.multiplier(np.exp2(rng.uniform(-14, 3, out)) * rng.choice([-1, 1], out))
    bias = rng.integers(-(1 << 24), 1 << 24, out)
    unit = unit_size(inn, group)
    v_code, v_fine = decompose(codes, coarse, fine)
    args = dict(v_code=v_code, v_fine=v_fine, coarse=coarse, fine=fine, unit=unit,
                group_scale=np.repeat(gs, group // unit, axis=1), mult=mult, nshift=shift,
                bias=bias, tile_rows=tile_rows, tile_cols=tile_cols)
    return IntLinear.build(codes, group, gs, mult, shift, bias), args


def random_q16(rng, tokens: int, inn: int) -> np.ndarray:
    """Q16 activations with per-token magnitudes from 2**-4 to 2**10 and a few loud channels."""
    x = rng.standard_normal((tokens, inn)) * np.exp2(rng.uniform(-4, 10, (tokens, 1)))
    x[:, rng.integers(0, inn, 3)] *= 40
    return np.clip(np.round(x * 65536), -(1 << 31), (1 << 31) - 1).astype(np.int64)


# --- via decomposition ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(ALPHABETS))
def test_decompose_round_trip(fmt):
    coarse, fine = ALPHABETS[fmt]
    codes = (np.unique(E2M1_DOUBLED) if CODE_RANGE[fmt] is None
             else np.arange(CODE_RANGE[fmt][0], CODE_RANGE[fmt][1] + 1))
    v_code, v_fine = decompose(codes, coarse, fine)
    assert np.array_equal(extract_codes(v_code, v_fine, coarse, fine), codes)
    assert np.all((codes == 0) == ((v_code < 0) & (v_fine < 0)))       # zero: no via at all
    if fmt in ("w3o6", "int8"):             # the table's step * floor(c / step) + (c mod step)
        step = 4 if fmt == "w3o6" else 16
        lut = np.array((*coarse, 0))
        assert np.array_equal(lut[v_code], step * np.floor_divide(codes, step))


def test_decompose_rejects_inexpressible_code():
    with pytest.raises(ValueError, match=r"^code 5 is not expressible with coarse alphabet"):
        decompose(np.array([5]), ALPHABETS["nvfp4"][0])


# --- constructor checks --------------------------------------------------------------------------
def tile_kw(**over):
    kw = dict(rows=4, cols=8, unit=4, coarse=(1, 2), fine=(), v_code=np.zeros((4, 8), int),
              group_scale=np.ones((4, 2), int))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, exc, message", [
    (dict(rows=0), TypeError, r"^Tile rows must be a positive integer, not 0$"),
    (dict(rows=2.0), TypeError, r"^Tile rows must be a positive integer, not 2\.0$"),
    (dict(cols="8"), TypeError, r"^Tile columns must be a positive integer, not '8'$"),
    (dict(unit=3), ValueError, r"^Tile unit must divide the tile columns \(8\), not 3$"),
    (dict(act_bits=0), TypeError, r"^Activation bits must be a positive integer, not 0$"),
    (dict(coarse=()), TypeError, r"^Coarse alphabet must be a non-empty sequence of non-zero integers, not \(\)$"),
    (dict(coarse=(1, 0)), TypeError, r"^Coarse alphabet must be a non-empty sequence of non-zero integers, not \(1, 0\)$"),
    (dict(coarse=(2, 2)), ValueError, r"^Coarse alphabet must not repeat a value, not \(2, 2\)$"),
    (dict(fine=(1.5,)), TypeError, r"^Fine alphabet must be a sequence of non-zero integers, not \(1\.5,\)$"),
    (dict(v_code=np.zeros((4, 7), int)), ValueError, r"^Via map v_code must have shape \(4, 8\), not \(4, 7\)$"),
    (dict(v_code=np.full((4, 8), 2)), ValueError, r"^Via map v_code must hold values in \[-1, 2\), not values in \[2, 2\]$"),
    (dict(v_code=np.zeros((4, 8))), TypeError, r"^Via map v_code must be an integer array, not float64 values$"),
    (dict(v_fine=np.zeros((4, 8), int)), ValueError, r"^Via map v_fine must hold values in \[-1, 0\), not values in \[0, 0\]$"),
    (dict(group_scale=-np.ones((4, 2), int)), ValueError, r"^Group scale must hold values in >= 0, not values in \[-1, -1\]$"),
    (dict(group_scale=np.ones((4, 8), int)), ValueError, r"^Group scale must have shape \(4, 2\), not \(4, 8\)$"),
])
def test_tile_rejects_bad_arguments(over, exc, message):
    with pytest.raises(exc, match=message):
        RomTile(**tile_kw(**over))


def test_tile_signature():
    tile = RomTile(**tile_kw())
    assert [len(tile.x), len(tile.sh), len(tile.acc)] == [8, 2, 4]
    assert tile.x[0].shape().signed and tile.acc[0].shape().width == 48
    assert RomTile.LATENCY == 1


@pytest.mark.parametrize("over, message", [
    (dict(mult=np.full(3, 1 << 15)), r"^Multiplier mult must hold values in \[-32767, 32768\), not values in \[32768, 32768\]$"),
    (dict(bias=np.full(3, 1 << 31)), r"^Bias must hold values in \[-2147483648, 2147483648\), not values in \[2147483648, 2147483648\]$"),
    (dict(unit=3), r"^Fabric unit must divide the tile columns \(8\), not 3$"),
    (dict(v_code=np.zeros((3, 12), int), group_scale=np.ones((3, 3), int)),
     r"^Fabric unit must divide the input features \(12\), not 8$"),
])
def test_fabric_rejects_bad_arguments(over, message):
    kw = dict(v_code=np.zeros((3, 16), int), coarse=(1,), group_scale=np.ones((3, 2), int), unit=8,
              mult=np.ones(3, int), nshift=np.zeros(3, int), tile_rows=2, tile_cols=8)
    if over.get("unit") == 3:
        kw["group_scale"] = np.ones((3, 5), int)
    kw.update(over)
    with pytest.raises(ValueError, match=message):
        LinearFabric(**kw)


# --- numpy datapath == golden --------------------------------------------------------------------
@pytest.mark.parametrize("fmt, group", [("w3o6", 64), ("nvfp4", 16), ("mxfp4", 32), ("int8", 128), ("int4", 32)])
def test_fabric_reference_equals_golden(fmt, group):
    rng = np.random.default_rng(7)
    out, inn, tokens = 70, 256, 24
    L, args = random_linear(rng, fmt, out, inn, group, tile_rows=64, tile_cols=64)
    x = random_q16(rng, tokens, inn)
    gold = linear_int(GOLDEN, L, x, "test")
    elems, sh, emin = mxint_inputs(x, group)
    y = fabric_reference(elems, sh, emin, **args)
    assert y.shape == gold.shape == (tokens, out)
    assert np.array_equal(y, gold)
    k = args["nshift"][None, :] - emin[:, None]
    assert (k <= 0).any() and (k > 0).any()               # both requantiser paths exercised
    assert (np.abs(gold) == (1 << 31) - 1).any() or (gold == -(1 << 31)).any()   # and saturation


@settings(max_examples=300, deadline=None)
@given(acc=st.integers(-(1 << 47), (1 << 47) - 1), mult=st.integers(-(1 << 15) + 1, (1 << 15) - 1),
       k=st.integers(-40, 80), bias=st.integers(-(1 << 31), (1 << 31) - 1))
def test_requantize_equals_golden_rounding(acc, mult, k, bias):
    v = acc * mult
    if k < 0 and abs(v) << -k >= 1 << 63:
        return                                            # golden's own int64 would wrap: out of contract
    exact = (v + (1 << (k - 1))) >> k if k > 0 else v << -k          # Python ints: no overflow
    expect = min(max(exact + bias, -(1 << 31)), (1 << 31) - 1)
    got = requantize(np.array([[acc]]), np.array([mult]), np.array([k]), np.array([0]), np.array([bias]))
    assert int(got[0, 0]) == expect
    if k <= 62:                                           # golden's rshift_round is int64 too
        ref = fx.saturate32(fx.rshift_round(np.int64(v), k) + bias)
        assert int(ref) == expect


# --- RTL (Amaranth simulator) == numpy datapath --------------------------------------------------
@pytest.mark.parametrize("fmt", ["w3o6", "nvfp4"])
def test_tile_rtl_equals_reference(fmt):
    rng = np.random.default_rng(11)
    rows, cols, unit, tokens = 8, 16, 8, 12
    coarse, fine = ALPHABETS[fmt]
    codes = random_codes(rng, fmt, (rows, cols))
    codes[:, 3] = 0                                       # a column without vias
    v_code, v_fine = decompose(codes, coarse, fine)
    gs = rng.integers(0, 1 << 20, (rows, cols // unit))
    gs[0, 0] = 0
    args = dict(rows=rows, cols=cols, unit=unit, coarse=coarse, fine=fine, v_code=v_code,
                v_fine=v_fine, group_scale=gs)
    x = rng.integers(-127, 128, (tokens, cols))
    x[0] = -128                                           # the full signed range
    sh = rng.integers(0, 32, (tokens, cols // unit))      # every shift, including the wrapping ones
    expect = tile_reference(x, sh, **{k: v for k, v in args.items() if k not in ("rows", "cols")})
    stats = {}
    acc, cycles = simulate_tile(args, list(zip(x, sh)), expected=expect, stats=stats)
    assert np.array_equal(acc, expect)
    assert stats["checked"] == acc.size == tokens * rows
    assert cycles == tokens + RomTile.LATENCY


@pytest.mark.parametrize("fmt, group", [("w3o6", 32), ("nvfp4", 16)])
def test_fabric_2x2_rtl_equals_reference_and_golden(fmt, group):
    rng = np.random.default_rng(5)
    out, inn, tokens = 13, 96, 10                         # 2 x 2 tiles of 8 x 64, edge tiles partly used
    L, args = random_linear(rng, fmt, out, inn, group, tile_rows=8, tile_cols=64)
    x = random_q16(rng, tokens, inn)
    gold = linear_int(GOLDEN, L, x, "test")
    elems, sh, emin = mxint_inputs(x, group)
    assert np.array_equal(fabric_reference(elems, sh, emin, **args), gold)
    stats = {}
    y, cycles = simulate_fabric(args, list(zip(elems, sh, emin)), expected=gold, stats=stats)
    assert np.array_equal(y, gold)
    assert stats["checked"] == y.size == tokens * out
    assert cycles == tokens + LinearFabric.LATENCY


def test_simulation_reports_a_mismatch():
    rng = np.random.default_rng(3)
    coarse, fine = ALPHABETS["int4"]
    v_code, v_fine = decompose(random_codes(rng, "int4", (4, 8)), coarse, fine)
    args = dict(rows=4, cols=8, unit=8, coarse=coarse, fine=fine, v_code=v_code, v_fine=v_fine,
                group_scale=np.ones((4, 1), int))
    tokens = [(rng.integers(-127, 128, 8), [0]) for _ in range(3)]
    expect = tile_reference([t[0] for t in tokens], [t[1] for t in tokens], **{
        k: v for k, v in args.items() if k not in ("rows", "cols")})
    expect[1, 2] += 1
    with pytest.raises(SimulationMismatch, match=r"^1 of 12 outputs differ; first at token 1, output 2"):
        simulate_tile(args, tokens, expected=expect)


def test_requantiser_rtl_clamps_equal_reference():
    """Out-of-contract corners of the requantiser (shifts past 64 either way, |acc * mult| near
    2**62, int32 saturation both ways) still agree between the RTL and hdl.reference."""
    rng = np.random.default_rng(13)
    out, inn, tokens = 16, 32, 24
    coarse, fine = ALPHABETS["int8"]
    v_code, v_fine = decompose(rng.integers(-128, 128, (out, inn)), coarse, fine)
    args = dict(v_code=v_code, v_fine=v_fine, coarse=coarse, fine=fine, unit=32,
                group_scale=rng.integers(0, 1 << 24, (out, 1)),
                mult=rng.choice([-(1 << 15) + 1, -1, 0, 1, 12345, (1 << 15) - 1], out),
                nshift=rng.integers(-1023, 1024, out), bias=rng.integers(-(1 << 31), 1 << 31, out),
                tile_rows=16, tile_cols=32)
    args["nshift"][:8] = rng.integers(-40, 90, 8)
    x = rng.integers(-128, 128, (tokens, inn))
    sh = rng.integers(0, 32, (tokens, 1))
    emin = rng.integers(-128, 128, tokens)
    emin[:12] = rng.integers(-5, 20, 12)
    expect = fabric_reference(x, sh, emin, **args)
    k = args["nshift"][None, :] - emin[:, None]
    assert (k > 63).any() and (k < -31).any() and ((k > -31) & (k < 63)).any()
    assert (expect == (1 << 31) - 1).any() and (expect == -(1 << 31)).any()
    stats = {}
    y, _ = simulate_fabric(args, list(zip(x, sh, emin)), expected=expect, stats=stats)
    assert np.array_equal(y, expect) and stats["checked"] == tokens * out


# --- the base-die RTL: the via layers as data, a linear run tile by tile -------------------------
@pytest.mark.parametrize("fmt, group", [("w3o6", 32), ("nvfp4", 16), ("int8", 32)])
def test_base_tile_slots_equal_golden(fmt, group):
    """A 21 x 96 linear on 8 x 32 base-die tiles (3 x 3 tiles, edge tiles partly used)."""
    from tapeout.hdl.slots import simulate_linear_slots
    rng = np.random.default_rng(41)
    out, inn, tokens = 21, 96, 6
    L, args = random_linear(rng, fmt, out, inn, group, tile_rows=8, tile_cols=32)
    args.update(act_bits=8, acc_bits=48)
    x = random_q16(rng, tokens, inn)
    gold = linear_int(GOLDEN, L, x, "test")
    elems, sh, emin = mxint_inputs(x, group)
    stats = {}
    y, cycles = simulate_linear_slots(args, elems, sh, emin, engine="amaranth", stats=stats)
    assert y.shape == (tokens, out) and np.array_equal(y, gold)
    assert stats["tiles"] == 9
    # per column tile: 3 row blocks x (8 configuration rows + 6 tokens), then the latency
    assert cycles == 3 * (3 * (8 + tokens) + 2)


def test_base_tile_is_the_same_rtl_for_every_model():
    """The base-die tile's RTL depends on the family only: two different linears, one Verilog."""
    from tapeout.hdl.sim import to_verilog
    from tapeout.hdl.slots import make_slot
    rng = np.random.default_rng(2)
    texts = []
    for _ in range(2):
        _, args = random_linear(rng, "w3o6", 16, 32, 32, tile_rows=4, tile_cols=32)
        args.update(act_bits=8, acc_bits=48)
        texts.append(to_verilog(make_slot(args), "tile_slot"))
    assert texts[0] == texts[1] and "cfg_code__31" in texts[0]


def test_base_tile_catches_a_corrupted_via():
    from tapeout.hdl.slots import simulate_linear_slots
    rng = np.random.default_rng(43)
    L, args = random_linear(rng, "nvfp4", 8, 32, 16, tile_rows=8, tile_cols=32)
    args.update(act_bits=8, acc_bits=48)
    x = random_q16(rng, 4, 32)
    gold = linear_int(GOLDEN, L, x, "test")
    elems, sh, emin = mxint_inputs(x, 16)
    args["v_code"] = args["v_code"].copy()
    args["v_code"][3, 5] = (args["v_code"][3, 5] + 3) % len(args["coarse"])     # a via moved
    y, _ = simulate_linear_slots(args, elems, sh, emin, engine="amaranth")
    assert (y[:, 3] != gold[:, 3]).any() and np.array_equal(np.delete(y, 3, 1), np.delete(gold, 3, 1))
