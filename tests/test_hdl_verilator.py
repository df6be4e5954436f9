"""The mask-ROM RTL through Verilator (the `rtl` tier): a 64 x 64 tile and a 128 x 192 fabric
against the numpy datapath and golden, both simulation engines identical, lint and synthesis."""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.golden.model import linear_int
from tapeout.hdl.checks import WAIVERS, lint_tile, synth_tile
from tapeout.hdl.reference import ALPHABETS, decompose, fabric_reference, mxint_inputs, tile_reference
from tapeout.hdl.sim import simulate_fabric, simulate_tile, verilator_available

from test_hdl_tile import GOLDEN, random_codes, random_linear, random_q16

VERILATOR, WHY = verilator_available()
pytestmark = [pytest.mark.rtl, pytest.mark.skipif(not VERILATOR, reason=WHY)]


def random_tile(rng, fmt: str, rows: int, cols: int, unit: int) -> dict:
    coarse, fine = ALPHABETS[fmt]
    v_code, v_fine = decompose(random_codes(rng, fmt, (rows, cols)), coarse, fine)
    return dict(rows=rows, cols=cols, unit=unit, coarse=coarse, fine=fine, v_code=v_code,
                v_fine=v_fine, group_scale=rng.integers(0, 256, (rows, cols // unit)))


def test_tile_64x64_verilator_equals_reference_and_amaranth():
    rng = np.random.default_rng(21)
    args = random_tile(rng, "w3o6", 64, 64, 32)
    tokens = 300
    x = rng.integers(-128, 128, (tokens, 64))
    sh = rng.integers(0, 32, (tokens, 2))
    expect = tile_reference(x, sh, **{k: v for k, v in args.items() if k not in ("rows", "cols")})
    stats = {}
    acc, cycles = simulate_tile(args, list(zip(x, sh)), engine="verilator", expected=expect, stats=stats)
    assert np.array_equal(acc, expect)
    assert stats["checked"] == stats["driver_checked"] == tokens * 64
    assert stats["driver_mismatches"] == 0 and cycles == tokens + 1
    few = list(zip(x[:4], sh[:4]))                        # the Amaranth simulator on a prefix
    acc_py, _ = simulate_tile(args, few, engine="amaranth")
    assert np.array_equal(acc_py, acc[:4])


@pytest.mark.parametrize("fmt, group", [("w3o6", 64), ("nvfp4", 16)])
def test_fabric_128x192_verilator_equals_golden(fmt, group):
    rng = np.random.default_rng(31)
    out, inn, tokens = 128, 192, 64                       # 2 x 3 tiles of 64 x 64
    L, args = random_linear(rng, fmt, out, inn, group, tile_rows=64, tile_cols=64)
    x = random_q16(rng, tokens, inn)
    gold = linear_int(GOLDEN, L, x, "test")
    elems, sh, emin = mxint_inputs(x, group)
    assert np.array_equal(fabric_reference(elems, sh, emin, **args), gold)
    toks = list(zip(elems, sh, emin))
    stats = {}
    y, cycles = simulate_fabric(args, toks, engine="verilator", expected=gold, stats=stats)
    assert np.array_equal(y, gold)
    assert stats["checked"] == stats["driver_checked"] == tokens * out
    assert cycles == tokens + 2
    y_py, _ = simulate_fabric(args, toks[:3], engine="amaranth")
    assert np.array_equal(y_py, y[:3])


def test_tile_lint_clean():
    rng = np.random.default_rng(41)
    result = lint_tile(random_tile(rng, "int8", 64, 64, 32))
    assert result["ok"], result["messages"] or result["errors"]
    assert set(result["waived"]) <= {rule for rule, _, _ in WAIVERS}
    assert not result["warnings"]


def test_tile_synthesises():
    rng = np.random.default_rng(51)
    result = synth_tile(random_tile(rng, "w3o6", 8, 32, 32))
    assert result["cells"] > 0
    assert sum(result["cell_types"].values()) == result["cells"]
    assert any(t.startswith("$_SDFF") or t.startswith("$_DFF") for t in result["cell_types"])


def test_base_tile_slots_verilator_equal_golden():
    """The base-die tile (vias as data) under Verilator: a 100 x 160 w3o6 linear on 16 x 64 tiles."""
    from tapeout.hdl.slots import simulate_linear_slots
    rng = np.random.default_rng(51)
    out, inn, tokens = 100, 160, 32
    L, args = random_linear(rng, "w3o6", out, inn, 32, tile_rows=16, tile_cols=64)
    args.update(act_bits=8, acc_bits=48)
    x = random_q16(rng, tokens, inn)
    gold = linear_int(GOLDEN, L, x, "test")
    elems, sh, emin = mxint_inputs(x, 32)
    stats = {}
    y, _ = simulate_linear_slots(args, elems, sh, emin, engine="verilator", stats=stats)
    assert y.shape == (tokens, out) and np.array_equal(y, gold)
    assert stats["tiles"] == 7 * 3
