"""The whole chip generating tokens: the sequencer's token program, the chip model (via-layer
row images, the vector unit, a KV cache) against golden's windows, `tapeout run`, and the
sequencer's cycles against the estimate's."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from test_bad_input import assert_one_line_error, run_cli
from tapeout.cli import main

# (family, exporter, mask): every family of the real-exports matrix that generates text
FAMILIES = [("llama", "dynamo", False), ("llama", "legacy", False), ("gpt2", "dynamo", False),
            ("llama", "dynamo", True), ("qwen2", "dynamo", True), ("neox", "dynamo", True),
            ("phi3", "dynamo", True), ("gemma", "dynamo", True)]


def _export(tiny, fam, exp, mask):
    opset = 20 if exp == "dynamo" else 17
    return tiny.export(fam, exp, opset, "prefill", mask=mask)


@pytest.fixture(scope="module")
def chips(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("chips")
    out = {}
    for case in FAMILIES:
        out[case] = root / "-".join(map(str, case))
        assert main(["compile", str(_export(tiny, *case)), "--target", "maskrom", "--format", "nvfp4",
                     "-o", str(out[case])]) == 0
    return out


@pytest.mark.parametrize("case", FAMILIES, ids=lambda c: "-".join(map(str, c)))
def test_chip_model_logits_equal_golden_at_every_position(chips, case):
    from tapeout.backends.maskrom import chipmodel as cm
    man, prog, layers, plan, seq = cm.load_chip(chips[case])
    ids = np.random.default_rng(1).integers(0, prog.interface.vocab, seq.seq_len)
    gold = cm.golden_window_logits(prog, ids)                  # one window: golden's prefill
    chip = cm.ChipModel(prog, layers, plan, seq)
    checked = 0
    for t, tok in enumerate(ids):                              # the chip: one token at a time
        logits, cycles = chip.step(int(tok))
        assert np.array_equal(logits, gold[t]), f"position {t}"
        assert cycles == seq.cycles_at(t)
        checked += logits.size
    assert checked == seq.seq_len * prog.interface.vocab
    with pytest.raises(Exception, match="past the chip's context"):
        chip.step(0)


@pytest.mark.parametrize("case", FAMILIES[:3], ids=lambda c: "-".join(map(str, c)))
def test_run_chip_equals_golden(chips, capsys, tmp_path, case):
    ids = tmp_path / "p.npy"
    np.save(ids, np.array([3, 1, 4, 1, 5]))
    res = {}
    for engine in ("golden", "chip"):
        code, out, err = run_cli(capsys, "run", chips[case], "--tokens", ids, "--new-tokens", 11,
                                 "--engine", engine, "--json")
        assert code == 0, err
        res[engine] = json.loads(out)
    assert res["chip"]["tokens"] == res["golden"]["tokens"] and len(res["chip"]["tokens"]) == 11
    seq = json.loads((chips[case] / "chip/sequencer.json").read_text())
    assert res["chip"]["cycles"] == res["golden"]["cycles"]
    # token i comes out of position 4 + i, which attends 5 + i keys: the listing's fixed cycles plus
    # one cycle per attn_positions_per_cycle keys in every attention instruction
    ppc = seq["arch"]["attn_positions_per_cycle"]
    fixed = sum(i["cycles"] for i in seq["instructions"])
    attn = sum(i["per_key"] for i in seq["instructions"])
    assert res["chip"]["cycles"] == [fixed + attn * -(-(5 + i) // ppc) for i in range(11)]
    assert res["chip"]["cycles_per_token"] == pytest.approx(sum(res["chip"]["cycles"]) / 11)
    assert res["chip"]["engine"] == "chip"


def test_run_text_output_and_errors(chips, capsys, tmp_path):
    chip = chips[FAMILIES[0]]
    ids = tmp_path / "p.npy"
    np.save(ids, np.array([7, 8, 9]))
    code, out, err = run_cli(capsys, "run", chip, "--tokens", ids, "--new-tokens", 4)
    assert code == 0, err
    assert "cycles " in out and "tokens/s at 1 GHz" in out and "tokens    [" in out
    code, _, err = run_cli(capsys, "run", chip, "--tokens", ids, "--new-tokens", 15)   # 3 + 14 positions
    assert_one_line_error(code, err, "need 17 positions", "context is 16")
    code, _, err = run_cli(capsys, "run", chip, "--prompt", "hello", "--new-tokens", 2)
    assert_one_line_error(code, err, "needs a tokenizer")
    np.save(ids, np.array([7, 999]))
    code, _, err = run_cli(capsys, "run", chip, "--tokens", ids, "--new-tokens", 2)
    assert_one_line_error(code, err, "999", "vocabulary")
    # a damaged sequencer file is refused by the manifest's hashes
    bad = tmp_path / "bad"
    shutil.copytree(chip, bad)
    (bad / "chip/sequencer.json").write_text("{}")
    np.save(ids, np.array([7]))
    code, _, err = run_cli(capsys, "run", bad, "--tokens", ids, "--new-tokens", 2)
    assert_one_line_error(code, err, "sequencer.json")


def test_run_refuses_an_encoder(tiny, capsys, tmp_path):
    out = tmp_path / "bert"
    assert main(["compile", str(tiny.export("bert", "dynamo", 20, "prefill")), "--target", "maskrom",
                 "--format", "nvfp4", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chip"]["generates"] is False and "encoder" in report["chip"]["reason"]
    ids = tmp_path / "p.npy"
    np.save(ids, np.array([1, 2]))
    code, _, err = run_cli(capsys, "run", out, "--tokens", ids, "--new-tokens", 2)
    assert_one_line_error(code, err, "encoder")


def test_sequencer_artifacts(chips):
    chip = chips[FAMILIES[0]]
    seq = json.loads((chip / "chip/sequencer.json").read_text())
    units = [i["unit"] for i in seq["instructions"]]
    assert units[0] == "embed" and units[-1] == "argmax"
    assert units.count("attention") == len(seq["attention"]) == 2
    # every linear of the program is in exactly one fabric stage
    index = json.loads((chip / "layers/index.json").read_text())
    in_stages = [o for i in seq["instructions"] if i["unit"] == "fabric" for o in i["ops"]]
    assert sorted(in_stages) == sorted(lin["op"] for lin in index["linears"])
    trace = json.loads((chip / "chip/trace.json").read_text())
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(x) == len(seq["instructions"])
    assert sum(e["args"]["cycles"] for e in x) == seq["cycles"]["last_token"] == trace["otherData"]["cycles"]
    listing = (chip / "chip/sequencer.txt").read_text()
    assert listing.count("\n") == len(seq["instructions"]) + 3


@pytest.mark.parametrize("case", [FAMILIES[0], FAMILIES[2], FAMILIES[4]], ids=lambda c: "-".join(map(str, c)))
def test_sequencer_cycles_equal_the_estimate(chips, case):
    """The estimate (from shapes alone) and the compiled chip's sequencer count the same cycles
    for a token at the last position of the context."""
    from tapeout.backends.maskrom import chipmodel as cm
    from tapeout.backends.maskrom.rowchip import estimate_rowserial
    from tapeout.backends.model_shape import shape_from_summary
    man, prog, layers, plan, seq = cm.load_chip(chips[case])
    shape = shape_from_summary(prog.summary, context=seq.context)
    if case[0] == "gpt2":                        # learned positions: not visible in a summary
        shape = dataclasses.replace(shape, positions=seq.seq_len)
    est = estimate_rowserial(shape, "nvfp4", "n7", context=seq.context)
    assert est["cycles_per_token"] == seq.cycles_at(seq.context - 1)


def test_decode_exports_compile_and_say_why_they_do_not_generate(tiny, tmp_path, capsys):
    """A decode export compiles to a mask-ROM chip (fabric, LVS, checks on a seeded KV cache),
    but its rope tables hold one position: the report and `run` say so."""
    out = tmp_path / "dec"
    assert main(["compile", str(tiny.export("llama", "dynamo", 20, "decode")), "--target", "maskrom",
                 "--format", "nvfp4", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fabric_vs_golden"]["equal"] and report["fabric_vs_golden"]["values_checked"] > 0
    assert report["chip"]["generates"] is False and "decode export" in report["chip"]["reason"]
    ids = tmp_path / "p.npy"
    np.save(ids, np.array([1]))
    code, _, err = run_cli(capsys, "run", out, "--tokens", ids, "--new-tokens", 2)
    assert_one_line_error(code, err, "decode export", "prefill export")


def test_floorplan_is_to_scale_and_labelled(chips):
    """layout/die.png|svg and the GDS cell DIE: the estimate's blocks, to scale, not overlapping."""
    import gdstk
    chip = chips[FAMILIES[0]]
    fp = json.loads((chip / "report.json").read_text())["floorplan"]
    blocks, side = fp["blocks"], fp["side_mm"]
    assert sum(b["area_mm2"] for b in blocks) == pytest.approx(fp["area_mm2"], rel=1e-4)
    assert side * side == pytest.approx(fp["area_mm2"], rel=1e-3)
    names = [b["name"] for b in blocks]
    assert {"L0", "L1", "lm_head", "KV cache SRAM", "activation SRAM", "vector units", "attention", "sequencer",
            "embedding ROM", "I/O"} <= set(names)
    core = [b for b in blocks if b["kind"] != "io"]
    for b in blocks:                                  # drawn to scale: w x h is the block's area
        assert b["w_mm"] * b["h_mm"] == pytest.approx(b["area_mm2"], rel=2e-3, abs=1e-6) or b["kind"] == "io"
        assert -1e-6 <= b["x_mm"] and b["x_mm"] + b["w_mm"] <= side + 1e-3
    for i, a in enumerate(core):                      # core blocks do not overlap
        for b in core[i + 1:]:
            ox = min(a["x_mm"] + a["w_mm"], b["x_mm"] + b["w_mm"]) - max(a["x_mm"], b["x_mm"])
            oy = min(a["y_mm"] + a["h_mm"], b["y_mm"] + b["h_mm"]) - max(a["y_mm"], b["y_mm"])
            assert ox <= 1e-3 or oy <= 1e-3, (a["name"], b["name"])
    svg = (chip / "layout/die.svg").read_text()
    assert "KV cache SRAM" in svg and "mm²" in svg
    lib = gdstk.read_gds(str(chip / "layout/tiles.gds"))
    die = next(c for c in lib.cells if c.name == "DIE")
    assert len([p for p in die.polygons if p.layer == 10]) == len(blocks)
    assert sorted(lb.text.rsplit(" ", 2)[0] for lb in die.labels) == sorted(names)


