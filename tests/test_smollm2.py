"""SmolLM2-135M: structure, float interpreter vs onnxruntime (slow tier: needs the export)."""
from __future__ import annotations

import numpy as np
import pytest

from tapeout.compiler.frontend import frontend
from tapeout.compiler.interp import run
from tapeout.compiler.structure import recognise

from _support import REPO, load_models_module

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.fixture(scope="module")
def smol():
    mod = load_models_module("smollm2")
    return mod, mod.export(), mod.load_tokenizer()


@pytest.fixture(scope="module")
def graph(smol):
    return frontend(smol[1])


def prompt_ids(tok, text="The capital of France is", seq=16):
    ids = np.array(tok(text)["input_ids"])
    x = np.zeros((1, seq), np.int64)
    x[0, : len(ids)] = ids
    return x, len(ids)


def test_every_layer_is_attention_plus_gated_mlp_with_7_linears(graph):
    s = recognise(graph)["structure"]
    assert s["layers"] == 30 and s["hidden"] == 576 and s["vocab"] == 49152
    roles = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for b in s["blocks"]:
        assert (b["heads"], b["kv_heads"], b["head_dim"], b["causal"]) == (9, 3, 64, True)
        assert b["mlp"] == {"kind": "gated_mlp", "activation": "silu", "intermediate": 1536}
        assert sorted(b["linears"]) == sorted(roles)
    assert [x["role"] for x in s["other_linears"]] == ["lm_head"]
    assert graph.histogram()["linear"] == 211


def test_float_interpreter_matches_onnxruntime(smol, graph):
    import onnxruntime as ort
    _, path, tok = smol
    x, n = prompt_ids(tok)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": x})[0]
    got = run(graph, {"input_ids": x})["logits"]
    assert float(np.max(np.abs(got - ref))) <= TOL
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    assert tok.decode([int(got[0, n - 1].argmax())]).strip() == "Paris"


def greedy_golden(qm, tok, prompt, steps, seq=16):
    """Greedy generation through the integer model with a right-padded prefill window
    (causal: padding after the last real token does not change earlier positions)."""
    gm = qm.golden()
    ids = list(tok(prompt)["input_ids"])
    for _ in range(steps):
        x = np.zeros((1, seq), np.int64)
        x[0, : len(ids)] = ids
        logits = gm.run({"input_ids": x})["logits"]
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    return tok.decode(ids)


@pytest.mark.parametrize("fmt", ["int8", "w3o6"])  # nvfp4 through golden answers " 15" (measured)
def test_golden_greedy_generation_says_paris(smol, graph, fmt):
    from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, windows
    _, _, tok = smol
    calib = np.array(tok(open(REPO / "compiler/data/calib.txt").read())["input_ids"])
    stats = calibrate(graph, windows(calib[:512], 16), hessian=True) if fmt == "w3o6" else None
    qm = quantize_model(graph, QuantConfig(fmt), stats)
    text = greedy_golden(qm, tok, "The capital of France is", 3)
    assert "Paris" in text, text


def test_golden_decode_with_kv_cache_equals_prefill(smol, graph):
    """prefill(16) -> Q16 KV cache -> one decode step == last row of prefill(17), bit for bit."""
    from tapeout.compiler.qmodel import QuantConfig, quantize_model
    mod, _, tok = smol
    pre17 = frontend(mod.export(seq_len=17))
    dec = frontend(mod.export(variant="decode", past_len=16))
    q16, q17, qd = (quantize_model(g, QuantConfig("int8")) for g in (graph, pre17, dec))
    ids = np.array(tok("The quick brown fox jumps over the lazy dog because it wanted to see what the farmer was doing")["input_ids"][:17])
    assert len(ids) == 17
    att = [op for op in graph.ops if op.kind == "attention"]
    names = {op.inputs[1]: f"past_key_values.{i}.key" for i, op in enumerate(att)}
    names.update({op.inputs[2]: f"past_key_values.{i}.value" for i, op in enumerate(att)})
    cache = {}
    q16.golden().run({"input_ids": ids[None, :16]}, keep=lambda n, v: cache.__setitem__(names[n], v) if n in names else None)
    assert len(cache) == 60 and set(cache) <= set(dec.inputs)
    step = qd.golden().run({"input_ids": ids[None, 16:17], **{k: cache[k] for k in dec.inputs if k in cache}})
    full = q17.golden().run({"input_ids": ids[None, :]})["logits"]
    assert np.array_equal(step["logits"][0, 0], full[0, 16]) and full.shape[-1] == 49152


