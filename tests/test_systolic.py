"""The systolic backend: ISA encoding, whole tiny models (prefill and decode) through the ISA
simulator against golden, attention on the array, capacity checks, schedule checks, corrupted
microcode, and tiles from the microcode replayed on the systolic array RTL (Amaranth; Verilator
in the ``rtl`` tier) with the cycle model against RTL cycles."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.backends.systolic.isa import BUF_SCORES, BUF_VALUES, INSTR, OPS, WORD0, WORD1, IsaError, decode, encode
from tapeout.backends.systolic.isasim import run_program as _run_program
from tapeout.backends.systolic.weights import build_image
from tapeout.backends.systolic.lower import lower
from tapeout.backends.systolic.machine import Machine
from tapeout.cli import main
from tapeout.compiler.frontend import frontend
from tapeout.compiler.qmodel import QuantConfig, quantize_model
from tapeout.hdl.sim import verilator_available

from _support import rehash
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


def run_program(ip, m, prog, feeds, stats=None, **kw):
    """The ISA simulator with the weight image the compiler writes for ``ip``."""
    return _run_program(ip, m, prog, feeds, stats, image=build_image(ip, m), **kw)


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
    rehash(out, "program.bin")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "simulate", str(out), "--json")
    assert_one_line_error(code, err, "program.bin: instruction", "expects weights")


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 5), n_in=st.integers(1, 37), seed=st.integers(0, 2**31))
def test_weight_codes_pack_and_unpack(bits, rows, n_in, seed):
    from tapeout.backends.systolic.weights import pack_codes, unpack_codes
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = np.random.default_rng(seed).integers(lo, hi + 1, (rows, n_in))
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, -(-n_in * bits // 8))
    assert np.array_equal(unpack_codes(packed, n_in, bits), codes)


def test_weight_codes_layout_is_the_documented_one():
    from tapeout.backends.systolic.weights import pack_codes
    # docs/isa.md: code c holds bits c*bits.. of the row, bit b is bit b%8 of byte b//8, two's complement
    # codes 1, -1, 2 at 3 bits: bits 0-2 = 1,0,0; bits 3-5 = 1,1,1; bits 6-8 = 0,1,0
    assert pack_codes(np.array([[1, -1, 2]]), 3).tolist() == [[0b10111001, 0b0]]
    assert pack_codes(np.array([[-2, 1]]), 4).tolist() == [[0x1E]]


def test_weight_image_holds_every_strip_the_program_loads(golden_llama):
    from tapeout.backends.systolic.weights import WeightImage
    m = Machine(n=8)
    low = lower(golden_llama, m)
    image = WeightImage(build_image(golden_llama, m), m)
    loads = low.program[low.program["op"] == OPS.index("LOAD_W")]
    assert len(loads) > 0
    for r in loads[:50]:
        layer, i = int(r["layer"]), int(r["i"])
        L = golden_llama.linears[golden_llama.ops[layer].name]
        w = image.strip(layer, i)
        rows = slice(i * m.n, (i + 1) * m.n)
        assert np.array_equal(w.codes, L.codes[rows]) and np.array_equal(w.mult, L.mult[rows])
        assert np.array_equal(w.group_scale, L.group_scale[rows]) and np.array_equal(w.shift, L.shift[rows])


def test_a_damaged_weight_image_is_caught(tiny, tmp_path, capsys):
    """weights.bin is what the simulator computes with: a flipped bit is refused by the hash
    check, and with a matching hash it changes the outputs (exit 1, mismatches counted)."""
    model = tiny.export("llama", "dynamo", 20, "prefill")
    out = tmp_path / "sys"
    assert main(["compile", str(model), "--target", "systolic", "--format", "nvfp4", "-o", str(out)]) == 0
    from tapeout.backends.systolic.weights import HEADER, STRIP
    data = bytearray((out / "weights.bin").read_bytes())
    table = np.frombuffer(bytes(data[HEADER.itemsize:]), STRIP, count=int(np.frombuffer(data[8:12], "<u4")[0]))
    off = int(table[0]["offset"])
    data[off] ^= 0x11                                    # two codes of the first strip
    (out / "weights.bin").write_bytes(bytes(data))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "simulate", str(out), "--json")
    assert_one_line_error(code, err, "weights.bin", "sha256")
    rehash(out, "weights.bin")
    code, stdout, err = run_cli(capsys, "simulate", str(out), "--json")
    assert code == 1, err
    r = json.loads(stdout)
    assert r["checked"] > 0 and r["mismatches"] > 0
    # a truncated image: one line naming the file
    (out / "weights.bin").write_bytes(bytes(data[:off + 3]))
    rehash(out, "weights.bin")
    code, _, err = run_cli(capsys, "simulate", str(out), "--json")
    assert_one_line_error(code, err, "weights.bin: weight image strip", "beyond the image")


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


def test_attention_runs_on_the_array(golden_llama):
    """Both attention matmuls are PRELOAD/MATMUL tiles (K, then V stationary; P streamed as three
    7-bit digits), the softmax is the only attention work left on the vector unit."""
    m = Machine()
    prog = lower(golden_llama, m).program
    att = {j for j, op in enumerate(golden_llama.order) if op.kind == "attention"}
    on_layer = np.isin(prog["layer"], list(att))
    ops = {OPS[o] for o in np.unique(prog["op"][on_layer])}
    assert ops == {"QUANT_A", "PRELOAD", "MATMUL", "REQUANT", "SOFTMAX"}
    mm = prog[on_layer & (prog["op"] == OPS.index("MATMUL"))]
    assert set(np.unique(mm["buf"])) == {BUF_SCORES, BUF_VALUES}
    assert set(np.unique(mm["flags"][mm["buf"] == BUF_VALUES] >> 2)) == {0, 1, 2}
    # a P.V MATMUL that streams the wrong digit changes the output: the digits are really used
    feeds = feeds_of(golden_llama)
    bad = prog.copy()
    j = int(np.flatnonzero(on_layer & (prog["op"] == OPS.index("MATMUL")) & (prog["buf"] == BUF_VALUES)
                           & (prog["flags"] >> 2 == 1))[0])
    bad["flags"][j] ^= 3 << 2                                        # digit 1 -> digit 2
    got, gold = run_program(golden_llama, m, bad, feeds), golden_llama.run(feeds)
    assert any(not np.array_equal(got[k], gold[k]) for k in gold)


def test_decode_step_reports_cycles_per_token(tiny, tmp_path, capsys):
    model = tiny.export("llama", "dynamo", 20, "decode")
    out = tmp_path / "sys"
    code, stdout, err = run_cli(capsys, "compile", model, "--target", "systolic", "--format", "nvfp4", "-o", out)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "decode" and rep["past_len"] > 0 and rep["tokens_per_run"] == 1
    assert rep["isa_vs_golden"]["mismatches"] == 0 and rep["isa_vs_golden"]["checked"] > 0
    assert rep["cycles_per_token"] == rep["isa_vs_golden"]["cycles"] == rep["schedule"]["makespan"]
    assert rep["tokens_per_s"] == pytest.approx(rep["machine"]["clock_hz"] / rep["cycles_per_token"], rel=1e-6)
    roof = rep["memory_roofline"]
    assert 0 < roof["cycles"] <= rep["cycles_per_token"] and roof["weight_bytes"] > 0
    assert rep["array_roofline"]["cycles"] <= rep["cycles_per_token"]
    assert f"decode step {rep['cycles_per_token']} cycles/token" in stdout
    assert "weight-DMA roofline" in stdout
    assert {r["kind"] for r in rep["layers"]} == {"linear", "attention"}
    code, stdout, err = run_cli(capsys, "simulate", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["cycles"] == rep["cycles_per_token"]


def test_prefill_reports_cycles_per_prefill_and_per_token(tiny, tmp_path, capsys):
    model = tiny.export("llama", "dynamo", 20, "prefill")
    out = tmp_path / "sys"
    code, stdout, err = run_cli(capsys, "compile", model, "--target", "systolic", "--format", "nvfp4", "-o", out)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "prefill" and rep["cycles_per_prefill"] == rep["schedule"]["makespan"]
    assert rep["cycles_per_token"] == pytest.approx(rep["cycles_per_prefill"] / rep["tokens_per_run"], abs=0.05)
    assert f"prefill {rep['tokens_per_run']} tokens" in stdout
    # capacity: every layer's need is reported and fits the machine
    cap = rep["capacity"]
    assert 0 < cap["acc"]["peak_bytes"] <= cap["acc"]["bytes"] == rep["machine"]["acc_kib"] * 1024
    assert 0 < cap["spad"]["peak_bytes"] <= cap["spad"]["bytes"] == rep["machine"]["spad_kib"] * 1024
    assert all(r["acc_bytes"] > 0 and r["spad_bytes"] > 0 for r in rep["layers"])
    assert cap["acc"]["peak_bytes"] == max(r["acc_bytes"] for r in rep["layers"])


@pytest.mark.parametrize("option, needles", [
    ("acc_kib=1", ("layer linear_node_linear: two accumulator tiles of 16 tokens x 16 columns x 6 B need 3072 B",
                   "acc_kib=1 holds 1024 B")),
    ("spad_kib=4", ("layer linear_node_linear: needs 4928 B of scratchpad", "spad_kib=4 holds 4096 B")),
])
def test_capacity_is_enforced(tiny, tmp_path, capsys, option, needles):
    model = tiny.export("llama", "dynamo", 20, "prefill")
    code, _, err = run_cli(capsys, "compile", model, "--target", "systolic", "--format", "nvfp4",
                           "--machine", option, "-o", tmp_path / "x")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "x").exists()


def test_attention_score_tiles_replayed_on_the_rtl(golden_llama):
    from tapeout.backends.systolic.replay import replay_tiles
    att = next(op.name for op in golden_llama.order if op.kind == "attention")
    r = replay_tiles(golden_llama, Machine(n=8), feeds_of(golden_llama), layer_name=att, tiles=2)
    assert r["kind"] == "attention" and r["mismatches"] == 0 and r["checked"] == 2 * r["tokens"] * 8
    assert r["isa_cycles"] == r["rtl_cycles"], r


VERILATOR, WHY = verilator_available()


@pytest.mark.rtl
@pytest.mark.skipif(not VERILATOR, reason=WHY)
def test_microcode_tiles_replayed_on_verilator(golden_llama):
    """Every K tile of a linear's first output tile and an attention's score tiles, on the
    Verilator build of the array: partial sums equal and cycle error 0."""
    from tapeout.backends.systolic.replay import replay_tiles
    m, feeds = Machine(n=16), feeds_of(golden_llama)
    att = next(op.name for op in golden_llama.order if op.kind == "attention")
    for name, tiles in ((None, 64), (att, 64)):
        r = replay_tiles(golden_llama, m, feeds, layer_name=name, tiles=tiles, engine="verilator")
        assert r["engine"] == "verilator" and r["mismatches"] == 0 and r["checked"] > 0, r
        assert r["cycle_error"] == 0 and r["isa_cycles"] == r["rtl_cycles"], r
        print(f"\n{r['kind']} {r['layer']}: {r['tiles']} tiles, {r['rtl_cycles']} cycles, ISA-vs-RTL cycle error "
              f"{r['cycle_error']:.1%}, {r['cycles_per_s']:,} cycles/s")


def test_a_third_live_accumulator_tile_is_rejected(golden_llama):
    m = Machine()
    prog = lower(golden_llama, m).program.copy()
    j = int(np.flatnonzero(prog["op"] == OPS.index("REQUANT"))[0])
    prog["cycle"][j] = prog["cycle"].max() + 1           # the first tile is never read in time
    with pytest.raises(IsaError, match=r"opens accumulator tile .* while tiles .* are still live; the "
                                       r"accumulator holds two"):
        run_program(golden_llama, m, prog, feeds_of(golden_llama))
