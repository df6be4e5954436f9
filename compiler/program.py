"""The integer program: the quantised model after lowering, as golden runs it and every backend
consumes it (spec: docs/program.md).

An :class:`IntegerProgram` is built once per compile from the fused, bound graph and its
quantised weights. It holds

* ``ops``: the ops in one fixed topological order (the graph's, ties broken by name);
* ``linears``: per ``linear`` op its integer constants (:class:`IntLinear`: int8 codes, group
  scales, requantisation multiplier and shift, Q16 bias);
* the other constants in golden's representation (float tensors as saturated Q16 integers,
  -inf and <= -1e30 as ``MASKED``; integer tensors as they are) -- norm gains, RoPE tables,
  the embedding table, shapes -- stored compactly (int32 when the values fit) and widened to
  int64 once, on first use;
* ``interface``: which input is the token ids, the positions, the mask, the token types, the
  KV cache, decided here and nowhere else;
* the structure summary, the linears' roles and the quantisation summary of the compile.

``save``/``load`` write and read it as ``program/program.json`` (ops, tensors, interface, a
table of arrays) plus ``program/tensors.bin`` (the arrays, 64-byte aligned, memory-mapped on
load). A compile folder carries it, so ``simulate`` and ``diff`` need nothing else.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .errors import TapeoutError
from .golden import fixed as fx
from .golden.model import KERNELS, MASKED, PLUMBING, GoldenConfig, IntLinear
from .ir import Graph, Op, TensorInfo

__all__ = ["IntegerProgram", "Interface", "FORMAT", "VERSION", "BUILDS", "golden_const"]

FORMAT, VERSION = "tapeout-integer-program", 1
ALIGN = 64
BUILDS = {"programs": 0, "int_linears": 0}     # counted by a test: one compile builds one program


def golden_const(c: np.ndarray) -> np.ndarray:
    """A graph constant in golden's representation: floats -> Q16 saturated to 32 bits (-inf and
    values <= -1e30, the masks' "minus infinity", -> ``MASKED``); integers and bools unchanged."""
    c = np.asarray(c)
    if c.dtype.kind != "f":
        return c
    c64 = np.asarray(c, np.float64)
    return np.where(np.isneginf(c64) | (c64 <= -1e30), MASKED,
                    fx.saturate32(fx.to_fixed(np.clip(c64, -2.0**15, 2.0**15))))


def _compact(v: np.ndarray) -> np.ndarray:
    """int64 values that fit int32 are stored as int32 (the Q16 tables); others as they are."""
    if v.dtype == np.int64 and v.size and -(1 << 31) <= int(v.min()) and int(v.max()) < (1 << 31):
        return v.astype(np.int32)
    return v


# ops whose float kernels are exact on integer and bool data (comparisons, logic, casts between
# integer types, integer sums and ranges): golden runs them as they are when every input and
# output is an integer or a bool -- the index arithmetic of masks and positions at run time
EXACT_ON_INTEGERS = frozenset({
    "Cast", "CastLike", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or",
    "Not", "Xor", "CumSum", "Range", "Max", "Min", "Abs", "Sign", "Neg", "Shape", "Size",
    "ConstantOfShape", "Tile", "Trilu", "ReduceSum", "ReduceMax", "ReduceMin", "Identity",
})


def integer_exact(graph: Graph, op: Op) -> bool:
    """Is ``op`` integer arithmetic golden can run with the float interpreter's kernel, exactly?"""
    if op.kind not in EXACT_ON_INTEGERS:
        return False
    for t in (*op.inputs, *op.outputs):
        if t and (t not in graph.tensors or np.dtype(graph.tensors[t].dtype).kind not in "iub"):
            return False
    return True


