"""LoRA adapters in SRAM: the integer LoRA kernel of golden against the chip model's LoRA unit
(bit-exact) and against float (stated tolerance), `tapeout adapt` from a real peft adapter and
from a fine-tuned export, the adapted chip's tokens (golden == chip model) and quality, `diff`
reporting the via layers untouched, and bad adapters refused in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_bad_input import assert_one_line_error, run_cli

from _support import load_models_module
from tapeout.backends import vector as vu
from tapeout.backends.maskrom import adapter as A
from tapeout.cli import main
from tapeout.compiler import lora
from tapeout.compiler.golden import fixed as fx


def _factors(rng, o, i, r, scale=0.05):
    return rng.normal(size=(r, i)) * scale, rng.normal(size=(o, r)) * scale


def test_lora_kernel_against_float():
    rng = np.random.default_rng(0)
    a, b = _factors(rng, 48, 64, 8)
    f = lora.quantize("op", "layers.0.q_proj", a, b, scale=2.0)
    x = rng.normal(size=(7, 64))
    got = lora.delta(f, fx.to_fixed(x)) / 65536
    want = x @ (2.0 * b @ a).T
    # int8 factors, 8-bit MXINT inputs to both products: 3 % of the largest output, measured 1.4 %
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    assert np.abs(f.dense() - 2.0 * b @ a).max() <= 0.01 * np.abs(2.0 * b @ a).max()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), o=st.integers(1, 40), i=st.sampled_from([1, 7, 16, 32, 48, 96]),
       r=st.integers(1, 12), mag=st.sampled_from([0, 1, 2**10, 2**20, 2**31 - 1]), bits=st.sampled_from([4, 8]))
def test_chip_lora_unit_equals_golden(seed, o, i, r, mag, bits):
    rng = np.random.default_rng(seed)
    a, b = _factors(rng, o, i, r, scale=float(rng.choice([1e-3, 0.1, 10.0])))
    f = lora.quantize("op", "r", a, b, scale=float(rng.choice([0.5, 2.0])))
    x = rng.integers(-mag, mag + 1, size=(3, i), dtype=np.int64)
    x[0] = mag                                           # all-equal inputs, the largest magnitude
    y = rng.integers(-(2**31), 2**31, size=(3, o), dtype=np.int64)
    y[1] = 2**31 - 1                                     # saturating adds
    want = lora.apply(y, f, x, bits)
    got = vu.lora(y, x, f, bits)
    assert got.shape == want.shape == (3, o)
    assert np.array_equal(got, want)


def test_sram_image_round_trip():
    rng = np.random.default_rng(1)
    fs = [lora.quantize(f"op{k}", f"layers.{k}.q_proj", *_factors(rng, 16 + k, 32, 2 + k)) for k in range(3)]
    data, rows = lora.image(fs)
    assert len(data) == sum(f.sram_bytes for f in fs) == rows[-1]["offset"] + rows[-1]["bytes"]
    back = lora.read_image({"format": lora.FORMAT, "linears": rows}, data, "idx")
    for f, g in zip(fs, back):
        for name, _ in lora.FIELDS:
            assert np.array_equal(getattr(f, name), getattr(g, name)), name
    with pytest.raises(lora.TapeoutError, match="does not hold"):
        lora.read_image({"format": lora.FORMAT, "linears": rows}, data[:-1], "idx")


@pytest.mark.parametrize("module,role", [
    ("base_model.model.model.layers.3.self_attn.q_proj", "layers.3.q_proj"),
    ("model.layers.11.mlp.down_proj", "layers.11.down_proj"),
    ("transformer.h.0.attn.c_attn", "layers.0.c_attn"),
    ("base_model.model.lm_head", "lm_head"),
    ("model.embed_tokens", None),
])
def test_module_roles(module, role):
    assert lora.role_of_module(module) == role


# --- the CLI on the tiny Llama ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_case(tmp_path_factory, tiny):
    """The tiny Llama chip, a peft LoRA fine-tune of it (adapter + merged export) and the chip's
    adapter made from that folder."""
    ft = load_models_module("lora_finetune").tiny("llama", rank=4)
    root = tmp_path_factory.mktemp("lora")
    chip, ad = root / "chip", root / "ad"
    assert main(["compile", str(tiny.export("llama")), "--target", "maskrom", "--format", "nvfp4", "-o", str(chip)]) == 0
    assert main(["adapt", str(chip), "--adapter", str(ft / "adapter"), "-o", str(ad)]) == 0
    return root, chip, ad, ft


def test_adapt_peft_report(lora_case):
    root, chip, ad, ft = lora_case
    rep = json.loads((ad / "report.json").read_text())
    assert rep["source"] == "peft" and rep["linears"] == 8 and rep["ranks"] == [4]
    assert sorted(r["role"].split(".")[-1] for r in rep["rows"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj"] * 2)
    assert rep["sram_bytes"] == (ad / "adapter" / "sram.bin").stat().st_size == sum(r["sram_bytes"] for r in rep["rows"])
    assert max(r["factor_error"] for r in rep["rows"]) < 0.01          # int8 rows of B A: measured 0.5 %
    man = json.loads((ad / "manifest.json").read_text())
    assert man["command"] == "adapt" and man["options"]["chip_manifest_sha256"] == \
        json.loads((chip / "manifest.json").read_text())["manifest_sha256"]


def _run(capsys, *argv):
    code, out, err = run_cli(capsys, "run", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_adapted_chip_tokens(capsys, lora_case, tmp_path):
    root, chip, ad, _ = lora_case
    np.save(tmp_path / "p.npy", np.array([1, 5, 9, 3], np.int64))
    g = _run(capsys, chip, "--tokens", tmp_path / "p.npy", "--new-tokens", 8, "--engine", "golden", "--adapter", ad)
    c = _run(capsys, chip, "--tokens", tmp_path / "p.npy", "--new-tokens", 8, "--engine", "chip", "--adapter", ad)
    assert len(g["tokens"]) == 8 and g["tokens"] == c["tokens"]
    assert g["cycles"] == c["cycles"]


def test_adapted_chip_tracks_the_finetune(lora_case):
    """KLD to the float LoRA fine-tune: the adapted chip recovers >= 90 % of the un-adapted chip's
    gap to a from-scratch compile of the fine-tune (measured: more than all of it)."""
    from tapeout.compiler.evaluate import reference_logits
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.qmodel import windows
    from tapeout.driver import load_program, open_folder
    root, chip, ad, ft = lora_case
    scratch = root / "scratch"
    assert main(["compile", str(ft / "merged.onnx"), "--target", "maskrom", "--format", "nvfp4", "-o", str(scratch)]) == 0
    ref = frontend(ft / "merged.onnx")
    ids = np.random.default_rng(0).integers(0, 256, 16 * 16)
    refs = reference_logits(ref, windows(ids, 16))
    prog, man = load_program(chip), open_folder(chip)[0]
    base = A.kld(prog, ref, ids, refs=refs)["kld_mean"]
    adapted = A.kld(prog, ref, ids, A.load(ad, man, prog), refs=refs)["kld_mean"]
    fresh = A.kld(load_program(scratch), ref, ids, refs=refs)["kld_mean"]
    assert base > fresh
    assert (base - adapted) >= 0.9 * (base - fresh), (base, adapted, fresh)


def test_adapt_finetuned(capsys, lora_case, tmp_path):
    root, chip, ad, ft = lora_case
    out = tmp_path / "svd"
    code, stdout, err = run_cli(capsys, "adapt", chip, "--finetuned", ft / "merged.onnx", "--rank", 4,
                                "--targets", "q_proj,v_proj", "--plain-svd", "-o", out)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["linears"] == 4 and {r["role"].split(".")[-1] for r in rep["rows"]} == {"q_proj", "v_proj"}
    assert rep["weighted"] is False
    for r in rep["rows"]:
        # the fine-tune's own change is rank 4: what is left is the ROM's quantisation error
        assert 0 <= r["gap_left_svd"] <= r["gap_left"] < 1
    assert "q_proj" in (out / "report.txt").read_text()
    # the output-weighted SVD on calibration token ids: less output error left than the plain one
    np.save(tmp_path / "calib.npy", np.random.default_rng(3).integers(0, 256, 256))
    out2 = tmp_path / "weighted"
    code, _, err = run_cli(capsys, "adapt", chip, "--finetuned", ft / "merged.onnx", "--rank", 4, "--targets",
                           "q_proj,v_proj", "--calib-tokens", tmp_path / "calib.npy", "-o", out2)
    assert code == 0, err
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["weighted"] is True and rep2["calibration"]["tokens"] == 256
    # int8 factors leave about what the float ones do (rounding can land either side)
    assert all(0 <= r["gap_left"] <= r["gap_left_svd"] + 0.02 and r["gap_left"] < 1 for r in rep2["rows"])
    code, _, err = run_cli(capsys, "adapt", chip, "--finetuned", ft / "merged.onnx", "-o", tmp_path / "x")
    assert_one_line_error(code, err, "needs a tokenizer")


def test_diff_reports_no_via_changed(capsys, lora_case):
    root, chip, ad, _ = lora_case
    code, out, err = run_cli(capsys, "diff", chip, ad, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["base_identical"] and r["changed_vias"] == 0
    assert r["adapter"]["sram_bytes"] == (ad / "adapter" / "sram.bin").stat().st_size
    assert r["adapter"]["linears"] == 8


# --- bad adapters -------------------------------------------------------------------------------------
def _peft_copy(src, dst, edit=None, tensors=None):
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.numpy import load_file, save_file
        t = load_file(str(dst / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def _rename(t, old, new):
    for k in list(t):
        if old in k:
            t[k.replace(old, new)] = t.pop(k)


@pytest.mark.parametrize("how,needle", [
    (dict(edit=lambda c: c.update(peft_type="IA3")), "only LoRA"),
    (dict(edit=lambda c: c.update(use_dora=True)), "DoRA"),
    (dict(edit=lambda c: c.update(lora_alpha="x")), "lora_alpha"),
    (dict(edit=lambda c: c.update(alpha_pattern={"q_proj": "x"})), "alpha_pattern must map"),
    (dict(edit=lambda c: c.update(r=8)), "lora_A has rank 4, the config says r=8"),
    (dict(edit=lambda c: c.update(use_rslora="yes")), "use_rslora must be true or false"),
    (dict(tensors=lambda t: _rename(t, "layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj")),
     "'base_model.model.model.layers.7.self_attn.q_proj' maps to no linear"),
    (dict(tensors=lambda t: t.pop(next(k for k in t if "lora_B" in k))), "has lora_A but no lora_B"),
    (dict(tensors=lambda t: t.update({k: np.zeros((4, 63), np.float32) for k in t if "k_proj.lora_A" in k})),
     "the chip's layers.0.k_proj is [32, 64]"),
    (dict(tensors=lambda t: t.update({"base_model.model.lm_head.bias": np.zeros(3, np.float32)})),
     "not a lora_A/lora_B weight"),
])
def test_bad_peft_adapters(capsys, lora_case, tmp_path, how, needle):
    root, chip, ad, ft = lora_case
    bad = _peft_copy(ft / "adapter", tmp_path / "bad", **how)
    code, _, err = run_cli(capsys, "adapt", chip, "--adapter", bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_bad_adapter_files(capsys, lora_case, tmp_path):
    root, chip, ad, ft = lora_case
    bad = _peft_copy(ft / "adapter", tmp_path / "trunc")
    p = bad / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    code, _, err = run_cli(capsys, "adapt", chip, "--adapter", bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "adapter_model.safetensors", "unreadable safetensors")
    code, _, err = run_cli(capsys, "adapt", chip, "--adapter", tmp_path, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "no adapter_config.json")
    code, _, err = run_cli(capsys, "adapt", chip, "--adapter", ft / "adapter", "--rank", 4, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "--rank, --targets, --calib, --tokenizer and --plain-svd apply to --finetuned")
    code, _, err = run_cli(capsys, "adapt", chip, "--finetuned", ft / "merged.onnx", "--targets", "qq_proj",
                           "--plain-svd", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "--targets names 'qq_proj'")


def test_run_refuses_a_foreign_or_damaged_adapter(capsys, lora_case, tmp_path, tiny):
    root, chip, ad, _ = lora_case
    other = tmp_path / "other"
    assert main(["compile", str(tiny.export("llama")), "--target", "maskrom", "--format", "int8", "-o", str(other)]) == 0
    np.save(tmp_path / "p.npy", np.array([1, 2], np.int64))
    code, _, err = run_cli(capsys, "run", other, "--tokens", tmp_path / "p.npy", "--adapter", ad)
    assert_one_line_error(code, err, "made for another chip")
    broken = tmp_path / "broken"
    shutil.copytree(ad, broken)
    img = broken / "adapter" / "sram.bin"
    img.write_bytes(b"\x7f" + img.read_bytes()[1:])
    code, _, err = run_cli(capsys, "run", chip, "--tokens", tmp_path / "p.npy", "--adapter", broken)
    assert_one_line_error(code, err, "adapter/sram.bin differs from its sha256")


def test_estimate_lora_llama8b(capsys):
    from _support import REPO
    cfg = REPO / "backends" / "maskrom" / "configs" / "llama-3.1-8b.json"
    code, out, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--lora-rank", 16, "--json")
    assert code == 0, err
    r = json.loads(out)
    x = r["lora"]
    # rank 16 on q/k/v/o of 32 layers (q, o: 4096 x 4096; k, v: 1024 x 4096): int8 A and B plus
    # 3 bytes of scale per row of each
    per_layer = 2 * (16 * 8192 + 3 * (16 + 4096)) + 2 * (16 * 5120 + 3 * (16 + 1024))
    assert x["linears"] == 128 and x["sram_bytes"] == 32 * per_layer
    assert x["area_mm2_with"] > r["area_mm2"] and x["cycles_per_token_with"] > r["cycles_per_token"]
    code, _, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--lora-rank", 16,
                           "--lora-targets", "qq_proj")
    assert_one_line_error(code, err, "--lora-targets names qq_proj")
    code, _, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--lora-rank", 0)
    assert_one_line_error(code, err, "--lora-rank must be a positive integer")


# --- the LoRA unit in RTL -------------------------------------------------------------------------
def _sim_lora_unit(f, cases, bits=8):
    """Drive hdl.lora.LoraUnit on the Amaranth simulator: per case (x Q16 [in], y [out]) the
    unit's MXINT input from x, its outputs and the cycles from start to ready."""
    from amaranth.sim import Simulator
    from tapeout.hdl.lora import LoraUnit
    o, i = f.shape
    dut = LoraUnit(f, i, bits)
    got = []

    async def bench(ctx):
        for x, y in cases:
            el, sh = fx.mx_quantize(x[None, :], bits, fx.MX_BLOCK)
            for k in range(i):
                ctx.set(dut.xe[k], int(el[0, k]))
            for b in range(sh.shape[1]):
                ctx.set(dut.xs[b], int(sh[0, b]))
            ctx.set(dut.emin, int(sh.min()))
            for q in range(o):
                ctx.set(dut.y[q], int(y[q]))
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            n = 1
            while not ctx.get(dut.ready):
                await ctx.tick()
                n += 1
                assert n < 10_000
            got.append(([ctx.get(dut.out[q]) for q in range(o)], n))
            await ctx.tick()
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return dut, got


