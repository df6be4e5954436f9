"""``quantize``: one entry point from a float [out, in] weight to a :class:`QuantTensor`."""
from __future__ import annotations

import math

import numpy as np

from ..errors import TapeoutError
from .fp4 import plan_mxfp4, plan_nvfp4
from .gptq import DAMP, HessianFactor, gptq_codes
from .intq import plan_int
from .tensor import FP4_BLOCK, QuantTensor
from .w3o6 import default_cap, plan_w3o6

KNOWN_FORMATS = ("w3o6", "mxfp4", "nvfp4", "int4", "int8")
W3O6_GROUP = 64             # default w3o6 group (docs/formats.md: best quality at <= 3.6 bits)
W3O6_OUTLIER_FRAC = 0.044   # default w3o6 outlier fraction (3.59 bits/weight at g64; docs/formats.md)
INT_BITS = range(2, 9)
WEIGHT_LIMIT = 2.0 ** 120


def resolve_format(fmt: str, bits: int | None) -> str:
    """Canonical format name: 'int' + bits, 'int3', ... -> 'int<b>'; others as given."""
    if not isinstance(fmt, str):
        raise TapeoutError(f"format must be a name such as 'w3o6', not {fmt!r}")
    name = fmt.strip().lower()
    if name == "int" or (name.startswith("int") and name[3:].isdigit()):
        b = int(name[3:]) if name != "int" else bits
        if b is None:
            raise TapeoutError("format 'int' needs bits=2..8 (or name it int3, int4, ...)")
        if bits is not None and bits != b:
            raise TapeoutError(f"format {fmt!r} has {b} bits but bits={bits} was given; pass one")
        if b not in INT_BITS:
            raise TapeoutError(f"int formats have 2 to 8 bits, not {b}")
        return f"int{b}"
    if name not in KNOWN_FORMATS:
        raise TapeoutError(f"unknown weight format {fmt!r}; known formats: "
                           f"{', '.join(KNOWN_FORMATS)} (and int2..int8 via 'int' with bits=)")
    if bits is not None:
        raise TapeoutError(f"bits= applies to the int formats, not {name}")
    return name


def resolve_group(fmt: str, group_size: int | None, n_in: int) -> int:
    """Group (block) size along the input dimension; must divide ``n_in``."""
    if fmt in FP4_BLOCK:
        block = FP4_BLOCK[fmt]
        if group_size not in (None, block):
            raise TapeoutError(f"{fmt} blocks are {block} wide; group size {group_size} is not "
                               f"supported (leave it unset)")
        group_size = block
    elif group_size is None:
        group_size = n_in if fmt.startswith("int") else W3O6_GROUP
        if fmt == "w3o6" and n_in % group_size:
            group_size = math.gcd(n_in, W3O6_GROUP)   # narrow layers: largest divisor <= 64
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size < 1:
        raise TapeoutError(f"group size must be a positive integer, not {group_size!r}")
    if n_in % group_size:
        raise TapeoutError(f"group size {group_size} does not divide the {n_in} input features")
    return int(group_size)


