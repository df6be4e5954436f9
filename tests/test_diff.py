"""`tapeout diff` on tiny chips: itself, two outlier fractions, two formats on one base, and a
base mismatch."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tapeout.cli import main

from test_bad_input import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def chips(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("chips")
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 64))
    llama = tiny.export("llama", "dynamo", 20, "prefill")
    gpt2 = tiny.export("gpt2", "dynamo", 20, "prefill")
    out = {}
    for name, model, extra in (("w1", llama, ["--format", "w3o6", "--outlier-frac", "0.01"]),
                               ("w3", llama, ["--format", "w3o6", "--outlier-frac", "0.03"]),
                               ("nv", llama, ["--format", "nvfp4"]), ("mx", llama, ["--format", "mxfp4"]),
                               ("gpt2", gpt2, ["--format", "w3o6"])):
        out[name] = root / name
        assert main(["compile", str(model), "--target", "maskrom", "--calib-tokens", str(ids), *extra,
                     "-o", str(out[name])]) == 0
    return out


def diff_json(capsys, a, b, *extra):
    code, stdout, err = run_cli(capsys, "diff", a, b, "--json", *extra)
    return code, (json.loads(stdout) if stdout.strip() else None), err


def test_self_diff_is_zero(chips, capsys):
    code, r, _ = diff_json(capsys, chips["w1"], chips["w1"], "--fail-on-change")
    assert code == 0 and r["base_identical"] and r["changed_vias"] == 0
    assert r["tiles_untouched"] == r["tiles"] == 24 and r["per_tile"] == []
    assert r["total_vias"] > 90000


def test_two_outlier_fractions_on_one_base(chips, capsys, tmp_path):
    png, gds = tmp_path / "heat.png", tmp_path / "xor.gds"
    code, r, _ = diff_json(capsys, chips["w1"], chips["w3"], "--fail-on-change", "--png", png,
                           "--gds-xor", "0", gds)
    assert code == 1 and r["base_identical"]
    assert {"base_identical", "total_vias", "changed_vias", "layers", "per_layer", "per_tile"} <= set(r)
    L = r["layers"]
    assert L["V_FINE"]["added"] > L["V_FINE"]["removed"]         # 3% outliers need more fine vias
    assert r["changed_vias"] == sum(v["changed"] for v in L.values())
    assert r["changed_vias"] == sum(v["changed"] for v in r["per_layer"].values())
    assert sum(t["V_CODE"]["added"] + t["V_FINE"]["added"] for t in r["per_tile"]) == \
        L["V_CODE"]["added"] + L["V_FINE"]["added"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import gdstk
    polys = gdstk.read_gds(str(gds)).cells[0].polygons
    kinds = {(p.layer, p.datatype) for p in polys}
    assert {(101, 1), (101, 2), (102, 2)} <= kinds
    assert r["gds_xor"]["vias"]["V_FINE/2"] == sum(1 for p in polys if (p.layer, p.datatype) == (102, 2))


def test_two_formats_share_the_fp4_base(chips, capsys):
    code, r, _ = diff_json(capsys, chips["nv"], chips["mx"])
    assert code == 0 and r["base_identical"] and r["changed_vias"] > 0
    assert r["layers"]["V_FINE"]["changed"] > 0 or r["layers"]["V_CODE"]["changed"] > 0


def test_base_mismatch_names_the_parameters(chips, capsys):
    code, _, err = run_cli(capsys, "diff", chips["w1"], chips["nv"])
    assert_one_line_error(code, err, "different base dies", "family.coarse", "--force-shapes")
    code, r, _ = diff_json(capsys, chips["w1"], chips["nv"], "--force-shapes")
    assert code == 0 and not r["base_identical"] and all(x["same_shape"] for x in r["shapes"])


def test_same_family_different_models(chips, capsys):
    code, r, _ = diff_json(capsys, chips["w1"], chips["gpt2"])
    assert code == 0 and r["base_identical"]          # one base die serves both models
    assert r["fraction"] > 0.5


def test_text_summary_line(chips, capsys):
    code, out, _ = run_cli(capsys, "diff", chips["w1"], chips["w3"])
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith("base identical; 2 layers differ: ") and "of 24 tiles untouched" in first


def test_diff_bad_input(chips, capsys, tmp_path):
    code, _, err = run_cli(capsys, "diff", chips["w1"], tmp_path)
    assert_one_line_error(code, err, "not a maskrom compile output")
