"""Golden covers what the float path covers: every float kernel has an integer fate, with a reason.

(compiler/golden/coverage.py; docs/golden.md "Elementwise ops and data movement")
"""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden import coverage
from tapeout.compiler.golden.model import KERNELS, PLUMBING
from tapeout.compiler.interp import _load_kernels
from tapeout.compiler.ir import Graph, Op, TensorInfo
from tapeout.compiler.passes import PASSES, _load, run_passes
from tapeout.compiler.program import EXACT_ON_INTEGERS, IntegerProgram

FLOAT_KERNELS = sorted(_load_kernels())


def test_every_float_kernel_has_a_fate():
    assert FLOAT_KERNELS and len(FLOAT_KERNELS) == len(coverage.FATES)
    assert set(FLOAT_KERNELS) == set(coverage.FATES)


@pytest.mark.parametrize("kind", FLOAT_KERNELS)
def test_fate_agrees_with_the_code(kind):
    fate, reason = coverage.fate(kind)
    assert reason
    if fate == "kernel":
        assert kind in KERNELS
    elif fate == "moves":
        assert kind in PLUMBING
    elif fate == "integers":
        assert kind in EXACT_ON_INTEGERS
    elif fate == "fused":
        assert reason.startswith("-> ")
        targets = [t.strip() for t in reason[3:].split("(")[0].split("/")]
        _load()
        assert all(f"fuse-{'mlp' if t == 'gated_mlp' else t}" in PASSES for t in targets), targets
        assert all(t in KERNELS for t in targets)
    else:
        assert fate in ("folded", "unsupported")
        assert kind not in KERNELS and kind not in PLUMBING


def _program(graph: Graph):
    return IntegerProgram.build(graph, {})


def _graph(kind: str, dtype, attrs=None) -> Graph:
    g = Graph("t")
    g.inputs, g.outputs = ["x", "y"], ["z"]
    g.tensors["x"] = TensorInfo((2, 4), dtype)
    g.tensors["y"] = TensorInfo((2, 4), dtype)
    g.tensors["z"] = TensorInfo((2, 4), dtype if kind not in ("Equal", "Less") else np.bool_)
    g.add_op(Op(kind, "n0", ("x", "y"), ("z",), attrs or {}))
    return g


@pytest.mark.parametrize("kind", ["Equal", "Less", "Max", "Min"])
def test_integer_ops_run_exactly_on_integers_and_are_refused_on_floats(kind):
    ip = _program(_graph(kind, np.int64))
    x = np.array([[1, 5, -3, 7], [0, 2, 2, -9]])
    y = np.array([[1, 4, -2, 8], [1, 2, 3, -9]])
    from tapeout.compiler.golden.model import Golden
    got = Golden(ip).run({"x": x, "y": y})["z"]
    want = {"Equal": x == y, "Less": x < y, "Max": np.maximum(x, y), "Min": np.minimum(x, y)}[kind]
    assert np.array_equal(got, want) and got.size == 8
    with pytest.raises(TapeoutError, match=f"no integer kernel for op {kind} on float values"):
        _program(_graph(kind, np.float32))


@pytest.mark.parametrize("kind", sorted(k for k, (f, _) in coverage.FATES.items() if f == "unsupported"))
def test_unsupported_ops_are_named(kind):
    g = Graph("t")
    g.inputs, g.outputs = ["x"], ["z"]
    g.tensors["x"] = TensorInfo((2, 4), np.float32)
    g.tensors["z"] = TensorInfo((2, 4), np.float32)
    g.add_op(Op(kind, "bad_node", ("x",), ("z",)))
    with pytest.raises(TapeoutError) as e:
        _program(g)
    assert f"op {kind}" in str(e.value) and e.value.node == "bad_node"


@pytest.mark.parametrize("kind", ["Floor", "Exp", "Mod", "Clip", "Cast", "Equal"])
def test_folded_ops_leave_the_graph_when_their_inputs_are_constants(kind):
    g = Graph("t")
    g.inputs, g.outputs = ["x"], ["z"]
    g.tensors["x"] = TensorInfo((4,), np.float32)
    for t in ("c", "d", "w", "z"):
        g.tensors[t] = TensorInfo((4,), np.float32)
    g.add_constant("c", np.array([1.5, -2.0, 3.25, 0.0], np.float32))
    g.add_constant("d", np.array([2.0, 3.0, 1.0, 5.0], np.float32))
    ins = {"Floor": ("c",), "Exp": ("c",), "Mod": ("c", "d"), "Clip": ("c",), "Cast": ("c",),
           "Equal": ("c", "d")}[kind]
    attrs = {"Mod": {"fmod": 1}, "Cast": {"to": 7}}.get(kind, {})
    if kind == "Cast":
        g.tensors["w"] = TensorInfo((4,), np.int64)
    if kind == "Equal":
        g.tensors["w"] = TensorInfo((4,), np.bool_)
    g.add_op(Op(kind, "n0", ins, ("w",), attrs))
    g.add_op(Op("Add", "n1", ("x", "x"), ("z",)))
    g.outputs = ["z", "w"]
    run_passes(g, ["fold-constants", "dead-code"])
    assert [op.kind for op in g.ops] == ["Add"] and "w" in g.constants
