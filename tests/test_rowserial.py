"""The row-serial fabric (hdl/rowserial.py): ROM image, its numpy model and the RTL against
golden.model.linear_int; the RTL's cycles against the stage formula the estimate uses; the
tile's cell list against Yosys."""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import IntLinear, linear_int
from tapeout.hdl.rowserial import (FILL_CYCLES, ROW_FORMATS, RowSerialTile, RowSpec, row_dense, row_dense_apply,
                                   row_image, row_reference, simulate_row_linear, stage_cycles)
from tapeout.hdl.sim import verilator_available

from test_hdl_tile import GOLDEN, random_linear, random_q16

FAMILY = {"w3o6": "w3o6", "nvfp4": "fp4", "mxfp4": "fp4", "int4": "int4", "int8": "int8"}


def hardware_linear(rng, fmt: str, out: int, inn: int, group: int, *, outliers: int = 5):
    """A random linear whose codes and scales the row-serial word can hold: w3o6 with at most
    ``outliers`` 6-bit codes per 64 weights, fp4 scales m * 2**e, as the quantisers make them."""
    L, args = random_linear(rng, fmt, out, inn, group, tile_rows=64, tile_cols=64)
    codes, unit = L.codes, args["unit"]
    if fmt == "w3o6":
        base = 4 * np.clip(np.round(codes / 4), -4, 3).astype(np.int64)
        keep = np.zeros(codes.shape, bool)
        for r in range(out):
            for g0 in range(0, inn, 64):
                keep[r, g0 + rng.choice(64, outliers, replace=False)] = True
        codes = np.where(keep, codes, base)
    gs = L.group_scale
    if fmt == "nvfp4":
        gs = rng.integers(1, 16, gs.shape) << rng.integers(0, 14, gs.shape)
    elif fmt == "mxfp4":
        gs = np.int64(1) << rng.integers(0, 30, gs.shape)
    L = IntLinear.build(codes, group, gs, args["mult"], args["nshift"], args["bias"])
    gs_unit = np.repeat(gs, group // unit, axis=1)
    return L, dict(codes=codes, group_scale=gs_unit, mult=args["mult"], nshift=args["nshift"], bias=args["bias"]), unit


def run(L, kw, unit, rng, tokens=3, **image):
    x = random_q16(rng, tokens, L.codes.shape[1])
    want = linear_int(GOLDEN, L, x, "t")
    elems, su, emin = fx.mx_units(x, unit, 8)
    return want, (elems, su - emin[:, None], emin)


@pytest.mark.parametrize("fmt, group", [("w3o6", 64), ("nvfp4", 16), ("mxfp4", 32), ("int4", 32), ("int8", 32)])
@pytest.mark.parametrize("out, inn, chains, chain_tiles", [(40, 192, 3, 2), (7, 64, 1, 1), (33, 320, 4, 8)])
def test_row_reference_equals_golden(fmt, group, out, inn, chains, chain_tiles):
    rng = np.random.default_rng(out * inn + chains)
    L, kw, unit = hardware_linear(rng, fmt, out, inn, group)
    spec = RowSpec(ROW_FORMATS[FAMILY[fmt]], word_lines=64, unit=unit)
    img = row_image(spec, chains=chains, chain_tiles=chain_tiles, **kw)
    want, (x, sh, emin) = run(L, kw, unit, rng, tokens=5)
    assert np.array_equal(row_reference(img, x, sh, emin), want)
    assert np.array_equal(row_dense_apply(row_dense(img), x, sh, emin), want)     # the chip model's form
    assert img.lines == -(-out // chains) * -(-inn // (chain_tiles * 64))


@pytest.mark.parametrize("fmt, group", [("w3o6", 64), ("nvfp4", 16), ("int8", 32)])
def test_rtl_equals_golden_in_stage_cycles(fmt, group):
    """Each token is held exactly stage_cycles cycles (start on the first): the outputs arrive
    in that window or the slots misalign, so the count equals the estimate's formula."""
    rng = np.random.default_rng(7)
    L, kw, unit = hardware_linear(rng, fmt, 20, 192, group)
    spec = RowSpec(ROW_FORMATS[FAMILY[fmt]], word_lines=32, unit=unit)
    img = row_image(spec, chains=3, chain_tiles=2, **kw)
    want, (x, sh, emin) = run(L, kw, unit, rng)
    got, cycles = simulate_row_linear(img, x, sh, emin, engine="amaranth")
    assert got.shape == want.shape == (3, 20)
    assert np.array_equal(got, want)
    per_token = stage_cycles(20, 192, chains=3, chain_tiles=2, cols=64)
    assert per_token == 7 * 2 + FILL_CYCLES
    assert cycles == 3 * per_token


def test_rtl_catches_a_corrupted_word_line():
    rng = np.random.default_rng(3)
    L, kw, unit = hardware_linear(rng, "w3o6", 8, 64, 64)
    spec = RowSpec(ROW_FORMATS["w3o6"], word_lines=8, unit=unit)
    img = row_image(spec, chains=1, chain_tiles=1, **kw)
    img.words[0][0][2] ^= 1 << 4                      # one code bit of row 2, column 1
    want, (x, sh, emin) = run(L, kw, unit, rng)
    got, _ = simulate_row_linear(img, x, sh, emin)
    assert np.count_nonzero(got != want) >= 1
    assert np.array_equal(np.delete(got, 2, axis=1), np.delete(want, 2, axis=1))


def test_image_rejects_what_the_word_cannot_hold():
    spec = RowSpec(ROW_FORMATS["w3o6"], word_lines=4)
    codes = np.zeros((2, 64), np.int64)
    ok = dict(group_scale=np.ones((2, 2), np.int64), mult=np.ones(2, np.int64), nshift=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"row 0, columns 0..63: 8 outliers; the w3o6 word line has 7 slots"):
        row_image(spec, np.where(np.arange(64) < 8, 1, 0)[None].repeat(2, 0), chains=1, chain_tiles=1, **ok)
    with pytest.raises(ValueError, match=r"needs 8 word lines; the tile has 4"):
        row_image(spec, np.zeros((8, 64), np.int64), chains=1, chain_tiles=1,
                  group_scale=np.ones((8, 2), np.int64), mult=np.ones(8, np.int64), nshift=np.zeros(8, np.int64))
    with pytest.raises(ValueError, match=r"row 0, columns 0..63: group scale 300 does not fit the w3o6 scale word"):
        row_image(spec, codes, chains=1, chain_tiles=1, **{**ok, "group_scale": np.full((2, 2), 300)})
    fp4 = RowSpec(ROW_FORMATS["fp4"], word_lines=4, unit=16)
    with pytest.raises(ValueError, match=r"row 0, columns 0..63: code 5 has no value in the fp4 word format"):
        row_image(fp4, np.full((2, 64), 5), chains=1, chain_tiles=1,
                  group_scale=np.ones((2, 4), np.int64), mult=np.ones(2, np.int64), nshift=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"Tile unit must divide the tile columns \(64\), not 48"):
        RowSpec(ROW_FORMATS["fp4"], unit=48)
    with pytest.raises(TypeError, match=r"Word lines must be a positive integer, not 0"):
        RowSpec(ROW_FORMATS["fp4"], word_lines=0)


def test_word_layout():
    w3 = RowSpec(ROW_FORMATS["w3o6"])
    # 64 x 3-bit codes, one 8-bit scale per 64-weight group, 7 slots of (6-bit column, 6-bit code)
    assert w3.word_bits == 64 * 3 + 8 + 7 * 12 == 284
    fp4 = RowSpec(ROW_FORMATS["fp4"], unit=16)
    assert fp4.word_bits == 64 * 4 + 4 * (4 + 5) == 292
    assert w3.counts()["rom_bits"] == 1024 * 284


VERILATOR, WHY = verilator_available()


@pytest.mark.rtl
@pytest.mark.skipif(not VERILATOR, reason=WHY)
@pytest.mark.parametrize("fmt, group", [("w3o6", 64), ("nvfp4", 16)])
def test_verilator_equals_golden_in_stage_cycles(fmt, group):
    rng = np.random.default_rng(11)
    L, kw, unit = hardware_linear(rng, fmt, 50, 320, group)
    spec = RowSpec(ROW_FORMATS[FAMILY[fmt]], word_lines=64, unit=unit)
    img = row_image(spec, chains=4, chain_tiles=2, **kw)
    want, (x, sh, emin) = run(L, kw, unit, rng, tokens=4)
    got, cycles = simulate_row_linear(img, x, sh, emin, engine="verilator")
    assert np.array_equal(got, want) and got.size == 4 * 50
    assert cycles == 4 * stage_cycles(50, 320, chains=4, chain_tiles=2, cols=64)


@pytest.mark.rtl
@pytest.mark.parametrize("family", ["w3o6", "fp4", "int4", "int8"])
def test_tile_cells_equal_yosys_stat(family):
    """Every adder, subtractor, negator, multiplier, mux, xor and register of the elaborated
    tile, by width, equals RowSpec.cells() (what the estimate prices); memory bits and the
    number of select comparators too. No multiplier per cell: only the slots', the scales'
    and (int5..8) the columns' shared ones."""
    from tapeout.hdl.checks import word_cells
    spec = RowSpec(ROW_FORMATS[family], word_lines=16, unit=16 if family == "fp4" else 32)
    rng = np.random.default_rng(0)
    words = [int.from_bytes(rng.bytes(64), "little") & ((1 << spec.word_bits) - 1) for _ in range(16)]
    got = word_cells(RowSerialTile(spec, words), "rowtile")
    counted = {k: n for k, n in got["cells"].items()
               if k.split("_")[0] in ("$add", "$sub", "$neg", "$mul", "$mux", "$pmux", "$xor", "$dff", "$sdff")}
    want = spec.counts()
    assert counted == want["cells"]
    assert got["memory_bits"] == want["rom_bits"] + want["lut_bits"]
    assert sum(n for k, n in got["cells"].items() if k.startswith(("$eq_", "$logic_not_"))) == want["comparators"]
    muls = sum(n for k, n in counted.items() if k.startswith("$mul"))
    assert muls == ROW_FORMATS[family].slots + spec.units + (64 if ROW_FORMATS[family].multiply else 0)


def test_base_view_loads_the_image_and_equals_golden():
    """The base die's view: the same datapath with writable word-line arrays, loaded with the
    image (one word per cycle) before the tokens."""
    rng = np.random.default_rng(5)
    L, kw, unit = hardware_linear(rng, "nvfp4", 12, 128, 16)
    spec = RowSpec(ROW_FORMATS["fp4"], word_lines=16, unit=unit)
    img = row_image(spec, chains=2, chain_tiles=1, **kw)
    want, (x, sh, emin) = run(L, kw, unit, rng)
    stats = {}
    got, cycles = simulate_row_linear(img, x, sh, emin, folded=False, stats=stats)
    assert np.array_equal(got, want) and got.size == 3 * 12
    assert stats["load_cycles"] == 2 * 1 * img.lines == 2 * 6 * 2       # chains x tiles x (slots x passes)
    assert cycles == 3 * stage_cycles(12, 128, chains=2, chain_tiles=1, cols=64)


def test_quantiser_respects_an_outlier_cap():
    from tapeout.compiler.errors import TapeoutError
    from tapeout.compiler.quant.formats import quantize
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[:, :8] *= 20                                   # loud columns want many outliers per group
    qt = quantize(w, "w3o6", outlier_frac=0.03, outlier_cap=2)
    per_group = qt.outliers.reshape(16, 2, 64).sum(-1)
    assert per_group.max() <= 2 and qt.outliers.sum() == round(0.03 * w.size)
    assert quantize(w, "w3o6", outlier_frac=0.03).outliers.reshape(16, 2, 64).sum(-1).max() > 2
    with pytest.raises(TapeoutError, match=r"--outlier-frac 0.05 needs 4 outliers per group of 64; the chip's "
                                           r"word line holds 2 \(use --outlier-frac <= 0.0312\)"):
        quantize(w, "w3o6", outlier_frac=0.05, outlier_cap=2)


def test_maskrom_compile_caps_w3o6_outliers_at_the_word_slots(tiny_llama, tmp_path, capsys):
    """The chip's word line has 7 outlier slots per 64 weights: a compile quantises with at most
    7 per group (recorded in the manifest) and refuses a fraction that needs more, before work."""
    import json

    from test_bad_input import assert_one_line_error, run_cli
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 64))
    code, _, err = run_cli(capsys, "compile", tiny_llama, "--target", "maskrom", "--format", "w3o6",
                           "--outlier-frac", "0.15", "--calib-tokens", ids, "-o", tmp_path / "bad")
    assert_one_line_error(code, err, "--outlier-frac 0.15 needs 10 outliers per group of 64",
                          "holds 7 (use --outlier-frac <= 0.1094)")
    assert not (tmp_path / "bad").exists()
    code, _, err = run_cli(capsys, "compile", tiny_llama, "--target", "maskrom", "--format", "w3o6",
                           "--group", "32", "--calib-tokens", ids, "-o", tmp_path / "bad")
    assert_one_line_error(code, err, "--group 32: the row-serial w3o6 word line holds one group of 64 weights")
    assert not (tmp_path / "bad").exists()
    code, out, err = run_cli(capsys, "compile", tiny_llama, "--target", "maskrom", "--format", "w3o6",
                             "--outlier-frac", "0.09", "--calib-tokens", ids, "-o", tmp_path / "ok")
    assert code == 0, err
    assert json.loads((tmp_path / "ok/manifest.json").read_text())["options"]["outlier_cap"] == 7
    rows = json.loads((tmp_path / "ok/report.json").read_text())["rowserial"]
    assert rows["equal"] is True and rows["values_checked"] > 0
