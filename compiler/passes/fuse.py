"""Fusion to transformer-level ops: linear, rmsnorm, layernorm, gelu, silu, rope, attention,
gated_mlp (semantics in ``kernels_fused``).

Each pass replaces a *root* op by a fused op producing the same output tensor and leaves the
ops it absorbed to ``dead-code`` (an absorbed op still read elsewhere stays, so a fusion never
changes what other consumers see). Two checks keep patterns honest without enumerating every
exporter's spelling:

* activations are recognised by *probing*: the single-input elementwise region ending at a
  root is evaluated on sample values and compared with gelu/silu;
* attention "head plumbing" (repeat-kv, transposes, reshapes between the k/v tensors and the
  score MatMul) is checked by *index tracing*: element ids are pushed through the plumbing and
  must come out as ``repeat(k)^T`` exactly.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import numpy as np

from ..errors import TapeoutError
from ..interp import OpError, run_op
from ..ir import Graph, Op, TensorInfo
from ..kernels_fused import gelu_fn, silu_fn
from . import register

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal", "Exp", "Log",
               "Tanh", "Sigmoid", "Erf", "Abs", "Cast", "silu"}
PLUMBING = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten"}


# --- small matching helpers -------------------------------------------------------------------
def const(graph: Graph, t: str) -> np.ndarray | None:
    return graph.constants.get(t) if t else None


def scalar(graph: Graph, t: str) -> float | None:
    c = const(graph, t)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def prod(graph: Graph, t: str, *kinds: str) -> Op | None:
    op = graph.producer_op(t) if t else None
    return op if op is not None and (not kinds or op.kind in kinds) else None


def split_const(graph: Graph, op: Op) -> tuple[str, np.ndarray] | None:
    """For a binary op with one constant operand: (the other input, the constant)."""
    a, b = op.inputs[0], op.inputs[1]
    if graph.is_constant(b) and not graph.is_constant(a):
        return a, graph.constants[b]
    if graph.is_constant(a) and not graph.is_constant(b):
        return b, graph.constants[a]
    return None


def replace_root(graph: Graph, root: Op, kind: str, inputs: list[str], attrs: dict | None = None,
                 outputs: tuple[str, ...] | None = None) -> Op:
    graph.remove_op(root.name)
    op = Op(kind, graph.fresh_name(f"{kind}_{root.name}"), tuple(inputs), outputs or root.outputs, attrs or {})
    return graph.add_op(op)


def _last_axis(graph: Graph, op: Op) -> bool:
    """ReduceMean over exactly the last axis (axes as attribute or constant input)."""
    axes = op.attr("axes")
    if axes is None and len(op.inputs) > 1:
        c = const(graph, op.inputs[1])
        axes = None if c is None else tuple(int(a) for a in c.reshape(-1))
    rank = len(graph.tensors[op.inputs[0]].shape or ())
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1) and op.attr("keepdims", 1) == 1


MAX_SCORE_SCALE = float(1 << 16)


def _score_scale(graph: Graph, op: Op, scale: float) -> float:
    """An attention's score scale, refused when no integer multiplier can hold it."""
    if not math.isfinite(scale) or abs(scale) > MAX_SCORE_SCALE:
        raise TapeoutError(f"the attention's score scale is {scale!r} (from the constants scaling q, k or the "
                           f"scores); it must be finite and at most {MAX_SCORE_SCALE:g} in magnitude",
                           file=graph.meta.get("file"), node=op.name, op=op.kind)
    return scale