def check_weights(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise TapeoutError(f"weights must be a non-empty 2-D [out, in] matrix, not shape {w.shape}")
    if w.dtype.kind not in "fiu":
        raise TapeoutError(f"weights must be real numbers, not {w.dtype}")
    w = w.astype(np.float32)
    amax = max(-float(w.min()), float(w.max()))       # NaN if any weight is NaN
    if not amax < np.inf:
        bad = int(np.size(w) - np.isfinite(w).sum())
        raise TapeoutError(f"weights hold {bad} non-finite value(s) (NaN or inf, or beyond "
                           f"float32); fix the model's weights before quantising")
    if amax >= WEIGHT_LIMIT:
        raise TapeoutError(f"weights reach {amax:g}; the formats need "
                           f"|w| < 2**120 (headroom for scales rounded up in float32)")
    return w


def check_calibration(act_sq, hessian, n_in: int, gptq: bool, rtn: bool):
    """-> (importance [in], hessian or None). Without calibration every input counts the same.
    ``hessian`` may be a :class:`~.gptq.HessianFactor` shared by the linears of one input."""
    factor = hessian if isinstance(hessian, HessianFactor) else None
    if hessian is not None:
        hessian = np.asarray(hessian.hessian if factor else hessian, dtype=np.float64)
        if hessian.shape != (n_in, n_in) or not np.all(np.isfinite(hessian)):
            raise TapeoutError(f"hessian must be a finite [{n_in}, {n_in}] matrix X^T X / n, "
                               f"not shape {hessian.shape}")
    if act_sq is None:
        act_sq = np.diag(hessian) if hessian is not None else np.ones(n_in)
    if factor is not None:
        hessian = factor
    act_sq = np.asarray(act_sq, dtype=np.float64)
    if act_sq.shape != (n_in,) or not np.all(np.isfinite(act_sq)) or np.any(act_sq < 0):
        raise TapeoutError(f"act_sq must be [{n_in}] finite non-negative mean squares of the "
                           f"inputs, not shape {act_sq.shape}")
    if gptq and hessian is None:
        raise TapeoutError("gptq=True needs hessian= (the input's X^T X / n, [in, in])")
    if gptq and rtn:
        raise TapeoutError("gptq=True and rtn=True exclude each other; pick one")
    return act_sq, hessian


def w3o6_cap(shape: tuple[int, int], group_size: int, outlier_frac: float, outlier_cap: int | None) -> int | None:
    """The per-group outlier cap: the count field's rule, lowered to ``outlier_cap`` when given;
    an outlier fraction that needs more than the cap on average is an error."""
    if outlier_cap is None:
        return None
    out, n_in = shape
    groups = out * (n_in // group_size)
    k = int(round(outlier_frac * out * n_in))
    if groups and -(-k // groups) > outlier_cap:
        raise TapeoutError(f"--outlier-frac {outlier_frac:g} needs {-(-k // groups)} outliers per group of "
                           f"{group_size}; the chip's word line holds {outlier_cap} (use --outlier-frac <= "
                           f"{outlier_cap / group_size:.4f})")
    return min(default_cap(k, groups, group_size), outlier_cap)


def quantize(w: np.ndarray, fmt: str, *, group_size: int | None = None, bits: int | None = None,
             outlier_frac: float | None = None, act_sq: np.ndarray | None = None,
             hessian: "np.ndarray | HessianFactor | None" = None, gptq: bool = False,
             rtn: bool = False, damp: float = DAMP, outlier_cap: int | None = None) -> QuantTensor:
    """Quantise a float weight ``w`` [out, in] (rows = output channels) to format ``fmt``.

    ``group_size`` runs along the input; int formats default to per channel, w3o6 to 64,
    mxfp4/nvfp4 are fixed at 32/16. ``act_sq`` [in] (mean of x_i**2 over calibration tokens)
    weights the error that scale search and w3o6's outlier saliency minimise; ``hessian``
    [in, in] (X^T X / n) enables ``gptq`` (``damp``: the fraction of mean(diag H) added to
    its diagonal). ``rtn=True`` is plain round-to-nearest from absmax
    scales (the baselines); otherwise int and w3o6 search a clipping ratio per group. mxfp4
    and nvfp4 always follow their specifications' scale rules. ``outlier_cap``: w3o6 holds at
    most that many outliers per group (the slots of a chip's word line; default: the count
    field's rule, ``w3o6.default_cap``).
    """
    fmt = resolve_format(fmt, bits)
    if outlier_frac is None:
        outlier_frac = W3O6_OUTLIER_FRAC
    w = check_weights(w)
    group_size = resolve_group(fmt, group_size, w.shape[1])
    if isinstance(outlier_frac, bool) or not isinstance(outlier_frac, (int, float, np.floating)) \
            or not 0 <= outlier_frac <= 1:
        raise TapeoutError(f"outlier fraction must be in [0, 1], not {outlier_frac!r}")
    imp, hessian = check_calibration(act_sq, hessian, w.shape[1], gptq, rtn)
    w64 = w.astype(np.float64)
    if fmt == "mxfp4":
        plan = plan_mxfp4(w)
    elif fmt == "nvfp4":
        plan = plan_nvfp4(w)
    elif fmt == "w3o6":
        plan = plan_w3o6(w64, group_size, imp, float(outlier_frac), rtn,
                         cap=w3o6_cap(w.shape, group_size, float(outlier_frac), outlier_cap))
    else:
        plan = plan_int(w64, int(fmt[3:]), group_size, imp, rtn)
    if gptq and not isinstance(hessian, HessianFactor):
        hessian = HessianFactor(hessian, damp=damp)
    codes = gptq_codes(w64, hessian, plan) if gptq else plan.round(w64)
    return plan.finish(codes)
