"""Binding dynamic dimensions of graph inputs to integers, then static shape propagation.

Exporters name dynamic dimensions freely (``batch``, ``sequence_length``, ``s0``,
``past_sequence_length + 1``). A dimension is bound by its name (``--dim NAME=N``) or by its
role, read from where it stands: dim 0 of the token inputs is the batch, dim 1 of ``input_ids``
and ``position_ids`` the sequence, dim 2 of past keys/values the cache length, dim 1 of
``attention_mask`` the cache plus the sequence.
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import TapeoutError
from .interp import OpError, infer_shapes
from .ir import Graph, TensorInfo
from .onnx_import import check_shape


@dataclass(frozen=True)
class Binding:
    """Values for dynamic dimensions. ``None`` means "only if the model needs it: error"."""

    batch: int = 1
    seq_len: int | None = None
    past_len: int | None = None
    dims: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("batch", "seq_len", "past_len"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < (0 if key == "past_len" else 1)):
                raise TapeoutError(f"--{key.replace('_', '-')} must be a positive integer, not {v!r}")


_SEQ_INPUTS = re.compile(r"^(input_ids|position_ids|token_type_ids|inputs_embeds|cache_position)$")
_PAST_INPUTS = re.compile(r"past|cache", re.I)
_MASK_INPUTS = re.compile(r"attention_mask", re.I)
_OPTION = {"batch": "--batch", "seq": "--seq-len", "past": "--past-len"}


def _role(input_name: str, axis: int, rank: int) -> tuple[str, ...] | None:
    """Which roles a dimension stands for (summed), or None if unknown."""
    if axis == 0 and rank >= 1 and (_SEQ_INPUTS.match(input_name) or _PAST_INPUTS.search(input_name)
                                    or _MASK_INPUTS.search(input_name)):
        return ("batch",)
    if _SEQ_INPUTS.match(input_name):
        return ("seq",) if axis == rank - 1 or axis == 1 else None
    if _MASK_INPUTS.search(input_name) and axis == rank - 1:
        return ("past", "seq")
    if _PAST_INPUTS.search(input_name) and rank == 4 and axis == 2:
        return ("past",)
    return None


def _eval_dim(expr: str, symbols: dict[str, int]) -> int | None:
    """Evaluate a dimension expression such as ``s0 + 1`` over known symbols; None if unknown."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv}

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in symbols:
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise KeyError(expr)

    if expr in symbols:
        return symbols[expr]
    try:
        return ev(ast.parse(expr, mode="eval"))
    except (KeyError, SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def _check_activation_sizes(graph: Graph, symbols: dict[str, int], file: str | None) -> None:
    """Refuse, before anything runs, a graph input or intermediate whose shape (as ONNX shape
    inference propagated it, dynamic dims substituted) exceeds the activation size limit."""
    for name, info in graph.tensors.items():
        if info.shape is None or name in graph.constants:
            continue
        dims = []
        for d in info.shape:
            v = d if isinstance(d, int) else _eval_dim(d, symbols)
            if v is None or v < 0:          # unknown here: the dummy run's own check sees it
                break
            dims.append(v)
        else:
            check_shape(dims, np.dtype(info.dtype).itemsize, f"tensor {name!r}", file,
                        node=graph.producer.get(name), activation=True)


def bind(graph: Graph, binding: Binding = Binding()) -> dict[str, int]:
    """Give every graph input a static shape and propagate shapes through the graph.

    Returns the symbol table used. Raises TapeoutError naming the input, the dimension and the
    option that binds it when a dimension cannot be bound.
    """
    file = graph.meta.get("file")
    roles = {"batch": binding.batch, "seq": binding.seq_len, "past": binding.past_len}
    symbols = dict(binding.dims)
    # first pass: dims whose role is a single known quantity fix their symbol's value
    for name in graph.inputs:
        shape = graph.tensors[name].shape or ()
        for axis, d in enumerate(shape):
            role = _role(name, axis, len(shape))
            if isinstance(d, str) and d not in symbols and role and len(role) == 1 and roles[role[0]] is not None:
                if d.isidentifier():
                    symbols[d] = roles[role[0]]
    known = dict(symbols)                    # plus the symbols bound through a role, for the size check
    for name in graph.inputs:
        info = graph.tensors[name]
        if info.shape is None:
            raise TapeoutError(f"graph input {name!r} has unknown rank; re-export with input shapes", file=file)
        dims = []
        for axis, d in enumerate(info.shape):
            if isinstance(d, int):
                dims.append(d)
                continue
            value = _eval_dim(d, symbols)
            role = _role(name, axis, len(info.shape))
            if value is None and role and all(roles[r] is not None for r in role):
                value = sum(roles[r] for r in role)
            if value is None:
                opts = [_OPTION[r] for r in role or () if roles[r] is None]
                how = " and ".join(f"{o} N" for o in opts) if opts else f"--dim {d}=N"
                raise TapeoutError(f"input {name!r} dimension {axis} is dynamic ({d!r}); bind it with {how}",
                                   file=file)
            if value < 0:
                raise TapeoutError(f"input {name!r} dimension {axis} ({d!r}) binds to {value} < 0", file=file)
            dims.append(int(value))
            if isinstance(d, str) and d.isidentifier():
                known.setdefault(d, int(value))
        graph.tensors[name] = TensorInfo(tuple(dims), info.dtype)
    graph.meta["bindings"] = dict(sorted(symbols.items()))
    _check_activation_sizes(graph, known, file)

    def within_limit(name: str, value) -> None:
        check_shape(value.shape, value.dtype.itemsize, f"tensor {name!r}", file,
                    node=graph.producer.get(name), activation=True)
    try:
        infer_shapes(graph, within_limit)
    except OpError as e:
        raise TapeoutError(f"shape propagation failed: {e.reason}; check the bound dimensions "
                           f"({', '.join(f'{n}={graph.tensors[n]}' for n in graph.inputs)})",
                           file=file, node=e.op.name, op=e.op.kind) from None
    return symbols
