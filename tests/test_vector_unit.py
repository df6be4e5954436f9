"""The simulators' vector unit (backends/vector.py) is independent of golden: it agrees with
golden's kernels on random inputs, it imports nothing from compiler/golden, and a deliberate
break of any golden kernel (softmax, norm, RoPE, activation, requantisation rounding) makes
the ISA simulator and the dataflow simulator disagree with golden on whole tiny models."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tapeout.backends import vector as vu
from tapeout.compiler.frontend import frontend
from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden import model as gmod
from tapeout.compiler.qmodel import QuantConfig, quantize_model

REPO = Path(__file__).resolve().parents[1]
q16 = st.integers(-(1 << 31), (1 << 31) - 1)


def test_the_simulators_do_not_import_golden():
    for rel in ("backends/vector.py", "backends/systolic/isasim.py", "backends/dataflow/sim.py",
                "backends/dataflow/banks.py", "backends/systolic/weights.py"):
        tree = ast.parse((REPO / rel).read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if "golden" in m], (rel, mods)


@settings(max_examples=200, deadline=None)
@given(v=arrays(np.int64, 16, elements=st.integers(-(1 << 40), 1 << 40)),
       k=arrays(np.int64, 16, elements=st.integers(-8, 40)))
def test_rounding_agrees(v, k):
    assert np.array_equal(vu.round_shift(v, k), fx.rshift_round(v, k))
    b = np.abs(k) + 1
    assert np.array_equal(vu.round_div(v, b), fx.div_round(v, b))
    assert np.array_equal(vu.bits_of(v), fx.bit_length(v))
    assert np.array_equal(vu.floor_sqrt(np.abs(v)), fx.isqrt(np.abs(v)))


@settings(max_examples=150, deadline=None)
@given(x=arrays(np.int64, (3, 48), elements=q16), bits=st.integers(4, 16))
def test_mxint_and_exp_agree(x, bits):
    e1, s1 = vu.mx(x, bits)
    e2, s2 = fx.mx_quantize(x, bits)
    assert np.array_equal(e1, e2) and np.array_equal(s1, s2)
    d = -np.abs(x) // 4
    assert np.array_equal(vu.exp_q30(d), fx.exp_neg_q30(d))
    assert np.array_equal(vu.sigmoid(x), fx.sigmoid_q30(x))
    z = np.where(x % 5 == 0, gmod.MASKED, x // 1024)
    assert np.array_equal(vu.softmax(z), gmod.softmax_q15(z))


@settings(max_examples=100, deadline=None)
@given(x=arrays(np.int64, (2, 64), elements=st.integers(-(1 << 24), 1 << 24)),
       g=arrays(np.int64, 64, elements=st.integers(-(1 << 17), 1 << 17)))
def test_norms_and_activations_agree(x, g):
    class Op:
        name, outputs = "op", ["y"]

        def attr(self, key, default=None):
            return default
    op = Op()
    assert np.array_equal(vu.v_rmsnorm(None, op, x, g), gmod.k_rmsnorm(None, op, x, g))
    assert np.array_equal(vu.v_layernorm(None, op, x, g, g), gmod.k_layernorm(None, op, x, g, g))
    assert np.array_equal(vu.KERNELS["gelu"](None, op, x), gmod.k_gelu(None, op, x))
    assert np.array_equal(vu.KERNELS["silu"](None, op, x), gmod.k_silu(None, op, x))


# --- mutations of golden's kernels: the simulators must notice -------------------------------------
def _half_down(v, k):
    """rshift_round, but halves round down."""
    v, k = np.asarray(v, np.int64), np.asarray(k, np.int64)
    pos = np.maximum(k, 0)
    half = np.where(pos > 0, (np.int64(1) << np.maximum(pos - 1, 0)) - 1, 0)
    return np.where(k >= 0, (v + half) >> pos, v << np.maximum(-k, 0))


def _softmax_floor(z):
    valid = z > gmod.MASKED // 2
    m = np.max(np.where(valid, z, np.iinfo(np.int64).min), axis=-1, keepdims=True)
    m = np.where(np.any(valid, axis=-1, keepdims=True), m, 0)
    e = np.where(valid, fx.exp_neg_q30(np.where(valid, z - m, 0)), 0)
    total = np.maximum(np.sum(e, axis=-1, keepdims=True), 1)
    return (e << 15) // total                                   # truncating instead of rounding


def _rope_sign(gm, op, x, cos, sin):
    return gmod.KERNELS_ORIGINAL["rope"](gm, op, x, cos, -sin)


def _rmsnorm_eps(gm, op, x, g):
    class Wider:
        name, outputs = op.name, op.outputs

        def attr(self, key, default=None):
            return 1e-2 if key == "eps" else op.attr(key, default)
    return gmod.KERNELS_ORIGINAL["rmsnorm"](gm, Wider(), x, g)


MUTATIONS = {
    "requant rounding half down": ("llama", lambda mp: mp.setattr(fx, "rshift_round", _half_down)),
    "softmax division truncates": ("llama", lambda mp: mp.setattr(gmod, "softmax_q15", _softmax_floor)),
    "rope sin sign": ("llama", lambda mp: mp.setitem(gmod.KERNELS, "rope", _rope_sign)),
    "rmsnorm eps": ("llama", lambda mp: mp.setitem(gmod.KERNELS, "rmsnorm", _rmsnorm_eps)),
    # one Q16 LSB of the sigmoid (a Q30 ulp is below the Q16 output's resolution)
    "silu sigmoid off by 2^-16": ("llama", lambda mp: mp.setattr(fx, "sigmoid_q30",
                                                                 lambda x, f=fx.sigmoid_q30: f(x) + (1 << 14))),
    "gelu constant": ("gpt2", lambda mp: mp.setattr(gmod, "GELU_C1", 2 * gmod.GELU_C1)),
    "layernorm extra bits": ("gpt2", lambda mp: mp.setattr(gmod, "_inv_rms",
                                                           lambda xs, k, eps, extra=8, f=gmod._inv_rms: f(xs, k, eps, 7))),
}


@pytest.fixture(scope="module")
def simulated(tiny):
    """Per family: the program, sample feeds, and the outputs of both simulators (unmutated)."""
    from tapeout.backends.dataflow.banks import build_banks
    from tapeout.backends.dataflow.lower import lower as df_lower
    from tapeout.backends.dataflow.lower import memory_map
    from tapeout.backends.dataflow.machine import Machine as DfMachine
    from tapeout.backends.dataflow.sim import run_queues
    from tapeout.backends.systolic.compile import sample_feeds
    from tapeout.backends.systolic.isasim import run_program
    from tapeout.backends.systolic.lower import lower
    from tapeout.backends.systolic.machine import Machine
    from tapeout.backends.systolic.weights import build_image
    out = {}
    for fam in ("llama", "gpt2"):
        g = frontend(tiny.export(fam, "dynamo", 20, "prefill"))
        gm = quantize_model(g, QuantConfig("nvfp4", quantize_head=True), None).golden()
        feeds = sample_feeds(gm)
        m = Machine(n=16)
        isa = run_program(gm, m, lower(gm, m).program, feeds, image=build_image(gm, m))
        dm = DfMachine()
        plan = df_lower(gm, dm)
        mm = memory_map(plan.copies)
        df = run_queues(gm, dm, plan.queues, mm, feeds, image=build_banks(gm, plan.geometry, mm))
        gold = gm.run(feeds)
        assert all(np.array_equal(isa[k], gold[k]) and np.array_equal(df[k], gold[k]) for k in gold)
        out[fam] = (gm, feeds, isa, df)
    return out


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_broken_golden_kernel_is_caught_by_both_simulators(simulated, monkeypatch, name):
    fam, apply = MUTATIONS[name]
    gm, feeds, isa, df = simulated[fam]
    monkeypatch.setattr(gmod, "KERNELS_ORIGINAL", dict(gmod.KERNELS), raising=False)
    apply(monkeypatch)
    gold = gm.run(feeds)
    checked = sum(v.size for v in gold.values())
    isa_diff = sum(int(np.count_nonzero(isa[k] != gold[k])) for k in gold)
    df_diff = sum(int(np.count_nonzero(df[k] != gold[k])) for k in gold)
    assert checked > 1000
    assert isa_diff > 0 and df_diff > 0, (name, isa_diff, df_diff)