def test_run_verilator_refuses_a_chip_too_large_for_the_rtl_path(chips, capsys, tmp_path, monkeypatch):
    from tapeout.backends.maskrom import chiprtl
    monkeypatch.setattr(chiprtl, "MAX_RTL_ROM_BITS", 1000)
    monkeypatch.setattr("tapeout.hdl.sim.verilator_available", lambda: (True, "stub"))
    ids = tmp_path / "p.npy"
    np.save(ids, np.array([1]))
    code, _, err = run_cli(capsys, "run", chips[FAMILIES[0]], "--tokens", ids, "--new-tokens", 2, "--engine", "verilator")
    assert_one_line_error(code, err, "Mbit of word-line ROM", "--engine chip")


def test_compile_arch_sizes_the_chip_and_refuses_fabric_keys(tiny, tmp_path, capsys):
    """`compile --arch` takes the chip's vector_lanes and attn_positions_per_cycle: they reach
    the sequencer (its cycles change as hdl.timing says) and the manifest; a fabric key, an
    unknown key or a bad value is one line, exit 2, no folder."""
    src = _export(tiny, "llama", "dynamo", False)
    out = tmp_path / "c16"
    code, _, err = run_cli(capsys, "compile", src, "--target", "maskrom", "--format", "nvfp4", "-o", out,
                           "--arch", "vector_lanes=16", "--arch", "attn_positions_per_cycle=2")
    assert code == 0, err
    seq = json.loads((out / "chip/sequencer.json").read_text())
    assert seq["arch"]["vector_lanes"] == 16 and seq["arch"]["attn_positions_per_cycle"] == 2
    norm = next(i for i in seq["instructions"] if i["stage"] == "norm_1")
    assert norm["cycles"] == 3 * (64 // 16) + 108             # tiny Llama: hidden 64, RMSNorm
    assert json.loads((out / "manifest.json").read_text())["options"]["arch"] == {
        "vector_lanes": 16, "attn_positions_per_cycle": 2}
    for bad, says in ((["--arch", "word_lines=512"], "word_lines"), (["--arch", "lanes=3"], "lanes"),
                      (["--arch", "vector_lanes=0"], "vector_lanes")):
        dst = tmp_path / f"bad-{says}"
        code, _, err = run_cli(capsys, "compile", src, "--target", "maskrom", "--format", "nvfp4", "-o", dst, *bad)
        assert_one_line_error(code, err, says)
        assert not dst.exists()
