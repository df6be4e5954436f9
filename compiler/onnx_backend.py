"""An ``onnx.backend`` for tapeout's float interpreter, in the style of ``onnxruntime.backend``.

It lets ONNX's own backend tests (and any tool written against ``onnx.backend.base``) run
models through tapeout: ``prepare`` imports a ModelProto with
:func:`~tapeout.compiler.onnx_import.from_proto`, ``TapeoutRep.run`` evaluates it with
:func:`~tapeout.compiler.interp.run`. Only the CPU device exists; the interpreter is numpy.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, namedtupledict

from . import interp
from .ir import Graph
from .onnx_import import KNOWN_DOMAINS, from_proto, load


def _kernels() -> dict:
    if not interp.KERNELS:
        interp._load_kernels()
    return interp.KERNELS


def supported_ops() -> list[str]:
    """The ONNX (default domain) op types that have a tapeout float kernel."""
    onnx_ops = {s.name for s in onnx.defs.get_all_schemas() if s.domain in KNOWN_DOMAINS}
    return sorted(onnx_ops & set(_kernels()))


class TapeoutRep(BackendRep):
    """A prepared model: the imported Graph, run on the float interpreter."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Run on ``inputs``: a list in graph-input order, a dict by name, or one array.

        Returns the outputs in graph-output order (a tuple that also has them by name).
        """
        names = self.graph.inputs
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            inputs = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            if len(inputs) != len(names):
                raise ValueError(f"model takes {len(names)} input(s) {names}, got {len(inputs)}")
            feeds = dict(zip(names, inputs))
        results = interp.run(self.graph, feeds)
        return namedtupledict("Outputs", self.graph.outputs)(*(results[o] for o in self.graph.outputs))


def is_compatible(model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
    """True when every node of ``model`` is an ONNX op with a tapeout float kernel."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    kernels = _kernels()
    tensors_only = all(vi.type.HasField("tensor_type") for vi in [*model.graph.input, *model.graph.output])
    return supports_device(device) and tensors_only and all(
        node.op_type in kernels and node.domain in KNOWN_DOMAINS
        and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        for node in model.graph.node)


def prepare(model: onnx.ModelProto | str | bytes, device: str = "CPU", **kwargs: Any) -> TapeoutRep:
    """Import ``model`` (a ModelProto, a path or serialized bytes) for :meth:`TapeoutRep.run`."""
    if not supports_device(device):
        raise ValueError(f"tapeout runs on the CPU only, not {device!r}")
    if isinstance(model, (str, os.PathLike)):
        return TapeoutRep(load(model))
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    return TapeoutRep(from_proto(model))


def run_model(model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple:
    """Prepare ``model`` and run it once on ``inputs``."""
    return prepare(model, device, **kwargs).run(inputs)


def run_node(node: onnx.NodeProto, inputs: Sequence[np.ndarray], device: str = "CPU",
             outputs_info: Sequence[tuple[np.dtype, tuple]] | None = None, **kwargs: Any) -> tuple:
    """Run one node on ``inputs`` (one array per non-empty input name of the node)."""
    def value_info(name: str, dtype: np.dtype, shape) -> onnx.ValueInfoProto:
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return onnx.helper.make_tensor_value_info(name, elem_type, shape)

    inputs = [np.asarray(x) for x in inputs]
    outputs = [name for name in node.output if name]
    graph = onnx.helper.make_graph(
        [node], f"run_node_{node.op_type}",
        [value_info(n, x.dtype, x.shape) for n, x in zip([n for n in node.input if n], inputs)],
        [value_info(n, *info) for n, info in zip(outputs, outputs_info)] if outputs_info
        else [onnx.helper.make_empty_tensor_value_info(n) for n in outputs])
    opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(node.domain, opset)])
    if not outputs_info:   # the importer's checker wants typed outputs: infer them
        model = onnx.shape_inference.infer_shapes(model)
    return run_model(model, inputs, device)


def supports_device(device: str) -> bool:
    """Only ``"CPU"``: the float interpreter is numpy."""
    return str(device).upper() == "CPU"


class TapeoutBackend(Backend):
    """``onnx.backend.base.Backend`` whose classmethods delegate to this module's functions."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return is_compatible(model, device, **kwargs)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> TapeoutRep:
        return prepare(model, device, **kwargs)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple:
        return run_model(model, inputs, device, **kwargs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Any = None, **kwargs: Any) -> tuple:
        return run_node(node, inputs, device, outputs_info, **kwargs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return supports_device(device)
