"""Attention masks as runtime inputs (fuse-mask), through golden and every backend.

The exports come from models/tiny.py with ``mask=True``: ``attention_mask`` is a graph input and
the exporters' plumbing (Cast, And, Equal, GatherND, Where, Expand, ...) turns it into the
scores' mask. After fusion each attention reads ``attention_mask`` itself (``key_mask``).
"""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from tapeout.compiler.frontend import frontend
from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.interp import run
from tapeout.compiler.ir import Graph, Op, TensorInfo
from tapeout.compiler.passes import run_passes
from tapeout.compiler.program import padded_mask
from tapeout.compiler.qmodel import QuantConfig, quantize_model

from test_bad_input import run_cli

# (family, exporter, variant): the default tier; the rest of the family matrix runs in `slow`
FAST = [("llama", "dynamo", "prefill"), ("llama", "dynamo", "decode"), ("gpt2", "dynamo", "prefill"),
        ("bert", "dynamo", "prefill"), ("qwen2", "dynamo", "prefill"),
        ("neox", "dynamo", "prefill"), ("phi3", "dynamo", "prefill"), ("gemma", "dynamo", "prefill")]
SLOW = [(f, e, v) for f in ("llama", "gpt2", "qwen2", "mistral", "neox", "phi3", "gemma")
        for e in ("dynamo", "legacy") for v in ("prefill", "decode")] + [("bert", "dynamo", "prefill")]
SLOW = [c for c in SLOW if c not in FAST]
CASES = FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW]
CAUSAL = {"llama", "gpt2", "qwen2", "mistral", "neox", "phi3", "gemma"}


def _export(tiny, fam, exp, var, **kw):
    return tiny.export(fam, exp, None, var, mask=True, **kw)


def _feeds(path, mask):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {}
    for i in sess.get_inputs():
        shape = i.shape
        if i.name == "attention_mask":
            feeds[i.name] = mask(shape)
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feeds[i.name] = rng.integers(0, 256, shape).astype(np.int64)
    return sess, feeds


@pytest.mark.parametrize("fam,exp,var", CASES)
def test_mask_plumbing_fuses_into_attention_and_matches_onnxruntime(tiny, fam, exp, var):
    path = _export(tiny, fam, exp, var)
    g = frontend(path)
    att = [op for op in g.ops if op.kind == "attention"]
    assert len(att) == 2
    for op in att:
        assert op.inputs[3] == "attention_mask" and op.attr("key_mask") is True
        assert op.attr("causal") == (fam in CAUSAL and var == "prefill")
    hist = g.histogram()
    assert not {"Cast", "And", "Equal", "GatherND", "Where", "Softmax", "IsNaN"} & set(hist), hist
    sess, feeds = _feeds(path, lambda s: padded_mask(tuple(s), np.int64))
    want = sess.run(["logits"], feeds)[0]
    got = run(g, feeds)["logits"]
    # causal + left padding: a padded query row has no key left; the fused softmax gives it 0,
    # the export its own fallback. Compare the rows that hold a real token.
    live = feeds["attention_mask"][:, -got.shape[1]:].astype(bool) if fam in CAUSAL else \
        np.ones(got.shape[:2], bool)
    assert live.sum() >= 1
    assert np.max(np.abs(got[live] - want[live])) < 1e-4


@pytest.mark.parametrize("fam", ["llama", "bert"])
def test_a_mask_of_all_ones_gives_exactly_the_mask_free_result(tiny, fam):
    outs = []
    for mask in (True, False):
        g = frontend(tiny.export(fam, "dynamo", 20, "prefill", mask=mask))
        gm = quantize_model(g, QuantConfig("nvfp4"), None).golden()
        ids = (np.arange(16) * 37 + 5) % 256
        feeds = {"input_ids": ids[None]}
        if mask:
            feeds["attention_mask"] = np.ones((1, 16), np.int64)
        outs.append(gm.run(feeds)["logits"])
    assert outs[0].size == 16 * 256 and np.array_equal(outs[0], outs[1])


def test_padding_changes_golden_where_it_should(tiny):
    """Encoder, batch 2, a different padding per row: each row's kept tokens see only kept keys."""
    g = frontend(tiny.export("bert", "dynamo", 20, "prefill", mask=True, batch=2))
    gm = quantize_model(g, QuantConfig("nvfp4"), None).golden()
    ids = np.stack([(np.arange(16) * 37 + 5) % 256] * 2)
    m = padded_mask((2, 16), np.int64)
    assert m[0].sum() != m[1].sum()
    out = gm.run({"input_ids": ids, "attention_mask": m})["logits"]
    # the padded keys' token ids do not matter to any position
    ids2 = ids.copy()
    ids2[m == 0] = 7
    out2 = gm.run({"input_ids": ids2, "attention_mask": m})["logits"]
    assert np.array_equal(out[m == 1], out2[m == 1])
    # ... but they do without the mask
    ones = np.ones_like(m)
    a = gm.run({"input_ids": ids, "attention_mask": ones})["logits"]
    b = gm.run({"input_ids": ids2, "attention_mask": ones})["logits"]
    assert not np.array_equal(a[m == 1], b[m == 1])
    # golden against the float model on the same padded batch (non-padded rows)
    want = run(g, {"input_ids": ids, "attention_mask": m})["logits"]
    err = np.max(np.abs(out[m == 1] / 2 ** 16 - want[m == 1]))
    assert err < 0.5, err