@pytest.mark.parametrize("o,i,r", [(64, 64, 4), (32, 64, 8), (48, 32, 3)])
def test_lora_unit_rtl_equals_golden(o, i, r):
    rng = np.random.default_rng(o + i + r)
    f = lora.quantize("op", "r", *_factors(rng, o, i, r, scale=0.3), scale=2.0)
    cases = []
    for t in range(4):
        x = rng.integers(-(2**20), 2**20, i)
        if t == 1:
            x[:] = 2**31 - 1                                # the largest inputs, all equal
        y = rng.integers(-(2**31), 2**31, o)
        if t == 2:
            y[:] = 2**31 - 1                                # saturating adds
        cases.append((x, y))
    dut, got = _sim_lora_unit(f, cases)
    checked = 0
    for (x, y), (out, n) in zip(cases, got):
        want = lora.apply(y[None, :], f, x[None, :])[0]
        assert out == [int(v) for v in want]
        checked += len(out)
        assert n == dut.cycles - 1 == lora.cycles(o, i, r) - 1      # the micro-op adds its start cycle
    assert checked == 4 * o


def test_whole_chip_rtl_with_lora_units_on_amaranth(tiny, tmp_path, lora_case):
    """The tiny Llama's whole-chip RTL with the peft adapter's LoRA units: 2 tokens equal golden's
    with the adapter (and differ from the un-adapted chip's), cycles = the sequencer's + the LoRA units'."""
    from test_chip_rtl import ARCH
    from tapeout.backends.maskrom import chipmodel as cm, chiprtl
    from tapeout.hdl.chip import ChipTop, rtl_cycles, run_tokens
    root, _, ad, ft = lora_case
    chip, adapted = tmp_path / "chip", tmp_path / "ad"
    assert main(["compile", str(tiny.export("llama")), "--target", "maskrom", "--format", "nvfp4", "-o", str(chip), *ARCH]) == 0
    assert main(["adapt", str(chip), "--adapter", str(ft / "adapter"), "-o", str(adapted)]) == 0
    man, prog, layers, plan, seq = cm.load_chip(chip)
    adapter = A.load(adapted, man, prog)
    spec = chiprtl.build_spec(prog, layers, plan, seq, adapter)
    assert sum(f is not None for op in spec["ops"] if op["kind"] == "linear" for f in op["lora"]) == 8
    prompt = [7]
    tokens, cycles = run_tokens(ChipTop(spec), prompt, 2)
    want = cm.golden_generate(prog, prompt, 2, adapter=adapter).tokens
    assert tokens == want and len(tokens) == 2
    assert want != cm.golden_generate(prog, prompt, 2).tokens
    extra = sum(f.cycles for f in adapter.values())
    assert cycles == [sum(rtl_cycles(spec, p).values()) for p in range(2)]
    assert cycles == [seq.cycles_at(p) + extra for p in range(2)]


@pytest.mark.rtl
def test_sixteen_adapted_tokens_under_verilator(capsys, tiny, tmp_path, lora_case):
    from test_chip_rtl import ARCH
    from tapeout.hdl.sim import verilator_available
    ok, why = verilator_available()
    if not ok:
        pytest.skip(why)
    root, _, _, ft = lora_case
    chip, adapted = tmp_path / "chip", tmp_path / "ad"
    assert main(["compile", str(tiny.export("llama")), "--target", "maskrom", "--format", "nvfp4", "-o", str(chip), *ARCH]) == 0
    assert main(["adapt", str(chip), "--adapter", str(ft / "adapter"), "-o", str(adapted)]) == 0
    capsys.readouterr()
    np.save(tmp_path / "p.npy", np.array([5]))
    res = {e: _run(capsys, chip, "--tokens", tmp_path / "p.npy", "--new-tokens", 16, "--engine", e, "--adapter", adapted)
           for e in ("golden", "verilator")}
    assert res["verilator"]["tokens"] == res["golden"]["tokens"] and len(res["golden"]["tokens"]) == 16
    assert res["verilator"]["cycles"] == res["golden"]["cycles"]
