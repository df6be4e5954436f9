"""RTL simulation of compiled tiny chips through `tapeout simulate`: every linear of the tiny
Llama (4 tokens), GPT-2 and BERT (2 tokens) on the row-serial fabric under the Amaranth
simulator, Verilator on two linears, the parallel fabric on two (default tier); every linear
of every chip on all 16 tokens under Verilator in the `rtl` tier."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _support import rehash
from tapeout.cli import main
from test_bad_input import assert_one_line_error, run_cli


def verilator_ok() -> tuple[bool, str]:
    from tapeout.hdl.sim import verilator_available
    return verilator_available()


@pytest.fixture(scope="module")
def chips(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("rtlchips")
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 64))
    out = {}
    for fam, fmt in (("llama", "w3o6"), ("gpt2", "nvfp4"), ("bert", "w3o6")):
        out[fam] = root / fam
        assert main(["compile", str(tiny.export(fam, "dynamo", 20, "prefill")), "--target", "maskrom",
                     "--format", fmt, "--calib-tokens", str(ids), "-o", str(out[fam])]) == 0
    return out


def simulate_json(capsys, chip, *extra):
    code, stdout, err = run_cli(capsys, "simulate", chip, "--json", *extra)
    return code, json.loads(stdout) if stdout.strip() else None, err


# every linear of every tiny chip on a few tokens (a row-serial linear takes one cycle per word
# line: ~500 cycles/s on the Amaranth simulator here, ~10 s per chip and token pair)
@pytest.mark.parametrize("fam, tokens", [("llama", 4), ("gpt2", 2), ("bert", 2)])
def test_every_linear_bit_exact_on_the_amaranth_simulator(chips, capsys, fam, tokens):
    code, r, err = simulate_json(capsys, chips[fam], "--tokens", str(tokens))
    assert code == 0, err
    index = json.loads((chips[fam] / "layers/index.json").read_text())
    expected = sum(tokens * lin["shape"][0] for lin in index["linears"])     # tokens x every output
    assert r["engine"] == "amaranth" and r["fabric"] == "rowserial" and r["linears"] == len(index["linears"])
    assert r["checked"] == expected and r["mismatches"] == 0
    assert all(x["checked"] == tokens * x["shape"][0] and x["rtl"] == "row-folded" for x in r["per_linear"])
    # the RTL's cycles are the estimate's stage formula: rows / chains x passes + fill, per token
    report = json.loads((chips[fam] / "report.json").read_text())["rowserial"]
    assert r["cycles"] == tokens * report["linear_cycles"]


def test_parallel_fabric_on_two_linears(chips, capsys):
    code, r, err = simulate_json(capsys, chips["llama"], "--fabric", "parallel",
                                 "--layer", "layers.0.k_proj", "--layer", "lm_head")
    assert code == 0, err
    assert r["fabric"] == "parallel" and r["checked"] == 16 * (32 + 256) and r["mismatches"] == 0
    assert r["cycles"] == 2 * (16 + 2)              # one token per cycle, two cycles of latency


def test_verilator_on_two_linears(chips, capsys):
    ok, why = verilator_ok()
    if not ok:
        pytest.skip(f"verilator not available: {why}")
    code, r, err = simulate_json(capsys, chips["llama"], "--engine", "verilator",
                                 "--layer", "layers.0.k_proj", "--layer", "lm_head")
    assert code == 0, err
    assert r["engine"] == "verilator" and r["checked"] == 16 * (32 + 256) and r["mismatches"] == 0


@pytest.mark.parametrize("fabric, kind", [("rowserial", "row-base"), ("parallel", "base")])
def test_base_die_rtl_on_a_tiny_linear(chips, capsys, fabric, kind):
    """--rtl base: the base die's tiles with the via layers loaded as data (Amaranth simulator)."""
    code, r, err = simulate_json(capsys, chips["llama"], "--rtl", "base", "--fabric", fabric,
                                 "--layer", "layers.0.k_proj")
    assert code == 0, err
    assert r["rtl"] == "base" and [x["rtl"] for x in r["per_linear"]] == [kind]
    assert r["checked"] == 16 * 32 and r["mismatches"] == 0


@pytest.mark.rtl
@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
def test_every_linear_bit_exact_under_verilator(chips, capsys, fam):
    ok, why = verilator_ok()
    if not ok:
        pytest.skip(f"verilator not available: {why}")
    code, r, err = simulate_json(capsys, chips[fam], "--engine", "verilator")
    assert code == 0, err
    assert r["mismatches"] == 0 and r["checked"] == sum(16 * x["shape"][0] for x in r["per_linear"])


def test_a_corrupted_via_is_caught(chips, capsys, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(chips["llama"], bad)
    data = bytearray((bad / "layers/V_CODE.bin").read_bytes())
    record = json.loads((bad / "layers/index.json").read_text())["record_bytes"]["V_CODE"]
    k_proj = next(x for x in json.loads((bad / "layers/index.json").read_text())["linears"]
                  if x["role"] == "layers.0.k_proj")
    data[k_proj["first_tile"] * record + 5] ^= 0x11          # move two vias of one row
    (bad / "layers/V_CODE.bin").write_bytes(bytes(data))
    rehash(bad, "layers/V_CODE.bin")
    code, r, _ = simulate_json(capsys, bad, "--layer", "layers.0.k_proj")
    assert code == 1 and r["mismatches"] > 0 and r["checked"] == 16 * 32


def test_simulate_bad_input(chips, capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", tmp_path)
    assert_one_line_error(code, err, "not a compile folder")
    code, _, err = run_cli(capsys, "simulate", chips["llama"], "--layer", "layers.9")
    assert_one_line_error(code, err, "matches no linear")