def _norm_eps(graph: Graph, op: Op, eps) -> float:
    """A norm's epsilon, finite and in [0, 8): every integer backend holds it as eps * 2**60."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and 0.0 <= value < 8.0):
        raise TapeoutError(f"the norm's epsilon is {eps!r}; it must be finite and in [0, 8)",
                           file=graph.meta.get("file"), node=op.name, op=op.kind)
    return value


# --- linear -------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class FuseLinear:
    """MatMul with a constant 2-D weight (+ a constant bias Add), and Gemm -> ``linear``."""

    name: ClassVar[str] = "fuse-linear"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            tr = prod(graph, op.inputs[1], "Transpose") if op.kind == "MatMul" else None
            if tr is not None and graph.is_constant(tr.inputs[0]) and graph.constants[tr.inputs[0]].ndim == 2 \
                    and tuple(tr.attr("perm", (1, 0))) == (1, 0) and not graph.is_constant(op.inputs[0]):
                # MatMul(x, W^T) of a tied embedding: read the shared table as [out, in]
                new = replace_root(graph, op, "linear", [op.inputs[0], tr.inputs[0]], {"trans_w": True})
                changed = True
            elif op.kind == "MatMul" and (w := const(graph, op.inputs[1])) is not None and w.ndim == 2 \
                    and not graph.is_constant(op.inputs[0]):
                new = replace_root(graph, op, "linear", [op.inputs[0], op.inputs[1]], {"trans_w": False})
                changed = True
            elif op.kind == "Gemm" and op.attr("transA", 0) == 0 and op.attr("alpha", 1.0) == 1.0 \
                    and op.attr("beta", 1.0) == 1.0 and graph.is_constant(op.inputs[1]):
                bias = op.inputs[2] if len(op.inputs) > 2 else ""
                if bias and const(graph, bias).ndim > 1 and const(graph, bias).shape[0] != 1:
                    continue
                inputs = [op.inputs[0], op.inputs[1]] + ([bias] if bias else [])
                new = replace_root(graph, op, "linear", inputs, {"trans_w": bool(op.attr("transB", 0))})
                changed = True
            else:
                continue
            self._absorb_bias(graph, new)
        return changed

    @staticmethod
    def _absorb_bias(graph: Graph, lin: Op) -> None:
        if len(lin.inputs) > 2:
            return
        users = graph.consumer_ops(lin.outputs[0])
        if len(users) != 1 or users[0].kind != "Add" or lin.outputs[0] in graph.outputs:
            return
        add = users[0]
        sc = split_const(graph, add)
        out_dim = graph.tensors[lin.inputs[1]].shape[0 if lin.attr("trans_w") else 1]
        if sc is None or sc[1].shape[-1:] != (out_dim,) or sc[1].size != out_dim:
            return
        bias_name = add.inputs[1] if graph.is_constant(add.inputs[1]) else add.inputs[0]
        if sc[1].ndim != 1:
            bias_name = graph.add_constant(graph.fresh_name(f"{bias_name}_1d"), sc[1].reshape(-1))
        graph.remove_op(lin.name)
        graph.remove_op(add.name)
        graph.add_op(lin.replace(inputs=lin.inputs + (bias_name,), outputs=add.outputs))


# --- norms --------------------------------------------------------------------------------------
def _rms_core(graph: Graph, t: str) -> tuple[str, float] | None:
    """t == x * rsqrt(mean(x^2) + eps) (or x / sqrt(...)): returns (x, eps)."""
    op = prod(graph, t, "Mul", "Div")
    if op is None:
        return None
    for x, r in ((op.inputs[0], op.inputs[1]), (op.inputs[1], op.inputs[0])):
        if op.kind == "Div" and x != op.inputs[0]:
            continue
        if op.kind == "Mul":
            rec = prod(graph, r, "Reciprocal", "Div")
            if rec is not None and rec.kind == "Div" and scalar(graph, rec.inputs[0]) != 1.0:
                rec = None
            sq = prod(graph, rec.inputs[-1], "Sqrt") if rec else None
        else:
            sq = prod(graph, r, "Sqrt")
        add = prod(graph, sq.inputs[0], "Add") if sq else None
        sc = split_const(graph, add) if add else None
        mean = prod(graph, sc[0], "ReduceMean") if sc and sc[1].size == 1 else None
        if mean is None or not _last_axis(graph, mean):
            continue
        sq_op = prod(graph, mean.inputs[0], "Pow", "Mul")
        if sq_op is None:
            continue
        if sq_op.kind == "Pow" and sq_op.inputs[0] == x and scalar(graph, sq_op.inputs[1]) == 2.0 or \
                sq_op.kind == "Mul" and sq_op.inputs[0] == sq_op.inputs[1] == x:
            return x, float(sc[1].reshape(-1)[0])
    return None


def _ln_core(graph: Graph, t: str) -> tuple[str, float] | None:
    """t == (x - mean(x)) / sqrt(var(x) + eps) over the last axis: returns (x, eps)."""
    div = prod(graph, t, "Div")
    if div is None:
        return None
    sub = prod(graph, div.inputs[0], "Sub")
    sq = prod(graph, div.inputs[1], "Sqrt")
    add = prod(graph, sq.inputs[0], "Add") if sq else None
    sc = split_const(graph, add) if add else None
    var = prod(graph, sc[0], "ReduceMean") if sc else None
    if sub is None or var is None or not _last_axis(graph, var):
        return None
    mean = prod(graph, sub.inputs[1], "ReduceMean")
    p = prod(graph, var.inputs[0], "Pow")
    if mean is None or mean.inputs[0] != sub.inputs[0] or not _last_axis(graph, mean) or p is None \
            or p.inputs[0] != sub.outputs[0] or scalar(graph, p.inputs[1]) != 2.0:
        return None
    return sub.inputs[0], float(sc[1].reshape(-1)[0])


def _ones(graph: Graph, x: str) -> str:
    d = graph.tensors[x].shape[-1]
    return graph.add_constant(graph.fresh_name("norm_ones"), np.ones((d,), graph.tensors[x].dtype))


@register
@dataclass(frozen=True)
class FuseRMSNorm:
    """The Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul chain (times gamma) and
    ``RMSNormalization`` -> ``rmsnorm``."""

    name: ClassVar[str] = "fuse-rmsnorm"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.name not in graph.nx:
                continue
            if op.kind == "RMSNormalization" and op.attr("axis", -1) in (-1, len(graph.tensors[op.inputs[0]].shape) - 1):
                replace_root(graph, op, "rmsnorm", [op.inputs[0], op.inputs[1]], {"eps": _norm_eps(graph, op, op.attr("epsilon", 1e-5))})
                changed = True
            elif op.kind == "Mul" and (sc := split_const(graph, op)) is not None and sc[1].ndim == 1 \
                    and (core := _rms_core(graph, sc[0])) is not None:
                g = op.inputs[0] if graph.is_constant(op.inputs[0]) else op.inputs[1]
                replace_root(graph, op, "rmsnorm", [core[0], g], {"eps": _norm_eps(graph, op, core[1])})
                changed = True
            elif op.kind in ("Mul", "Div") and (core := _rms_core(graph, op.outputs[0])) is not None:
                # no gamma: rmsnorm with ones
                users = graph.consumer_ops(op.outputs[0])
                if len(users) == 1 and users[0].kind == "Mul" and split_const(graph, users[0]):
                    continue  # the gamma Mul is the root; handled when we reach it
                replace_root(graph, op, "rmsnorm", [core[0], _ones(graph, core[0])], {"eps": _norm_eps(graph, op, core[1])})
                changed = True
        return changed


@register
@dataclass(frozen=True)
class FuseLayerNorm:
    """``LayerNormalization`` over the last axis and its decomposed form -> ``layernorm``."""

    name: ClassVar[str] = "fuse-layernorm"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.name not in graph.nx:
                continue
            if op.kind == "LayerNormalization" and len([o for o in op.outputs if o]) == 1 and \
                    op.attr("axis", -1) in (-1, len(graph.tensors[op.inputs[0]].shape) - 1):
                replace_root(graph, op, "layernorm", list(op.inputs), {"eps": _norm_eps(graph, op, op.attr("epsilon", 1e-5))},
                             outputs=op.outputs[:1])
                changed = True
            elif op.kind == "Add" and (sc := split_const(graph, op)) is not None and sc[1].ndim == 1:
                mul = prod(graph, sc[0], "Mul")
                msc = split_const(graph, mul) if mul else None
                core = _ln_core(graph, msc[0]) if msc and msc[1].ndim == 1 else None
                if core is None:
                    continue
                g = mul.inputs[0] if graph.is_constant(mul.inputs[0]) else mul.inputs[1]
                b = op.inputs[0] if graph.is_constant(op.inputs[0]) else op.inputs[1]
                replace_root(graph, op, "layernorm", [core[0], g, b], {"eps": _norm_eps(graph, op, core[1])})
                changed = True
        return changed


# --- activations by probing ---------------------------------------------------------------------
PROBE = np.concatenate([np.linspace(-8, 8, 161), [-30.0, -12.5, 0.0, 1e-3, 12.5, 30.0]]).astype(np.float32)


def _region(graph: Graph, root: Op, depth: int = 8, cap: int = 32) -> tuple[str, list[Op]] | None:
    """The largest single-source elementwise region ending at ``root``: (source, ops in order).

    Bounded (``depth`` hops, ``cap`` ops): activation spellings are short chains, and the
    bound keeps the search local instead of wandering up the residual stream.
    """
    seen: dict[str, Op] = {}
    frontier = [(root, 0)]
    while frontier and len(seen) < cap:
        op, d = frontier.pop()
        if op.name in seen or op.kind not in ELEMENTWISE or d > depth:
            continue
        seen[op.name] = op
        for t in op.inputs:
            p = prod(graph, t)
            if t and p is not None and not graph.is_constant(t):
                frontier.append((p, d + 1))
    local = [seen[n] for n in nx.topological_sort(graph.nx.subgraph(seen))]
    best = None
    for x in dict.fromkeys(t for o in local for t in o.inputs if t and not graph.is_constant(t)):
        region, produced = [], {x}
        for op in local:
            if any(t in produced for t in op.inputs):
                region.append(op)
                produced.update(op.outputs)
        names = {o.name for o in region}
        if root.name not in names:
            continue
        ok = all((t in produced) or scalar(graph, t) is not None for o in region for t in o.inputs if t)
        ok = ok and all(all(c in names for c in graph.consumers.get(t, ()))
                        for o in region if o is not root for t in o.outputs)
        ok = ok and not any(t in graph.outputs for o in region if o is not root for t in o.outputs)
        if ok and (best is None or len(region) > len(best[1])):
            best = (x, region)
    return best


def _probe(graph: Graph, x: str, region: list[Op]) -> np.ndarray:
    env = {x: PROBE.astype(graph.tensors[x].dtype)}
    for op in region:
        args = [env[t] if t in env else graph.constants[t].reshape(()) for t in op.inputs]
        for name, v in zip(op.outputs, run_op(op, args)):
            env[name] = v
    return env[region[-1].outputs[0]]


ACT_CANDIDATES = {
    "gelu": lambda v: gelu_fn(v.astype(np.float64)),
    "gelu_tanh": lambda v: gelu_fn(v.astype(np.float64), "tanh"),
    "silu": lambda v: silu_fn(v.astype(np.float64)),
}


def identify_activation(graph: Graph, root: Op) -> tuple[str, str, list[Op]] | None:
    found = _region(graph, root)
    if found is None or len(found[1]) < 2:
        return None
    x, region = found
    with np.errstate(all="ignore"):
        y = _probe(graph, x, region).astype(np.float64)
    for name, fn in ACT_CANDIDATES.items():
        ref = fn(PROBE)
        if np.all(np.abs(y - ref) <= 2e-6 * (1 + np.abs(ref))):
            return name, x, region
    return None


@dataclass(frozen=True)
class _FuseActivation:
    kinds: ClassVar[tuple[str, ...]] = ()

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.name not in graph.nx:
                continue
            if op.kind == "Gelu" and "gelu" in self.kinds:
                approx = op.attr("approximate", "none")
                replace_root(graph, op, "gelu", [op.inputs[0]], {"approximate": approx})
                changed = True
                continue
            if op.kind not in ("Mul", "Div"):
                continue
            found = identify_activation(graph, op)
            if found is None or found[0].split("_")[0] not in self.kinds:
                continue
            name, x, _ = found
            kind, attrs = ("gelu", {"approximate": "tanh" if name == "gelu_tanh" else "none"}) \
                if name.startswith("gelu") else ("silu", {})
            replace_root(graph, op, kind, [x], attrs)
            changed = True
        return changed


@register
@dataclass(frozen=True)
class FuseGelu(_FuseActivation):
    """``Gelu`` and any elementwise chain computing erf- or tanh-GELU -> ``gelu``."""

    name: ClassVar[str] = "fuse-gelu"
    kinds: ClassVar[tuple[str, ...]] = ("gelu",)


@register
@dataclass(frozen=True)
class FuseSilu(_FuseActivation):
    """``x * sigmoid(x)`` (any spelling) -> ``silu``."""

    name: ClassVar[str] = "fuse-silu"
    kinds: ClassVar[tuple[str, ...]] = ("silu",)

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.kind == "Mul" and op.name in graph.nx:
                a, b = op.inputs[0], op.inputs[1]
                for x, s in ((a, b), (b, a)):
                    sig = prod(graph, s, "Sigmoid")
                    if sig is not None and sig.inputs[0] == x and len(graph.consumers[s]) == 1:
                        replace_root(graph, op, "silu", [x])
                        changed = True
                        break
        return super().__call__(graph) or changed


@register
@dataclass(frozen=True)
class FuseGatedMLP:
    """``act(gate) * up`` where gate and up are linears of one input -> ``gated_mlp``."""

    name: ClassVar[str] = "fuse-mlp"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        acts = {"silu": "silu", "gelu": "gelu"}
        for op in list(graph.ops):
            if op.kind != "Mul" or op.name not in graph.nx:
                continue
            for g, u in ((op.inputs[0], op.inputs[1]), (op.inputs[1], op.inputs[0])):
                act = prod(graph, g, *acts)
                gate = prod(graph, act.inputs[0], "linear") if act else None
                up = prod(graph, u, "linear")
                if gate is None or up is None or gate.inputs[0] != up.inputs[0]:
                    continue
                name = acts[act.kind]
                if act.kind == "gelu" and act.attr("approximate", "none") == "tanh":
                    name = "gelu_tanh"
                replace_root(graph, op, "gated_mlp", [act.inputs[0], u], {"activation": name})
                changed = True
                break
        return changed


# --- rope ---------------------------------------------------------------------------------------
def _rotate_half_source(graph: Graph, t: str) -> str | None:
    """t == concat(-x[..., h:], x[..., :h]) along the last axis: returns x."""
    cat = prod(graph, t, "Concat")
    if cat is None or len(cat.inputs) != 2:
        return None
    neg = prod(graph, cat.inputs[0], "Neg")
    hi = prod(graph, neg.inputs[0], "Slice") if neg else None
    lo = prod(graph, cat.inputs[1], "Slice")
    if hi is None or lo is None or hi.inputs[0] != lo.inputs[0]:
        return None
    x = hi.inputs[0]
    shape = graph.tensors[x].shape
    rank, d = len(shape), shape[-1]
    if cat.attr("axis") not in (-1, rank - 1):
        return None

    def bounds(s: Op) -> tuple[int, int] | None:
        starts, ends = const(graph, s.inputs[1]), const(graph, s.inputs[2])
        axes = const(graph, s.inputs[3]) if len(s.inputs) > 3 and s.inputs[3] else np.array([rank - 1])
        steps = const(graph, s.inputs[4]) if len(s.inputs) > 4 and s.inputs[4] else np.array([1])
        if starts is None or ends is None or axes is None or steps is None or starts.size != 1 \
                or int(axes.reshape(-1)[0]) % rank != rank - 1 or int(steps.reshape(-1)[0]) != 1:
            return None
        lo_, hi_ = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
        return (lo_ + d if lo_ < 0 else lo_), min(hi_ + d if hi_ < 0 else hi_, d)

    h = d // 2
    if d % 2 or bounds(hi) != (h, d) or bounds(lo) != (0, h):
        return None
    return x


@register
@dataclass(frozen=True)
class FuseRope:
    """``x*cos + rotate_half(x)*sin`` with constant cos/sin, and ``RotaryEmbedding`` -> ``rope``."""

    name: ClassVar[str] = "fuse-rope"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.name not in graph.nx:
                continue
            if op.kind == "Add":
                found = self._match(graph, op)
                if found:
                    x, cos, sin = found
                    replace_root(graph, op, "rope", [x, cos, sin],
                                 {"rotary_dim": int(graph.tensors[x].shape[-1]), "interleaved": False})
                    changed = True
            elif op.kind == "RotaryEmbedding":
                changed |= self._from_onnx(graph, op)
        return changed

    @staticmethod
    def _match(graph: Graph, add: Op) -> tuple[str, str, str] | None:
        m1, m2 = prod(graph, add.inputs[0], "Mul"), prod(graph, add.inputs[1], "Mul")
        if m1 is None or m2 is None:
            return None
        for mc, ms in ((m1, m2), (m2, m1)):
            sc_c, sc_s = split_const(graph, mc), split_const(graph, ms)
            if sc_c is None or sc_s is None:
                continue
            x = sc_c[0]
            if _rotate_half_source(graph, sc_s[0]) != x or graph.tensors[x].shape is None \
                    or len(graph.tensors[x].shape) != 4:
                continue
            cos = mc.inputs[1] if graph.is_constant(mc.inputs[1]) else mc.inputs[0]
            sin = ms.inputs[1] if graph.is_constant(ms.inputs[1]) else ms.inputs[0]
            if graph.constants[cos].shape[-1] == graph.tensors[x].shape[-1] and graph.constants[cos].ndim == 4:
                return x, cos, sin
        return None

    @staticmethod
    def _from_onnx(graph: Graph, op: Op) -> bool:
        x, cos_cache, sin_cache = op.inputs[:3]
        pos = op.inputs[3] if len(op.inputs) > 3 else ""
        shape = graph.tensors[x].shape
        if len(shape) != 4 or not (graph.is_constant(cos_cache) and graph.is_constant(sin_cache)):
            return False
        cos, sin = graph.constants[cos_cache], graph.constants[sin_cache]
        if pos:
            if not graph.is_constant(pos):
                return False
            p = graph.constants[pos]
            cos, sin = cos[p], sin[p]           # [B, S, rd/2]
        rd = op.attr("rotary_embedding_dim", 0) or shape[-1]
        c = graph.add_constant(graph.fresh_name(f"{op.name}_cos"), np.ascontiguousarray(cos))
        s = graph.add_constant(graph.fresh_name(f"{op.name}_sin"), np.ascontiguousarray(sin))
        replace_root(graph, op, "rope", [x, c, s],
                     {"rotary_dim": int(rd), "interleaved": bool(op.attr("interleaved", 0))})
        return True


# --- attention ----------------------------------------------------------------------------------
def _strip_scale(graph: Graph, t: str) -> tuple[str, float]:
    """Walk back through Mul/Div by scalar constants: (source tensor, accumulated factor)."""
    factor = 1.0
    while True:
        op = prod(graph, t, "Mul", "Div")
        sc = split_const(graph, op) if op else None
        if sc is None or sc[1].size != 1 or (op.kind == "Div" and op.inputs[1] != t and not graph.is_constant(op.inputs[1])):
            return t, factor
        v = float(sc[1].reshape(-1)[0])
        factor = factor / v if op.kind == "Div" else factor * v
        t = sc[0]


def _plumbing_chain(graph: Graph, t: str, limit: int = 10) -> list[Op]:
    chain = []
    while len(chain) < limit:
        op = prod(graph, t, *PLUMBING)
        if op is None or any(i and not graph.is_constant(i) for i in op.inputs[1:]):
            break
        chain.append(op)
        t = op.inputs[0]
    return chain  # nearest first


def _trace_ids(graph: Graph, chain: list[Op], ids: np.ndarray) -> np.ndarray | None:
    v = ids
    for op in reversed(chain):
        try:
            v = run_op(op, [v] + [graph.constants[i] if i else None for i in op.inputs[1:]])[0]
        except Exception:  # noqa: BLE001 - a chain that cannot run on ids is not plumbing
            return None
    return v


def _find_source(graph: Graph, t: str, expect) -> str | None:
    """A 4-D tensor s upstream of ``t`` through plumbing with plumbing(s) == expect(P(s)), where
    P is a permutation of s's axes; the farthest such s wins. When P is not the identity a
    Transpose producing P(s) is inserted, so the fused op always sees [B, H, S, D]."""
    chain = _plumbing_chain(graph, t)
    for n in range(len(chain), -1, -1):
        src = chain[n - 1].inputs[0] if n else t
        shape = graph.tensors[src].shape
        if shape is None or len(shape) != 4:
            continue
        ids = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        got = _trace_ids(graph, chain[:n], ids)
        if got is None:
            continue
        for perm in itertools.permutations(range(4)):
            want = expect(np.transpose(ids, perm))
            if want is not None and got.shape == want.shape and np.array_equal(got, want):
                if perm == (0, 1, 2, 3):
                    return src
                out = graph.fresh_name(f"{src}_bhsd")
                graph.add_op(Op("Transpose", graph.fresh_name(f"transpose_{src}"), (src,), (out,), {"perm": perm}))
                graph.tensors[out] = TensorInfo(tuple(shape[p] for p in perm), graph.tensors[src].dtype)
                return out
    return None


def _causal_constant(mask: np.ndarray, scores_shape: tuple[int, ...]) -> bool:
    """Is ``mask`` (broadcast to the scores) exactly the lower-right-aligned causal mask?"""
    if mask.ndim < 2 or mask.dtype.kind != "f" or len(scores_shape) < 2:
        return False
    try:
        m = np.broadcast_to(mask, scores_shape)
    except ValueError:
        return False
    s, t = scores_shape[-2:]
    keep = np.tril(np.ones((s, t), dtype=bool), k=t - s)
    m = m.reshape(-1, s, t)
    return bool(np.all(m[:, keep] == 0) and np.all(m[:, ~keep] <= -1e30))


@register
@dataclass(frozen=True)
class FuseAttention:
    """softmax(q k^T * scale + mask) v with grouped-query plumbing, and ONNX ``Attention`` -> ``attention``."""

    name: ClassVar[str] = "fuse-attention"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.name not in graph.nx:
                continue
            if op.kind == "MatMul":
                changed |= self._fuse_decomposed(graph, op)
            elif op.kind == "Attention":
                changed |= self._fuse_onnx(graph, op)
        return changed

    def _fuse_decomposed(self, graph: Graph, pv: Op) -> bool:
        p, v_in = pv.inputs
        where = prod(graph, p, "Where")
        if where is not None and prod(graph, where.inputs[0], "IsNaN") is not None:
            p = where.inputs[2]  # nan guard for fully-masked rows; the fused softmax yields 0 there
        sm = prod(graph, p, "Softmax")
        if sm is None or sm.attr("axis", 1 if sm.attr("coerce_2d", 0) else -1) not in (-1, 3):
            return False
        scores, mask = sm.inputs[0], ""
        scores, s_factor = _strip_scale(graph, scores)
        add = prod(graph, scores, "Add")
        if add is not None:
            for a, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
                if prod(graph, a, "MatMul") is not None or prod(graph, _strip_scale(graph, a)[0], "MatMul"):
                    scores, mask = a, b
                    break
        scores, s2 = _strip_scale(graph, scores)
        qk = prod(graph, scores, "MatMul")
        if qk is None:
            return False
        q_t, q_factor = _strip_scale(graph, qk.inputs[0])
        k_t, k_factor = _strip_scale(graph, qk.inputs[1])
        q = _find_source(graph, q_t, lambda ids: ids)
        if q is None:
            return False
        hq = graph.tensors[q].shape[1]

        def repeat_kv(transpose: bool):
            def expect(ids):
                if ids.shape[0] != graph.tensors[q].shape[0] or hq % ids.shape[1]:
                    return None
                r = np.repeat(ids, hq // ids.shape[1], axis=1)
                return np.swapaxes(r, -1, -2) if transpose else r
            return expect

        k = _find_source(graph, k_t, repeat_kv(True))
        v = _find_source(graph, v_in, repeat_kv(False))
        if k is None or v is None:
            return False
        attrs = {"scale": _score_scale(graph, pv, float(s_factor * s2 * q_factor * k_factor)), "causal": False}
        inputs = [q, k, v]
        if mask:
            mc = const(graph, mask)
            if mc is not None and _causal_constant(mc, graph.tensors[sm.inputs[0]].shape):
                attrs["causal"] = True
            else:
                inputs.append(mask)
        replace_root(graph, pv, "attention", inputs, attrs)
        return True

    @staticmethod
    def _fuse_onnx(graph: Graph, op: Op) -> bool:
        ins = list(op.inputs) + [""] * (6 - len(op.inputs))
        q, k, v, mask, past_k, past_v = ins[:6]
        outs = [o for o in op.outputs]
        if len(graph.tensors[q].shape) != 4 or op.attr("softcap", 0.0) or op.attr("qk_matmul_output_mode", 0) \
                or (len(outs) > 3 and outs[3]):
            return False
        scale = op.attr("scale", None) or 1.0 / math.sqrt(graph.tensors[q].shape[-1])
        hq = graph.tensors[q].shape[1]

        def repeated(ids):  # exporters repeat kv heads before Attention; the fused op does GQA itself
            return np.repeat(ids, hq // ids.shape[1], axis=1) if hq % ids.shape[1] == 0 else None

        if not past_k:
            k = _find_source(graph, k, repeated) or k
            v = _find_source(graph, v, repeated) or v
        if past_k:
            # present = concat(past, new) along the sequence axis, as the exporters' own graphs do
            pk = graph.fresh_name(f"{op.name}_present_key") if len(outs) < 2 or not outs[1] else outs[1]
            pvn = graph.fresh_name(f"{op.name}_present_value") if len(outs) < 3 or not outs[2] else outs[2]
            for src, new, out in ((past_k, k, pk), (past_v, v, pvn)):
                graph.add_op(Op("Concat", graph.fresh_name(f"{op.name}_concat"), (src, new), (out,), {"axis": 2}))
                shp = list(graph.tensors[src].shape)
                shp[2] += graph.tensors[new].shape[2]
                graph.tensors[out] = TensorInfo(tuple(shp), graph.tensors[src].dtype)
            k, v = pk, pvn
        attrs = {"scale": _score_scale(graph, op, float(scale)), "causal": bool(op.attr("is_causal", 0))}
        inputs = [q, k, v]
        if mask:
            mc = const(graph, mask)
            if mc is not None and mc.dtype == bool and mc.ndim >= 2:
                s, t = mc.shape[-2:]
                if np.array_equal(np.broadcast_to(mc, mc.shape), np.broadcast_to(np.tril(np.ones((s, t), bool), t - s), mc.shape)):
                    attrs["causal"] = True
                    mask = ""
            elif mc is not None and _causal_constant(mc, (1, 1, graph.tensors[q].shape[2], graph.tensors[k].shape[2])):
                attrs["causal"] = True
                mask = ""
            if mask:
                inputs.append(mask)
        graph.remove_op(op.name)
        graph.add_op(Op("attention", graph.fresh_name(f"attention_{op.name}"), tuple(inputs), (outs[0],), attrs))
        return True


# --- runtime masks ---------------------------------------------------------------------------
MASK_PLUMBING_CAP = 400          # ops between a mask input and an attention: exporters use ~10-60


def _ancestors(graph: Graph, t: str, cap: int = MASK_PLUMBING_CAP) -> tuple[list[Op], set[str]] | None:
    """The ops computing ``t`` (in graph order) and the graph inputs they read; None past ``cap``."""
    seen: set[str] = set()
    sources: set[str] = set()
    stack = [t]
    while stack:
        x = stack.pop()
        p = graph.producer.get(x)
        if p is None:
            if x in graph.inputs:
                sources.add(x)
            continue
        if p in seen:
            continue
        seen.add(p)
        if len(seen) > cap:
            return None
        op = graph.op(p)
        if op.kind in ("linear", "attention", "MatMul", "Gemm", "Softmax"):
            return None                          # a computed bias (ALiBi, a learned mask): not plumbing
        stack.extend(i for i in op.inputs if i)
    return [op for op in graph.ops if op.name in seen], sources


def _eval(graph: Graph, ops: list[Op], feeds: dict[str, np.ndarray], out: str) -> np.ndarray:
    env = dict(feeds)
    for op in ops:
        args = [None if not i else env[i] if i in env else graph.constants[i] for i in op.inputs]
        for name, v in zip(op.outputs, run_op(op, args)):
            if name:
                env[name] = v
    return env[out]


def _keep(value: np.ndarray) -> np.ndarray | None:
    """A mask value as keep flags: bool as is; additive float 0 = keep, <= -1e4 = masked (an
    exporter's finfo.min or -inf or -10000); anything else (a bias) is not a mask."""
    if value.dtype == bool:
        return value
    if value.dtype.kind != "f":
        return None
    keep, masked = value == 0, value <= -1e4
    return keep if bool(np.all(keep | masked)) else None


def probe_masks(shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    """Keep patterns [B, T] that pin down a per-key mask: all kept, none kept, each key dropped
    alone, left and right padding, and seeded random patterns differing per row."""
    b, t = shape
    out = [np.ones(shape, bool), np.zeros(shape, bool)]
    # every key and padding length up to 32 keys; beyond, the ends, the middle and random ones
    keys = range(t) if t <= 32 else sorted({0, 1, 2, t // 2, t - 3, t - 2, t - 1})
    for j in keys:
        m = np.ones(shape, bool)
        m[:, j] = False
        out.append(m)
    for n in (range(1, t) if t <= 32 else sorted({1, 2, t // 3, t // 2, t - 2, t - 1})):
        out.append(np.arange(t)[None, :].repeat(b, 0) >= n)          # left padding
        out.append(np.arange(t)[None, :].repeat(b, 0) < t - n)       # right padding
    rng = np.random.default_rng(seed)
    out += [rng.random(shape) < p for p in (0.3, 0.6, 0.9, 0.6, 0.6, 0.95)]
    return out


def classify_mask(graph: Graph, attn: Op) -> tuple[str, bool] | None:
    """(mask input, causal) when the attention's 4th input is the graph input ``mask`` pushed
    through plumbing into keep[b, h, s, t] = mask[b, t] != 0 (and s, t causal when ``causal``),
    checked by probing; None when it is anything else."""
    if len(attn.inputs) < 4 or not attn.inputs[3] or graph.is_constant(attn.inputs[3]):
        return None
    found = _ancestors(graph, attn.inputs[3])
    if found is None:
        return None
    ops, sources = found
    if len(sources) != 1:
        return None
    src = next(iter(sources))
    info = graph.tensors[src]
    q, k = graph.tensors[attn.inputs[0]].shape, graph.tensors[attn.inputs[1]].shape
    if info.shape is None or len(info.shape) != 2 or not q or not k or len(q) != 4:
        return None
    b, t = info.shape
    s = q[2]
    if b != q[0] or t != k[2]:
        return None
    tril = np.tril(np.ones((s, t), bool), k=t - s)
    causal = None
    try:
        for am in probe_masks((b, t)):
            got = _eval(graph, ops, {src: am.astype(info.dtype)}, attn.inputs[3])
            keep = _keep(np.asarray(got))
            if keep is None:
                return None
            keep = np.broadcast_to(keep, (b, q[1], s, t))
            if causal is None:                    # the all-kept probe decides causal or not
                if np.all(keep):
                    causal = False
                elif np.all(keep == tril):
                    causal = True
                else:
                    return None
            want = am[:, None, None, :] & (tril if causal else True)
            # rows with no key kept: an exporter may unmask them (to avoid NaN); the fused
            # softmax gives such a row 0 whatever the mask, so they are not compared
            live = np.broadcast_to(want.any(axis=-1, keepdims=True), keep.shape)
            if not np.array_equal(keep[live], np.broadcast_to(want, keep.shape)[live]):
                return None
    except (OpError, ValueError, TypeError, KeyError, IndexError):
        return None
    return src, bool(causal)


@register
@dataclass(frozen=True)
class FuseMask:
    """A padding (and causal) mask computed from a graph input -> the attention reads that input.

    Exporters turn ``attention_mask[B, T]`` into a [B, 1, S, T] additive or bool mask through
    Cast, Equal, And, Where, GatherND, Expand, ... . When probing shows the result is exactly
    "key t of row b is kept iff mask[b, t] != 0" (and the causal triangle), the attention takes
    the mask input itself with ``key_mask`` set, and the plumbing goes to ``dead-code``. The
    mask stays a runtime input of the chip; a constant mask was already folded by
    ``fuse-attention``.
    """

    name: ClassVar[str] = "fuse-mask"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        seen: dict[tuple, tuple | None] = {}     # layers share one mask tensor: probe it once
        for op in list(graph.ops):
            if op.kind != "attention" or op.attr("key_mask", False):
                continue
            key = (op.inputs[3] if len(op.inputs) > 3 else "", graph.tensors[op.inputs[0]].shape,
                   graph.tensors[op.inputs[1]].shape)
            if key not in seen:
                seen[key] = classify_mask(graph, op)
            found = seen[key]
            if found is None:
                continue
            src, causal = found
            attrs = {**dict(op.attrs), "causal": causal or bool(op.attr("causal", False)), "key_mask": True}
            graph.replace_op(op.replace(inputs=(*op.inputs[:3], src), attrs=attrs))
            changed = True
        return changed


# --- runtime positions -------------------------------------------------------------------------
POSITION_TABLE = 8192            # positions a folded table covers (0 .. POSITION_TABLE - 1)


def _position_region(graph: Graph, src: str) -> list[Op]:
    """Ops computed from ``src`` and constants alone, in graph order."""
    made = {src}
    region = []
    for op in graph.ops:
        ins = [t for t in op.inputs if t]
        if op.kind in ("linear", "attention") or not any(t in made for t in ins):
            continue
        if all(t in made or graph.is_constant(t) for t in ins):
            region.append(op)
            made.update(t for t in op.outputs if t)
    return region


def _table_of(graph: Graph, ops: list[Op], src: str, t: str, n_pos: int) -> tuple[np.ndarray, int] | None:
    """(table [n_pos, *rest], position axis) when ``t`` depends on each position alone."""
    b, s = graph.tensors[src].shape
    shape = graph.tensors[t].shape
    if shape is None or len(shape) < 2 or shape[0] not in (1, b):
        return None
    for a in (a for a in range(1, len(shape)) if shape[a] == s):   # the position axis: whichever checks
        found = _table_along(graph, ops, src, t, n_pos, a)
        if found is not None:
            return found, a
    return None


def _table_along(graph: Graph, ops: list[Op], src: str, t: str, n_pos: int, a: int) -> np.ndarray | None:
    b, s = graph.tensors[src].shape
    dtype = graph.tensors[src].dtype
    chunks = []
    try:
        for k in range(0, n_pos, s):
            pos = np.broadcast_to(np.arange(k, k + s), (b, s)).astype(dtype)
            out = np.asarray(_eval(graph, ops, {src: pos}, t))
            chunks.append(np.moveaxis(out, a, 1)[0])         # [S, *rest without the batch axis]
        table = np.concatenate(chunks)[:n_pos]
        rng = np.random.default_rng(0)
        for pos in (rng.integers(0, n_pos, (b, s)), np.broadcast_to(np.arange(s)[::-1], (b, s))):
            got = np.asarray(_eval(graph, ops, {src: pos.astype(dtype)}, t))
            want = np.moveaxis(table[pos], 1, a)                # [B, ..., S at a, ...]
            if got.shape[0] == 1 and b > 1:
                return None
            if want.shape != got.shape or not np.array_equal(want, got):
                return None
    except (OpError, ValueError, TypeError, KeyError, IndexError):
        return None
    return table


@register
@dataclass(frozen=True)
class FoldPositionTables:
    """Float values computed from a runtime ``position_ids`` input alone (RoPE's cos and sin,
    from ``inv_freq x position``) -> a compile-time table gathered by position.

    Exporters such as optimum compute the rotary tables at run time from the positions; golden
    has no float path, so the table is evaluated here for positions 0 .. POSITION_TABLE - 1 and
    checked on random positions; the chip reads it with a Gather (exact data movement). The
    positions stay a runtime input.
    """

    name: ClassVar[str] = "fold-position-tables"

    def __call__(self, graph: Graph) -> bool:
        from ..program import Interface               # the one rule for which input is the positions
        src = Interface.of(graph).positions
        info = graph.tensors.get(src) if src else None
        if info is None or np.dtype(info.dtype).kind not in "iu" or info.shape is None or len(info.shape) != 2:
            return False
        ops = _position_region(graph, src)
        names = {op.name for op in ops}
        # the region's float results that leave it: what the rest of the model reads
        leaving = [t for op in ops for t in op.outputs if t and np.dtype(graph.tensors[t].dtype).kind == "f"
                   and (t in graph.outputs or any(c not in names for c in graph.consumers.get(t, ())))]
        changed = False
        for t in leaving:
            if len([o for o in graph.op(graph.producer[t]).outputs if o]) != 1:
                continue
            found = _table_of(graph, ops, src, t, POSITION_TABLE)
            if found is None:
                continue
            table, a = found
            dtype = graph.tensors[t].dtype
            tab = graph.add_constant(graph.fresh_name(f"{t}_table"), table.astype(dtype))
            graph.remove_op(graph.producer[t])
            if a == 1:
                graph.add_op(Op("Gather", graph.fresh_name(f"gather_{t}"), (tab, src), (t,), {"axis": 0}))
            else:                                           # gathered [B, S, ...], then S moved to axis a
                g_out = graph.fresh_name(f"{t}_gathered")
                graph.tensors[g_out] = TensorInfo(tuple(info.shape) + table.shape[1:], dtype)
                graph.add_op(Op("Gather", graph.fresh_name(f"gather_{t}"), (tab, src), (g_out,), {"axis": 0}))
                perm = [0] + list(range(2, a + 1)) + [1] + list(range(a + 1, len(table.shape) + 1))
                graph.add_op(Op("Transpose", graph.fresh_name(f"transpose_{t}"), (g_out,), (t,), {"perm": perm}))
            changed = True
        return changed
