"""Import + fusion of the tiny exports, proven against onnxruntime (the float oracle)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tapeout.compiler.frontend import fuse, import_graph
from tapeout.compiler.interp import run
from tapeout.compiler.ir import verify
from tapeout.compiler.structure import recognise

from _support import TINY_CASES, tiny_id

TOL = 1e-4  # max abs diff on every output against onnxruntime (the bound)


def _reference(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, feeds)


@pytest.mark.parametrize("case", TINY_CASES, ids=tiny_id)
def test_float_interpreter_matches_onnxruntime_before_and_after_fusion(tiny, case):
    fam, exp, opset, var = case
    path = tiny.export(fam, exp, opset, var)
    feeds = tiny.sample_inputs(path)
    names, ref = _reference(path, feeds)
    graph, problems = import_graph(path)
    assert problems == []
    before = run(graph, feeds)
    fuse(graph)
    verify(graph, require_static=True)
    after = run(graph, feeds)
    checked = 0
    for name, r in zip(names, ref):
        for got in (before[name], after[name]):
            assert got.shape == r.shape and got.dtype == r.dtype
            assert float(np.max(np.abs(got.astype(np.float64) - r))) <= TOL, name
            checked += 1
    assert np.array_equal(after[names[0]].argmax(-1), ref[0].argmax(-1))
    assert checked == 2 * len(names)


@pytest.mark.parametrize("case", TINY_CASES, ids=tiny_id)
def test_transformer_structure_is_recognised(tiny, case):
    fam, exp, opset, var = case
    graph, _ = import_graph(tiny.export(fam, exp, opset, var))
    fuse(graph)
    hist = graph.histogram()
    s = recognise(graph)["structure"]
    assert s["layers"] == 2 and hist["attention"] == 2
    for block in s["blocks"]:
        assert block["head_dim"] == 16
        if fam == "llama":
            assert block["mlp"]["kind"] == "gated_mlp" and block["mlp"]["activation"] == "silu"
            assert sorted(block["linears"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
        else:
            assert block["mlp"]["kind"] == "mlp" and block["mlp"]["activation"] == "gelu"
            assert block["causal"] == (fam == "gpt2")
    if fam == "llama":
        assert hist["rmsnorm"] == 5 and hist["rope"] == 4 and hist["gated_mlp"] == 2
        if not (exp == "legacy" and var == "decode"):  # legacy decode folds q groups into rows
            assert [(b["heads"], b["kv_heads"]) for b in s["blocks"]] == [(4, 2), (4, 2)]
    else:
        assert hist["layernorm"] == (5 if fam == "gpt2" else 6)
    # nothing of the raw attention/norm spelling is left behind
    for kind in ("Softmax", "ReduceMean", "Sqrt", "Pow", "Erf", "Tanh", "Sigmoid", "MatMul", "Gemm"):
        assert kind not in hist, kind
