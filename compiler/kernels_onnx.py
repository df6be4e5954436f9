"""Float kernels for ONNX ops, in numpy, with the semantics of the current ONNX opsets.

Each kernel is ``fn(op, *inputs)`` (omitted optional inputs are ``None``) and returns one array
or a tuple with one array per output. Dtypes follow ONNX: results keep the input dtype (a
float32 MatMul stays float32), comparisons give bool, index-valued ops give int64.
Where an operand moved from attribute to input between opsets (``axes``, ``split``, ``pads``,
``min``/``max``), the kernel takes the input when given and falls back to the attribute.
"""
from __future__ import annotations

import functools
import math

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .interp import kernel


# --- helpers ------------------------------------------------------------------------------
def _axis(axis: int, rank: int) -> int:
    """Normalise a possibly negative axis against ``rank``."""
    axis = int(axis)
    return axis + rank if axis < 0 else axis


def _axes(op, axes, rank: int) -> tuple[int, ...] | None:
    """Axes from the input (newer opsets) or the ``axes`` attribute (older ones); None if absent."""
    axes = op.attr("axes") if axes is None else axes
    return None if axes is None else tuple(_axis(a, rank) for a in np.ravel(axes))


def _dtype(code) -> np.dtype:
    """numpy dtype of an ONNX ``TensorProto.DataType`` code (or name, as Cast-1 has it)."""
    if isinstance(code, str):
        code = onnx.TensorProto.DataType.Value(code.upper())
    if isinstance(code, (int, np.integer)):
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(code)))
    return np.dtype(code)


def _text(op, key: str, default: str) -> str:
    value = op.attr(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _tensor(value) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _zero(x: np.ndarray):
    return x.dtype.type(0)


def _extreme(dtype: np.dtype, low: bool):
    if dtype == np.bool_:
        return not low
    if np.issubdtype(dtype, np.integer):
        return np.iinfo(dtype).min if low else np.iinfo(dtype).max
    return -np.inf if low else np.inf


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; math.erf is exact and fast enough for activations
    return np.asarray(_ERF(x), dtype=np.float64).astype(x.dtype)


_ERF = np.frompyfunc(math.erf, 1, 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-x))


# --- elementwise --------------------------------------------------------------------------
_UNARY = {
    "Identity": lambda x: x, "Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal, "Exp": np.exp, "Log": np.log, "Floor": np.floor, "Ceil": np.ceil,
    "Round": np.round, "Sign": np.sign, "Tanh": np.tanh, "Sigmoid": _sigmoid, "Erf": _erf,
    "Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin, "Acos": np.arccos,
    "Atan": np.arctan, "Sinh": np.sinh, "Cosh": np.cosh, "Asinh": np.arcsinh, "Acosh": np.arccosh,
    "Atanh": np.arctanh, "Not": np.logical_not, "IsNaN": np.isnan, "BitwiseNot": np.invert,
    "Softsign": lambda x: x / (1 + np.abs(x)), "Softplus": lambda x: np.logaddexp(x, _zero(x)),
    "Relu": lambda x: np.maximum(x, _zero(x)),
}
_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "And": np.logical_and,
    "Or": np.logical_or, "Xor": np.logical_xor, "BitwiseAnd": np.bitwise_and,
    "BitwiseOr": np.bitwise_or, "BitwiseXor": np.bitwise_xor,
}
_COMPARE = {
    "Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
}
_VARIADIC = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}

for _kind, _fn in _UNARY.items():
    kernel(_kind)(lambda op, x, fn=_fn: fn(x))
for _kind, _fn in _BINARY.items():
    kernel(_kind)(lambda op, a, b, fn=_fn: fn(a, b))
for _kind, _fn in _COMPARE.items():
    kernel(_kind)(lambda op, a, b, fn=_fn: np.asarray(fn(a, b), dtype=bool))
for _kind, _fn in _VARIADIC.items():
    kernel(_kind)(lambda op, *xs, fn=_fn: functools.reduce(fn, xs))


@kernel("Mean")
def mean(op, *xs):
    return functools.reduce(np.add, xs) / len(xs)


