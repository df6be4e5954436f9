"""Mask-ROM backend on the tiny models: base dies, via layers, extraction (LVS), fabric == golden."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tapeout.backends.maskrom.base import FAMILIES, choose_base, split_alphabets
from tapeout.backends.maskrom.compile import specs_of
from tapeout.backends.maskrom.fabric import fabric_model
from tapeout.backends.maskrom.layers import build_layers, compose, decompose, extract, lvs
from tapeout.cli import main
from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.frontend import frontend
from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, window_feeds, windows

FORMATS = [("w3o6", None), ("nvfp4", None), ("mxfp4", None), ("int4", 32), ("int8", None)]


def quantized(tiny, fam, fmt, group=None):
    g = frontend(tiny.export(fam, "dynamo", 20, "prefill"))
    stats = calibrate(g, windows(np.random.default_rng(0).integers(0, 256, 64), 16), hessian=True)
    return quantize_model(g, QuantConfig(fmt, group_size=group, quantize_head=True), stats)


def chip(qm):
    specs = specs_of(qm.program())
    base = choose_base(qm.config.fmt, [s.shape for s in specs], 0)
    return base, specs, build_layers(base, specs)


@pytest.mark.parametrize("fmt", ["w3o6", "mxfp4", "int4", "int8"])
def test_alphabets_express_every_code_of_the_format(fmt):
    fam = next(f for f in FAMILIES.values() if fmt in f.formats)
    lo, hi = {"w3o6": (-32, 31), "mxfp4": (-12, 12), "int4": (-8, 7), "int8": (-128, 127)}[fmt]
    codes = np.arange(lo, hi + 1)
    if fmt == "mxfp4":
        codes = np.array([0] + [s * v for v in (1, 2, 3, 4, 6, 8, 12) for s in (1, -1)])
    vc, vf = decompose(codes, fam)
    assert np.array_equal(compose(vc, vf, fam), codes)
    assert np.all((vc == 0) == (codes - (codes & ((1 << fam.fine_bits) - 1)) == 0))
    assert split_alphabets(6, 2)[1] == (1, 2, 3)


@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_layout_round_trip_and_fabric_equals_golden(tiny, fam, fmt, group):
    qm = quantized(tiny, fam, fmt, group)
    base, specs, layers = chip(qm)
    compared = lvs(layers, specs)
    assert compared == sum(s.codes.size + s.group_scale.size + 3 * s.shape[0] for s in specs)
    for i, s in enumerate(specs):          # extraction reads the layers alone
        assert np.array_equal(extract(layers, i).codes, np.asarray(qm.weights[s.name].codes))
    g = qm.graph
    feeds = window_feeds(g, np.random.default_rng(4).integers(0, 256, 16))
    fab = fabric_model(g, layers).run(feeds)[g.outputs[0]]
    gold = qm.golden().run(feeds)[g.outputs[0]]
    assert fab.shape == gold.shape and np.array_equal(fab, gold)
    assert fab.size == 16 * 256


def test_base_is_shared_by_two_models_of_a_family(tiny):
    a = chip(quantized(tiny, "llama", "w3o6"))
    b = chip(quantized(tiny, "gpt2", "w3o6"))
    assert a[0].canonical() == b[0].canonical() and a[0].sha256 == b[0].sha256
    assert a[2].sha256 != b[2].sha256          # the two via layers carry the difference
    nv, mx = chip(quantized(tiny, "llama", "nvfp4")), chip(quantized(tiny, "llama", "mxfp4"))
    assert nv[0].sha256 == mx[0].sha256 and nv[0].family.name == "fp4"


def test_a_flipped_via_fails_lvs(tiny):
    from dataclasses import replace
    base, specs, layers = chip(quantized(tiny, "llama", "w3o6"))
    data = bytearray(layers.v_code)
    data[100] ^= 0x03
    with pytest.raises(TapeoutError, match="LVS mismatch"):
        lvs(replace(layers, v_code=bytes(data)), specs)


def test_base_selection(tiny):
    shapes = [(64, 64)] * 100
    assert choose_base("w3o6", shapes, 0).tiles == 256
    with pytest.raises(TapeoutError, match="needs 100 tiles"):
        choose_base("w3o6", shapes, 0, "w3o6-t64-s1m")
    with pytest.raises(TapeoutError, match="does not serve nvfp4"):
        choose_base("nvfp4", shapes, 0, "w3o6-t256-s4m")
    with pytest.raises(TapeoutError, match="unknown base"):
        choose_base("w3o6", shapes, 0, "nope")


def test_compile_maskrom_cli(tmp_path, tiny_llama, capsys):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 64))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["compile", str(tiny_llama), "--target", "maskrom", "--format", "w3o6",
                     "--calib-tokens", str(ids), "--gds-tiles", "0,3", "-o", str(out)]) == 0
        outs.append(out)
    report = json.loads((outs[0] / "report.json").read_text())
    assert report["lvs"]["equal"] and report["fabric_vs_golden"]["equal"]
    assert report["fabric_vs_golden"]["values_checked"] == 16 * 256
    assert report["tiles_used"] == 24 and report["base"] == "w3o6-t64-s1m"
    files = sorted(p.relative_to(outs[0]).as_posix() for p in outs[0].rglob("*") if p.is_file())
    assert {"layers/V_CODE.bin", "layers/V_FINE.bin", "layout/tiles.gds", "layout/die.png",
            "base/base.json", "manifest.json"} <= set(files)
    for f in files:                             # deterministic, byte for byte
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    import gdstk
    lib = gdstk.read_gds(str(outs[0] / "layout/tiles.gds"))
    layers = {(p.layer, p.datatype) for c in lib.cells for p in c.polygons}
    assert {(101, 0), (102, 0), (1, 0), (2, 0), (3, 0)} <= layers
    capsys.readouterr()
