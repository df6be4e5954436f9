"""The dataflow backend: queue file round trip, whole tiny models (prefill, decode, several
chips) through the cycle-accurate simulator against golden, the checker proving real schedules
and rejecting corrupted ones with the unit, cycle and resource named, the CLI, and sizing from
shapes."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapeout.backends.dataflow.check import check
from tapeout.backends.dataflow.isa import DF, OP, OPS, QueueError, decode, encode
from tapeout.backends.dataflow.lower import lower, memory_map
from tapeout.backends.dataflow.machine import Machine
from tapeout.backends.dataflow.banks import build_banks
from tapeout.backends.dataflow.sim import run_queues
from tapeout.cli import main
from tapeout.compiler.frontend import frontend
from tapeout.compiler.qmodel import QuantConfig, quantize_model, sample_feeds

from _support import rehash
from test_bad_input import assert_one_line_error, run_cli

LIMIT = {"cycle": (1 << 40) - 1, "op": len(OPS) - 1, "flags": 255, "stream": 65535, "peer": 65535}


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["c0.mem0", "c0.vxm1", "c1.mxm3", "c2.c2c0"]),
                       st.lists(st.tuples(*(st.integers(0, LIMIT.get(f, (1 << 32) - 1)) for f in DF.names)),
                                max_size=12), min_size=1))
def test_queue_file_round_trip(queues):
    q = {u: np.array(rows, DF) for u, rows in queues.items()}
    back = decode(encode(q))
    assert list(back) == list(q)
    assert all(np.array_equal(back[u], q[u]) for u in q)


def test_queue_file_rejects_bad_bytes():
    with pytest.raises(QueueError, match="shorter than its header"):
        decode(b"TODF")
    with pytest.raises(QueueError, match="not a version-1 tapeout queue file"):
        decode(b"XXXX" + bytes(12))
    data = encode({"c0.vxm0": np.zeros(2, DF)})
    with pytest.raises(QueueError, match="not a multiple"):
        decode(data[:-1])


def _golden(tiny, fam, var, fmt):
    g = frontend(tiny.export(fam, "dynamo", 20, var))
    return quantize_model(g, QuantConfig(fmt, quantize_head=True), None).golden()


@pytest.mark.parametrize("fam,var,fmt,opts", [
    ("llama", "decode", "nvfp4", []),
    ("llama", "prefill", "nvfp4", []),
    ("gpt2", "prefill", "int8", []),
    ("gpt2", "decode", "mxfp4", []),
    ("bert", "prefill", "int4", []),
    ("llama", "prefill", "nvfp4", ["chips=2"]),
    ("llama", "decode", "int8", ["chips=3", "mxm=2", "hop_cycles=2"]),
])
def test_whole_tiny_model_equals_golden(tiny, fam, var, fmt, opts):
    gm = _golden(tiny, fam, var, fmt)
    m = Machine.from_options(opts)
    plan = lower(gm, m)
    mm = memory_map(plan.copies)
    proof = check(m, plan.queues, mm)
    assert proof["transfers"] > 100 and proof["multiplies"] == sum(
        1 for t in plan.tasks if t.kind == "mm")
    feeds = sample_feeds(gm.graph)
    gold = gm.run(feeds)
    cycles = []
    for _ in range(2):               # no runtime arbitration: the same latency on every run
        st_: dict = {}
        got = run_queues(gm, m, plan.queues, mm, feeds, st_, image=build_banks(gm, plan.geometry, mm))
        cycles.append(st_["cycles"])
        checked = sum(v.size for v in gold.values())
        assert checked >= 256
        assert all(np.array_equal(got[k], gold[k]) for k in gold)
    assert cycles[0] == cycles[1] == plan.makespan
    s = plan.schedule
    assert plan.makespan >= s.lower_bound == max(s.critical_path, s.resource_bound)
    assert plan.chips == (int(opts[0].split("=")[1]) if opts else 1)
    if plan.chips > 1:
        assert st_["per_op"]["TX"] == st_["per_op"]["RX"] >= plan.chips - 1


@pytest.fixture(scope="module")
def llama_plan(tiny):
    gm = _golden(tiny, "llama", "decode", "nvfp4")
    m = Machine()
    plan = lower(gm, m)
    return gm, m, plan, memory_map(plan.copies)


def _corrupt(plan, kind, op, field, delta):
    q = {u: v.copy() for u, v in plan.queues.items()}
    for u, a in q.items():
        if f".{kind}" in u:
            idx = np.flatnonzero(a["op"] == OP[op])
            if len(idx) > 2:
                j = int(idx[len(idx) // 2])
                a[field][j] = int(a[field][j]) + delta
                return q, u, int(a["cycle"][j])
    raise AssertionError("nothing to corrupt")


@pytest.mark.parametrize("kind,op,field,delta,needle", [
    ("mem", "READ", "cycle", 1, "reach it at cycle"),            # an operand arriving a cycle late
    ("mxm", "MM", "cycle", -3, "reach it at cycle"),             # a reader a few cycles early
    ("mxm", "IW", "stream", 1, "reach no reader"),               # a reader on the wrong stream
    ("mem", "WRITE", "addr", 320, "does not place in this bank"),  # a write to the wrong address
    ("vxm", "SEND", "stream", 1, "stream"),                      # a result sent on the wrong stream
])
def test_checker_rejects_corrupted_schedules(llama_plan, kind, op, field, delta, needle):
    gm, m, plan, mm = llama_plan
    check(m, plan.queues, mm)                                  # the real schedule passes
    q, unit, cyc = _corrupt(plan, kind, op, field, delta)
    with pytest.raises(QueueError, match=r"^c\d+\.\w+ @ cycle \d+: ") as e:
        check(m, q, mm)
    assert needle in str(e.value)


def test_checker_rejects_a_port_used_twice(llama_plan):
    gm, m, plan, mm = llama_plan
    q = {u: v.copy() for u, v in plan.queues.items()}
    bank = next(u for u, v in q.items() if ".mem" in u and (v["op"] == OP["READ"]).sum() >= 2)
    a = q[bank]
    reads = np.flatnonzero(a["op"] == OP["READ"])
    a["cycle"][reads[1]] = a["cycle"][reads[0]]                # two reads of one bank in one cycle
    a.sort(order="cycle", kind="stable")
    with pytest.raises(QueueError, match=rf"^{re.escape(bank)} @ cycle \d+: read port used twice"):
        check(m, q, mm)


def test_simulator_rejects_a_late_operand(llama_plan):
    gm, m, plan, mm = llama_plan
    q, unit, cyc = _corrupt(plan, "mem", "READ", "cycle", 2)
    with pytest.raises(QueueError, match="reach it at cycle"):
        run_queues(gm, m, q, mm, sample_feeds(gm.graph), image=build_banks(gm, plan.geometry, mm))


def test_compile_and_simulate_cli(tiny, tmp_path, capsys):
    model = tiny.export("llama", "dynamo", 20, "decode")
    outs = []
    for d in ("a", "b"):
        code, out, err = run_cli(capsys, "compile", model, "--target", "dataflow", "--format", "nvfp4",
                                 "-o", tmp_path / d)
        assert code == 0, err
        outs.append(out)
    assert "simulator == golden on 1408 outputs" in outs[0] and "tokens/s per user" in outs[0]
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text())["artifacts"] for d in "ab")
    assert a == b and {"queues.bin", "queues.lst", "memory.json", "trace.json", "schedule.json",
                       "report.json"} <= set(a)
    code, out, err = run_cli(capsys, "simulate", tmp_path / "a", "--json")
    assert code == 0, err
    r = json.loads(out)
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert r["checked"] == 1408 and r["mismatches"] == 0 and r["engine"] == "dataflow"
    assert r["cycles"] == rep["schedule"]["makespan"] >= r["lower_bound_cycles"] > 0
    assert rep["step"] == "decode" and rep["tokens_per_s_per_user"] > 0
    trace = json.loads((tmp_path / "a" / "trace.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if e["ph"] == "X") == rep["instructions"]
    # a corrupted queue file: one line, exit 2
    q = decode((tmp_path / "a" / "queues.bin").read_bytes())
    u = next(k for k, v in q.items() if ".mxm" in k and len(v))
    q[u]["cycle"][-1] += 5
    (tmp_path / "a" / "queues.bin").write_bytes(encode(q))
    rehash(tmp_path / "a", "queues.bin")
    code, _, err = run_cli(capsys, "simulate", tmp_path / "a")
    assert_one_line_error(code, err, "queues.bin", u)
    # the load image is what the simulator computes with: a flipped bit is refused by the hash
    # check; re-hashed, it changes the outputs (exit 1, mismatches counted)
    from tapeout.backends.dataflow.banks import ENTRY, HEADER, KIND_BLOCK
    b = tmp_path / "b"
    data = bytearray((b / "banks.bin").read_bytes())
    n = int(np.frombuffer(bytes(data[8:12]), "<u4")[0])
    table = np.frombuffer(bytes(data[HEADER.itemsize:HEADER.itemsize + n * ENTRY.itemsize]), ENTRY)
    first = table[table["kind"] == KIND_BLOCK][0]
    o = int(first["offset"])
    assert any(data[o:o + 16])
    data[o:o + 16] = bytes(16)                           # the first codes -> code-table entry 0
    (b / "banks.bin").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "simulate", b)
    assert_one_line_error(code, err, "banks.bin", "sha256")
    rehash(b, "banks.bin")
    code, out, err = run_cli(capsys, "simulate", b, "--json")
    assert code == 1, err
    r = json.loads(out)
    assert r["checked"] == 1408 and r["mismatches"] > 0
    # an image whose copy sits elsewhere than memory.json says: one line naming banks.bin
    bad = table.copy()
    bad["addr"][bad["kind"] == KIND_BLOCK] += 64
    data[HEADER.itemsize:HEADER.itemsize + bad.nbytes] = bad.tobytes()
    (b / "banks.bin").write_bytes(bytes(data))
    rehash(b, "banks.bin")
    code, _, err = run_cli(capsys, "simulate", b)
    assert_one_line_error(code, err, "banks.bin: load image places copy", "memory.json at chip")


def test_load_image_holds_the_program_weights_and_constants(llama_plan):
    from tapeout.backends.dataflow.banks import BankImage
    gm, m, plan, mm = llama_plan
    image = BankImage(build_banks(gm, plan.geometry, mm), mm)
    blocks = consts = 0
    for c in mm:
        v = c["value"]
        if not c["resident"] or v[0] == "input":
            continue
        got = image.value(c["id"])
        if v[0] == "w":
            layer, j = int(v[1]), int(v[2])
            L, geo = gm.linears[gm.ops[layer].name], plan.geometry[gm.ops[layer].name]
            i, k = divmod(j, geo["n_k"])
            cols, rows = slice(i * geo["cols"], (i + 1) * geo["cols"]), slice(k * geo["rows"], (k + 1) * geo["rows"])
            assert np.array_equal(got["codes"], L.codes[cols, rows])
            units = np.arange(rows.start, rows.stop, geo["unit"]) // L.group_size
            assert np.array_equal(got["gs"], L.group_scale[cols][:, units])
            if k == geo["n_k"] - 1:
                assert np.array_equal(got["mult"], L.mult[cols]) and np.array_equal(got["shift"], L.shift[cols])
            blocks += 1
        else:
            name = v[1] if v[0] in ("const", "gather") else v[2]
            assert np.array_equal(got.ravel(), gm.const(name).ravel())
            consts += 1
    assert blocks > 20 and consts >= 1                 # the embedding table (norm gains are immediates)


def test_weight_blocks_that_straddle_groups_carry_every_group():
    from tapeout.backends.dataflow.banks import block_groups
    geo = {"rows": 96, "group": 128}
    assert [list(block_groups(geo, k)) for k in range(4)] == [[0], [0, 1], [1, 2], [2]]
    assert list(block_groups({"rows": 64, "group": 32}, 1)) == [2, 3]


@pytest.mark.parametrize("opt,needle", [("mxm_k=400", "mxm_k (400) must be <= lanes"),
                                        ("bogus=1", "--machine expects KEY=VALUE"),
                                        ("act_banks=88", "must leave banks for weights"),
                                        ("bank_kib=1", "raise --machine bank_kib")])
def test_bad_machine_options(tiny, tmp_path, capsys, opt, needle):
    model = tiny.export("llama", "dynamo", 20, "decode")
    code, _, err = run_cli(capsys, "compile", model, "--target", "dataflow", "--format", "nvfp4",
                           "--machine", opt, "-o", tmp_path / "x")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x").exists()


def test_estimate_from_shapes(capsys):
    res = {}
    for name in ("smollm2-135m", "llama-3.1-8b"):
        code, out, err = run_cli(capsys, "estimate", "--hf-config", f"backends/maskrom/configs/{name}.json",
                                 "--target", "dataflow", "--format", "nvfp4", "--json")
        assert code == 0, err
        res[name] = json.loads(out)
    s, big = res["smollm2-135m"], res["llama-3.1-8b"]
    assert s["chips"] == 2 and big["chips"] > 20
    for r in (s, big):
        assert r["chips"] * r["chip_store_bytes"] >= r["weight_bytes"] + r["table_bytes"]
        assert r["pipeline_tokens_per_s_bound"] >= r["tokens_per_s_per_user_bound"] > 0
    assert big["tokens_per_s_per_user_bound"] < s["tokens_per_s_per_user_bound"] / 10


@pytest.mark.slow
def test_smollm2_decode_step_equals_golden_within_1_10_of_the_bound():
    """One SmolLM2-135M decode step (past 16, nvfp4) on the default machine: checked, simulated
    == golden on every output, makespan <= 1.10x its lower bound."""
    from _support import load_models_module
    mod = load_models_module("smollm2")
    g = frontend(mod.export(variant="decode", past_len=16))
    gm = quantize_model(g, QuantConfig("nvfp4", quantize_head=True), None).golden()
    m = Machine()
    plan = lower(gm, m)
    mm = memory_map(plan.copies)
    proof = check(m, plan.queues, mm)
    assert proof["transfers"] > 5000 and plan.chips == 2
    feeds = sample_feeds(g)
    st_: dict = {}
    got = run_queues(gm, m, plan.queues, mm, feeds, st_, image=build_banks(gm, plan.geometry, mm))
    gold = gm.run(feeds)
    assert sum(v.size for v in gold.values()) == 49152 + 60 * 3 * 17 * 64
    assert all(np.array_equal(got[k], gold[k]) for k in gold)
    assert st_["cycles"] == plan.makespan <= 1.10 * plan.schedule.lower_bound