@kernel("Div")
def div(op, a, b):
    if np.issubdtype(a.dtype, np.integer):   # ONNX integer division truncates toward zero
        return np.trunc(np.true_divide(a, b)).astype(a.dtype)
    return np.divide(a, b)


@kernel("Pow")
def pow_(op, x, y):
    return np.power(x, y).astype(x.dtype)   # the result has the base's type


@kernel("Mod")
def mod(op, a, b):
    return (np.fmod if op.attr("fmod", 0) else np.mod)(a, b)


@kernel("BitShift")
def bit_shift(op, x, y):
    return (np.left_shift if _text(op, "direction", "") == "LEFT" else np.right_shift)(x, y)


@kernel("IsInf")
def is_inf(op, x):
    return (np.isneginf(x) & bool(op.attr("detect_negative", 1))) | \
        (np.isposinf(x) & bool(op.attr("detect_positive", 1)))


@kernel("Clip")
def clip(op, x, lo=None, hi=None):
    lo = op.attr("min") if lo is None else lo
    hi = op.attr("max") if hi is None else hi
    if lo is not None:
        x = np.maximum(x, np.asarray(lo, x.dtype))
    return x if hi is None else np.minimum(x, np.asarray(hi, x.dtype))


@kernel("Where")
def where(op, cond, a, b):
    return np.where(cond, a, b)


# --- activations --------------------------------------------------------------------------
@kernel("LeakyRelu")
def leaky_relu(op, x):
    return np.where(x >= 0, x, x * op.attr("alpha", 0.01))


@kernel("PRelu")
def prelu(op, x, slope):
    return np.where(x >= 0, x, x * slope).astype(x.dtype)


@kernel("Elu")
def elu(op, x):
    return np.where(x > 0, x, op.attr("alpha", 1.0) * np.expm1(np.minimum(x, 0))).astype(x.dtype)


@kernel("Selu")
def selu(op, x):
    alpha, gamma = op.attr("alpha", 1.67326319217681884765625), op.attr("gamma", 1.05070102519989013671875)
    return (gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))).astype(x.dtype)


@kernel("Celu")
def celu(op, x):
    alpha = op.attr("alpha", 1.0)
    return (np.maximum(x, 0) + np.minimum(0, alpha * np.expm1(np.minimum(x, 0) / alpha))).astype(x.dtype)


@kernel("ThresholdedRelu")
def thresholded_relu(op, x):
    return np.where(x > op.attr("alpha", 1.0), x, _zero(x))


@kernel("HardSigmoid")
def hard_sigmoid(op, x):
    return np.clip(op.attr("alpha", 0.2) * x + op.attr("beta", 0.5), 0, 1)


@kernel("HardSwish")
def hard_swish(op, x):
    return x * np.clip(x / 6 + 0.5, 0, 1)


@kernel("Shrink")
def shrink(op, x):
    bias, lambd = op.attr("bias", 0.0), op.attr("lambd", 0.5)
    return np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0)).astype(x.dtype)


@kernel("Mish")
def mish(op, x):
    return x * np.tanh(np.logaddexp(x, _zero(x)))


@kernel("Swish")
def swish(op, x):
    return x * _sigmoid(op.attr("alpha", 1.0) * x)


@kernel("SwiGLU")
def swiglu(op, a, b):
    return a * _sigmoid(op.attr("alpha", 1.0) * a) * b


