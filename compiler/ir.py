"""The Graph IR: a thin wrapper over ``networkx.DiGraph`` of frozen, typed op records.

* Nodes of the DiGraph are op names; the payload ``graph.nx.nodes[name]["op"]`` is an :class:`Op`.
* Edges run producer -> consumer and carry ``tensors``: the tensor names flowing on that edge.
* Every tensor has a :class:`TensorInfo` (shape and dtype). A shape is a tuple of ints once
  dimensions are bound; before binding a dimension may be a ``str`` (a symbolic name).
* Weights live in ``graph.constants`` as numpy arrays held by reference (memory-mapped for
  ONNX external data); passes never copy them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import networkx as nx
import numpy as np

Dim = int | str


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor. ``shape`` is ``None`` when the rank is unknown."""

    shape: tuple[Dim, ...] | None
    dtype: np.dtype

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def __str__(self) -> str:
        dims = "?" if self.shape is None else "x".join(str(d) for d in self.shape) or "scalar"
        return f"{np.dtype(self.dtype).name}[{dims}]"


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        value = value.view()
        value.flags.writeable = False
    return value


@dataclass(frozen=True, eq=False)
class Op:
    """One operation. ``kind`` is the ONNX op type (``MatMul``) or a tapeout op (``linear``).

    Inputs and outputs are ordered tensor names; an omitted optional input is ``""``.
    Attributes are typed Python values (int, float, str, tuple, numpy array, Graph) and can be
    read as ``op.attr("axis", -1)`` or, when present, ``op.axis``.
    """

    kind: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    domain: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        frozen = {k: _freeze(v) for k, v in dict(self.attrs).items()}
        object.__setattr__(self, "attrs", MappingProxyType(frozen))

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def __getattr__(self, key: str) -> Any:
        # only called when normal lookup fails: expose attributes as fields (op.axis)
        attrs = object.__getattribute__(self, "attrs")
        if key in attrs:
            return attrs[key]
        raise AttributeError(f"{object.__getattribute__(self, 'kind')} op has no attribute {key!r}")

    def replace(self, **changes: Any) -> "Op":
        fields = dict(kind=self.kind, name=self.name, inputs=self.inputs, outputs=self.outputs,
                      attrs=dict(self.attrs), domain=self.domain)
        fields.update(changes)
        return Op(**fields)

    def __repr__(self) -> str:
        return f"Op({self.kind} {self.name!r}: {list(self.inputs)} -> {list(self.outputs)})"


SORTS = {"count": 0}     # topological sorts done (a test counts them: one per pass at most)


class GraphError(Exception):
    """An IR invariant does not hold (a compiler bug, not a user error)."""


