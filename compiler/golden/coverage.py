"""What becomes of every op the float interpreter runs, on the integer path (docs/golden.md).

Golden covers what the float path covers inside a Transformer: each float kernel is one of

* ``kernel``   -- golden has an integer kernel for it (``model.KERNELS``);
* ``moves``    -- data movement, exact on integers (``model.PLUMBING``);
* ``integers`` -- exact on integer and bool tensors, so golden runs the float kernel when every
  input and output is an integer or a bool (``program.EXACT_ON_INTEGERS``): mask and position
  index arithmetic at run time; on float tensors it is folded or fused, or it is an error;
* ``fused``    -- absorbed by a fusion pass into the transformer-level op named in the reason;
* ``folded``   -- appears in exports only on shapes and constants: ``fold-constants`` evaluates
  it at compile time once the inputs that feed it are bound;
* ``unsupported`` -- no integer meaning inside a Transformer's run-time path (the reason says
  why); if one survives folding, the compile names the node and exits 2.

``tests/test_golden_coverage.py`` checks that every float kernel is listed and that each
entry agrees with the code (a ``kernel`` is in the kernel table, and so on).
"""
from __future__ import annotations

FATES: dict[str, tuple[str, str]] = {}


def _put(fate: str, reason: str, *kinds: str) -> None:
    for k in kinds:
        assert k not in FATES, k
        FATES[k] = (fate, reason)


_put("kernel", "integer kernel", "linear", "rmsnorm", "layernorm", "silu", "gelu", "gated_mlp", "rope",
     "attention", "Add", "Sub", "Mul", "Neg")
_put("moves", "moves integers unchanged", "Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze",
     "Unsqueeze", "Expand", "Identity", "Flatten", "Gather", "GatherElements", "GatherND", "Where")
_put("integers", "mask/position index arithmetic: exact on integer and bool tensors",
     "Cast", "CastLike", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or",
     "Not", "Xor", "CumSum", "Range", "Max", "Min", "Abs", "Sign", "Shape", "Size",
     "ConstantOfShape", "Tile", "Trilu", "ReduceSum", "ReduceMax", "ReduceMin")
_put("fused", "-> linear (a constant weight)", "MatMul", "Gemm")
_put("fused", "-> attention (scores, scale, mask and softmax)", "Softmax", "Attention", "IsNaN")
_put("fused", "-> rmsnorm / layernorm", "RMSNormalization", "LayerNormalization", "ReduceMean", "Pow",
     "Sqrt", "Reciprocal", "Div")
_put("fused", "-> gelu / silu / gated_mlp (recognised by probing)", "Gelu", "Erf", "Tanh", "Sigmoid",
     "Swish", "SwiGLU")
_put("fused", "-> rope", "RotaryEmbedding", "Sin", "Cos")
_put("folded", "constant or shape arithmetic only (folded once shapes are bound)",
     "Constant", "Dropout", "Floor", "Ceil", "Round", "Mod", "Exp", "Log", "BitShift", "BitwiseAnd",
     "BitwiseNot", "BitwiseOr", "BitwiseXor", "CumProd", "EyeLike", "OneHot", "Pad", "ReduceProd",
     "IsInf", "Scatter", "ScatterElements", "ScatterND", "TensorScatter", "Mean", "Sum", "Clip")
_put("unsupported", "an activation no Transformer family here uses; no integer kernel",
     "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "Softplus",
     "Softsign", "ThresholdedRelu", "Shrink")
_put("unsupported", "trigonometric and hyperbolic functions outside RoPE tables (those fold)",
     "Tan", "Acos", "Asin", "Atan", "Acosh", "Asinh", "Atanh", "Cosh", "Sinh")
_put("unsupported", "float reductions and selections with no fixed-point form here",
     "LogSoftmax", "Hardmax", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
     "ArgMax", "ArgMin", "TopK")
_put("unsupported", "data-dependent shapes (a static chip has none)", "NonZero", "Compress")
_put("unsupported", "general tensor algebra not in a Transformer layer", "Einsum", "Det")


def fate(kind: str) -> tuple[str, str] | None:
    return FATES.get(kind)