@pytest.mark.parametrize("fam,exp,var,target,fmt", [
    ("llama", "dynamo", "prefill", "systolic", "nvfp4"), ("llama", "dynamo", "prefill", "dataflow", "w3o6"),
    ("llama", "dynamo", "decode", "systolic", "nvfp4"), ("gpt2", "dynamo", "prefill", "dataflow", "nvfp4"),
    ("bert", "dynamo", "prefill", "systolic", "w3o6"), ("gemma", "dynamo", "prefill", "dataflow", "nvfp4"),
    ("llama", "dynamo", "decode", "dataflow", "w3o6"),     # w3o6 calibrates a decode export step by step
])
def test_masked_models_are_bit_exact_on_the_backends(tiny, tmp_path, capsys, fam, exp, var, target, fmt):
    path = _export(tiny, fam, exp, var)
    extra = ["--calib-tokens", _ids(tmp_path)] if fmt == "w3o6" else []
    code, out, err = run_cli(capsys, "compile", path, "--target", target, "--format", fmt, "-o", tmp_path / "o",
                             *extra)
    assert code == 0, err
    code, out, err = run_cli(capsys, "simulate", tmp_path / "o", "--json")
    r = json.loads(out)
    assert code == 0 and r["mismatches"] == 0 and r["checked"] >= 256, (r, err)
    # the self-check ran with a padded mask (row 0 drops its first keys)
    m = np.load(tmp_path / "o" / "sim" / "feeds" / "attention_mask.npy")
    assert m.shape[0] == 1 and (m == 0).sum() == max(1, m.shape[1] // 8) and m[0, -1] == 1


def test_masked_model_on_the_maskrom_target(tiny, tmp_path, capsys):
    path = _export(tiny, "llama", "dynamo", "prefill")
    code, out, err = run_cli(capsys, "compile", path, "--target", "maskrom", "--format", "w3o6",
                             "--calib-tokens", _ids(tmp_path), "-o", tmp_path / "c")
    assert code == 0, err
    assert "fabric == golden (full) on 4096 outputs" in out
    code, out, err = run_cli(capsys, "simulate", tmp_path / "c", "--layer", "layers.0.k_proj", "--json")
    r = json.loads(out)
    assert code == 0 and r["mismatches"] == 0 and r["checked"] == 512


def _ids(tmp_path):
    p = tmp_path / "ids.npy"
    np.save(p, (np.arange(256) * 37 + 11) % 256)
    return p


def _mask_graph(body) -> Graph:
    """q, k, v [1, 2, 4, 8] and attention_mask [1, 4] -> attention(q, k, v, body(mask))."""
    g = Graph("m")
    g.inputs, g.outputs = ["q", "k", "v", "attention_mask"], ["o"]
    for t in ("q", "k", "v", "o"):
        g.tensors[t] = TensorInfo((1, 2, 4, 8), np.float32)
    g.tensors["attention_mask"] = TensorInfo((1, 4), np.int64)
    m = body(g)
    g.add_op(Op("attention", "att", ("q", "k", "v", m), ("o",), {"scale": 0.35, "causal": False}))
    return g


def _additive(g: Graph, scale: float) -> str:
    g.tensors.update({"mb": TensorInfo((1, 4), np.bool_), "mf": TensorInfo((1, 4), np.float32),
                      "mr": TensorInfo((1, 1, 1, 4), np.float32), "mm": TensorInfo((1, 1, 1, 4), np.float32)})
    g.add_constant("zero", np.array(0, np.int64))
    g.add_constant("big", np.array(scale, np.float32))
    g.add_constant("shape", np.array([1, 1, 1, 4], np.int64))
    g.tensors.update({"zero": TensorInfo((), np.int64), "big": TensorInfo((), np.float32),
                      "shape": TensorInfo((4,), np.int64)})
    g.add_op(Op("Equal", "eq", ("attention_mask", "zero"), ("mb",)))
    g.add_op(Op("Cast", "cast", ("mb",), ("mf",), {"to": 1}))
    g.add_op(Op("Reshape", "rs", ("mf", "shape"), ("mr",)))
    g.add_op(Op("Mul", "mul", ("mr", "big"), ("mm",)))
    return "mm"


def test_fuse_mask_takes_a_real_mask_and_leaves_a_bias_alone():
    g = _mask_graph(lambda g: _additive(g, -3.4e38))          # (mask == 0) * finfo.min: a padding mask
    run_passes(g, ["fuse-mask", "dead-code"])
    (att,) = g.ops
    assert att.inputs[3] == "attention_mask" and att.attr("key_mask") and not att.attr("causal")
    g = _mask_graph(lambda g: _additive(g, -2.0))             # a soft bias of -2: not a mask
    run_passes(g, ["fuse-mask", "dead-code"])
    att = next(op for op in g.ops if op.kind == "attention")
    assert att.inputs[3] == "mm" and not att.attr("key_mask", False) and len(list(g.ops)) == 5


def test_key_mask_semantics_in_golden_and_the_float_kernel():
    g = _mask_graph(lambda g: _additive(g, -3.4e38))
    run_passes(g, ["fuse-mask", "dead-code"])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(np.float32) for _ in range(3))
    m = np.array([[1, 0, 1, 1]])
    got = run(g, {"q": q, "k": k, "v": v, "attention_mask": m})["o"]
    s = np.einsum("bhsd,bhtd->bhst", q, k) * 0.35
    s[..., 1] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v
    assert np.max(np.abs(got - want)) < 1e-5
    from tapeout.compiler.golden.model import Golden
    gm = Golden(g, {})
    z = gm.run({"q": fx.to_fixed(q), "k": fx.to_fixed(k), "v": fx.to_fixed(v), "attention_mask": m})["o"]
    assert np.max(np.abs(z / 2 ** 16 - want)) < 0.05
    # key 1's value does not reach the output; change it and nothing moves
    v2 = v.copy()
    v2[..., 1, :] += 5
    z2 = gm.run({"q": fx.to_fixed(q), "k": fx.to_fixed(k), "v": fx.to_fixed(v2), "attention_mask": m})["o"]
    assert np.array_equal(z, z2)


