"""ONNX -> Graph IR.

``load(path)`` parses with ``onnx`` (checker, shape inference, local functions inlined),
memory-maps external data after checking that its location stays inside the model's folder,
and turns every node into an :class:`~tapeout.compiler.ir.Op`. ``from_proto`` does the same
for an in-memory ``ModelProto``. Problems with the input become :class:`TapeoutError`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from .errors import TapeoutError
from .ir import Graph, Op, TensorInfo

# ONNX domains whose ops we interpret; anything else is reported as unsupported.
KNOWN_DOMAINS = {"", "ai.onnx"}

# The largest tensor (initializer, constant or declared input/output) accepted, in bytes, checked
# before anything is allocated; raise it with the environment variable TAPEOUT_MAX_TENSOR_BYTES.
MAX_TENSOR_BYTES = 1 << 36     # 64 GiB: Llama-3.1-70B's largest tensor is 4.3 GB in fp32
# The largest activation (graph input or intermediate at the bound shapes), checked from the
# propagated shapes before the graph is run; raise it with TAPEOUT_MAX_ACTIVATION_BYTES.
MAX_ACTIVATION_BYTES = 1 << 33  # 8 GiB: Llama-3.1-8B's logits at 8,192 positions are 4.2 GB


def _env_bytes(var: str, default: int) -> int:
    v = os.environ.get(var)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        raise TapeoutError(f"{var}={v!r} is not an integer number of bytes") from None
    if n <= 0:
        raise TapeoutError(f"{var}={v!r} must be positive")
    return n


def max_tensor_bytes() -> int:
    return _env_bytes("TAPEOUT_MAX_TENSOR_BYTES", MAX_TENSOR_BYTES)


def max_activation_bytes() -> int:
    return _env_bytes("TAPEOUT_MAX_ACTIVATION_BYTES", MAX_ACTIVATION_BYTES)


def check_shape(dims, itemsize: int, what: str, file: str, node: str | None = None, *,
                activation: bool = False) -> int:
    """The element count of ``dims``, refused when a dimension is negative or the tensor would
    exceed ``max_tensor_bytes()`` (``max_activation_bytes()`` for an activation), checked in
    Python integers: no overflow, nothing allocated."""
    count = 1
    for d in dims:
        d = int(d)
        if d < 0:
            raise TapeoutError(f"{what} has a negative dimension {d} in {list(map(int, dims))}", file=file, node=node)
        count *= d
    limit, var = ((max_activation_bytes(), "TAPEOUT_MAX_ACTIVATION_BYTES") if activation
                  else (max_tensor_bytes(), "TAPEOUT_MAX_TENSOR_BYTES"))
    if count * max(1, itemsize) > limit:
        raise TapeoutError(f"{what} of shape {list(map(int, dims))} would take {count * max(1, itemsize):,} bytes, "
                           f"more than the {limit:,} allowed (set {var} to raise it)",
                           file=file, node=node)
    return count


def _np_dtype(data_type: int, what: str, file: str, node: str | None = None) -> np.dtype:
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        raise TapeoutError(f"{what} has an undefined data type {data_type}", file=file, node=node) from None
    if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        raise TapeoutError(f"{what} has data type {onnx.TensorProto.DataType.Name(data_type)}, not a number",
                           file=file, node=node)
    return dt


def tensor_array(t: onnx.TensorProto, what: str, file: str, node: str | None = None) -> np.ndarray:
    """An inline TensorProto as numpy: data type, shape and size checked first, and data that
    does not fill the declared shape refused (``numpy_helper`` would raise a bare ValueError)."""
    dt = _np_dtype(t.data_type, what, file, node)
    check_shape(t.dims, dt.itemsize, what, file, node)
    try:
        return numpy_helper.to_array(t)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        raise TapeoutError(f"{what}: its data does not fill its shape {list(t.dims)} "
                           f"({onnx.TensorProto.DataType.Name(t.data_type)}): {e}", file=file, node=node) from None


def load(path: str | os.PathLike, *, check_finite: bool = True) -> Graph:
    """Read an ONNX file into a Graph. External data is memory-mapped, never copied."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise TapeoutError("no such file; pass the path of an .onnx model", file=file)
    if path.is_dir():
        raise TapeoutError("is a folder, not an .onnx file", file=file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TapeoutError(f"cannot read: {e.strerror}", file=file) from None
    model = parse_bytes(data, file)
    try:
        graph = from_proto(model, file=file, base_dir=str(path.parent))
    except UnicodeDecodeError as e:
        raise TapeoutError(f"a string field of the model is not valid UTF-8 (the file is corrupt): {e.reason} "
                           f"at byte {e.start}", file=file) from None
    if check_finite:
        check_weights_finite(graph)
    return graph


def parse_bytes(data: bytes, file: str) -> onnx.ModelProto:
    if not data:
        raise TapeoutError("file is empty, not an ONNX model", file=file)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise TapeoutError(f"not a valid ONNX protobuf (truncated or corrupt?): {e}", file=file) from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise TapeoutError("not an ONNX model (no ir_version or empty graph); "
                           "export one with torch.onnx.export", file=file)
    return model


def from_proto(model: onnx.ModelProto, *, file: str = "<memory>", base_dir: str | None = None) -> Graph:
    """Convert a ModelProto to a Graph (external data resolved against ``base_dir``)."""
    _check_opsets(model, file)
    _check_declared_shapes(model, file)
    # external data first: its own messages are clearer than the checker's
    constants = [(init.name, _initializer(init, file, base_dir)) for init in model.graph.initializer]
    constants += [(sp.values.name, _sparse(sp, file)) for sp in model.graph.sparse_initializer]
    if model.graph.sparse_initializer:          # the checker and the inliner see them as dense
        model = _densified(model, constants[len(model.graph.initializer):])
    try:
        # with a file the checker resolves external data against the model's folder
        on_disk = base_dir is not None and any(i.data_location == onnx.TensorProto.EXTERNAL
                                               for i in model.graph.initializer)
        onnx.checker.check_model(file if on_disk else model)
    except onnx.checker.ValidationError as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TapeoutError(f"fails onnx.checker: {line}", file=file) from None
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    # inferred afresh: an exporter's value_info can be stale (a re-declared input), and the
    # activation size check of bind() trusts these shapes; the caller's proto is left as it came
    declared = [vi.SerializeToString() for vi in model.graph.value_info]
    given = model
    del given.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(given, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        model = given
    finally:
        given.graph.value_info.extend(onnx.ValueInfoProto.FromString(b) for b in declared)
    g = model.graph
    graph = Graph(g.name or Path(file).stem)
    graph.meta.update(file=file, opsets={o.domain or "": o.version for o in model.opset_import},
                      producer=f"{model.producer_name} {model.producer_version}".strip())

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        graph.tensors[vi.name] = _tensor_info(vi)
    for name, value in constants:
        graph.add_constant(name, value)
    inits = {i.name for i in g.initializer} | {sp.values.name for sp in g.sparse_initializer}
    graph.inputs = [vi.name for vi in g.input if vi.name not in inits]
    graph.outputs = [vi.name for vi in g.output]

    used: set[str] = set()
    for i, node in enumerate(g.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in used:
            name = f"{name}_{i}"
        used.add(name)
        if node.op_type == "Constant" and node.domain in KNOWN_DOMAINS and len(node.output) == 1:
            value = _constant_value(node, file, name)
            graph.add_constant(node.output[0], value)
            continue
        attrs = {a.name: _attr_value(a, file, name) for a in node.attribute}
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and (node.domain or "") in KNOWN_DOMAINS \
                and graph.meta["opsets"].get("", 0) < 13:
            attrs["coerce_2d"] = 1          # the pre-13 flatten-to-2-D semantics
        graph.add_op(Op(node.op_type, name, tuple(node.input), tuple(node.output), attrs,
                        domain=node.domain or ""))
    for t in list(graph.producer) + graph.inputs:
        graph.tensors.setdefault(t, TensorInfo(None, np.dtype("float32")))
    return graph


def unsupported_ops(graph: Graph) -> list[tuple[str, str, str]]:
    """Every op the float interpreter cannot run: (node name, op kind, why)."""
    from .interp import _load_kernels
    kernels = _load_kernels()
    problems = []
    for op in graph.ops:
        if op.domain not in KNOWN_DOMAINS:
            problems.append((op.name, f"{op.domain}.{op.kind}", f"custom domain {op.domain!r} is not supported"))
        elif op.kind not in kernels:
            problems.append((op.name, op.kind, "no tapeout implementation of this ONNX op"))
        elif any(isinstance(v, Graph) or isinstance(v, onnx.GraphProto) for v in op.attrs.values()):
            problems.append((op.name, op.kind, "control flow with subgraphs is not supported"))
    return problems


# --- helpers ----------------------------------------------------------------------------------
def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
    except (KeyError, TypeError, ValueError):
        dtype = np.dtype("float32")
    if not tt.HasField("shape"):
        return TensorInfo(None, dtype)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return TensorInfo(tuple(dims), dtype)


def _check_opsets(model: onnx.ModelProto, file: str) -> None:
    """Opset versions this onnx release defines: 1 .. its newest for the default domain."""
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if (o.domain or "") in KNOWN_DOMAINS and not 1 <= o.version <= newest:
            raise TapeoutError(f"opset_import asks for ONNX opset {o.version}; this onnx knows opsets 1..{newest}",
                               file=file)


def _check_declared_shapes(model: onnx.ModelProto, file: str) -> None:
    """Graph inputs and outputs declare no negative dimension and no tensor past the size limit."""
    for kind, vis in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in vis:
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                continue
            dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
            check_shape(dims, 4, f"graph {kind} {vi.name!r}", file)


def _sparse(sp: onnx.SparseTensorProto, file: str) -> np.ndarray:
    """A sparse initializer as a dense array: ``indices`` flat [nnz] or coordinates [nnz, rank]."""
    name = sp.values.name
    what = f"sparse initializer {name!r}"
    dims = [int(d) for d in sp.dims]
    vals = tensor_array(sp.values, what, file).reshape(-1)
    count = check_shape(dims, vals.dtype.itemsize, what, file)
    idx = tensor_array(sp.indices, f"{what} indices", file).astype(np.int64)
    if idx.ndim == 2 and idx.shape[1] == len(dims) and len(dims) > 0:
        if (idx < 0).any() or (idx >= np.asarray(dims)).any():
            raise TapeoutError(f"{what}: an index lies outside its shape {dims}", file=file)
        idx = np.ravel_multi_index(tuple(idx.T), dims)
    idx = idx.reshape(-1)
    if idx.size != vals.size:
        raise TapeoutError(f"{what}: {idx.size} indices for {vals.size} values", file=file)
    if idx.size and (idx.min() < 0 or idx.max() >= count):
        raise TapeoutError(f"{what}: an index lies outside its {count} elements", file=file)
    dense = np.zeros(count, vals.dtype)
    dense[idx] = vals
    return dense.reshape(dims)


def _densified(model: onnx.ModelProto, dense) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.sparse_initializer[:]
    m.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in dense)
    return m


def _initializer(init: onnx.TensorProto, file: str, base_dir: str | None) -> np.ndarray:
    what = f"initializer {init.name!r}"
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return tensor_array(init, what, file)
    info = {e.key: e.value for e in init.external_data}
    location = info.get("location", "")
    if "\x00" in location:
        raise TapeoutError(f"{what}: external data location {location!r} holds a NUL byte", file=file)
    if base_dir is None:
        raise TapeoutError(f"initializer {init.name!r} uses external data {location!r} but the model "
                           "was given in memory; load it from its file", file=file)
    root = Path(base_dir).resolve()
    target = (root / location).resolve()
    if not location or Path(location).is_absolute() or root not in target.parents or ".." in Path(location).parts:
        raise TapeoutError(f"initializer {init.name!r}: external data location {location!r} points "
                           "outside the model's folder; refusing to read it", file=file)
    if not target.is_file():
        raise TapeoutError(f"initializer {init.name!r}: external data file {location!r} is missing; "
                           "keep the .onnx.data file beside the .onnx", file=file)
    dtype = _np_dtype(init.data_type, what, file)
    shape = tuple(int(d) for d in init.dims)
    count = check_shape(shape, dtype.itemsize, what, file)

    def field(key, default):
        v = info.get(key)
        if v is None:
            return default
        n = int(v) if v.isascii() and v.isdigit() else -1
        if n < 0:
            raise TapeoutError(f"{what}: external data {key} {v!r} is not a non-negative integer", file=file)
        return n
    offset = field("offset", 0)
    length = field("length", count * dtype.itemsize)
    size = target.stat().st_size
    if length != count * dtype.itemsize or offset + length > size:
        raise TapeoutError(f"initializer {init.name!r}: external data {location!r} is truncated or "
                           f"inconsistent (needs bytes {offset}..{offset + count * dtype.itemsize}, "
                           f"file has {size})", file=file)
    if count == 0:
        return np.zeros(shape, dtype)
    return np.memmap(target, dtype=dtype, mode="r", offset=offset, shape=shape)


WEIGHT_INPUTS = {"MatMul": (1,), "Gemm": (1, 2), "Gather": (0,), "LayerNormalization": (1, 2),
                 "RMSNormalization": (1,), "Conv": (1, 2), "Add": (0, 1), "Mul": (0, 1)}


def check_weights_finite(graph: Graph) -> None:
    """Every large float constant an op computes with must be finite (masks may hold -inf, so
    scalars and the mask operand of Add/Where are exempt by the op table above), and no
    constant an op reads may hold NaN, scalars and masks included (NaN has no use anywhere)."""
    file = graph.meta.get("file")
    seen: set[str] = set()
    for op in graph.ops:
        for i in WEIGHT_INPUTS.get(op.kind, ()):
            t = op.inputs[i] if i < len(op.inputs) else ""
            if not t or t in seen or not graph.is_constant(t):
                continue
            value = graph.constants[t]
            if op.kind in ("Add", "Mul") and (value.ndim < 1 or value.ndim > 1 and value.shape[-2] != 1):
                continue  # scalars and [.., S, T] score masks: the NaN check below
            seen.add(t)
            _check_finite(value, t, file, node=op.name, op=op.kind)
    for op in graph.ops:
        for t in op.inputs:
            if t and t not in seen and graph.is_constant(t):
                seen.add(t)
                _check_finite(graph.constants[t], t, file, node=op.name, op=op.kind, nan_only=True)


def _check_finite(value: np.ndarray, name: str, file: str, node: str | None = None,
                  op: str | None = None, nan_only: bool = False) -> None:
    if value.dtype.kind != "f" or value.size == 0:
        return
    bad_of = np.isnan if nan_only else (lambda c: ~np.isfinite(c))
    flat = value.reshape(-1)
    step = 1 << 22  # chunks keep the check from materialising a boolean copy of big weights
    for start in range(0, flat.size, step):
        bad = bad_of(np.asarray(flat[start:start + step]))
        if bad.any():
            at = start + int(np.flatnonzero(bad)[0])
            raise TapeoutError(f"{'constant' if nan_only else 'weight'} {name!r} has a non-finite value "
                               f"({flat[at]}) at flat index {at}; fix or re-export the model",
                               file=file, node=node, op=op)


def _constant_value(node: onnx.NodeProto, file: str, name: str) -> np.ndarray:
    a = node.attribute[0] if node.attribute else None
    if a is None:
        raise TapeoutError("Constant node without a value", file=file, node=name, op="Constant")
    if a.name == "value":
        if a.t.data_location == onnx.TensorProto.EXTERNAL:
            raise TapeoutError("Constant with external data is not supported", file=file, node=name, op="Constant")
        return tensor_array(a.t, f"the value of Constant {name!r}", file, node=name)
    v = helper.get_attribute_value(a)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
             "value_ints": np.int64}
    if a.name in kinds:
        return np.asarray(v, dtype=kinds[a.name])
    raise TapeoutError(f"Constant attribute {a.name!r} is not supported", file=file, node=name, op="Constant")


def _attr_value(a: onnx.AttributeProto, file: str, node: str | None = None):
    if a.type == onnx.AttributeProto.TENSOR:
        return tensor_array(a.t, f"attribute {a.name!r}", file, node=node)
    if a.type == onnx.AttributeProto.TENSORS:
        return tuple(tensor_array(t, f"attribute {a.name!r}", file, node=node) for t in a.tensors)
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return helper.get_attribute_value(a)  # kept as proto; reported unsupported
    try:
        v = helper.get_attribute_value(a)
    except (ValueError, TypeError) as e:
        raise TapeoutError(f"attribute {a.name!r} has an unusable type {a.type}: {e}", file=file, node=node) from None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):
        return tuple(x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v)
    return v
