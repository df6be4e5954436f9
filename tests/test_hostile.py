"""Hostile input: every crash class the first fuzz campaign found gives one line and exit 2,
damaged compile folders are refused before use, interrupted compiles leave nothing behind, and
a short seeded fuzz campaign (tests/fuzz/harness.py) has no bad outcome."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, parser

from test_bad_input import MATMUL, assert_one_line_error, compile_fails, run_cli, save

from _support import REPO
from fuzz import harness


def _external_matmul(tmp_path, **entries):
    """MATMUL with its weight in m.bin, the external-data entries overridden by ``entries``."""
    model = parser.parse_model(MATMUL)
    init = model.graph.initializer[0]
    w = np.arange(12, dtype=np.float32)
    (tmp_path / "m.bin").write_bytes(w.tobytes())
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for k, v in {"location": "m.bin", "offset": "0", "length": "48", **entries}.items():
        e = init.external_data.add()
        e.key, e.value = k, v
    return model


@pytest.mark.parametrize("key,value,needle", [
    ("offset", "-4", "offset"), ("offset", "1.5", "offset"), ("offset", " 0", "offset"), ("offset", "abc", "offset"),
    ("length", "-1", "length"), ("length", "1e3", "length"), ("length", str(2**62), "inconsistent"),
    ("location", "m\x00.bin", "NUL"), ("location", "sub/../m.bin", "outside"),
])
def test_external_data_fields(capsys, tmp_path, key, value, needle):
    p = save(tmp_path, _external_matmul(tmp_path, **{key: value}))
    compile_fails(capsys, tmp_path, p, "m.onnx", "'w'", needle)


def test_external_data_undefined_dtype(capsys, tmp_path):
    model = _external_matmul(tmp_path)
    model.graph.initializer[0].data_type = 999
    compile_fails(capsys, tmp_path, save(tmp_path, model), "'w'", "undefined data type 999")


def test_initializer_data_does_not_fill_its_shape(capsys, tmp_path):
    model = parser.parse_model(MATMUL)
    model.graph.initializer[0].dims[0] = 5          # 12 values for a [5, 3] tensor
    compile_fails(capsys, tmp_path, save(tmp_path, model), "'w'", "does not fill its shape [5, 3]")


def test_huge_declared_dims_are_refused_before_allocation(capsys, tmp_path):
    model = parser.parse_model(MATMUL)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    compile_fails(capsys, tmp_path, save(tmp_path, model), "graph input 'x'", "TAPEOUT_MAX_TENSOR_BYTES")
    model = parser.parse_model(MATMUL)
    model.graph.initializer[0].dims[0] = 2**40
    compile_fails(capsys, tmp_path, save(tmp_path, model), "'w'", "more than the")


@pytest.mark.parametrize("dim", [-1, -7])
def test_negative_output_dimension(capsys, tmp_path, dim):
    model = parser.parse_model(MATMUL)
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dim
    compile_fails(capsys, tmp_path, save(tmp_path, model), "graph output 'y'", f"negative dimension {dim}")


@pytest.mark.parametrize("version", [10000, 0])
def test_unknown_opset_version(capsys, tmp_path, version):
    model = parser.parse_model(MATMUL)
    model.opset_import[0].version = version
    compile_fails(capsys, tmp_path, save(tmp_path, model), f"opset {version}")


def test_corrupt_string_field(capsys, tmp_path):
    data = bytearray(parser.parse_model(MATMUL).SerializeToString())
    i = data.find(b"MatMul")
    data[i] = 0xFF
    p = tmp_path / "m.onnx"
    p.write_bytes(bytes(data))
    compile_fails(capsys, tmp_path, p, "m.onnx", "not valid UTF-8")


def test_recursive_function(capsys, tmp_path, tiny_llama):
    m = onnx.load(str(tiny_llama))
    harness._mut_recursive_function(random.Random(0), m, b"")
    compile_fails(capsys, tmp_path, save(tmp_path, m), "m.onnx")


def test_sparse_initializer_equals_its_dense_twin(capsys, tmp_path):
    """A sparse initializer is densified: the compile is the dense model's, artifact for artifact."""
    w = np.zeros((4, 3), np.float32)
    w[1, 2], w[3, 0] = 2.5, -1.0
    dense = parser.parse_model(MATMUL)
    dense.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    sparse = parser.parse_model(MATMUL)
    del sparse.graph.initializer[:]
    flat = np.flatnonzero(w)
    sparse.graph.sparse_initializer.append(onnx.SparseTensorProto(
        values=numpy_helper.from_array(w.reshape(-1)[flat], "w"),
        indices=numpy_helper.from_array(flat.astype(np.int64), ""), dims=[4, 3]))
    outs = []
    for name, model in (("dense", dense), ("sparse", sparse)):
        (tmp_path / name).mkdir()
        p = save(tmp_path / name, model, name="m.onnx")
        code, _, err = run_cli(capsys, "compile", p, "--target", "systolic", "--format", "int8",
                               "-o", tmp_path / name / "out")
        assert code == 0, err
        arts = json.loads((tmp_path / name / "out" / "manifest.json").read_text())["artifacts"]
        arts.pop("program/program.json")            # it records the input's path
        outs.append(arts)
    assert outs[0] == outs[1] and any(k.startswith("program/") for k in outs[0])