@pytest.mark.parametrize("fmt", ["nvfp4", "w3o6"])
def test_whole_model_fabric_model_equals_golden(smol, graph, fmt):
    """The mask-ROM chip's fabric model, run from the extracted via layers, on the whole forward."""
    from tapeout.backends.maskrom.base import choose_base
    from tapeout.backends.maskrom.compile import specs_of
    from tapeout.backends.maskrom.fabric import fabric_model
    from tapeout.backends.maskrom.layers import build_layers, lvs
    from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, windows
    _, _, tok = smol
    stats = None
    if fmt == "w3o6":
        calib = np.array(tok(open(REPO / "compiler/data/calib.txt").read())["input_ids"])
        stats = calibrate(graph, windows(calib[:256], 16), hessian=True)
    qm = quantize_model(graph, QuantConfig(fmt, quantize_head=True), stats)
    specs = specs_of(qm.program())
    base = choose_base(fmt, [s.shape for s in specs], 0)
    layers = build_layers(base, specs)
    assert lvs(layers, specs) > 134_000_000
    x, _ = prompt_ids(tok)
    fab = fabric_model(graph, layers).run({"input_ids": x})["logits"]
    gold = qm.golden().run({"input_ids": x})["logits"]
    assert fab.size == 16 * 49152 and np.array_equal(fab, gold)


def test_diff_smollm2_against_its_fine_tune(tmp_path):
    """A real update: SmolLM2 and a 20-step AdamW fine-tune (models/smollm2_finetune.py), both nvfp4."""
    import json

    from tapeout.cli import main
    ft = load_models_module("smollm2_finetune")
    smol = load_models_module("smollm2")
    chips = []
    for name, model in (("base", smol.export()), ("ft", ft.export())):
        out = tmp_path / name
        assert main(["compile", str(model), "--target", "maskrom", "--format", "nvfp4", "--verify", "none",
                     "-o", str(out)]) == 0
        chips.append(out)
    report = tmp_path / "diff.json"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["diff", str(chips[0]), str(chips[1]), "--json", "--fail-on-change"]) == 1
    r = json.loads(buf.getvalue())
    report.write_text(buf.getvalue())
    assert r["base_identical"] and r["tiles"] == 32832
    assert 0.005 < r["fraction"] < 0.05                  # a light fine-tune moves a few % of the vias
    assert len(r["per_layer"]) == 31 and r["layers"]["V_CODE"]["changed"] > 1_000_000


