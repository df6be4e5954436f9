"""ONNX's own backend node tests, run against tapeout's float interpreter.

The onnx wheel ships the generators of its node tests, not their data, so
``collect_testcases()`` rebuilds every case in memory (a few seconds). A case runs when
``onnx_backend.is_compatible`` accepts its model (every op has a kernel, tensors only);
every other case is counted as not run, never as failed. Outputs are compared the way ONNX's
own runner does (same shapes and dtypes, ``assert_allclose`` with the case's rtol/atol).
"""
from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.backend.test.case import node as node_cases
from onnx.backend.test.runner import Runner

from tapeout.compiler import onnx_backend

# Cases of supported ops that fail for reasons outside tapeout's scope (strict: a fix shows up).
_RANDOM_DROPOUT = "training-mode Dropout samples a random mask; tapeout is inference-only"
KNOWN_FAILURES = {
    "test_training_dropout": _RANDOM_DROPOUT,
    "test_training_dropout_mask": _RANDOM_DROPOUT,
    "test_training_dropout_default": _RANDOM_DROPOUT,
    "test_training_dropout_default_mask": _RANDOM_DROPOUT,
}
# The suite must not shrink silently (onnx 1.23 with today's kernels runs ~1340 cases).
MIN_CASES_RUN = 1200


def _collect() -> list:
    with warnings.catch_warnings():   # the generators overflow on purpose (float8, -inf cases)
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return list(node_cases.collect_testcases(None))


ALL_CASES = _collect()
RUN_CASES = [c for c in ALL_CASES if onnx_backend.is_compatible(c.model)]
SUPPORTED_OPS = onnx_backend.supported_ops()
TALLY: collections.Counter = collections.Counter()


def _array(value):
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _param(case):
    reason = KNOWN_FAILURES.get(case.name)
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if TALLY["run"]:
        line = (f"ONNX node tests: passed {TALLY['passed']} / run {TALLY['run']} "
                f"(supported ops: {len(SUPPORTED_OPS)}, not run: {len(ALL_CASES) - len(RUN_CASES)})")
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is None or capture is None:   # e.g. an xdist worker: nowhere to print
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


@pytest.mark.parametrize("case", [_param(c) for c in RUN_CASES])
def test_onnx_node(case):
    TALLY["run"] += 1
    rep = onnx_backend.prepare(case.model)
    for inputs, expected in case.data_sets:
        with np.errstate(all="ignore"):
            outputs = rep.run([_array(x) for x in inputs])
        Runner.assert_similar_outputs([_array(x) for x in expected], list(outputs),
                                      rtol=case.rtol, atol=case.atol)
    TALLY["passed"] += 1


def test_enough_cases_run():
    assert len(ALL_CASES) > 1000, "onnx's node test generators produced too few cases"
    assert len(RUN_CASES) >= MIN_CASES_RUN, f"only {len(RUN_CASES)} ONNX node cases are runnable"
    run_ops = {n.op_type for c in RUN_CASES for n in c.model.graph.node}
    for op in ("Attention", "RotaryEmbedding", "RMSNormalization", "LayerNormalization", "MatMul", "Softmax"):
        assert op in run_ops, f"no ONNX node case exercises {op}"


def test_known_failures_are_runnable_cases():
    # a stale entry would hide nothing and mislead readers
    names = {c.name for c in RUN_CASES}
    assert set(KNOWN_FAILURES) <= names, set(KNOWN_FAILURES) - names


def test_backend_api():
    relu = onnx.helper.make_node("Relu", ["x"], ["y"])
    x = np.array([[-1.0, 2.0]], dtype=np.float32)
    (y,) = onnx_backend.TapeoutBackend.run_node(relu, [x])
    np.testing.assert_array_equal(y, [[0.0, 2.0]])
    x_info, y_info = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 2]) for n in "xy")
    graph = onnx.helper.make_graph([relu], "relu", [x_info], [y_info])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 14)])
    assert onnx_backend.TapeoutBackend.is_compatible(model)
    assert onnx_backend.TapeoutBackend.supports_device("CPU") and not onnx_backend.supports_device("CUDA")
    np.testing.assert_array_equal(onnx_backend.prepare(model).run({"x": x}).y, [[0.0, 2.0]])
    model.graph.node[0].op_type = "Conv"
    assert not onnx_backend.is_compatible(model)