TARGETS = [("--target", "maskrom", "--format", "nvfp4"), ("--target", "systolic", "--format", "int8"),
           ("--target", "dataflow", "--format", "int8"), ()]


@pytest.mark.parametrize("target", TARGETS, ids=["maskrom", "systolic", "dataflow", "none"])
@pytest.mark.parametrize("bad,needle", [(np.nan, "non-finite"), (np.inf, "epsilon"), (-np.inf, "epsilon")])
def test_non_finite_norm_epsilon(capsys, tmp_path, tiny_llama, bad, needle, target):
    """NaN or Inf in an RMSNorm's eps (a scalar Add the masks exemption skips) never reaches a
    backend: the systolic and dataflow simulators run their vector units before golden."""
    m = onnx.load(str(tiny_llama))
    means = {n.output[0] for n in m.graph.node if n.op_type == "ReduceMean"}
    name = next(n.input[1] for n in m.graph.node if n.op_type == "Add" and n.input[0] in means)
    init = next(t for t in m.graph.initializer if t.name == name)
    a = numpy_helper.to_array(init).copy()
    a[...] = bad
    init.CopyFrom(numpy_helper.from_array(a, name))
    compile_fails(capsys, tmp_path, save(tmp_path, m), needle, extra=target)


@pytest.mark.parametrize("target", TARGETS, ids=["maskrom", "systolic", "dataflow", "none"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e30])
def test_attention_score_scale_out_of_range(capsys, tmp_path, tiny_llama, bad, target):
    """The constant scaling q (or the scores) set to Inf or 1e30: the fused attention's scale has no
    integer multiplier; refused at fusion, naming the attention node (the 10,000-case run's last class)."""
    m = onnx.load(str(tiny_llama))
    soft = next(n for n in m.graph.node if n.op_type == "Softmax")
    consts = {t.name: t for t in m.graph.initializer if numpy_helper.to_array(t).size == 1
              and numpy_helper.to_array(t).dtype.kind == "f"}
    producers = {o: n for n in m.graph.node for o in n.output}
    seen, todo, hit = set(), [soft.input[0]], None
    while todo and hit is None:             # walk back from the scores to the first scalar scaling
        t = todo.pop()
        n = producers.get(t)
        if n is None or t in seen:
            continue
        seen.add(t)
        if n.op_type in ("Mul", "Div"):
            hit = next((i for i in n.input if i in consts), None)
        todo.extend(n.input)
    assert hit is not None
    a = numpy_helper.to_array(consts[hit]).copy()
    a[...] = bad
    consts[hit].CopyFrom(numpy_helper.from_array(a, hit))
    compile_fails(capsys, tmp_path, save(tmp_path, m), "score scale", "node_scaled_dot_product_attention",
                  extra=target)


def test_axis_too_large_for_c_int(capsys, tmp_path, tiny_llama):
    m = onnx.load(str(tiny_llama))
    node = next(n for n in m.graph.node if n.op_type == "Unsqueeze")
    axes = next(t for t in m.graph.initializer if t.name == node.input[1])
    axes.CopyFrom(numpy_helper.from_array(np.array([2**40], np.int64), axes.name))
    compile_fails(capsys, tmp_path, save(tmp_path, m), "Unsqueeze", "OverflowError")


def _positions(m: onnx.ModelProto, value: int | str) -> onnx.ModelProto:
    """``m`` with its ``input_ids`` declaring ``value`` positions (a number or a dim name)."""
    d = m.graph.input[0].type.tensor_type.shape.dim[1]
    d.Clear()
    if isinstance(value, str):
        d.dim_param = value
    else:
        d.dim_value = value
    return m


