"""Float kernels of tapeout's transformer-level ops (the targets of the fusion passes).

Semantics, shared with docs/ops.md:
- ``linear(x, W[, b])``: ``x @ W + b`` with W ``[in, out]``; attr ``trans_w`` means W is ``[out, in]``.
- ``rmsnorm(x, g)``: ``x / sqrt(mean(x^2, -1) + eps) * g``.
- ``layernorm(x, g[, b])``: ``(x - mean) / sqrt(var + eps) * g + b`` over the last axis.
- ``gelu(x)``: exact (erf) or ``approximate="tanh"``; ``silu(x)``: ``x * sigmoid(x)``.
- ``gated_mlp(gate, up)``: ``act(gate) * up`` with ``activation`` silu|gelu|gelu_tanh.
- ``rope(x, cos, sin)``: rotates the first ``rotary_dim`` features of the last axis of
  ``x [B, H, S, D]`` with ``cos/sin [B or 1, S, rotary_dim/2 or rotary_dim]``; half-split
  (``rotate_half``) or ``interleaved`` pairs.
- ``attention(q, k, v[, mask])``: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, T, D]`` with Hq a
  multiple of Hkv (grouped-query); ``softmax(q k^T * scale + mask) v``; ``causal`` adds the
  lower-right-aligned causal mask; a bool mask keeps True positions, a float mask is added; with ``key_mask`` the mask is
  ``[B, T]`` (a graph input such as ``attention_mask``): key t of row b is kept iff it is non-zero.
"""
from __future__ import annotations

import math

import numpy as np

from .interp import kernel


def _acc(a: np.ndarray) -> np.ndarray:
    """float32 tensors accumulate in float64 (results round to float32 once per op, as a
    float32 runtime's do, instead of once per partial sum)."""
    return a.astype(np.float64) if a.dtype == np.float32 else a


@kernel("linear")
def linear(op, x, w, b=None):
    y = _acc(x) @ _acc(w.T if op.attr("trans_w", False) else w)
    return (y + b if b is not None else y).astype(x.dtype)


@kernel("rmsnorm")
def rmsnorm(op, x, g):
    x64 = x.astype(np.float64)
    var = np.mean(x64 * x64, axis=-1, keepdims=True)
    return (x64 / np.sqrt(var + op.attr("eps", 1e-6)) * g).astype(x.dtype)


@kernel("layernorm")
def layernorm(op, x, g, b=None):
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=-1, keepdims=True)
    y = d / np.sqrt(var + np.float32(op.attr("eps", 1e-5))) * g
    return (y + b if b is not None else y).astype(x.dtype)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


def gelu_fn(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        y = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    else:
        y = 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))
    return y.astype(x.dtype)


def silu_fn(x: np.ndarray) -> np.ndarray:
    return (x / (1.0 + np.exp(-x))).astype(x.dtype)


ACTIVATIONS = {"silu": silu_fn, "gelu": gelu_fn, "gelu_tanh": lambda x: gelu_fn(x, "tanh")}


@kernel("gelu")
def gelu(op, x):
    return gelu_fn(x, op.attr("approximate", "none"))


@kernel("silu")
def silu(op, x):
    return silu_fn(x)


@kernel("gated_mlp")
def gated_mlp(op, gate, up):
    return (ACTIVATIONS[op.attr("activation", "silu")](_acc(gate)) * _acc(up)).astype(gate.dtype)


@kernel("rope")
def rope(op, x, cos, sin):
    rd = op.attr("rotary_dim", x.shape[-1])
    xr, xp = x[..., :rd], x[..., rd:]
    if cos.ndim == 3:       # [B, S, *] broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    if op.attr("interleaved", False):
        half = cos.shape[-1] if cos.shape[-1] == rd // 2 else rd // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = np.empty_like(xr)
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x2 * c + x1 * s
    else:
        if cos.shape[-1] == rd // 2:
            cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        h = rd // 2
        rot = np.concatenate([-xr[..., h:], xr[..., :h]], axis=-1)
        out = xr * cos + rot * sin
    return np.concatenate([out.astype(x.dtype), xp], axis=-1) if xp.shape[-1] else out.astype(x.dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    return e / np.where(s == 0, 1, s)


@kernel("attention")
def attention(op, q, k, v, mask=None):
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = np.repeat(k, hq // hkv, axis=1)
        v = np.repeat(v, hq // hkv, axis=1)
    scale = op.attr("scale", 1.0 / math.sqrt(q.shape[-1]))
    dtype, q, k, v = q.dtype, _acc(q), _acc(k), _acc(v)
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    s, t = scores.shape[-2], scores.shape[-1]
    if op.attr("causal", False):
        keep = np.tril(np.ones((s, t), dtype=bool), k=t - s)
        scores = np.where(keep, scores, -np.inf)
    if mask is not None and op.attr("key_mask", False):
        mask = (np.asarray(mask) != 0)[:, None, None, :]         # [B, T] keep flags per key
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    return (_softmax(scores) @ v).astype(dtype)
