"""Bad input: one actionable line on stderr, exit code 2, no traceback, no output folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, parser

from tapeout.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tapeout: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def compile_fails(capsys, tmp_path, model, *needles, extra=()):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compile", model, "-o", out, *extra)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp leftovers


MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4] x) => (float[1, 3] y) <float[4, 3] w = {0,1,2,3,4,5,6,7,8,9,10,11}> {
  y = MatMul(x, w)
}
"""


def save(tmp_path, model, name="m.onnx", **kw) -> Path:
    p = tmp_path / name
    onnx.save(model, str(p), **kw)
    return p


def test_missing_file(capsys, tmp_path):
    compile_fails(capsys, tmp_path, tmp_path / "nope.onnx", "nope.onnx", "no such file")


def test_not_onnx(capsys, tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n")
    compile_fails(capsys, tmp_path, p, "notes.onnx", "ONNX")


def test_truncated_protobuf(capsys, tmp_path, tiny_llama):
    p = tmp_path / "cut.onnx"
    p.write_bytes(tiny_llama.read_bytes()[: 5000])
    compile_fails(capsys, tmp_path, p, "cut.onnx")


def test_external_data_missing(capsys, tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    model = parser.parse_model(MATMUL)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    p = save(tmp_path, model, save_as_external_data=True, all_tensors_to_one_file=True,
             location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()
    compile_fails(capsys, tmp_path, p, "m.onnx", "'w'", "missing")


def test_external_data_path_traversal(capsys, tmp_path):
    model = parser.parse_model(MATMUL)
    init = model.graph.initializer[0]
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(12, np.float32).tobytes())
    sub = tmp_path / "models"
    sub.mkdir()
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "48")):
        e = init.external_data.add()
        e.key, e.value = k, v
    p = sub / "m.onnx"
    p.write_bytes(model.SerializeToString())
    compile_fails(capsys, tmp_path, p, "outside the model's folder", "../secret.bin")


def test_unsupported_ops_are_all_listed(capsys, tmp_path):
    model = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.acme" : 1]>
    g (float[1, 4] x) => (float[1, 4] y) {
      a = com.acme.Frobnicate <k = 2> (x)
      b = Relu(a)
      c = StringNormalizer(b)
      y = com.acme.Twiddle(b)
    }
    """)
    p = tmp_path / "odd.onnx"
    p.write_bytes(model.SerializeToString())
    code, out, err = run_cli(capsys, "inspect", p)
    assert code == 2
    assert "Frobnicate" in out and "Twiddle" in out and "StringNormalizer" in out
    compile_fails(capsys, tmp_path, p, "odd.onnx", "3 unsupported op(s)", "Frobnicate", "Twiddle",
                  "StringNormalizer")


def test_unbound_dynamic_dims_name_the_option(capsys, tmp_path):
    model = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[batch, seq] input_ids, float[batch, foo] z) => (int64[batch, seq] y) {
      y = Identity(input_ids)
    }
    """)
    p = save(tmp_path, model, name="dyn.onnx")
    compile_fails(capsys, tmp_path, p, "dyn.onnx", "'input_ids'", "--seq-len")
    compile_fails(capsys, tmp_path, p, "'z'", "--dim foo=N", extra=("--seq-len", "8"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compile", p, "-o", out, "--seq-len", "8", "--dim", "foo=3")
    assert code == 0, err
    shutil.rmtree(out)


def test_non_finite_weight(capsys, tmp_path):
    model = parser.parse_model(MATMUL)
    w = np.ones((4, 3), np.float32)
    w[2, 1] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    p = save(tmp_path, model, name="nan.onnx")
    compile_fails(capsys, tmp_path, p, "nan.onnx", "'w'", "non-finite", "MatMul")


def test_impossible_options(capsys, tmp_path, tiny_llama):
    compile_fails(capsys, tmp_path, tiny_llama, "--seq-len", extra=("--seq-len", "0"))
    compile_fails(capsys, tmp_path, tiny_llama, "--dim", extra=("--dim", "seq"))


def test_refuses_to_replace_a_foreign_folder(capsys, tmp_path, tiny_llama):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "compile", tiny_llama, "-o", out)
    assert_one_line_error(code, err, "precious", "refusing")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    assert code == 2 and "Traceback" in err


def test_shape_error_names_node_and_op(capsys, tmp_path):
    model = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4] x) => (float[1, 5] y) <float[5, 5] w = {0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24}> {
      y = MatMul(x, w)
    }
    """)
    for n in model.graph.node:
        n.name = "bad_matmul"
    p = tmp_path / "shape.onnx"
    p.write_bytes(model.SerializeToString())  # onnx.checker does not run shape inference
    compile_fails(capsys, tmp_path, p, "shape.onnx", "bad_matmul", "MatMul")