@pytest.mark.parametrize("positions,needle", [
    (2**31, "tensor 'input_ids' of shape [1, 2147483648]"),      # the input itself: 16 GiB of ids
    (2**28, "tensor 'embedding' of shape [1, 268435456, 64]"),   # ids fit; the first activation does not
])
def test_huge_declared_positions_refused_before_shape_propagation(capsys, tmp_path, tiny_llama, positions, needle):
    # the export's value_info still says 16 positions: the check must not trust it
    m = _positions(onnx.load(str(tiny_llama)), positions)
    assert [d.dim_value for d in next(v for v in m.graph.value_info if v.name == "embedding")
            .type.tensor_type.shape.dim] == [1, 16, 64]
    compile_fails(capsys, tmp_path, save(tmp_path, m), needle, "TAPEOUT_MAX_ACTIVATION_BYTES")


def test_huge_bound_positions_refused_before_shape_propagation(capsys, tmp_path, tiny_llama):
    m = _positions(onnx.load(str(tiny_llama)), "sequence_length")
    compile_fails(capsys, tmp_path, save(tmp_path, m), "tensor 'embedding' of shape [1, 268435456, 64]",
                  "TAPEOUT_MAX_ACTIVATION_BYTES", extra=("--seq-len", str(2**28)))


def test_activation_limit_is_raisable(capsys, tmp_path, tiny_llama, monkeypatch):
    m = save(tmp_path, _positions(onnx.load(str(tiny_llama)), 2**28))
    monkeypatch.setenv("TAPEOUT_MAX_ACTIVATION_BYTES", str(2**50))
    from tapeout.compiler import interp
    calls = []

    def refuse(op, *inputs):            # numpy's refusal of a 64 GiB array, without allocating 2 GiB of ids
        calls.append(op.name)
        raise MemoryError("Unable to allocate 64.0 GiB for an array with shape (1, 268435456, 64)")
    interp._load_kernels()
    monkeypatch.setattr(interp, "dummy_feeds", lambda g: {n: np.zeros((0,), np.int64) for n in g.inputs})
    monkeypatch.setitem(interp.KERNELS, "Gather", refuse)
    compile_fails(capsys, tmp_path, m, "node 'node_embedding' (Gather)", "MemoryError: Unable to allocate 64.0 GiB")
    assert calls == ["node_embedding"]            # the pre-check let it through to the run


@pytest.mark.parametrize("extra,needle", [
    (("--target", "dataflow", "--format", "int8", "--machine", "chips=1000"), "chips"),
    (("--format", "nvfp4"), "--format applies to a compile that quantises"),
    (("--target", "maskrom", "--format", "w3o6", "--calib-max-tokens", "0"), "--calib-max-tokens"),
])
def test_impossible_compile_options(capsys, tmp_path, tiny_llama, extra, needle):
    compile_fails(capsys, tmp_path, tiny_llama, needle, extra=extra)


def test_empty_calibration_tokens(capsys, tmp_path, tiny_llama):
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int64))
    compile_fails(capsys, tmp_path, tiny_llama, "empty.npy",
                  extra=("--target", "maskrom", "--format", "w3o6", "--calib-tokens", tmp_path / "empty.npy"))


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_output_path_that_cannot_be_a_folder(capsys, tmp_path, tiny_llama, where):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out" if where == "under-a-file" else Path("/proc/tapeout-test-out")
    code, _, err = run_cli(capsys, "compile", tiny_llama, "-o", out)
    assert_one_line_error(code, err, "cannot create the output folder")


@pytest.mark.parametrize("key,value", [("hidden_size", 10**15), ("num_key_value_heads", float("inf")),
                                       ("head_dim", float("nan")), ("intermediate_size", "abc"),
                                       ("num_key_value_heads", 7)])
def test_estimate_config_values(capsys, tmp_path, key, value):
    cfg = json.loads((REPO / "backends/maskrom/configs/smollm2-135m.json").read_text())
    cfg[key] = value
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "estimate", "--hf-config", p, "--format", "w3o6")
    assert_one_line_error(code, err, "config")


# --- damaged compile folders ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chip(tmp_path_factory, tiny_llama):
    from tapeout.cli import main
    out = tmp_path_factory.mktemp("hostile") / "chip"
    assert main(["compile", str(tiny_llama), "--target", "maskrom", "--format", "nvfp4", "-o", str(out)]) == 0
    return out