@kernel("Gelu")
def gelu(op, x):
    if _text(op, "approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def coerced(fn):
    """Opset < 13 semantics (the importer sets ``coerce_2d``): flatten to 2-D at ``axis``
    (default 1), apply over the trailing block, reshape back."""
    def wrapped(op, x):
        if not op.attr("coerce_2d", 0):
            return fn(op, x, op.attr("axis", -1))
        axis = op.attr("axis", 1) % max(x.ndim, 1)
        lead = int(np.prod(x.shape[:axis], dtype=np.int64))
        return fn(op, x.reshape(lead, -1), -1).reshape(x.shape)
    return wrapped


@kernel("Softmax")
@coerced
def softmax(op, x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@kernel("LogSoftmax")
@coerced
def log_softmax(op, x, axis):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


@kernel("Hardmax")
@coerced
def hardmax(op, x, axis):
    out = np.zeros_like(x)
    np.put_along_axis(out, np.argmax(x, axis=axis, keepdims=True), 1, axis=axis)
    return out


# --- reductions ---------------------------------------------------------------------------
_REDUCE = {
    "ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceProd": np.prod,
    "ReduceMax": lambda x, **kw: np.max(x, initial=_extreme(x.dtype, True), **kw),
    "ReduceMin": lambda x, **kw: np.min(x, initial=_extreme(x.dtype, False), **kw),
    "ReduceL1": lambda x, **kw: np.sum(np.abs(x), **kw),
    "ReduceL2": lambda x, **kw: np.sqrt(np.sum(np.square(x), **kw)),
    "ReduceSumSquare": lambda x, **kw: np.sum(np.square(x), **kw),
    "ReduceLogSum": lambda x, **kw: np.log(np.sum(x, **kw)),
    "ReduceLogSumExp": lambda x, **kw: np.log(np.sum(np.exp(x), **kw)),
}


def _reduction(fn):
    def run(op, x, axes=None):
        axes = _axes(op, axes, x.ndim)
        if not axes:   # absent or empty: all axes, or none at all with noop_with_empty_axes
            axes = () if op.attr("noop_with_empty_axes", 0) else None
        with np.errstate(divide="ignore"):
            out = fn(x, axis=axes, keepdims=bool(op.attr("keepdims", 1)))
        return np.asarray(out).astype(x.dtype, copy=False)
    return run


for _kind, _fn in _REDUCE.items():
    kernel(_kind)(_reduction(_fn))


def _arg_reduction(fn):
    def run(op, x):
        axis = _axis(op.attr("axis", 0), x.ndim)
        if op.attr("select_last_index", 0):
            index = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis)
        else:
            index = fn(x, axis=axis)
        if op.attr("keepdims", 1):
            index = np.expand_dims(index, axis)
        return np.asarray(index, dtype=np.int64)
    return run


kernel("ArgMax")(_arg_reduction(np.argmax))
kernel("ArgMin")(_arg_reduction(np.argmin))


def _cumulative(fn, identity):
    def run(op, x, axis):
        axis = _axis(np.ravel(axis)[0], x.ndim)
        reverse = op.attr("reverse", 0)
        y = fn(np.flip(x, axis) if reverse else x, axis=axis, dtype=x.dtype)
        if op.attr("exclusive", 0):
            pad = np.full_like(np.take(y, [0], axis=axis), identity)
            y = np.concatenate([pad, np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis)
        return np.flip(y, axis) if reverse else y
    return run


kernel("CumSum")(_cumulative(np.cumsum, 0))
kernel("CumProd")(_cumulative(np.cumprod, 1))


# --- linear algebra and normalisation -----------------------------------------------------
@kernel("MatMul")
def matmul(op, a, b):
    return np.matmul(a, b).astype(a.dtype, copy=False)   # ml_dtypes' bfloat16 matmul widens


@kernel("Gemm")
def gemm(op, a, b, c=None):
    a = a.T if op.attr("transA", 0) else a
    b = b.T if op.attr("transB", 0) else b
    y = op.attr("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + op.attr("beta", 1.0) * c
    return y.astype(a.dtype, copy=False)


@kernel("Einsum")
def einsum(op, *xs):
    wide = [x.astype(np.float32) if x.dtype.kind == "V" else x for x in xs]   # bfloat16
    return np.einsum(_text(op, "equation", ""), *wide).astype(xs[0].dtype, copy=False)


@kernel("Det")
def det(op, x):
    return np.linalg.det(x).astype(x.dtype)


def _stash(op, x: np.ndarray) -> np.dtype:
    """Compute dtype of the normalisations: stash_type, widened to the input type."""
    return np.promote_types(_dtype(op.attr("stash_type", 1)), x.dtype)


@kernel("LayerNormalization")
def layer_normalization(op, x, scale, bias=None):
    dims = tuple(range(_axis(op.attr("axis", -1), x.ndim), x.ndim))
    xs = x.astype(_stash(op, x))
    mean = xs.mean(axis=dims, keepdims=True)
    inv_std = 1 / np.sqrt(np.square(xs - mean).mean(axis=dims, keepdims=True) + op.attr("epsilon", 1e-5))
    y = (xs - mean) * inv_std * scale
    y = y if bias is None else y + bias
    return y.astype(x.dtype), mean, inv_std


@kernel("RMSNormalization")
def rms_normalization(op, x, scale):
    dims = tuple(range(_axis(op.attr("axis", -1), x.ndim), x.ndim))
    xs = x.astype(_stash(op, x))
    inv_rms = 1 / np.sqrt(np.square(xs).mean(axis=dims, keepdims=True) + op.attr("epsilon", 1e-5))
    return (xs * inv_rms * scale).astype(x.dtype)


@kernel("RotaryEmbedding")
def rotary_embedding(op, x, cos, sin, position_ids=None):
    # work in (batch, seq, heads, head_size); 4-D input is (batch, heads, seq, head_size)
    xt = x.transpose(0, 2, 1, 3) if x.ndim == 4 else x.reshape(*x.shape[:2], op.num_heads, -1)
    rot = op.attr("rotary_embedding_dim", 0) or xt.shape[-1]
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xr = xt[..., :rot]
    if op.attr("interleaved", 0):
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if op.attr("interleaved", 0):
        rotated = np.stack([real, imag], axis=-1).reshape(xr.shape)
    else:
        rotated = np.concatenate([real, imag], axis=-1)
    out = np.concatenate([rotated, xt[..., rot:]], axis=-1).astype(x.dtype)
    return out.transpose(0, 2, 1, 3) if x.ndim == 4 else out.reshape(x.shape)


def _split_heads(t: np.ndarray, heads: int) -> np.ndarray:
    """(batch, seq, heads * size) -> (batch, heads, seq, size)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(0, 2, 1, 3)


def _attention_bias(op, mask, q_len: int, kv_len: int, past: int, nonpad, dtype) -> np.ndarray:
    """Additive bias (0 or -inf, plus a float mask) of shape broadcastable to the scores."""
    def additive(allowed):
        return np.where(allowed, dtype.type(0), dtype.type(-np.inf))

    bias = np.zeros((q_len, kv_len), dtype)
    if mask is not None:
        pad = [(0, 0)] * (mask.ndim - 1) + [(0, kv_len - mask.shape[-1])]
        mask = np.pad(mask, pad, constant_values=False if mask.dtype == np.bool_ else -np.inf)
        bias = bias + (additive(mask) if mask.dtype == np.bool_ else mask)
    # query i sits at absolute position i + offset (past length, or per batch for an external cache)
    offset = past if nonpad is None else np.reshape(nonpad, (-1, 1, 1, 1)) - q_len
    i, j = np.arange(q_len)[:, None] + offset, np.arange(kv_len)
    allowed = np.ones_like(i - j, dtype=bool)
    if op.attr("is_causal", 0):
        allowed &= j <= i
    if op.attr("left_window_size", -1) >= 0:
        allowed &= i - j <= op.attr("left_window_size")
    if op.attr("right_window_size", -1) >= 0:
        allowed &= j - i <= op.attr("right_window_size")
    if nonpad is not None:
        allowed &= j < np.reshape(nonpad, (-1, 1, 1, 1))
    return bias + additive(allowed)


@kernel("Attention")
def attention(op, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    rank3 = q.ndim == 3
    if rank3:
        q, k, v = (_split_heads(q, op.q_num_heads), _split_heads(k, op.kv_num_heads),
                   _split_heads(v, op.kv_num_heads))
    # scale Q and K by sqrt(scale) each, as the spec does against overflow
    root = q.dtype.type(math.sqrt(op.attr("scale") or 1 / math.sqrt(q.shape[-1])))
    past = 0 if past_key is None else past_key.shape[2]
    if past_key is not None:
        k, v = np.concatenate([past_key, k], axis=2), np.concatenate([past_value, v], axis=2)
    present_key, present_value = k, v
    if q.shape[1] != k.shape[1]:   # grouped-query: each KV head serves q_heads / kv_heads heads
        k, v = (np.repeat(t, q.shape[1] // t.shape[1], axis=1) for t in (k, v))
    logits = (q * root) @ np.swapaxes(k * root, -1, -2)
    softcap = op.attr("softcap", 0.0)
    capped = softcap * np.tanh(logits / softcap) if softcap > 0 else logits
    bias = _attention_bias(op, mask, q.shape[2], k.shape[2], past, nonpad_kv_seqlen, q.dtype)
    scores = capped + bias
    if op.attr("softmax_precision") is not None:
        scores = scores.astype(_dtype(op.softmax_precision))
    # a row with no attendable key gives zeros, not NaN
    masked_row = np.isneginf(np.max(bias, axis=-1, keepdims=True))
    top = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isneginf(top), 0, top))
    total = np.sum(e, axis=-1, keepdims=True)
    probs = np.where(masked_row, 0, e / np.where(total == 0, 1, total)).astype(q.dtype)
    y = (probs @ v).astype(q.dtype, copy=False)
    if rank3:
        y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)
    qk = (logits, capped, capped + bias, probs)[op.attr("qk_matmul_output_mode", 0)]
    return y, present_key, present_value, qk.astype(q.dtype)


# --- shape and data movement --------------------------------------------------------------
@kernel("Transpose")
def transpose(op, x):
    return np.transpose(x, op.attr("perm"))


@kernel("Reshape")
def reshape(op, x, shape=None):
    shape = [int(d) for d in (op.attr("shape") if shape is None else shape)]
    if not op.attr("allowzero", 0):   # 0 copies the input dimension
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@kernel("Flatten")
def flatten(op, x):
    axis = _axis(op.attr("axis", 1), x.ndim)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@kernel("Unsqueeze")
def unsqueeze(op, x, axes=None):
    axes = op.attr("axes") if axes is None else axes
    return np.expand_dims(x, tuple(int(a) for a in np.ravel(axes)))


@kernel("Squeeze")
def squeeze(op, x, axes=None):
    axes = _axes(op, axes, x.ndim)
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=axes)


@kernel("Expand")
def expand(op, x, shape):
    return np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))))


@kernel("Tile")
def tile(op, x, repeats):
    return np.tile(x, tuple(int(r) for r in repeats))


@kernel("Concat")
def concat(op, *xs):
    return np.concatenate(xs, axis=op.attr("axis"))


@kernel("Split")
def split(op, x, sizes=None):
    axis = _axis(op.attr("axis", 0), x.ndim)
    sizes = op.attr("split") if sizes is None else sizes
    if sizes is None:   # equal chunks (num_outputs: the last one may be smaller)
        n, dim = op.attr("num_outputs") or len(op.outputs), x.shape[axis]
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    return tuple(np.split(x, np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1], axis=axis))


@kernel("Slice")
def slice_(op, x, starts=None, ends=None, axes=None, steps=None):
    starts = op.attr("starts") if starts is None else starts
    ends = op.attr("ends") if ends is None else ends
    axes = _axes(op, axes, x.ndim) or range(len(starts))
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for a, start, end, step in zip(axes, starts, ends, steps):
        dim, start, end, step = x.shape[a], int(start), int(end), int(step)
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            index[a] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        elif start < 0:   # a backwards slice starting before the first element is empty
            index[a] = slice(0, 0)
        else:   # end -1 means "through the first element", which Python spells None
            end = min(max(end, -1), dim - 1)
            index[a] = slice(min(start, dim - 1), None if end < 0 else end, step)
    return x[tuple(index)]


@kernel("Pad")
def pad(op, x, pads=None, value=None, axes=None):
    pads = [int(p) for p in (op.attr("pads") if pads is None else pads)]
    axes = _axes(op, axes, x.ndim) or range(x.ndim)
    widths, crop = [(0, 0)] * x.ndim, [slice(None)] * x.ndim
    for i, a in enumerate(axes):   # pads: all begins, then all ends; negative pads crop
        begin, end = pads[i], pads[i + len(axes)]
        widths[a] = (max(begin, 0), max(end, 0))
        crop[a] = slice(max(-begin, 0), x.shape[a] + max(begin, 0) + max(end, 0) - max(-end, 0))
    mode = _text(op, "mode", "constant")
    if mode == "constant":
        fill = op.attr("value", 0.0) if value is None else value
        out = np.pad(x, widths, constant_values=np.asarray(fill).astype(x.dtype))
    else:
        out = np.pad(x, widths, mode=mode)   # ONNX edge/reflect/wrap are numpy's
    return out[tuple(crop)]


@kernel("Gather")
def gather(op, x, indices):
    return np.take(x, indices.astype(np.int64), axis=_axis(op.attr("axis", 0), x.ndim))


@kernel("GatherElements")
def gather_elements(op, x, indices):
    axis = _axis(op.attr("axis", 0), x.ndim)
    return np.take_along_axis(x, np.where(indices < 0, indices + x.shape[axis], indices), axis)


@kernel("GatherND")
def gather_nd(op, x, indices):
    b = op.attr("batch_dims", 0)
    flat_x = x.reshape(-1, *x.shape[b:])
    flat_i = indices.reshape(-1, *indices.shape[b:])
    out = [xb[tuple(np.moveaxis(ib, -1, 0))] for xb, ib in zip(flat_x, flat_i)]
    return np.asarray(out, dtype=x.dtype).reshape(indices.shape[:-1] + x.shape[b + indices.shape[-1]:])


_SCATTER_REDUCE = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter(op, x, where, updates):
    out = x.copy()
    reduction = _text(op, "reduction", "none")
    if reduction == "none":
        out[where] = updates
    else:
        _SCATTER_REDUCE[reduction].at(out, where, updates)
    return out


@kernel("ScatterND")
def scatter_nd(op, x, indices, updates):
    return _scatter(op, x, tuple(np.moveaxis(indices, -1, 0)), updates)


@kernel("ScatterElements", "Scatter")
def scatter_elements(op, x, indices, updates):
    axis = _axis(op.attr("axis", 0), x.ndim)
    where = list(np.indices(indices.shape, sparse=True))
    where[axis] = np.where(indices < 0, indices + x.shape[axis], indices)
    return _scatter(op, x, tuple(where), updates)


@kernel("TensorScatter")
def tensor_scatter(op, cache, update, write_indices=None):
    """KV-cache write: ``update`` goes into ``cache`` along ``axis`` from each batch's write index."""
    axis = _axis(op.attr("axis", -2), cache.ndim)
    start = np.zeros(cache.shape[0], np.int64) if write_indices is None else write_indices
    position = np.reshape(start, (-1,) + (1,) * axis) + np.arange(update.shape[axis])
    if _text(op, "mode", "linear") == "circular":
        position = position % cache.shape[axis]
    where = list(np.indices(update.shape[:axis + 1], sparse=True))
    where[axis] = position
    out = cache.copy()
    out[tuple(where)] = update
    return out


@kernel("Compress")
def compress(op, x, condition):
    return np.compress(condition, x, axis=op.attr("axis"))


@kernel("NonZero")
def nonzero(op, x):
    return np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)


@kernel("Trilu")
def trilu(op, x, k=None):
    k = 0 if k is None else int(np.ravel(k)[0])
    return np.triu(x, k) if op.attr("upper", 1) else np.tril(x, k)


@kernel("TopK")
def top_k(op, x, k=None):
    k = int(np.ravel(k)[0]) if k is not None else op.k
    axis = _axis(op.attr("axis", -1), x.ndim)
    if op.attr("largest", 1):   # stable descending: ties keep the lower index first
        order = x.shape[axis] - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    index = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, index, axis), index.astype(np.int64)


@kernel("OneHot")
def one_hot(op, indices, depth, values):
    depth = int(np.ravel(depth)[0])
    indices = np.where(indices < 0, indices + depth, indices).astype(np.int64)
    hot = np.expand_dims(indices, -1) == np.arange(depth)
    axis = _axis(op.attr("axis", -1), indices.ndim + 1)
    return np.moveaxis(np.where(hot, values[1], values[0]), -1, axis)


# --- constants, shapes, types -------------------------------------------------------------
_CONSTANT_ATTRS = {"value": None, "value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64, "value_string": object,
                   "value_strings": object}


@kernel("Constant")
def constant(op):
    for key, dtype in _CONSTANT_ATTRS.items():
        if key in op.attrs:
            return np.array(_tensor(op.attrs[key]), dtype=dtype)
    raise NotImplementedError(f"Constant {op.name!r}: only dense values are supported")


@kernel("ConstantOfShape")
def constant_of_shape(op, shape):
    value = _tensor(op.attr("value", np.zeros(1, np.float32)))
    return np.full(tuple(int(d) for d in shape), value.ravel()[0], dtype=value.dtype)


@kernel("EyeLike")
def eye_like(op, x):
    dtype = x.dtype if op.attr("dtype") is None else _dtype(op.dtype)
    return np.eye(*x.shape, k=op.attr("k", 0), dtype=dtype)


@kernel("Range")
def range_(op, start, limit, delta):
    # float16/bfloat16 count and accumulate in stash_type (float32 by default)
    out = start.dtype
    work = _dtype(op.attr("stash_type", 1)) if out in (np.float16, ml_dtypes.bfloat16) else out
    start, limit, delta = (np.asarray(v, work) for v in (start, limit, delta))
    count = max(math.ceil(float(limit - start) / float(delta)), 0)   # in double, as onnxruntime
    return (start + np.arange(count, dtype=work) * delta).astype(out)


@kernel("Shape")
def shape(op, x):
    return np.array(x.shape[op.attr("start", 0):op.attr("end")], dtype=np.int64)


@kernel("Size")
def size(op, x):
    return np.array(x.size, dtype=np.int64)


def _to_e8m0(x: np.ndarray, saturate: bool, round_mode: str) -> np.ndarray:
    """FLOAT8E8M0 (MX scales) keeps the float32 exponent; ``round_mode`` rounds the mantissa."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint16)
    if round_mode == "up":
        bump = (bits & 0x7FFFFF) > 0
    elif round_mode == "nearest":   # guard bit set and (round/sticky bits or odd exponent)
        bump = ((bits & 0x400000) > 0) & (((bits & 0x3FFFFF) > 0) | (exponent > 0))
    else:
        bump = np.zeros(bits.shape, dtype=bool)
    bump &= (exponent != 0xFF) & ((exponent != 0xFE) | (not saturate))
    return (exponent + bump).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def _cast(x: np.ndarray, to: np.dtype, saturate: bool, round_mode: str = "up") -> np.ndarray:
    if to == np.bool_:
        return x != 0
    if to == object:   # STRING
        return x.astype(str).astype(object)
    if to == ml_dtypes.float8_e8m0fnu:
        return _to_e8m0(x, saturate, round_mode)
    if saturate and to.name.startswith(("float8_e4", "float8_e5", "float4")) and x.dtype.kind in "fV":
        top = float(ml_dtypes.finfo(to).max)   # saturate: +-inf and out-of-range values clamp
        x = np.clip(x.astype(np.float32), -top, top)
    return x.astype(to)


@kernel("Cast")
def cast(op, x):
    return _cast(x, _dtype(op.to), bool(op.attr("saturate", 1)), _text(op, "round_mode", "up"))


@kernel("CastLike")
def cast_like(op, x, like):
    return _cast(x, like.dtype, bool(op.attr("saturate", 1)))


@kernel("Dropout")
def dropout(op, x, ratio=None, training_mode=None):
    ratio = op.attr("ratio", 0.5) if ratio is None else float(ratio)
    if training_mode is not None and bool(training_mode) and ratio > 0:
        raise NotImplementedError(f"Dropout {op.name!r}: training mode is random; tapeout runs inference")
    return x, np.ones(x.shape, dtype=bool)