class Graph:
    """A dataflow graph of :class:`Op` records over a ``networkx.DiGraph``."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.nx = nx.DiGraph()
        self.tensors: dict[str, TensorInfo] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.producer: dict[str, str] = {}           # tensor -> op name
        self.consumers: dict[str, list[str]] = {}    # tensor -> op names (in insertion order)
        self.meta: dict[str, Any] = {}               # source file, opset, bindings
        self._order: tuple[str, ...] | None = None   # cached topological order (None: stale)

    # --- building -------------------------------------------------------------------------
    def add_op(self, op: Op) -> Op:
        if op.name in self.nx:
            raise GraphError(f"duplicate op name {op.name!r}")
        self.nx.add_node(op.name, op=op)
        self._order = None
        for t in op.outputs:
            if t:
                if t in self.producer:
                    raise GraphError(f"tensor {t!r} produced by {self.producer[t]!r} and {op.name!r}")
                self.producer[t] = op.name
                for c in self.consumers.get(t, ()):
                    self._link(op.name, c, t)
        for t in op.inputs:
            if t:
                self.consumers.setdefault(t, []).append(op.name)
                p = self.producer.get(t)
                if p is not None:
                    self._link(p, op.name, t)
        return op

    def _link(self, src: str, dst: str, tensor: str) -> None:
        if self.nx.has_edge(src, dst):
            ts = self.nx.edges[src, dst]["tensors"]
            if tensor not in ts:
                self.nx.edges[src, dst]["tensors"] = ts + (tensor,)
        else:
            self.nx.add_edge(src, dst, tensors=(tensor,))

    def remove_op(self, name: str) -> Op:
        op = self.op(name)
        for t in op.inputs:
            if t and name in self.consumers.get(t, ()):
                self.consumers[t] = [c for c in self.consumers[t] if c != name]
                if not self.consumers[t]:
                    del self.consumers[t]
        for t in op.outputs:
            if t and self.producer.get(t) == name:
                del self.producer[t]
        self.nx.remove_node(name)
        self._order = None
        return op

    def replace_op(self, op: Op) -> None:
        """Swap the record of an existing op (same name) for ``op``."""
        old, order = self.op(op.name), self._order
        self.remove_op(op.name)
        self.add_op(op)
        if old.inputs == op.inputs and old.outputs == op.outputs:
            self._order = order                      # same edges: the sorted order stays valid

    def add_constant(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        self.constants[name] = value
        self.tensors[name] = TensorInfo(tuple(value.shape), value.dtype)
        return name

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self.nx or name in self.tensors:
            i += 1
            name = f"{base}_{i}"
        return name

    def rename_uses(self, old: str, new: str) -> None:
        """Make every consumer of tensor ``old`` (and the graph outputs) read ``new`` instead."""
        for c in list(self.consumers.get(old, ())):
            op = self.op(c)
            self.replace_op(op.replace(inputs=tuple(new if t == old else t for t in op.inputs)))
        self.outputs = [new if t == old else t for t in self.outputs]

    def copy(self) -> "Graph":
        """A new Graph sharing the op records and the constant arrays (no weight is copied)."""
        g = Graph(self.name)
        g.nx = self.nx.copy()
        g.tensors = dict(self.tensors)
        g.constants = dict(self.constants)
        g.inputs, g.outputs = list(self.inputs), list(self.outputs)
        g.producer = dict(self.producer)
        g.consumers = {k: list(v) for k, v in self.consumers.items()}
        g.meta = dict(self.meta)
        g._order = self._order
        return g

    # --- reading --------------------------------------------------------------------------
    def op(self, name: str) -> Op:
        return self.nx.nodes[name]["op"]

    @property
    def ops(self) -> Iterator[Op]:
        """The ops in topological order; ties between independent ops break by name, so the order
        is deterministic. Sorted once and cached until the next add/remove."""
        order = self._order
        if order is None:
            SORTS["count"] += 1
            order = self._order = tuple(nx.lexicographical_topological_sort(self.nx, key=str))
        nodes = self.nx.nodes
        for n in order:
            yield nodes[n]["op"]

    def producer_op(self, tensor: str) -> Op | None:
        p = self.producer.get(tensor)
        return None if p is None else self.op(p)

    def consumer_ops(self, tensor: str) -> list[Op]:
        return [self.op(c) for c in self.consumers.get(tensor, ())]

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for _, data in self.nx.nodes(data=True):
            hist[data["op"].kind] = hist.get(data["op"].kind, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} ops, {len(self.constants)} constants)"


def verify(graph: Graph, *, require_static: bool = False) -> None:
    """Check the IR invariants; raise :class:`GraphError` naming the first violation."""
    if not nx.is_directed_acyclic_graph(graph.nx):
        raise GraphError(f"graph {graph.name!r} has a cycle")
    defined = set(graph.inputs) | set(graph.constants)
    for name, data in graph.nx.nodes(data=True):
        op = data.get("op")
        if not isinstance(op, Op):
            raise GraphError(f"node {name!r} carries no Op record")
        if op.name != name:
            raise GraphError(f"node {name!r} carries op named {op.name!r}")
        for t in op.outputs:
            if t:
                if graph.producer.get(t) != name:
                    raise GraphError(f"producer map wrong for {t!r} of {name!r}")
                defined.add(t)
    for name, data in graph.nx.nodes(data=True):
        op = data["op"]
        for t in op.inputs:
            if t and t not in defined:
                raise GraphError(f"op {name!r} ({op.kind}) reads undefined tensor {t!r}")
            p = graph.producer.get(t)
            if t and p is not None and t not in graph.nx.edges[p, name]["tensors"]:
                raise GraphError(f"edge {p!r} -> {name!r} lacks tensor {t!r}")
    for t in graph.outputs:
        if t not in defined:
            raise GraphError(f"graph output {t!r} is never produced")
    for t in defined:
        info = graph.tensors.get(t)
        if info is None:
            raise GraphError(f"tensor {t!r} has no TensorInfo")
        if require_static and not info.static:
            raise GraphError(f"tensor {t!r} has non-static shape {info}")
    for t, v in graph.constants.items():
        info = graph.tensors[t]
        if info.shape is not None and tuple(v.shape) != tuple(info.shape):
            raise GraphError(f"constant {t!r} has shape {v.shape}, TensorInfo says {info.shape}")