@pytest.mark.rtl
def test_one_smollm2_layer_bit_exact_under_verilator(tmp_path):
    """All 7 linears of layer 0 (nvfp4) under Verilator, every output against golden's
    (compile's sim/ stimulus): on the row-serial RTL, whose cycles equal the estimate's stage
    formula, and on the parallel fabric's base-die RTL."""
    import contextlib
    import io
    import json

    from tapeout.cli import main
    from tapeout.hdl.sim import verilator_available
    ok, why = verilator_available()
    if not ok:
        pytest.skip(why)
    smol = load_models_module("smollm2")
    out = tmp_path / "chip"
    assert main(["compile", str(smol.export()), "--target", "maskrom", "--format", "nvfp4",
                 "--verify", "none", "-o", str(out)]) == 0
    from tapeout.backends.maskrom.layers import load_layers
    from tapeout.backends.maskrom.rowfabric import chip_plan
    from tapeout.hdl.rowserial import stage_cycles
    plan = chip_plan(load_layers(out))
    for fabric, kind in (("rowserial", "row-folded"), ("parallel", "base")):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["simulate", str(out), "--layer", "layers.0", "--engine", "verilator",
                         "--fabric", fabric, "--json"]) == 0
        r = json.loads(buf.getvalue())
        roles = [x["role"].split(".")[-1] for x in r["per_linear"]]
        assert roles == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert all(x["rtl"] == kind for x in r["per_linear"])
        assert r["checked"] == 16 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) and r["mismatches"] == 0
        if fabric == "rowserial":
            for x in r["per_linear"]:
                o, i = x["shape"]
                want = stage_cycles(o, i, chains=plan["chains"]["layers.0"], chain_tiles=plan["chain_tiles"], cols=64)
                assert x["cycles"] == 16 * want


def test_smollm2_with_its_mask_whole_model_fabric_equals_golden():
    """SmolLM2 exported with attention_mask, as users export it: the mask fuses into every
    attention, and the fabric model equals golden on a left-padded prompt."""
    from tapeout.backends.maskrom.base import choose_base
    from tapeout.backends.maskrom.compile import specs_of
    from tapeout.backends.maskrom.fabric import fabric_model
    from tapeout.backends.maskrom.layers import build_layers
    from tapeout.compiler.qmodel import QuantConfig, quantize_model
    mod = load_models_module("smollm2")
    g = frontend(mod.export(mask=True))
    att = [op for op in g.ops if op.kind == "attention"]
    assert len(att) == 30 and all(op.inputs[3] == "attention_mask" and op.attr("key_mask") for op in att)
    qm = quantize_model(g, QuantConfig("nvfp4", quantize_head=True), None)
    specs = specs_of(qm.program())
    layers = build_layers(choose_base("nvfp4", [s.shape for s in specs], 0), specs)
    x, n = prompt_ids(mod.load_tokenizer())
    m = np.zeros((1, 16), np.int64)
    m[0, 16 - n:] = 1                                   # left padding
    x = np.roll(x, 16 - n, axis=1)
    feeds = {"input_ids": x, "attention_mask": m}
    fab = fabric_model(g, layers).run(feeds)["logits"]
    gold = qm.golden().run(feeds)["logits"]
    assert fab.size == 16 * 49152 and np.array_equal(fab, gold)
    # the last position's greedy token equals the float model's
    ref = run(g, feeds)["logits"]
    assert int(np.argmax(gold[0, -1])) == int(np.argmax(ref[0, -1]))


PROMPT_32 = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. One stormy night, "
             "he saw a small boat struggling against the waves near the rocks, and")


def test_run_the_whole_chip_on_smollm2(tmp_path):
    """`tapeout run` on the SmolLM2 w3o6 chip (export with its mask, 128 positions): a 32-token
    prompt and 32 new tokens, the chip model's tokens equal golden's."""
    import contextlib
    import io
    import json

    from tapeout.cli import main
    mod = load_models_module("smollm2")
    out = tmp_path / "chip"
    assert main(["compile", str(mod.export(seq_len=128, mask=True)), "--target", "maskrom", "--format", "w3o6",
                 "--verify", "none", "-o", str(out)]) == 0
    res = {}
    for engine in ("chip", "golden"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["run", str(out), "--prompt", PROMPT_32, "--new-tokens", "32", "--engine", engine,
                         "--json"]) == 0
        res[engine] = json.loads(buf.getvalue())
    assert len(res["chip"]["prompt"]) == 32 and len(res["chip"]["tokens"]) == 32
    assert res["chip"]["tokens"] == res["golden"]["tokens"]
    assert res["chip"]["cycles"] == res["golden"]["cycles"] and res["chip"]["text"] == res["golden"]["text"]
