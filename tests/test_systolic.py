"""The systolic backend: ISA encoding, whole tiny models through the ISA simulator against
golden, schedule checks, corrupted microcode, and tiles from the microcode replayed on the
Amaranth systolic array (cycle model vs RTL cycles)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.backends.systolic.isa import INSTR, OPS, WORD0, WORD1, IsaError, decode, encode
from tapeout.backends.systolic.isasim import run_program
from tapeout.backends.systolic.lower import lower
from tapeout.backends.systolic.machine import Machine
from tapeout.cli import main
from tapeout.compiler.frontend import frontend
from tapeout.compiler.qmodel import QuantConfig, quantize_model

from test_bad_input import assert_one_line_error, run_cli

WIDTH = {name: width for name, _, width in WORD0 + WORD1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(*(st.integers(0, (1 << WIDTH[f]) - 1 if f != "op" else len(OPS) - 1)
                            for f in INSTR.names)), min_size=1, max_size=40))
def test_encode_decode_round_trip(rows):
    prog = np.array(rows, INSTR)
    data = encode(prog)
    assert len(data) == 16 * len(prog)
    assert np.array_equal(decode(data), prog)


def test_encoding_rejects_overflow_and_bad_bytes():
    prog = np.zeros(2, INSTR)
    prog["op"] = OPS.index("MATMUL")
    prog["t"][1] = 1 << 12
    with pytest.raises(IsaError, match=r"^instruction 1 \(MATMUL\): field t=4096 does not fit its 12 bits"):
        encode(prog)
    with pytest.raises(IsaError, match="not a multiple of 16"):
        decode(b"\0" * 17)
    with pytest.raises(IsaError, match="unknown opcode 31"):
        decode(bytes([31]) + b"\0" * 15)


@pytest.fixture(scope="module")
def golden_llama(tiny):
    g = frontend(tiny.export("llama", "dynamo", 20, "prefill"))
    return quantize_model(g, QuantConfig("nvfp4", quantize_head=True), None).golden()


def feeds_of(gm):
    from tapeout.backends.systolic.compile import sample_feeds
    return sample_feeds(gm)


@pytest.mark.parametrize("n", [8, 16, 32])
def test_tiny_llama_isa_simulator_equals_golden(golden_llama, n):
    m = Machine(n=n)
    low = lower(golden_llama, m)
    low.schedule.verify()
    s = low.schedule
    assert s.makespan >= s.lower_bound >= max(s.critical_path, s.resource_bound) > 0
    feeds = feeds_of(golden_llama)
    stats = {}
    out = run_program(golden_llama, m, decode(encode(low.program)), feeds, stats)
    gold = golden_llama.run(feeds)
    assert out.keys() == gold.keys() and all(np.array_equal(out[k], gold[k]) for k in gold)
    assert stats["cycles"] == s.makespan                 # the simulator's cycle model == the schedule
    assert stats["per_op"]["MATMUL"] > 0


def test_a_schedule_that_reads_too_early_is_rejected(golden_llama):
    m = Machine()
    low = lower(golden_llama, m)
    prog = low.program.copy()
    j = int(np.flatnonzero(prog["op"] == OPS.index("MATMUL"))[5])
    prog["cycle"][j] = prog["cycle"][j - 1]              # with its PRELOAD, before the weights are in
    with pytest.raises(IsaError, match=rf"^instruction {j} \(MATMUL\) issues at cycle \d+ but reads the "
                                       r"array's weights, ready at cycle \d+"):
        run_program(golden_llama, m, prog, feeds_of(golden_llama))


@pytest.mark.parametrize("fam, variant, fmt", [("llama", "prefill", "nvfp4"), ("gpt2", "prefill", "int8"),
                                               ("bert", "prefill", "w3o6")])
def test_compile_systolic_and_simulate(tiny, tmp_path, capsys, fam, variant, fmt):
    model = tiny.export(fam, "dynamo", 20, variant)
    out = tmp_path / "sys"
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 256, 64))
    assert main(["compile", str(model), "--target", "systolic", "--format", fmt, "--calib-tokens", str(ids),
                 "-o", str(out)]) == 0
    capsys.readouterr()
    for f in ("program.bin", "program.lst", "schedule.json", "trace.json", "report.json", "manifest.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["isa_vs_golden"]["mismatches"] == 0 and rep["isa_vs_golden"]["checked"] > 0
    assert all(0 < r["utilisation"] <= 1 for r in rep["layers"])
    trace = json.loads((out / "trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) > rep["instructions"] // 2
    code, stdout, err = run_cli(capsys, "simulate", str(out), "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["mismatches"] == 0 and r["checked"] == rep["isa_vs_golden"]["checked"]
    assert r["cycles"] == rep["schedule"]["makespan"]


def test_compile_systolic_is_deterministic(tiny, tmp_path):
    model = tiny.export("llama", "dynamo", 20, "prefill")
    for d in ("a", "b"):
        assert main(["compile", str(model), "--target", "systolic", "--format", "nvfp4", "-o",
                     str(tmp_path / d)]) == 0
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text())["artifacts"] for d in "ab")
    assert a == b and "program.bin" in a


def test_corrupted_microcode_is_caught(tiny, tmp_path, capsys):
    model = tiny.export("llama", "dynamo", 20, "prefill")
    out = tmp_path / "sys"
    assert main(["compile", str(model), "--target", "systolic", "--format", "nvfp4", "-o", str(out)]) == 0
    prog = decode((out / "program.bin").read_bytes())
    j = int(np.flatnonzero(prog["op"] == OPS.index("PRELOAD"))[3])
    prog["k"][j] += 1                                    # a PRELOAD of the wrong K tile
    (out / "program.bin").write_bytes(encode(prog))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "simulate", str(out), "--json")
    assert_one_line_error(code, err, "program.bin: instruction", "expects weights")


def test_bad_machine_option(tiny, tmp_path, capsys):
    model = tiny.export("llama", "dynamo", 20, "prefill")
    code, _, err = run_cli(capsys, "compile", str(model), "--target", "systolic", "--format", "nvfp4",
                           "--machine", "n=0", "-o", str(tmp_path / "x"))
    assert_one_line_error(code, err, "machine option n must be a positive integer, not 0")
    assert not (tmp_path / "x").exists()


def test_microcode_tiles_replayed_on_the_systolic_array_rtl(golden_llama):
    """K tiles of one linear, exactly as the microcode's PRELOAD/MATMUL pairs carry them, on the
    Amaranth array: partial sums equal, and the cycle model's cycles for the chain equal RTL's."""
    from tapeout.backends.systolic.replay import replay_tiles
    r = replay_tiles(golden_llama, Machine(n=8), feeds_of(golden_llama), layer_name=None, tiles=3)
    assert r["checked"] == 3 * r["tokens"] * 8 and r["mismatches"] == 0
    assert r["isa_cycles"] == r["rtl_cycles"], r
