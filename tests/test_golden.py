"""The integer golden model on the tiny models: close to the float path (stated tolerance),
deterministic, and a KV-cache decode step equal bit for bit to a prefill."""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.frontend import frontend
from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import Golden, GoldenConfig
from tapeout.compiler.interp import run
from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, window_feeds, windows

# Golden vs the float path of the same quantised weights: max |logit diff| relative to the
# float path's max |logit|. Golden rounds activations to MXINT8 at every product (~2^-8
# relative per element); measured 1-2% on these models.
REL_TOL = 0.05


def calib_windows(seq, n=6, vocab=256):
    return windows(np.random.default_rng(1).integers(0, vocab, seq * n), seq)


@pytest.fixture(scope="module")
def models(tiny):
    out = {}
    for fam in ("llama", "gpt2", "bert"):
        g = frontend(tiny.export(fam, "dynamo", 20, "prefill"))
        out[fam] = (g, calibrate(g, calib_windows(16), hessian=True))
    return out


@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("w3o6", None), ("mxfp4", None),
                                       ("nvfp4", None)])
def test_golden_tracks_float_path(models, fam, fmt, group):
    g, stats = models[fam]
    qm = quantize_model(g, QuantConfig(fmt, group_size=group), stats)
    fg, gm = qm.float_graph(), qm.golden()
    checked = 0
    for w in calib_windows(16, n=2, vocab=256):
        feeds = window_feeds(g, w)
        ref = run(fg, feeds)[g.outputs[0]].astype(np.float64)
        got = gm.run(feeds)[g.outputs[0]]
        assert got.dtype == np.int64
        assert np.max(np.abs(got / 2.0**16 - ref)) <= REL_TOL * np.max(np.abs(ref))
        checked += got.size
    assert checked == 2 * 16 * 256


def test_golden_is_deterministic_and_integer(models):
    g, stats = models["llama"]
    qm = quantize_model(g, QuantConfig("w3o6"), stats)
    feeds = window_feeds(g, calib_windows(16, 1)[0])
    a = qm.golden().run(feeds)["logits"]
    b = qm.golden().run(feeds)["logits"]
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert np.all(np.abs(a) < 2**31)


def test_decode_with_kv_cache_equals_prefill_bit_exactly(tiny):
    """prefill(8 tokens) -> Q16 KV cache -> decode(token 9) == last row of prefill(9 tokens)."""
    pre8 = frontend(tiny.export("llama", "dynamo", 20, "prefill", seq_len=8))
    pre9 = frontend(tiny.export("llama", "dynamo", 20, "prefill", seq_len=9))
    dec = frontend(tiny.export("llama", "dynamo", 20, "decode", past_len=8))
    stats = calibrate(pre8, calib_windows(8), hessian=True)
    cfg = QuantConfig("w3o6")
    q8, q9, qd = (quantize_model(g, cfg, stats) for g in (pre8, pre9, dec))
    # the three graphs hold the same weights: quantised identically
    for a, b in zip(q8.weights.values(), qd.weights.values()):
        assert np.array_equal(a.codes, b.codes)
    ids = np.random.default_rng(7).integers(0, 256, 9)
    cache = {}
    att = [op for op in pre8.ops if op.kind == "attention"]
    names = {op.inputs[1]: f"past_key_values.{i}.key" for i, op in enumerate(att)}
    names.update({op.inputs[2]: f"past_key_values.{i}.value" for i, op in enumerate(att)})

    def keep(name, value):
        if name in names:
            cache[names[name]] = value

    q8.golden().run({"input_ids": ids[None, :8]}, keep=keep)
    assert len(cache) == 4
    step = qd.golden().run({"input_ids": ids[None, 8:9], **cache})
    full = q9.golden().run({"input_ids": ids[None, :]})["logits"]
    assert np.array_equal(step["logits"][0, 0], full[0, 8])
    # the present cache is the past cache plus the new token's k/v
    assert np.array_equal(step["present.0.key"][:, :, :8], cache["past_key_values.0.key"])
    assert step["logits"].size == 256


def test_activation_width_is_configurable(models):
    g, stats = models["llama"]
    qm = quantize_model(g, QuantConfig("int8"), stats)
    feeds = window_feeds(g, calib_windows(16, 1)[0])
    ref = run(qm.float_graph(), feeds)["logits"]
    errs = {}
    for bits in (6, 8, 12):
        got = Golden(g, qm.weights, GoldenConfig(act_bits=bits)).run(feeds)["logits"] / 2.0**16
        errs[bits] = float(np.max(np.abs(got - ref)))
    assert errs[12] < errs[8] < errs[6]


def test_golden_rejects_float_feeds_and_bad_config(models):
    from tapeout.compiler.errors import TapeoutError
    g, stats = models["llama"]
    with pytest.raises(TapeoutError, match="activation bits"):
        GoldenConfig(act_bits=3)
    qm = quantize_model(g, QuantConfig("int8"), stats)
    with pytest.raises(TapeoutError, match="without quantised weights"):
        Golden(g, {})
    assert fx.Q == 16 and qm.golden().config.act_bits == 8