def padded_mask(shape, dtype) -> np.ndarray:
    """A left-padded [B, T] mask: row b keeps all but its first min(T-1, (b+1)*max(1, T//8)) keys."""
    if len(shape) != 2:
        return np.ones(shape, dtype)
    b, t = shape
    pad = np.minimum(t - 1, (np.arange(b) + 1) * max(1, t // 8))
    return (np.arange(t)[None, :] >= pad[:, None]).astype(dtype)


# --- the interface ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interface:
    """The roles of the model's inputs and outputs: the one place that decides them.

    Token ids: the integer input that is not a mask, a position or a token-type input.
    Positions / mask / token types: integer (or bool) inputs whose names say so. KV cache: the
    float inputs (``past_key_values.*``) and the outputs after the logits (``present.*``).
    """

    tokens: str | None
    positions: str | None = None
    mask: str | None = None
    token_types: str | None = None
    kv_inputs: tuple[str, ...] = ()
    kv_outputs: tuple[str, ...] = ()
    logits: str | None = None
    vocab: int | None = None
    past: int = 0                    # KV-cache length of a decode graph
    mode: str = "prefill"            # "prefill" or "decode"

    @staticmethod
    def of(graph: Graph) -> "Interface":
        ints, kv, pos, mask, types = [], [], None, None, None
        for n in graph.inputs:
            kind = np.dtype(graph.tensors[n].dtype).kind
            low = n.lower()
            if kind == "f":
                kv.append(n)
            elif "mask" in low:
                mask = mask or n
            elif "position" in low:
                pos = pos or n
            elif "token_type" in low or "segment" in low:
                types = types or n
            else:
                ints.append(n)
        logits = graph.outputs[0] if graph.outputs else None
        shape = graph.tensors[logits].shape if logits else None
        vocab = int(shape[-1]) if shape and isinstance(shape[-1], int) else None
        past = max((int(graph.tensors[n].shape[-2]) for n in kv
                    if graph.tensors[n].shape and len(graph.tensors[n].shape) >= 2), default=0)
        return Interface(tokens=ints[0] if len(ints) == 1 else None, positions=pos, mask=mask, token_types=types,
                         kv_inputs=tuple(kv), kv_outputs=tuple(graph.outputs[1:]), logits=logits, vocab=vocab,
                         past=past, mode="decode" if kv else "prefill")

    def require_tokens(self, graph: Graph) -> str:
        """The token-id input of a prefill graph whose other inputs can be filled in."""
        if self.tokens is None or self.kv_inputs:
            raise TapeoutError("needs a prefill export whose inputs are input_ids (plus optional "
                               f"attention_mask / position_ids); this model has {graph.inputs}",
                               file=graph.meta.get("file"))
        return self.tokens

    def window_feeds(self, graph: Graph, window: np.ndarray) -> dict[str, np.ndarray]:
        """Float-model feeds for one window of token ids: all-ones mask, positions 0..S-1."""
        tok = self.require_tokens(graph)
        feeds = {}
        for name in graph.inputs:
            info = graph.tensors[name]
            if name == tok:
                feeds[name] = window.reshape(info.shape).astype(info.dtype)
            elif name == self.positions:
                feeds[name] = np.broadcast_to(np.arange(info.shape[-1]), info.shape).astype(info.dtype)
            elif name == self.token_types:
                feeds[name] = np.zeros(info.shape, info.dtype)
            else:
                feeds[name] = np.ones(info.shape, info.dtype)
        return feeds

    def sample_feeds(self, graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
        """Golden feeds for a backend's self-check (prefill and decode): token ids uniform over the
        vocabulary (seeded), masks left-padded (``padded_mask``: the backends' masking is
        exercised and rows differ), positions counting on from the past length, a KV cache of
        standard-normal values in Q16."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for name in graph.inputs:
            info = graph.tensors[name]
            if name in self.kv_inputs:
                feeds[name] = fx.to_fixed(rng.standard_normal(info.shape))
            elif name == self.positions:
                feeds[name] = np.broadcast_to(self.past + np.arange(info.shape[-1]), info.shape).astype(info.dtype)
            elif name == self.mask:
                feeds[name] = padded_mask(info.shape, info.dtype)
            elif name == self.token_types:
                # the pre-interface rule drew these like token ids; kept so artifacts stay identical
                feeds[name] = rng.integers(0, self.vocab, info.shape).astype(info.dtype)
            else:
                feeds[name] = rng.integers(0, self.vocab, info.shape).astype(info.dtype)
        return feeds

    def to_json(self) -> dict:
        d = asdict(self)
        d["kv_inputs"], d["kv_outputs"] = list(self.kv_inputs), list(self.kv_outputs)
        return d

    @staticmethod
    def from_json(d: Mapping) -> "Interface":
        return Interface(**{**d, "kv_inputs": tuple(d["kv_inputs"]), "kv_outputs": tuple(d["kv_outputs"])})


# --- the program -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class IntegerProgram:
    """The lowered integer model (see the module docstring). Frozen: passes do not touch it."""

    graph: Graph                              # the fused, bound graph; constants in golden's form
    config: GoldenConfig
    linears: Mapping[str, IntLinear]
    interface: Interface
    roles: Mapping[str, str] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)     # structure.recognise of the float graph
    quant: Mapping[str, Any] = field(default_factory=dict)       # the quantisation summary
    ops: tuple[Op, ...] = ()
    _wide: dict = field(default_factory=dict, repr=False)         # int64 views of compact constants

    # --- building ---------------------------------------------------------------------------
    @staticmethod
    def build(graph: Graph, weights: Mapping[str, object], config: GoldenConfig = GoldenConfig(), *,
              roles: Mapping[str, str] | None = None, summary: Mapping | None = None,
              quant: Mapping | None = None) -> "IntegerProgram":
        """Lower ``graph`` (fused, bound) with quantised ``weights`` (per linear op: ``codes``,
        ``group_size``, ``group_scale``, ``row_scale``, or already-integer ``mult``/``shift``)."""
        BUILDS["programs"] += 1
        ops = tuple(graph.ops)
        missing = [op.name for op in ops if op.kind == "linear" and op.name not in weights]
        if missing:
            raise TapeoutError(f"golden: linear ops without quantised weights: {missing[:5]}")
        linears: dict[str, IntLinear] = {}
        linear_only: set[str] = set()
        for op in ops:
            if op.kind not in KERNELS and op.kind not in PLUMBING and not integer_exact(graph, op):
                raise TapeoutError(f"golden has no integer kernel for op {op.kind}"
                                   + (" on float values" if op.kind in EXACT_ON_INTEGERS else ""),
                                   node=op.name, op=op.kind)
            if op.kind == "linear":
                linears[op.name] = _int_linear(graph, op, weights[op.name])
                linear_only.update(t for t in op.inputs[1:3] if t)
        # constants a non-linear op reads (a linear's float weight and bias live in its IntLinear)
        used = {t for op in ops if op.kind != "linear" for t in op.inputs if t in graph.constants}
        used |= {t for op in ops if op.kind == "linear" for t in op.inputs[:1] if t in graph.constants}
        used |= {t for t in graph.outputs if t in graph.constants}
        g = Graph(graph.name)
        g.tensors = dict(graph.tensors)
        g.inputs, g.outputs = list(graph.inputs), list(graph.outputs)
        g.meta = {k: v for k, v in graph.meta.items() if isinstance(v, (str, int, float, bool))}
        for op in ops:
            g.add_op(op)
        g.constants = {t: _compact(golden_const(graph.constants[t])) for t in sorted(used)}
        list(g.ops)                        # sort once; the order is cached with the graph
        return IntegerProgram(g, config, MappingProxyType(linears), Interface.of(graph),
                              MappingProxyType(dict(roles or {})), MappingProxyType(dict(summary or {})),
                              MappingProxyType(dict(quant or {})), ops)

    def with_linears(self, linears: Mapping[str, object]) -> "IntegerProgram":
        """The same program with other integer linears (e.g. read back from a chip's via layers:
        objects with ``codes``, ``group_size``, ``group_scale``, ``mult``, ``shift``, ``bias``)."""
        new = {}
        for name, L in linears.items():
            if name not in self.linears:
                raise TapeoutError(f"integer program has no linear {name!r}")
            new[name] = L if isinstance(L, IntLinear) else _int_linear_of(L.codes, int(L.group_size), L.group_scale,
                                                                         L.mult, L.shift, L.bias)
        missing = sorted(set(self.linears) - set(new))
        if missing:
            raise TapeoutError(f"golden: linear ops without quantised weights: {missing[:5]}")
        return IntegerProgram(self.graph, self.config, MappingProxyType(new), self.interface, self.roles,
                              self.summary, self.quant, self.ops, self._wide)

    # --- reading ----------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray:
        """A constant in golden's representation (int64 for integer tables; bools as they are)."""
        v = self._wide.get(name)
        if v is None:
            c = self.graph.constants[name]
            v = c.astype(np.int64) if c.dtype.kind in "iu" and c.dtype != np.int64 else c
            self._wide[name] = v
        return v

    def is_float(self, t: str) -> bool:
        return np.dtype(self.graph.tensors[t].dtype).kind == "f"

    @property
    def inputs(self) -> list[str]:
        return self.graph.inputs

    @property
    def outputs(self) -> list[str]:
        return self.graph.outputs

    def sample_feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        return self.interface.sample_feeds(self.graph, seed)

    # --- serialisation ----------------------------------------------------------------------
    def save(self, out, folder: str = "program") -> None:
        """Write ``folder/program.json`` and ``folder/tensors.bin`` through ``out`` (an
        OutputFolder, or anything with ``write_text``/``write_bytes``)."""
        blob = _Blob()
        ops = [{"kind": op.kind, "name": op.name, "domain": op.domain, "inputs": list(op.inputs),
                "outputs": list(op.outputs), "attrs": {k: _attr_json(op, k, v, blob) for k, v in sorted(op.attrs.items())}}
               for op in self.ops]
        linears = {}
        for name in [op.name for op in self.ops if op.kind == "linear"]:
            L = self.linears[name]
            linears[name] = {"group_size": L.group_size, "codes": blob.add(np.asarray(L.codes)),
                             "group_scale": blob.add(_compact(np.asarray(L.group_scale, np.int64))),
                             "mult": blob.add(np.asarray(L.mult, np.int64)), "shift": blob.add(np.asarray(L.shift, np.int64)),
                             "bias": None if L.bias is None else blob.add(np.asarray(L.bias, np.int64))}
        doc = {"format": FORMAT, "version": VERSION, "name": self.graph.name,
               "config": {"act_bits": self.config.act_bits, "block": self.config.block},
               "interface": self.interface.to_json(), "inputs": list(self.inputs), "outputs": list(self.outputs),
               "tensors": {t: _tensor_json(info) for t, info in sorted(self.graph.tensors.items())},
               "constants": {t: blob.add(v) for t, v in sorted(self.graph.constants.items())},
               "linears": linears, "ops": ops, "roles": dict(sorted(self.roles.items())),
               "meta": dict(sorted(self.graph.meta.items())), "quant": dict(self.quant), "summary": dict(self.summary),
               "blob": {"file": "tensors.bin", "bytes": blob.size, "align": ALIGN}}
        out.write_text(f"{folder}/program.json", json.dumps(doc, indent=1, sort_keys=False) + "\n")
        out.write_bytes(f"{folder}/tensors.bin", blob.bytes())

    @staticmethod
    def load(path: str | Path) -> "IntegerProgram":
        """Read a program folder (``OUT/program``) written by :meth:`save`; every malformed part
        raises TapeoutError naming the file."""
        path = Path(path)
        pj, tb = path / "program.json", path / "tensors.bin"
        try:
            doc = json.loads(pj.read_text())
        except (OSError, ValueError) as e:
            raise TapeoutError(f"cannot read the integer program: {e}", file=str(pj)) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise TapeoutError(f"not a tapeout integer program (format {doc.get('format') if isinstance(doc, dict) else None!r})",
                               file=str(pj))
        if doc.get("version") != VERSION:
            raise TapeoutError(f"integer program version {doc.get('version')!r}; this tapeout reads version {VERSION}",
                               file=str(pj))
        try:
            data = np.memmap(tb, dtype=np.uint8, mode="r") if tb.stat().st_size else np.zeros(0, np.uint8)
        except OSError as e:
            raise TapeoutError(f"cannot read the program's tensors: {e}", file=str(tb)) from None
        try:
            if len(data) != doc["blob"]["bytes"]:
                raise TapeoutError(f"{len(data)} bytes, program.json says {doc['blob']['bytes']}", file=str(tb))
            arr = lambda ref: _array(data, ref, tb)          # noqa: E731
            g = Graph(doc["name"])
            g.tensors = {t: TensorInfo(None if d["shape"] is None else tuple(d["shape"]), np.dtype(d["dtype"]))
                         for t, d in doc["tensors"].items()}
            g.inputs, g.outputs, g.meta = list(doc["inputs"]), list(doc["outputs"]), dict(doc["meta"])
            ops = []
            for o in doc["ops"]:
                op = Op(o["kind"], o["name"], tuple(o["inputs"]), tuple(o["outputs"]),
                        {k: _attr_value(v, arr) for k, v in o["attrs"].items()}, o["domain"])
                g.add_op(op)
                ops.append(op)
            g.constants = {t: arr(ref) for t, ref in doc["constants"].items()}
            linears = {}
            for name, d in doc["linears"].items():
                linears[name] = _int_linear_of(arr(d["codes"]), int(d["group_size"]), arr(d["group_scale"]),
                                               arr(d["mult"]), arr(d["shift"]), None if d["bias"] is None else arr(d["bias"]))
            config = GoldenConfig(**doc["config"])
            interface = Interface.from_json(doc["interface"])
        except TapeoutError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TapeoutError(f"damaged integer program: {type(e).__name__}: {e}", file=str(pj)) from None
        order = tuple(op.name for op in ops)
        if tuple(o.name for o in g.ops) != order:
            raise TapeoutError("damaged integer program: the ops are not in topological order", file=str(pj))
        for op in ops:
            if op.kind not in KERNELS and op.kind not in PLUMBING:
                raise TapeoutError(f"integer program has op {op.kind}, which golden has no kernel for",
                                   file=str(pj), node=op.name, op=op.kind)
            if op.kind == "linear" and op.name not in linears:
                raise TapeoutError("damaged integer program: a linear without constants", file=str(pj),
                                   node=op.name, op=op.kind)
        return IntegerProgram(g, config, MappingProxyType(linears), interface, MappingProxyType(doc["roles"]),
                              MappingProxyType(doc["summary"]), MappingProxyType(doc["quant"]), tuple(ops))


def _int_linear(graph: Graph, op: Op, qt) -> IntLinear:
    if hasattr(qt, "mult"):      # already integer (read back from a chip's ROM)
        mult, shift, bias = qt.mult, qt.shift, qt.bias
    else:
        mult, shift = fx.multiplier(np.asarray(qt.row_scale, np.float64))
        bias = None
        if len(op.inputs) > 2 and op.inputs[2]:
            bias = fx.saturate32(fx.to_fixed(graph.constants[op.inputs[2]]))
    BUILDS["int_linears"] += 1
    return _int_linear_of(np.asarray(qt.codes, np.int64), int(qt.group_size), np.asarray(qt.group_scale, np.int64),
                          mult, shift, bias)


def _int_linear_of(codes, group_size, group_scale, mult, shift, bias) -> IntLinear:
    return IntLinear.build(np.asarray(codes, np.int64), group_size, np.asarray(group_scale, np.int64),
                           np.asarray(mult, np.int64), np.asarray(shift, np.int64),
                           None if bias is None else np.asarray(bias, np.int64))


# --- the tensor blob and attribute encoding ------------------------------------------------------
_DTYPES = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
           "float64"}


class _Blob:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise TapeoutError(f"integer program: cannot store an array of dtype {a.dtype}")
        pad = -self.size % ALIGN
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        ref = {"offset": self.size, "dtype": a.dtype.name, "shape": list(a.shape)}
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        self.parts.append(raw)
        self.size += len(raw)
        return ref

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _array(data: np.ndarray, ref: Mapping, file: Path) -> np.ndarray:
    dtype = ref["dtype"]
    if dtype not in _DTYPES:
        raise TapeoutError(f"array of unknown dtype {dtype!r}", file=str(file))
    dt = np.dtype(dtype).newbyteorder("<")
    shape = tuple(int(s) for s in ref["shape"])
    if any(s < 0 for s in shape):
        raise TapeoutError(f"array with a negative dimension {shape}", file=str(file))
    off, n = int(ref["offset"]), int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if off < 0 or off % ALIGN or off + n > len(data):
        raise TapeoutError(f"array at offset {off} ({n} bytes) lies outside the file ({len(data)} bytes)",
                           file=str(file))
    return np.frombuffer(data, dt, count=n // dt.itemsize if dt.itemsize else 0, offset=off).reshape(shape)


def _tensor_json(info: TensorInfo) -> dict:
    return {"shape": None if info.shape is None else list(info.shape), "dtype": np.dtype(info.dtype).name}


_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}


def _attr_json(op: Op, key: str, v: Any, blob: _Blob) -> Any:
    if v is None:
        return {"t": "none"}
    if type(v) in _SCALARS:
        return {"t": _SCALARS[type(v)], "v": v if not isinstance(v, float) or np.isfinite(v) else repr(v)}
    if isinstance(v, np.generic) and v.dtype.name in _DTYPES:
        return {"t": "np", "dtype": v.dtype.name, "v": v.item() if v.dtype.kind != "f" or np.isfinite(v) else repr(v.item())}
    if isinstance(v, np.ndarray):
        return {"t": "array", "ref": blob.add(v)}
    if isinstance(v, tuple):
        return {"t": "tuple", "v": [_attr_json(op, key, x, blob) for x in v]}
    raise TapeoutError(f"integer program: attribute {key!r} of type {type(v).__name__} cannot be stored "
                       "(subgraphs must be lowered before the program is built)", node=op.name, op=op.kind)


def _attr_value(d: Mapping, arr) -> Any:
    t = d["t"]
    if t == "none":
        return None
    if t in ("bool", "int", "str"):
        return {"bool": bool, "int": int, "str": str}[t](d["v"])
    if t == "float":
        return float(d["v"])
    if t == "np":
        if d["dtype"] not in _DTYPES:
            raise ValueError(f"unknown attribute dtype {d['dtype']!r}")
        return np.dtype(d["dtype"]).type(float(d["v"]) if isinstance(d["v"], str) else d["v"])
    if t == "array":
        return arr(d["ref"])
    if t == "tuple":
        return tuple(_attr_value(x, arr) for x in d["v"])
    raise ValueError(f"unknown attribute type {t!r}")



# --- comparing two programs ------------------------------------------------------------------------
def diff_programs(a: "IntegerProgram", b: "IntegerProgram") -> dict:
    """What differs between two integer programs: per linear (by role, else op name) the codes,
    group scales and requantisation words that changed; the non-linear constants that changed;
    and whether the op lists are the same. The model-level diff of a systolic or dataflow
    folder (a mask-ROM folder diffs its via layers, docs/diff.md)."""
    def key(p, name):
        return p.roles.get(name) or name
    la = {key(a, n): L for n, L in a.linears.items()}
    lb = {key(b, n): L for n, L in b.linears.items()}
    rows, total, changed_codes = [], 0, 0
    for k in list(la) + [k for k in lb if k not in la]:
        A, B = la.get(k), lb.get(k)
        if A is None or B is None or A.codes.shape != B.codes.shape:
            rows.append({"linear": k, "shape_a": None if A is None else list(A.codes.shape),
                         "shape_b": None if B is None else list(B.codes.shape), "same_shape": False})
            continue
        codes = int(np.count_nonzero(np.asarray(A.codes) != np.asarray(B.codes)))
        same_groups = A.group_size == B.group_size
        scales = (int(np.count_nonzero(np.asarray(A.group_scale) != np.asarray(B.group_scale))) if same_groups
                  else int(max(A.group_scale.size, B.group_scale.size)))
        rq = int(np.count_nonzero((np.asarray(A.mult) != np.asarray(B.mult)) | (np.asarray(A.shift) != np.asarray(B.shift))))
        ba = np.zeros(A.codes.shape[0], np.int64) if A.bias is None else np.asarray(A.bias)
        bb = np.zeros(B.codes.shape[0], np.int64) if B.bias is None else np.asarray(B.bias)
        bias = int(np.count_nonzero(ba != bb))
        total += A.codes.size
        changed_codes += codes
        rows.append({"linear": k, "shape": list(A.codes.shape), "same_shape": True, "codes_changed": codes,
                     "codes": int(A.codes.size), "fraction": round(codes / max(A.codes.size, 1), 6),
                     "group_size": [A.group_size, B.group_size], "group_scales_changed": scales,
                     "rows_requant_changed": rq, "bias_changed": bias})
    consts = []
    for t in sorted(set(a.graph.constants) | set(b.graph.constants)):
        ca, cb = a.graph.constants.get(t), b.graph.constants.get(t)
        if ca is None or cb is None or ca.shape != cb.shape:
            consts.append({"constant": t, "changed": None if ca is None or cb is None else int(ca.size)})
        else:
            n = int(np.count_nonzero(np.asarray(ca, np.int64) != np.asarray(cb, np.int64)))
            if n:
                consts.append({"constant": t, "changed": n})
    same_ops = [(o.kind, o.inputs, o.outputs) for o in a.ops] == [(o.kind, o.inputs, o.outputs) for o in b.ops]
    return {"schema": 1, "kind": "program", "same_ops": same_ops, "ops": [len(a.ops), len(b.ops)],
            "same_shapes": all(r["same_shape"] for r in rows), "codes": total, "codes_changed": changed_codes,
            "fraction": round(changed_codes / max(total, 1), 6), "linears": rows, "constants_changed": consts}


def render_program_diff(r: dict) -> str:
    changed = [x for x in r["linears"] if not x["same_shape"] or x["codes_changed"] or x["group_scales_changed"]
               or x["rows_requant_changed"] or x["bias_changed"]]
    lines = [f"integer programs: {'same' if r['same_ops'] else 'different'} ops ({r['ops'][0]} vs {r['ops'][1]}); "
             f"{r['codes_changed']} of {r['codes']} weight codes changed ({100 * r['fraction']:.2f}%) in "
             f"{len(changed)} of {len(r['linears'])} linears; {len(r['constants_changed'])} other constants changed"]
    if changed:
        lines.append(f"  {'linear':28s} {'codes changed':>14s} {'scales':>8s} {'requant rows':>13s} {'bias':>6s}")
    for x in changed:
        if not x["same_shape"]:
            lines.append(f"  {x['linear']:28s} shape {x['shape_a']} vs {x['shape_b']}")
        else:
            lines.append(f"  {x['linear']:28s} {x['codes_changed']:14d} {x['group_scales_changed']:8d} "
                         f"{x['rows_requant_changed']:13d} {x['bias_changed']:6d}")
    return "\n".join(lines)
