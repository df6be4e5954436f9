"""Activation-aware input scaling folded into the graph (AWQ, Lin et al. 2023), free on the chip.

A linear y = W x quantises W diag(s) on the input x / s instead: loud input channels (large
s) get finer steps relative to their weights. The division by s is folded into whatever makes
x, so the chip computes exactly the same network with rescaled constants:

- x is an ``rmsnorm`` / ``layernorm`` output: its gain (and bias) divided by s;
- x is a ``gated_mlp`` output act(gate) * up: the ``up`` linear's output rows (and bias)
  divided by s (the product is linear in up).

Every linear reading x is scaled by the same s (q, k, v share the attention norm; gate and up
share the MLP norm). s = rms(x)^alpha, normalised to geometric mean 1, with alpha per input
chosen from ALPHAS by the activation-weighted error of a quick w3o6 rounding; alpha = 0 (no
scaling) is always a candidate, so a group is only rescaled when it measurably pays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import Graph, Op

ALPHAS = np.linspace(0.0, 1.0, 11)


@dataclass(frozen=True)
class Site:
    """An input tensor ``x`` all of whose readers are quantised linears, and what makes it."""

    x: str
    readers: tuple[str, ...]       # linear op names reading x
    maker: str                     # the op whose constants absorb 1 / s
    kind: str                      # "norm" | "up"


def sites(graph: Graph, linears: set[str]) -> list[Site]:
    """Every input that can be rescaled for free, in graph order."""
    out, seen = [], set()
    for op in graph.ops:
        if op.kind != "linear" or op.name not in linears or op.inputs[0] in seen:
            continue
        x = op.inputs[0]
        seen.add(x)
        readers = graph.consumer_ops(x)
        if not readers or any(r.kind != "linear" or r.name not in linears or r.inputs[0] != x
                              or len(r.inputs) > 2 and r.inputs[2] == x for r in readers):
            continue
        site = _site(graph, x, tuple(r.name for r in readers), _maker(graph, x))
        if site is not None:
            out.append(site)
    return out


def _maker(graph: Graph, x: str) -> Op | None:
    """The op that makes ``x``, looking through Reshapes that keep the feature axis (and feed
    nothing else), such as the [B, S, D] -> [B*S, D] flattening before a Gemm."""
    op = graph.producer_op(x)
    while op is not None and op.kind == "Reshape" and len(graph.consumer_ops(op.outputs[0])) == 1 \
            and graph.tensors[op.inputs[0]].shape[-1:] == graph.tensors[op.outputs[0]].shape[-1:]:
        op = graph.producer_op(op.inputs[0])
    return op


def _constant(graph: Graph, t: str | None) -> bool:
    return t is not None and graph.is_constant(t)


def _site(graph: Graph, x: str, readers: tuple[str, ...], maker: Op | None) -> Site | None:
    through_reshape = graph.producer_op(x) is not maker
    if maker is None or len(maker.outputs) != 1 \
            or (through_reshape and len(graph.consumer_ops(maker.outputs[0])) != 1):
        return None
    if maker.kind in ("rmsnorm", "layernorm") and len(maker.inputs) >= 2 \
            and all(_constant(graph, t) for t in maker.inputs[1:] if t):
        return Site(x, readers, maker.name, "norm")
    if maker.kind == "gated_mlp":
        up = graph.producer_op(maker.inputs[1])
        if up is not None and up.kind == "linear" and len(graph.consumer_ops(up.outputs[0])) == 1 \
                and _constant(graph, up.inputs[1]) \
                and (len(up.inputs) < 3 or not up.inputs[2] or _constant(graph, up.inputs[2])):
            return Site(x, readers, up.name, "up")
    return None


def _scale_input(graph: Graph, op_name: str, index: int, factor: np.ndarray, axis: int) -> None:
    """Give op ``op_name`` its own copy of constant input ``index`` multiplied by ``factor``
    along ``axis`` (constants may be shared: exporters deduplicate equal norm gains)."""
    op = graph.op(op_name)
    v = np.asarray(graph.constants[op.inputs[index]])
    shape = [1] * v.ndim
    shape[axis] = -1
    new = graph.fresh_name(f"{op.inputs[index]}_scaled")
    graph.add_constant(new, (v.astype(np.float64) * factor.reshape(shape)).astype(v.dtype))
    inputs = list(op.inputs)
    inputs[index] = new
    graph.replace_op(op.replace(inputs=tuple(inputs)))


def apply(graph: Graph, site: Site, s: np.ndarray) -> None:
    """Rescale ``graph`` (a copy the caller owns) so that ``site.x`` becomes x / s and every
    reader's weight W diag(s): the network's function is unchanged."""
    maker = graph.op(site.maker)
    inv = 1.0 / s
    if site.kind == "norm":
        for i, t in enumerate(maker.inputs[1:], 1):
            if t:
                _scale_input(graph, site.maker, i, inv, -1)
    else:                               # the up linear's outputs (its weight's output axis)
        _scale_input(graph, site.maker, 1, inv, 0 if maker.attr("trans_w", False) else 1)
        if len(maker.inputs) > 2 and maker.inputs[2]:
            _scale_input(graph, site.maker, 2, inv, -1)
    for r in site.readers:
        _scale_input(graph, r, 1, s, 1 if graph.op(r).attr("trans_w", False) else 0)


def candidate_scales(act_sq: np.ndarray, alpha: float) -> np.ndarray:
    """rms^alpha normalised to geometric mean 1 (dead channels keep 1)."""
    rms = np.sqrt(np.maximum(act_sq, 0))
    live = rms > 0
    s = np.ones_like(rms)
    if alpha and live.any():
        s[live] = rms[live] ** alpha
        s[live] /= np.exp(np.mean(np.log(s[live])))
    return s


def choose_scales(weights: list[np.ndarray], act_sq: np.ndarray, quantise) -> tuple[float, np.ndarray]:
    """(alpha, s) with the least activation-weighted error sum_i act_sq[i] / s[i]^2 *
    (Q(W diag s) - W diag s)^2 over the readers' weights; ``quantise(w, act_sq)`` -> the
    dequantised w. alpha = 0 comes first, so it wins ties."""
    best = None
    for alpha in ALPHAS:
        s = candidate_scales(act_sq, alpha)
        imp = act_sq / s ** 2
        err = 0.0
        for w in weights:
            ws = w * s
            err += float(np.sum((quantise(ws, imp) - ws) ** 2 * imp))
        if best is None or err < best[0]:
            best = (err, float(alpha), s)
    return best[1], best[2]


def smooth_model(graph: Graph, stats, linears: set[str], quantise):
    """A rescaled copy of ``graph`` and matching statistics (x / s: act_sq / s^2 and
    H / (s s^T)), with alpha chosen per site by :func:`choose_scales`. -> (graph, stats,
    {site input: alpha})."""
    from ..qmodel import CalibStats, weight_matrix
    g = graph.copy()
    out = CalibStats(dict(stats.act_sq), dict(stats.hessian), stats.tokens)
    alphas = {}
    for site in sites(graph, linears):
        if site.x not in stats.act_sq:
            continue
        ws = [np.asarray(weight_matrix(graph, graph.op(r)), np.float64) for r in site.readers]
        alpha, s = choose_scales(ws, stats.act_sq[site.x], quantise)
        alphas[site.x] = alpha
        if alpha == 0:
            continue
        apply(g, site, s)
        out.act_sq[site.x] = stats.act_sq[site.x] / s ** 2
        if site.x in stats.hessian:
            out.hessian[site.x] = stats.hessian[site.x] / np.outer(s, s)
    return g, out, alphas
