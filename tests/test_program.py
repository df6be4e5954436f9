"""The integer program: built once per compile, saved into every folder, read back exactly; folders
that simulate and diff with the source model deleted."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _support import rehash
from tapeout.cli import main
from tapeout.compiler import ir
from tapeout.compiler.frontend import frontend
from tapeout.compiler.golden.model import Golden
from tapeout.compiler.program import BUILDS, IntegerProgram, Interface
from tapeout.compiler.qmodel import QuantConfig, quantize_model
from test_bad_input import assert_one_line_error, run_cli


class _Folder:
    """The two write methods of an OutputFolder, into a plain directory."""

    def __init__(self, root):
        self.root = root

    def write_text(self, rel, text):
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_text(text)

    def write_bytes(self, rel, data):
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)


@pytest.mark.parametrize("fam,var", [("llama", "prefill"), ("llama", "decode"), ("gpt2", "decode"), ("bert", "prefill")])
def test_program_round_trip_runs_identically(tiny, tmp_path, fam, var):
    g = frontend(tiny.export(fam, "dynamo", 20, var))
    p = quantize_model(g, QuantConfig("int4", quantize_head=True)).program()
    p.save(_Folder(tmp_path))
    q = IntegerProgram.load(tmp_path / "program")
    assert [(o.kind, o.name, o.inputs, o.outputs) for o in q.ops] == [(o.kind, o.name, o.inputs, o.outputs) for o in p.ops]
    for a, b in zip(p.ops, q.ops):                      # attributes keep their values and types
        assert a.attrs.keys() == b.attrs.keys()
        for k in a.attrs:
            va, vb = a.attrs[k], b.attrs[k]
            assert type(va) is type(vb), (a.name, k)
            assert np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb, (a.name, k)
    assert q.interface == p.interface and dict(q.roles) == dict(p.roles)
    for name, L in p.linears.items():
        M = q.linears[name]
        for f in ("codes", "group_scale", "mult", "shift"):
            assert np.array_equal(getattr(L, f), getattr(M, f)), (name, f)
        assert (L.bias is None) == (M.bias is None)
    feeds = p.sample_feeds()
    a, b = Golden(p).run(feeds), Golden(q).run(feeds)
    assert a.keys() == b.keys() and sum(v.size for v in a.values()) > 0
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # saving the loaded program again gives the same bytes
    (tmp_path / "again").mkdir()
    q.save(_Folder(tmp_path / "again"))
    for f in ("program.json", "tensors.bin"):
        assert (tmp_path / "program" / f).read_bytes() == (tmp_path / "again" / "program" / f).read_bytes()


def test_interface_roles(tiny):
    dec = frontend(tiny.export("gpt2", "dynamo", 20, "decode"))
    itf = Interface.of(dec)
    assert itf.mode == "decode" and itf.tokens == "input_ids" and len(itf.kv_inputs) == 4 and itf.past > 0
    assert len(itf.kv_outputs) == len(dec.outputs) - 1 and itf.vocab == dec.tensors[dec.outputs[0]].shape[-1]
    pre = Interface.of(frontend(tiny.export("llama", "dynamo", 20, "prefill")))
    assert pre.mode == "prefill" and pre.kv_inputs == () and pre.past == 0 and pre.tokens == "input_ids"


def test_one_compile_builds_the_constants_once_and_sorts_once_per_pass(tiny_llama, tmp_path):
    BUILDS.update(programs=0, int_linears=0)
    ir.SORTS["count"] = 0
    assert main(["compile", str(tiny_llama), "--target", "systolic", "--format", "nvfp4", "-o", str(tmp_path / "s")]) == 0
    passes = (tmp_path / "s" / "passes.txt").read_text().splitlines()
    linears = json.loads((tmp_path / "s" / "program/program.json").read_text())["linears"]
    assert BUILDS["programs"] == 1 and BUILDS["int_linears"] == len(linears) == 15
    # the import's shape propagation, one per pass, the program: never more
    assert 0 < ir.SORTS["count"] <= len(passes) + 2, (ir.SORTS, passes)
    BUILDS.update(programs=0, int_linears=0)
    assert main(["compile", str(tiny_llama), "--target", "maskrom", "--format", "nvfp4", "-o", str(tmp_path / "m")]) == 0
    assert BUILDS["programs"] == 1 and BUILDS["int_linears"] == 15


def _compile(model, out, target, fmt="nvfp4", *extra):
    assert main(["compile", str(model), "--target", target, "--format", fmt, "-o", str(out), *extra]) == 0


def test_folders_simulate_and_diff_without_the_source_model(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    pre, dec = tiny.export("llama", "dynamo", 20, "prefill"), tiny.export("llama", "dynamo", 20, "decode")
    for m in (pre, dec):
        shutil.copy(m, src / m.name)
        for extra in m.parent.glob(m.name + ".data"):
            shutil.copy(extra, src / extra.name)
    p, d = src / pre.name, src / dec.name
    _compile(p, tmp_path / "mr_a", "maskrom", "nvfp4")
    _compile(p, tmp_path / "mr_b", "maskrom", "int4")
    _compile(p, tmp_path / "sys_a", "systolic", "nvfp4")
    _compile(p, tmp_path / "sys_b", "systolic", "int4")
    _compile(d, tmp_path / "df", "dataflow", "nvfp4")
    shutil.rmtree(src)                                     # the source model is gone
    capsys.readouterr()
    code, out, err = run_cli(capsys, "simulate", tmp_path / "sys_a", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["mismatches"] == 0 and r["checked"] == 16 * 256
    code, out, err = run_cli(capsys, "simulate", tmp_path / "df", "--json")
    assert code == 0, err
    assert json.loads(out)["mismatches"] == 0 and json.loads(out)["checked"] == 1408
    code, out, err = run_cli(capsys, "simulate", tmp_path / "mr_a", "--json", "--layer", "layers.0.q_proj")
    assert code == 0, err
    assert json.loads(out)["mismatches"] == 0 and json.loads(out)["checked"] == 16 * 64
    code, out, err = run_cli(capsys, "diff", tmp_path / "mr_a", tmp_path / "mr_a", "--json")
    assert code == 0 and json.loads(out)["changed_vias"] == 0
    # the program-level diff of two systolic folders: every linear, read from the folders alone
    code, out, err = run_cli(capsys, "diff", tmp_path / "sys_a", tmp_path / "sys_b", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["kind"] == "program" and r["same_ops"] and r["same_shapes"] and len(r["linears"]) == 15
    assert 0 < r["codes_changed"] < r["codes"] == sum(x["codes"] for x in r["linears"])
    assert all(x["group_size"][0] == 16 != x["group_size"][1] for x in r["linears"]), r["linears"][0]  # nvfp4 vs int4
    code, out, err = run_cli(capsys, "diff", tmp_path / "sys_a", tmp_path / "sys_a", "--json", "--fail-on-change")
    assert code == 0 and json.loads(out)["codes_changed"] == 0
    code, out, err = run_cli(capsys, "diff", tmp_path / "sys_a", tmp_path / "df")
    assert code == 0 and "integer programs" in out


def test_damaged_program_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "s"
    _compile(tiny_llama, out, "systolic", "int8")
    blob = out / "program/tensors.bin"
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "simulate", out)
    assert_one_line_error(code, err, "program/tensors.bin", "sha256")
    blob.write_bytes(bytes(data[:1000]))                  # truncated, and the manifest made to agree
    rehash(out, "program/tensors.bin")
    code, _, err = run_cli(capsys, "simulate", out)
    assert_one_line_error(code, err, "tensors.bin", "bytes")
    doc = json.loads((out / "program/program.json").read_text())
    doc["version"] = 99
    (out / "program/program.json").write_text(json.dumps(doc))
    rehash(out, "program/program.json")
    code, _, err = run_cli(capsys, "simulate", out)
    assert_one_line_error(code, err, "program.json", "version 99")


def test_bad_gds_tiles_fail_before_quantisation(tiny_llama, tmp_path, capsys):
    import tapeout.compiler.qmodel as qmodel
    calls = []
    orig = qmodel.quantize_model
    qmodel.quantize_model = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        code, _, err = run_cli(capsys, "compile", tiny_llama, "--target", "maskrom", "--format", "nvfp4",
                               "--gds-tiles", "9999", "-o", tmp_path / "x")
    finally:
        qmodel.quantize_model = orig
    assert_one_line_error(code, err, "--gds-tiles: tile 9999 does not exist")
    assert calls == [] and not (tmp_path / "x").exists()


def test_manifest_records_every_artifact_option(tiny_llama, tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(64) % 256)
    _compile(tiny_llama, tmp_path / "m", "maskrom", "w3o6", "--calib-tokens", str(ids), "--group-fallback")
    opt = json.loads((tmp_path / "m" / "manifest.json").read_text())["options"]
    assert opt["group_fallback"] is True and opt["format"] == "w3o6"
    assert opt["calibration"]["kind"] == "token ids" and opt["calibration"]["file"] == "ids.npy"
    assert len(opt["calibration"]["sha256"]) == 64 and opt["calibration"]["tokens"] == 64
    assert not any(str(tmp_path) in json.dumps(v) for v in opt.values())   # no absolute paths
    arts = json.loads((tmp_path / "m" / "manifest.json").read_text())["artifacts"]
    assert {"passes.txt", "program/program.json", "program/tensors.bin", "quant_report.json"} <= set(arts)
