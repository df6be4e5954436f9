"""Canonicalisation: constant folding, shape-op elimination, no-op removal, dead code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..interp import run_op
from ..ir import Graph, Op
from . import register

# Ops never folded: they would materialise large tensors or are not pure.
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
_FOLD_LIMIT = 1 << 24  # elements: fold nothing that would materialise more than 64 MiB of float32


def _const_inputs(graph: Graph, op: Op) -> bool:
    return all(not t or graph.is_constant(t) for t in op.inputs)


def fold_op(graph: Graph, op: Op, values: tuple[np.ndarray, ...]) -> None:
    """Replace ``op`` by constants for its outputs."""
    graph.remove_op(op.name)
    for t, v in zip(op.outputs, values):
        if t:
            graph.add_constant(t, v)


@register
@dataclass(frozen=True)
class FoldConstants:
    """Evaluate every op whose inputs are all constants; ``Shape``/``Size`` of static tensors too."""

    name: ClassVar[str] = "fold-constants"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for op in list(graph.ops):
            if op.kind in ("Shape", "Size") and op.inputs[0] and graph.tensors[op.inputs[0]].static:
                shape = np.asarray(graph.tensors[op.inputs[0]].shape, dtype=np.int64)
                if op.kind == "Size":
                    value = np.asarray(np.prod(shape), dtype=np.int64)
                else:
                    value = shape[op.attr("start", 0):op.attr("end", None)]
                fold_op(graph, op, (value,))
                changed = True
                continue
            if op.kind in _NO_FOLD or op.domain or not _const_inputs(graph, op):
                continue
            outs = [graph.tensors.get(t) for t in op.outputs]
            if any(o is not None and o.static and int(np.prod(o.shape)) > _FOLD_LIMIT for o in outs):
                continue
            values = run_op(op, [graph.constants[t] if t else None for t in op.inputs])
            fold_op(graph, op, values)
            changed = True
        return changed


def _same(graph: Graph, a: str, b: str) -> bool:
    ia, ib = graph.tensors.get(a), graph.tensors.get(b)
    return bool(ia and ib and ia.static and ib.static and ia.shape == ib.shape
                and np.dtype(ia.dtype) == np.dtype(ib.dtype))


def _is_no_op(graph: Graph, op: Op) -> bool:
    if op.kind == "Identity":
        return True
    if op.kind == "Dropout":
        return len([t for t in op.outputs if t]) == 1
    if op.kind in ("Cast", "Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
                   "Slice", "CastLike"):
        if op.kind == "Transpose" and op.attr("perm") is not None and \
                tuple(op.attr("perm")) != tuple(range(len(op.attr("perm")))):
            return False
        return _same(graph, op.inputs[0], op.outputs[0])
    return False


@register
@dataclass(frozen=True)
class EliminateNoOps:
    """Remove Identity, inference Dropout, and casts/reshapes/expands that change nothing."""

    name: ClassVar[str] = "eliminate-no-ops"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        for name in [op.name for op in graph.ops]:
            op = graph.op(name)  # fresh record: earlier removals may have renamed its inputs
            if not _is_no_op(graph, op):
                continue
            src, dst = op.inputs[0], op.outputs[0]
            if dst in graph.outputs and (src in graph.outputs or src in graph.inputs
                                         or graph.is_constant(src)):
                continue  # keep the graph interface's names
            graph.remove_op(op.name)
            if dst in graph.outputs:
                # the producer of src now produces the output name directly
                prod = graph.producer_op(src)
                graph.rename_uses(src, dst)
                graph.replace_op(prod.replace(outputs=tuple(dst if t == src else t for t in prod.outputs)))
                graph.tensors[dst] = graph.tensors[src]
            else:
                graph.rename_uses(dst, src)
            changed = True
        return changed


@register
@dataclass(frozen=True)
class DeadCode:
    """Remove ops whose outputs nobody reads, and constants nobody reads."""

    name: ClassVar[str] = "dead-code"

    def __call__(self, graph: Graph) -> bool:
        changed = False
        live_outputs = set(graph.outputs)
        for op in reversed(list(graph.ops)):
            if any(t and (t in live_outputs or graph.consumers.get(t)) for t in op.outputs):
                continue
            graph.remove_op(op.name)
            changed = True
        for t in list(graph.constants):
            if not graph.consumers.get(t) and t not in live_outputs:
                del graph.constants[t]
                changed = True
        for t in list(graph.tensors):
            if t not in graph.constants and t not in graph.producer and t not in graph.inputs:
                del graph.tensors[t]
        return changed