def test_rotary_tables_computed_from_runtime_positions_fold_into_a_gathered_table():
    """optimum-style RoPE: cos/sin = cos/sin(position_ids x inv_freq) at run time."""
    g = Graph("p")
    g.inputs, g.outputs = ["position_ids", "x"], ["y"]
    g.tensors["position_ids"] = TensorInfo((1, 6), np.int64)
    g.tensors["x"] = TensorInfo((1, 6, 4), np.float32)
    g.add_constant("inv", (1.0 / 10000 ** (np.arange(4) / 4)).astype(np.float32).reshape(1, 1, 4))
    g.add_constant("ax", np.array([2], np.int64))
    for t, shp, dt in (("pu", (1, 6, 1), np.int64), ("pf", (1, 6, 1), np.float32), ("f", (1, 6, 4), np.float32),
                       ("c", (1, 6, 4), np.float32), ("y", (1, 6, 4), np.float32)):
        g.tensors[t] = TensorInfo(shp, dt)
    g.add_op(Op("Unsqueeze", "u", ("position_ids", "ax"), ("pu",)))
    g.add_op(Op("Cast", "cast", ("pu",), ("pf",), {"to": 1}))
    g.add_op(Op("Mul", "mul", ("pf", "inv"), ("f",)))
    g.add_op(Op("Cos", "cos", ("f",), ("c",)))
    g.add_op(Op("Mul", "use", ("x", "c"), ("y",)))
    pos = np.array([[3, 9, 0, 17, 4000, 5]])
    x = np.random.default_rng(0).standard_normal((1, 6, 4)).astype(np.float32)
    want = run(g, {"position_ids": pos, "x": x})["y"]
    run_passes(g, ["fold-position-tables", "dead-code"])
    kinds = sorted(op.kind for op in g.ops)
    assert kinds == ["Gather", "Mul"], kinds
    gather = next(op for op in g.ops if op.kind == "Gather")
    assert g.constants[gather.inputs[0]].shape == (8192, 4) and gather.inputs[1] == "position_ids"
    assert np.array_equal(run(g, {"position_ids": pos, "x": x})["y"], want)
    # a value that is not a function of each position alone (a running sum over positions) stays
    g2 = Graph("q")
    g2.inputs, g2.outputs = ["position_ids", "x"], ["y"]
    g2.tensors["position_ids"] = TensorInfo((1, 6), np.int64)
    for t in ("x", "pf", "cs", "y"):
        g2.tensors[t] = TensorInfo((1, 6), np.float32)
    g2.add_constant("one", np.array(1, np.int64))
    g2.add_op(Op("Cast", "cast", ("position_ids",), ("pf",), {"to": 1}))
    g2.add_op(Op("CumSum", "cumsum", ("pf", "one"), ("cs",)))
    g2.add_op(Op("Mul", "mul", ("cs", "x"), ("y",)))
    assert not run_passes(g2, ["fold-position-tables"])[0].changed
    assert sorted(op.kind for op in g2.ops) == ["Cast", "CumSum", "Mul"]