DAMAGE = {"truncate": lambda b: b[: len(b) // 2], "null": lambda b: b"null\n", "list": lambda b: b"[]",
          "flip": lambda b: bytes([b[0] ^ 1]) + b[1:]}


@pytest.mark.parametrize("rel,how", [("layers/V_CODE.bin", "truncate"), ("layers/index.json", "truncate"),
                                     ("layers/index.json", "null"), ("base/base.json", "list"),
                                     ("manifest.json", "truncate"), ("manifest.json", "null"),
                                     ("manifest.json", "list"), ("sim/0000.x.npy", "flip"),
                                     ("chip/sequencer.json", "flip"), ("layout/die.png", "truncate")])
@pytest.mark.parametrize("cmd", ["simulate", "run", "diff"])
def test_damaged_folder_is_refused(capsys, tmp_path, chip, rel, how, cmd):
    d = tmp_path / "chip"
    shutil.copytree(chip, d)
    p = d / rel
    p.write_bytes(DAMAGE[how](p.read_bytes()))
    np.save(tmp_path / "p.npy", np.array([1, 2, 3]))
    argv = {"simulate": ["simulate", d, "--layer", "lm_head", "--tokens", "1"],
            "run": ["run", d, "--tokens", tmp_path / "p.npy", "--new-tokens", "1"],
            "diff": ["diff", chip, d]}[cmd]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "manifest" if rel == "manifest.json" else rel)


@pytest.mark.parametrize("edit", ["options.arch", "artifacts.sha256", "input"])
def test_edited_manifest_is_refused(capsys, tmp_path, chip, edit):
    d = tmp_path / "chip"
    shutil.copytree(chip, d)
    man = json.loads((d / "manifest.json").read_text())
    if edit == "options.arch":
        man["options"]["arch"] = {"vector_lanes": 3}
    elif edit == "artifacts.sha256":
        man["artifacts"]["layers/V_CODE.bin"]["sha256"] = "0" * 64
    else:
        man["input"] = []
    (d / "manifest.json").write_text(json.dumps(man))
    code, _, err = run_cli(capsys, "simulate", d, "--layer", "lm_head", "--tokens", "1")
    assert_one_line_error(code, err, "manifest")


# --- interrupted compiles ------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_compile_leaves_the_previous_folder(tmp_path, tiny_llama, chip, sig):
    """A signal in the middle of a compile that would replace a folder: the old folder stays
    byte for byte, no temporary folder is left, the exit code says interrupted."""
    out = tmp_path / "chip"
    shutil.copytree(chip, out)
    before = (out / "manifest.json").read_bytes()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    np.save(tmp_path / "calib.npy", np.arange(256, dtype=np.int64))
    # -P: the installed package, never a checkout's tapeout/ folder on the working directory
    p = subprocess.Popen([sys.executable, "-P", "-m", "tapeout", "compile", str(tiny_llama), "--target", "maskrom",
                          "--format", "w3o6", "--calib-tokens", str(tmp_path / "calib.npy"), "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env, text=True)
    deadline = time.time() + 60           # wait until it is working on the new folder
    while not [q for q in tmp_path.iterdir() if q.name.startswith(".chip.tmp-")]:
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            raise AssertionError(f"the compile ended before it was interrupted: {p.communicate()[1][-2000:]}")
        time.sleep(0.02)
    time.sleep(0.3)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "interrupted" in err and "Traceback" not in err
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["calib.npy", "chip"]


# --- the fuzz harness ----------------------------------------------------------------------------
def test_short_fuzz_campaign(tmp_path, tiny_llama):
    """A seeded campaign across every group (models, options, HF configs, damaged folders): each
    case classified, none internal, hung, accepted when invalid or half-written."""
    seeds = harness.make_seeds(tmp_path / "seeds", tiny_llama, REPO / "backends/maskrom/configs/smollm2-135m.json")
    results = harness.campaign(1, 60, seeds, tmp_path / "cases", timeout=60)
    assert len(results) == 60
    assert {r.case.group for r in results} == set(harness.GROUPS)
    assert all(r.outcome in harness.OUTCOMES for r in results)
    assert sum(r.outcome == "clean" for r in results) >= 30        # most mutations must be refused
    assert harness.failures(results) == [], harness.table(results)
