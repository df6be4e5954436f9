"""Graph IR invariants, the pass registry, and canonicalisation on inline ONNX graphs."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import parser

from tapeout.compiler.bind import Binding, bind
from tapeout.compiler.interp import run
from tapeout.compiler.ir import Graph, GraphError, Op, TensorInfo, verify
from tapeout.compiler.onnx_import import from_proto
from tapeout.compiler.passes import PASSES, PIPELINES, _load, run_passes


def test_ops_are_frozen_with_typed_attributes():
    op = Op("Softmax", "sm", ("x",), ("y",), {"axis": -1, "perm": [0, 2, 1]})
    assert op.axis == -1 and op.perm == (0, 2, 1)
    with pytest.raises(AttributeError):
        op.kind = "Relu"
    with pytest.raises(TypeError):
        op.attrs["axis"] = 0
    with pytest.raises(AttributeError, match="no attribute 'keepdims'"):
        op.keepdims


def test_verifier_catches_broken_graphs():
    g = Graph()
    g.inputs = ["x"]
    g.tensors["x"] = TensorInfo((2,), np.dtype("float32"))
    g.add_op(Op("Relu", "r", ("x",), ("y",)))
    g.tensors["y"] = TensorInfo((2,), np.dtype("float32"))
    g.outputs = ["y"]
    verify(g, require_static=True)
    g.add_op(Op("Relu", "r2", ("missing",), ("z",)))
    with pytest.raises(GraphError, match="undefined tensor 'missing'"):
        verify(g)
    g.remove_op("r2")
    g.outputs = ["nowhere"]
    with pytest.raises(GraphError, match="never produced"):
        verify(g)
    with pytest.raises(GraphError, match="duplicate op name"):
        g.add_op(Op("Relu", "r", ("x",), ("w",)))


def test_registry_names_match_classes_and_pipelines():
    _load()
    for name, cls in PASSES.items():
        assert cls.name == name and name == name.lower() and " " not in name
        assert cls.__doc__, f"pass {name} has no docstring"
    for pipeline in PIPELINES.values():
        assert all(p in PASSES for p in pipeline)


def _graph(text: str) -> Graph:
    g = from_proto(parser.parse_model(text))
    bind(g, Binding())
    return g


def test_constant_folding_and_shape_ops_report_changes_honestly():
    g = _graph("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[3, 2] y) <int64[2] perm = {1, 0}> {
      s = Shape(x)
      t = Reverse_of_shape(s)
      y = Reshape(x, t)
    }
    """.replace("t = Reverse_of_shape(s)", "idx = Constant<value_ints = [1, 0]>()\n      t = Gather(s, idx)"))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    before = run(g, {"x": x})["y"]
    reports = run_passes(g, ["fold-constants", "dead-code"])
    assert [r.changed for r in reports] == [True, True]
    assert g.histogram() == {"Reshape": 1}
    assert np.array_equal(run(g, {"x": x})["y"], before)
    again = run_passes(g, ["fold-constants", "eliminate-no-ops", "dead-code"])
    assert not any(r.changed for r in again)


def test_no_op_elimination_keeps_output_names():
    g = _graph("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
      a = Relu(x)
      b = Identity(a)
      y = Cast<to = 1>(b)
    }
    """)
    run_passes(g, ["eliminate-no-ops", "dead-code"])
    assert g.histogram() == {"Relu": 1} and g.outputs == ["y"]
    assert g.producer_op("y").kind == "Relu"


def test_softmax_before_opset_13_flattens_at_axis():
    import onnxruntime as ort
    text = """
    <ir_version: 6, opset_import: ["" : 11]>
    g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[2, 3, 4] z) {
      y = Softmax<axis = 1>(x)
      z = LogSoftmax(x)
    }
    """
    model = parser.parse_model(text)
    g = from_proto(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    got = run(g, {"x": x})
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.allclose(got["y"], ref[0], atol=1e-6) and np.allclose(got["z"], ref[1], atol=1e-6)
    assert not np.allclose(got["y"].sum(axis=1), 1.0)      # not the opset-13 per-axis softmax
