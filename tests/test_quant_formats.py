"""Weight formats (docs/formats.md): integer decomposition, rounding, packing, ONNX agreement."""
from __future__ import annotations

import json
import math
import re
import struct

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.quant import FORMATS, QuantTensor, pack, quantize, unpack

PROPS = settings(max_examples=30, deadline=None)
ALL = [("int8", {}), ("int4", {}), ("int4", {"group_size": 32}), ("int3", {"group_size": 64}),
       ("int", {"bits": 2, "group_size": 16}), ("mxfp4", {}), ("nvfp4", {}),
       ("w3o6", {"outlier_frac": 0.05}), ("w3o6", {"outlier_frac": 0.3, "rtn": True})]
IDS = [f + "".join(f"-{k}{v}" for k, v in kw.items()) for f, kw in ALL]


@st.composite
def weights(draw, max_rows: int = 6) -> np.ndarray:
    """Heavy-tailed float32 matrices [rows, 64 or 128] with exact zeros and repeated values."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.sampled_from([64, 128]))
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    elems = st.one_of(st.just(0.0), st.floats(-1, 1, width=32), st.floats(-20, 20, width=32))
    return draw(hnp.arrays(np.float32, (rows, cols), elements=elems)) * np.float32(scale)


def sections(data: bytes) -> tuple[dict, dict[str, bytes]]:
    (n,) = struct.unpack("<I", data[4:8])
    header, at, out = json.loads(data[8:8 + n]), 8 + n, {}
    for name, size in header["sections"]:
        out[name], at = data[at:at + size], at + size
    assert at == len(data)
    return header, out


def integer_dequant(qt: QuantTensor) -> np.ndarray:
    """Reference decomposition, group by group with Python integers: code * group_scale, then
    one float64 multiplication by the row scale."""
    out = np.zeros(qt.shape)
    for o in range(qt.shape[0]):
        for i in range(qt.shape[1]):
            out[o, i] = int(qt.codes[o, i]) * int(qt.group_scale[o, i // qt.group_size]) \
                * float(qt.row_scale[o])
    return out.astype(np.float32)


# ---------------------------------------------------------------- decomposition and packing

@pytest.mark.parametrize("fmt,kw", ALL, ids=IDS)
@PROPS
@given(w=weights())
def test_pack_round_trip_exact(fmt, kw, w):
    qt = quantize(w, fmt, **kw)
    data = pack(qt)
    back = unpack(data)
    assert (back.fmt, back.shape, back.group_size) == (qt.fmt, qt.shape, qt.group_size)
    assert np.array_equal(back.codes, qt.codes) and back.codes.dtype == np.int8
    assert np.array_equal(back.group_scale, qt.group_scale) and back.group_scale.dtype == np.int32
    assert np.array_equal(back.row_scale, qt.row_scale)
    assert (back.outliers is None) == (qt.outliers is None)
    if qt.outliers is not None:
        assert np.array_equal(back.outliers, qt.outliers)
    assert back.tensor_scale == qt.tensor_scale
    assert pack(back) == data
    # the accounting is the payload: each section is its bit count rounded up to a byte
    header, secs = sections(data)
    bits = qt.bits()
    bits["outlier_entries"] = bits.pop("outlier_index", 0) + bits.pop("outlier_codes", 0)
    for name, payload in secs.items():
        assert len(payload) == math.ceil(bits[name] / 8), name
    assert sum(v for k, v in bits.items() if k != "total") == bits["total"]


@pytest.mark.parametrize("fmt,kw", ALL, ids=IDS)
@PROPS
@given(w=weights(max_rows=3))
def test_dequantize_is_the_integer_decomposition(fmt, kw, w):
    qt = quantize(w, fmt, **kw)
    assert qt.codes.shape == qt.shape and qt.group_scale.shape == (qt.shape[0], qt.n_groups)
    assert qt.group_scale.min() >= 0 and qt.row_scale.dtype == np.float64
    assert np.array_equal(qt.dequantize(), integer_dequant(qt))


@pytest.mark.parametrize("fmt,kw", ALL, ids=IDS)
@PROPS
@given(w=weights())
def test_zero_stays_zero_and_codes_in_range(fmt, kw, w):
    qt = quantize(w, fmt, **kw)
    assert np.all(qt.codes[w == 0] == 0) and np.all(qt.dequantize()[w == 0] == 0)
    if qt.fmt.startswith("int"):
        lo, hi = -(1 << (int(qt.fmt[3:]) - 1)), (1 << (int(qt.fmt[3:]) - 1)) - 1
    else:
        lo, hi = {"mxfp4": (-12, 12), "nvfp4": (-12, 12), "w3o6": (-32, 31)}[qt.fmt]
    assert qt.codes.min() >= lo and qt.codes.max() <= hi


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 32), (3, 64), (2, 16)])
@PROPS
@given(w=weights())
def test_int_rtn_error_at_most_half_a_step(bits, group, w):
    qt = quantize(w, "int", bits=bits, group_size=group, rtn=True)
    err = np.abs(w.astype(np.float64) - qt.dequantize())
    # the step is rounded up (bfloat16 row scale, ceil group scale): nothing clips further
    assert np.all(err <= qt.step() / 2 * (1 + 1e-6) + 1e-30 + np.abs(w) * 2.0 ** -24)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (3, 64)])
@PROPS
@given(w=weights())
def test_int_sign_symmetry(bits, group, w):
    pos, neg = (quantize(x, "int", bits=bits, group_size=group, rtn=True) for x in (w, -w))
    hi = (1 << (bits - 1)) - 1
    assert np.array_equal(pos.group_scale, neg.group_scale)
    # symmetric up to the one-sided extra code -2**(b-1) (where -absmax may land)
    assert np.array_equal(np.clip(-pos.codes, -hi, hi), np.clip(neg.codes, -hi, hi))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@PROPS
@given(w=weights())
def test_fp4_sign_symmetry(fmt, w):
    pos, neg = quantize(w, fmt), quantize(-w, fmt)
    assert np.array_equal(neg.codes, -pos.codes)
    assert np.array_equal(neg.group_scale, pos.group_scale)


def test_int_rounding_ties_to_even_and_saturates():
    w = np.array([[7.5, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -7.5, 6.5] + [0.0] * 6], np.float32)
    qt = quantize(w, "int4", rtn=True)          # absmax 7.5 / 7.5 -> step exactly 1
    assert qt.row_scale[0] == 1.0
    assert qt.codes[0, :10].tolist() == [7, 0, 2, 2, 4, 0, -2, -2, -8, 6]


# ---------------------------------------------------------------- FP4 element rules

def test_e2m1_ties_to_even_and_saturation():
    # a block with absmax in [4, 8) has E8M0 exponent 0: elements are the weights themselves
    vals = [7.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25, 6.5, -7.5, 0.0]
    w = np.zeros((1, 32), np.float32)
    w[0, :len(vals)] = vals
    qt = quantize(w, "mxfp4")
    assert qt.group_scale[0, 0] * qt.row_scale[0] == 0.5
    assert (qt.codes[0, :len(vals)] / 2).tolist() == [6, 0, 1, 1, 2, 2, 4, 4, -4, 0, 6, -6, 0]


@PROPS
@given(w=weights())
def test_mxfp4_codes_are_doubled_ml_dtypes_elements(w):
    qt = quantize(w, "mxfp4")
    _, secs = sections(pack(qt))
    e = np.frombuffer(secs["block_scales"], np.uint8).astype(np.int64) - 127
    e = e.reshape(qt.shape[0], -1)
    amax = np.abs(w).reshape(qt.shape[0], -1, 32).max(axis=2).astype(np.float64)
    spec = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2      # OCP MX v1.0, emax(E2M1) = 2
    live = amax > 0
    spec = np.where(live, np.clip(spec, -127, 127), -np.inf)
    spec = np.maximum(spec, spec.max(axis=1, keepdims=True) - 30)   # documented int32 clamp
    assert np.array_equal(e[live], spec[live])
    scale = np.repeat(np.ldexp(1.0, e), 32, axis=1)
    elems = (w / scale.astype(np.float32)).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(qt.codes, (2 * elems).astype(np.int8))
    assert np.array_equal(qt.dequantize(), (elems * scale).astype(np.float32))


@PROPS
@given(w=weights())
def test_nvfp4_follows_the_two_level_recipe(w):
    qt = quantize(w, "nvfp4")
    amax = np.float32(np.abs(w).max())
    ts = max(amax / np.float32(6 * 448), np.float32(2.0 ** -149)) if amax > 0 else np.float32(1)
    assert qt.tensor_scale == ts
    _, secs = sections(pack(qt))
    bs = np.frombuffer(secs["block_scales"], np.uint8).view(ml_dtypes.float8_e4m3fn)
    bs = bs.astype(np.float32).reshape(qt.shape[0], -1)
    block_amax = np.abs(w).reshape(qt.shape[0], -1, 16).max(axis=2)
    want = np.clip(block_amax / np.float32(6) / ts, 0, 448).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(bs, want.astype(np.float32))
    full = np.repeat(bs, 16, axis=1) * ts                  # float32, as the element rule divides
    ratio = w / np.where(full > 0, full, np.inf).astype(np.float32)
    elems = ratio.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(qt.codes, (2 * elems).astype(np.int8))
    exact = elems.astype(np.float64) * np.repeat(bs, 16, axis=1).astype(np.float64) * float(ts)
    assert np.array_equal(qt.dequantize(), exact.astype(np.float32))


# ---------------------------------------------------------------- agreement with onnx.reference

def _dequantize_linear(x: np.ndarray, x_type: int, scale: np.ndarray, block: int, opset: int):
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=1, block_size=block)
    graph = helper.make_graph(
        [node], "dq", [helper.make_tensor_value_info("x", x_type, list(x.shape)),
                       helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model).run(None, {"x": x, "s": scale})[0]


@settings(max_examples=15, deadline=None)
@given(w=weights(), group=st.sampled_from([16, 32, 64]))
def test_int4_group_matches_onnx_blocked_dequantize_linear(w, group):
    qt = quantize(w, "int4", group_size=group)
    # group_scale (8 bits) * bfloat16 row scale is exact in float32: ONNX's float32 product and
    # our float64-then-cast product are the same correctly rounded value
    scale = qt.group_scale * qt.row_scale[:, None]
    assert np.array_equal(scale.astype(np.float32).astype(np.float64), scale)
    y = _dequantize_linear(qt.codes.astype(ml_dtypes.int4), TensorProto.INT4,
                           scale.astype(np.float32), group, 21)
    assert np.array_equal(y, qt.dequantize())
    # our int4 code section is ONNX's int4 packing (two per byte, low nibble first)
    _, secs = sections(pack(qt))
    tensor = numpy_helper.from_array(qt.codes.astype(ml_dtypes.int4), "x")
    assert secs["codes"] == tensor.raw_data


@settings(max_examples=15, deadline=None)
@given(w=weights())
def test_mxfp4_matches_onnx_float4e2m1_dequantize_linear(w):
    qt = quantize(w, "mxfp4")
    elems = (qt.codes.astype(np.float32) / 2).astype(ml_dtypes.float4_e2m1fn)
    scale = (qt.group_scale * qt.row_scale[:, None] * 2).astype(np.float32)   # 2**e, exact
    y = _dequantize_linear(elems, TensorProto.FLOAT4E2M1, scale, 32, 23)
    assert np.array_equal(y, qt.dequantize())
    ones = _dequantize_linear(elems, TensorProto.FLOAT4E2M1, np.ones_like(scale), 32, 23)
    assert np.array_equal(2 * ones, qt.codes.astype(np.float32))
    _, secs = sections(pack(qt))
    assert secs["codes"] == numpy_helper.from_array(elems, "x").raw_data


# ---------------------------------------------------------------- w3o6

@settings(max_examples=20, deadline=None)
@given(w=weights(), frac=st.floats(0, 1))
def test_w3o6_outlier_count_is_exact(w, frac):
    qt = quantize(w, "w3o6", outlier_frac=frac)
    k = round(frac * w.size)
    assert int(qt.outliers.sum()) == k
    bits = qt.bits()
    assert bits["outlier_index"] == 6 * k and bits["outlier_codes"] == 3 * k   # groups of 64
    assert bits["outlier_counts"] == qt.count_bits() * qt.shape[0] * qt.n_groups


def test_w3o6_saliency_is_activation_aware():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 64)) * 0.01).astype(np.float32)
    act_sq = np.full(64, 1.0)
    act_sq[:8] = 1e4                     # loud input channels, small weights
    w[:, :8] = rng.uniform(-0.008, 0.008, (16, 8))
    act_sq[60] = 1e-6                    # a quiet channel with the matrix's largest weights
    w[:, 60] = 0.06                      # (within the outliers' +-8 s reach)
    qt = quantize(w, "w3o6", outlier_frac=8 * 16 / w.size, act_sq=act_sq)
    assert not qt.outliers[:, 60].any()
    # loud-channel weights are chosen over ten times as often as ordinary ones
    assert qt.outliers[:, :8].mean() > 10 * qt.outliers[:, 8:60].mean()
    # by weight magnitude alone the big weights would be the first outliers
    plain = quantize(w, "w3o6", outlier_frac=8 * 16 / w.size)
    assert plain.outliers[:, 60].all()


def test_w3o6_beats_int3_g64_rtn_on_activation_weighted_error():
    rng = np.random.default_rng(1)
    w = (rng.standard_t(3, size=(128, 256)) * 0.02).astype(np.float32)
    act_sq = rng.lognormal(0, 1.5, 256)

    def err(qt):
        d = qt.dequantize().astype(np.float64) - w
        return (d ** 2 * act_sq).sum() / (w.astype(np.float64) ** 2 * act_sq).sum()

    int3 = quantize(w, "int3", group_size=64, rtn=True)
    w3o6 = quantize(w, "w3o6", outlier_frac=0.04, act_sq=act_sq)
    assert w3o6.bits_per_weight <= 3.6
    assert err(w3o6) < err(int3) / 3


def test_gptq_lowers_the_calibration_output_error():
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((64, 64)) * 0.3 + np.eye(64)       # correlated inputs
    x = rng.standard_normal((512, 64)) @ mix
    hessian = x.T @ x / len(x)
    w = (rng.standard_t(4, size=(32, 64)) * 0.02).astype(np.float32)

    def out_err(qt):
        d = qt.dequantize().astype(np.float64) - w
        return ((d @ hessian) * d).sum()

    for fmt, kw in [("w3o6", {"outlier_frac": 0.02}), ("int3", {"group_size": 64})]:
        plain = quantize(w, fmt, act_sq=np.diag(hessian), **kw)
        gptq = quantize(w, fmt, hessian=hessian, gptq=True, **kw)
        assert out_err(gptq) < 0.8 * out_err(plain)
        assert np.array_equal(unpack(pack(gptq)).codes, gptq.codes)


# ---------------------------------------------------------------- options and errors

def test_formats_table_names_every_format():
    w = np.ones((2, 64), np.float32)
    assert set(FORMATS) == {"w3o6", "mxfp4", "nvfp4", "int4", "int8"}
    for name, line in FORMATS.items():
        assert quantize(w, name).fmt == name and "\n" not in line


def test_bits_per_weight_of_a_576x576_matrix():
    w = np.random.default_rng(3).standard_normal((576, 576)).astype(np.float32)
    bpw = {f: quantize(w, f, **kw).bits_per_weight for f, kw in
           [("int8", {}), ("mxfp4", {}), ("nvfp4", {}), ("int4", {"group_size": 64})]}
    assert bpw == pytest.approx({"int8": 8 + 16 / 576, "mxfp4": 4.25, "nvfp4": 4.5 + 32 / 576 ** 2,
                                 "int4": 4 + 8 / 64 + 16 / 576}, rel=1e-12)
    qt = quantize(w, "w3o6", outlier_frac=0.04)
    k, cb = int(qt.outliers.sum()), qt.count_bits()
    assert k == round(0.04 * 576 * 576)
    assert qt.bits()["total"] == 576 * 576 * 3 + 576 * 9 * (8 + cb) + 576 * 16 + k * (6 + 3)


@pytest.mark.parametrize("args,kw,message", [
    ((np.ones((4, 576)), "fp3"), {},
     r"^unknown weight format 'fp3'; known formats: w3o6, mxfp4, nvfp4, int4, int8 "
     r"\(and int2\.\.int8 via 'int' with bits=\)$"),
    ((np.ones((4, 576)), "w3o6"), {"outlier_frac": 1.5},
     r"^outlier fraction must be in \[0, 1\], not 1\.5$"),
    ((np.ones((4, 576)), "w3o6"), {"outlier_frac": -0.01},
     r"^outlier fraction must be in \[0, 1\], not -0\.01$"),
    ((np.ones((4, 576)), "int4"), {"group_size": 100},
     r"^group size 100 does not divide the 576 input features$"),
    ((np.ones((4, 576)), "w3o6"), {"group_size": 128},
     r"^group size 128 does not divide the 576 input features$"),
    ((np.ones((4, 48)), "mxfp4"), {}, r"^group size 32 does not divide the 48 input features$"),
    ((np.ones((4, 64)), "mxfp4"), {"group_size": 16}, r"^mxfp4 blocks are 32 wide; group size 16"),
    ((np.ones((4, 64)), "int"), {"bits": 9}, r"^int formats have 2 to 8 bits, not 9$"),
    ((np.ones((4, 64)), "int4"), {"gptq": True}, r"^gptq=True needs hessian="),
    ((np.full((2, 64), np.nan), "int8"), {}, r"^weights hold 128 non-finite value\(s\)"),
    ((np.array([[1.0, np.inf] * 32]), "nvfp4"), {}, r"^weights hold 32 non-finite value\(s\)"),
    ((np.ones((4, 64)), "w3o6"), {"act_sq": np.ones(32)}, r"^act_sq must be \[64\]"),
    ((np.full((1, 64), 3e38), "w3o6"), {},
     r"^weights reach 3e\+38; the formats need \|w\| < 2\*\*120"),
])
def test_bad_options_raise_one_actionable_line(args, kw, message):
    with pytest.raises(TapeoutError) as info:
        quantize(*args, **kw)
    assert re.search(message, str(info.value)) and "\n" not in str(info.value)
