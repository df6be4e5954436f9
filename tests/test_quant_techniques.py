"""The quantisation techniques measured in benchmarks/quality.py: AWQ-style input scaling
folded into the graph (compiler/quant/smooth.py) and the non-uniform w3o6 base alphabet."""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.frontend import frontend
from tapeout.compiler.interp import run
from tapeout.compiler.qmodel import calibrate, linear_roles, sample_feeds, windows
from tapeout.compiler.quant import smooth
from tapeout.compiler.quant.plan import AlphabetRounder
from tapeout.compiler.quant.w3o6 import plan_w3o6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_scales_keep_the_network_function(tiny, family):
    """Every free site rescaled by random s: the float outputs are unchanged (to float32 noise),
    and the readers' weights really changed."""
    g = frontend(tiny.export(family, "dynamo", 20, "prefill"))
    roles = linear_roles(g)
    lin = {n for n, r in roles.items() if r != "lm_head"}
    found = smooth.sites(g, lin)
    kinds = {s.kind for s in found}
    assert kinds == ({"norm", "up"} if family == "llama" else {"norm"}), kinds
    g2 = g.copy()
    rng = np.random.default_rng(0)
    changed = 0
    for site in found:
        n = g.tensors[site.x].shape[-1]
        smooth.apply(g2, site, np.exp(rng.uniform(-1, 1, n)))
        for r in site.readers:
            changed += not np.array_equal(g.constants[g.op(r).inputs[1]], g2.constants[g2.op(r).inputs[1]])
    assert changed == sum(len(s.readers) for s in found) > 0
    feeds = sample_feeds(g)
    a, b = run(g, feeds)[g.outputs[0]], run(g2, feeds)[g.outputs[0]]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_smooth_model_scales_the_statistics_with_the_graph(tiny):
    g = frontend(tiny.export("llama", "dynamo", 20, "prefill"))
    stats = calibrate(g, windows(np.random.default_rng(1).integers(0, 256, 64), 16), hessian=True)
    roles = linear_roles(g)
    lin = {n for n, r in roles.items() if r != "lm_head"}
    # a quantiser that rewards scaling: error grows with the spread of the inputs' importance
    g2, st2, alphas = smooth.smooth_model(g, stats, lin, lambda w, imp: np.round(w * 4) / 4)
    assert set(alphas) == {s.x for s in smooth.sites(g, lin)}
    for x, alpha in alphas.items():
        s = smooth.candidate_scales(stats.act_sq[x], alpha)
        np.testing.assert_allclose(st2.act_sq[x], stats.act_sq[x] / s ** 2)
        np.testing.assert_allclose(st2.hessian[x], stats.hessian[x] / np.outer(s, s))


def test_candidate_scales_geometric_mean_one():
    a = np.array([4.0, 1.0, 0.25, 0.0])
    s = smooth.candidate_scales(a, 0.5)            # rms 2, 1, 0.5 -> s^0.5 / gm
    np.testing.assert_allclose(s[:3], np.sqrt([2.0, 1.0, 0.5]))
    assert s[3] == 1.0
    assert np.array_equal(smooth.candidate_scales(a, 0.0), np.ones(4))


def test_alphabet_rounder_nearest_level_ties_down():
    r = AlphabetRounder((-14, -9, -5, -2, 2, 5, 9, 14), (-32, 31))
    w = np.array([0.0, 3.5, 3.6, -11.5, 100.0, -100.0, 7.0, 7.01])
    assert r(w, np.ones(8)).tolist() == [-2, 2, 5, -14, 14, -14, 5, 9]
    assert r(w, np.ones(8), np.array([0, 0, 0, 0, 1, 1, 1, 0], bool)).tolist() == [-2, 2, 5, -14, 31, -32, 7, 9]
    with pytest.raises(ValueError):
        AlphabetRounder((3, 1, 2))


def test_w3o6_plan_with_an_alphabet_uses_only_its_levels():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 128))
    lv = (-14, -9, -5, -2, 2, 5, 9, 14)
    p = plan_w3o6(w, 64, np.ones(128), 0.03, False, levels=lv)
    codes = p.round(w)
    assert set(np.unique(codes[~p.outliers])) <= set(lv)
    assert p.outliers.sum() == round(0.03 * w.size)
    q = p.finish(codes).dequantize()
    assert np.linalg.norm(q - w) / np.linalg.norm(w) < 0.25


@pytest.mark.parametrize("n", [5, 128, 300])
def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse(n):
    from tapeout.compiler.quant.gptq import inverse_hessian_factor, lower_inverse
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n + 7, n)) * (1 + 5 * rng.random(n))
    h = x.T @ x / len(x)
    h[2, :] = h[:, 2] = 0                                   # a dead input
    u = inverse_hessian_factor(h, 0.1)
    hd = h.copy()
    d = np.diag(hd).copy()
    d[2] = 1.0
    hd[np.diag_indices(n)] = d + 0.1 * d.mean()
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u @ hd, np.eye(n), atol=1e-9)
    low = np.tril(rng.standard_normal((n, n))) + n * np.eye(n)
    np.testing.assert_allclose(lower_inverse(low, leaf=4) @ low, np.eye(n), atol=1e-12)


def test_gptq_default_for_w3o6_needs_hessians(tiny):
    from tapeout.compiler.errors import TapeoutError
    from tapeout.compiler.qmodel import QuantConfig, quantize_model
    g = frontend(tiny.export("llama", "dynamo", 20, "prefill"))
    assert QuantConfig("w3o6").gptq and not QuantConfig("w3o6", rtn=True).gptq and not QuantConfig("nvfp4").gptq
    stats = calibrate(g, windows(np.random.default_rng(1).integers(0, 256, 32), 16))
    with pytest.raises(TapeoutError, match="hessian=True"):
        quantize_model(g, QuantConfig("w3o6"), stats)
    assert quantize_model(g, QuantConfig("w3o6", gptq=False), stats).weights
