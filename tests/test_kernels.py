"""Float kernels of the transformer-critical ONNX ops against onnxruntime.

One-node models built with ``onnx.helper`` on small random float32 inputs, run through
``onnx_backend.run_model`` and through onnxruntime. The attribute combinations are those the
ONNX node suite leaves thin: grouped-query Attention with a KV cache and a causal mask,
partial rotary embedding with position ids, normalisations on the last axis, ...
Tolerance: 1e-5 relative (with 1e-6 absolute for results near zero).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tapeout.compiler import onnx_backend

ort = pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-5, 1e-6


def _model(op: str, inputs: dict, outputs: tuple[str, ...], opset: int, **attrs):
    """A one-node model; an input given as None and an output named "" are omitted."""
    node = helper.make_node(op, [n if v is not None else "" for n, v in inputs.items()], outputs, **attrs)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in inputs.items() if v is not None],
        [helper.make_empty_tensor_value_info(n) for n in outputs if n])
    # ir_version 10: the newest onnxruntime accepts; onnx would stamp a newer one
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)   # types the outputs


def _check(op: str, inputs: dict, outputs: tuple[str, ...] = ("Y",), opset: int = 23, **attrs) -> None:
    model = _model(op, inputs, outputs, opset, **attrs)
    feeds = {n: v for n, v in inputs.items() if v is not None}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)
    got = onnx_backend.run_model(model, feeds)
    assert len(got) == len(want) == len([n for n in outputs if n])
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"output {i}"
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{op} output {i}")


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("q_len", [1, 3])   # one decode step; a chunk of three tokens
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_attention_gqa_past_causal(rank, q_len, mask):
    rng = np.random.default_rng(0)
    batch, q_heads, kv_heads, head, past = 2, 4, 2, 8, 5
    q, k, v = _rand(rng, batch, q_heads, q_len, head), _rand(rng, batch, kv_heads, q_len, head), \
        _rand(rng, batch, kv_heads, q_len, head)
    attrs = {"is_causal": 1}
    if rank == 3:   # (batch, seq, heads * head_size), heads given as attributes
        q, k, v = (t.transpose(0, 2, 1, 3).reshape(batch, q_len, -1) for t in (q, k, v))
        attrs.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
    masks = {None: None, "bool": rng.random((q_len, past + q_len)) > 0.3,
             "float": _rand(rng, q_len, past + q_len)}
    inputs = {"Q": q, "K": k, "V": v, "attn_mask": masks[mask],
              "past_key": _rand(rng, batch, kv_heads, past, head),
              "past_value": _rand(rng, batch, kv_heads, past, head)}
    _check("Attention", inputs, ("Y", "present_key", "present_value"), **attrs)


# mode 2 (scores + bias) is left to the node suite: onnxruntime writes the lowest float32 where
# the ONNX reference (and tapeout) write -inf
@pytest.mark.parametrize("mode", [0, 1, 3])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_attention_softcap_scale_qk_output(mode, softcap):
    rng = np.random.default_rng(1)
    q, k, v = _rand(rng, 1, 2, 4, 8), _rand(rng, 1, 2, 6, 8), _rand(rng, 1, 2, 6, 8)
    mask = rng.random((4, 6)) > 0.3
    _check("Attention", {"Q": q, "K": k, "V": v, "attn_mask": mask}, ("Y", "", "", "qk_matmul_output"),
           scale=0.25, softcap=softcap, is_causal=1, qk_matmul_output_mode=mode)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout", ["4d", "3d"])
def test_rotary_embedding_partial_with_position_ids(interleaved, layout):
    rng = np.random.default_rng(2)
    batch, heads, seq, head, rot, max_pos = 2, 3, 5, 8, 4, 16
    x = _rand(rng, batch, heads, seq, head)
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rot}
    if layout == "3d":
        x = x.transpose(0, 2, 1, 3).reshape(batch, seq, heads * head)
        attrs["num_heads"] = heads
    angles = np.arange(max_pos)[:, None] * (1e-2 ** (np.arange(rot // 2) / (rot // 2)))
    inputs = {"X": x, "cos_cache": np.cos(angles).astype(np.float32),
              "sin_cache": np.sin(angles).astype(np.float32),
              "position_ids": rng.integers(0, max_pos, (batch, seq)).astype(np.int64)}
    _check("RotaryEmbedding", inputs, **attrs)


def test_rotary_embedding_without_position_ids():
    rng = np.random.default_rng(3)
    x = _rand(rng, 2, 3, 5, 8)
    angles = rng.random((2, 5, 4)) * 3
    _check("RotaryEmbedding", {"X": x, "cos_cache": np.cos(angles).astype(np.float32),
                               "sin_cache": np.sin(angles).astype(np.float32)})


@pytest.mark.parametrize("axis", [-1, -2])
def test_rms_normalization(axis):
    rng = np.random.default_rng(4)
    x = _rand(rng, 2, 3, 16)
    scale = _rand(rng, *x.shape[axis:])
    _check("RMSNormalization", {"X": x, "scale": scale}, axis=axis, epsilon=1e-6)


def test_layer_normalization_last_axis():
    rng = np.random.default_rng(5)
    x = _rand(rng, 2, 3, 16) * 3 + 1
    _check("LayerNormalization", {"X": x, "Scale": _rand(rng, 16), "B": _rand(rng, 16)},
           ("Y", "Mean", "InvStdDev"), opset=17, axis=-1, epsilon=1e-5)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_axis(axis):
    x = _rand(np.random.default_rng(6), 3, 4, 5) * 4
    _check("Softmax", {"input": x}, opset=13, axis=axis)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = _rand(np.random.default_rng(7), 4, 32) * 3
    _check("Gelu", {"X": x}, opset=20, approximate=approximate)
