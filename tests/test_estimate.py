"""Chip estimates for the mask-ROM target from shapes alone (backends/maskrom/estimate.py)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from tapeout.backends.maskrom.estimate import (
    CONFIG_DIR, FORMATS, TECH_DIR, TECH_KEYS, ModelShape, estimate, format_table, load_tech,
    shape_from_hf_config, shape_from_summary,
)
from tapeout.compiler.errors import TapeoutError

TOTAL_KEYS = ("area_mm2", "transistors", "rom_bits", "sram_bytes", "energy_per_token_j", "tokens_per_s",
              "power_w", "clock_hz")
COMPONENT_KEYS = ("area_mm2", "transistors", "energy_per_token_j", "power_w", "counts")


@pytest.fixture(scope="module")
def smol() -> ModelShape:
    return shape_from_hf_config(CONFIG_DIR / "smollm2-135m.json")


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return shape_from_hf_config(CONFIG_DIR / "llama-3.1-8b.json")


@pytest.fixture(scope="module")
def results(smol, llama8b) -> dict:
    return {(m, f): estimate(s, f, "n5") for m, s in (("smol", smol), ("8b", llama8b)) for f in ("w3o6", "nvfp4")}


def test_configs_parse(smol, llama8b):
    assert (smol.hidden, smol.layers, smol.heads, smol.kv_heads, smol.head_dim, smol.intermediate, smol.vocab) \
        == (576, 30, 9, 3, 64, 1536, 49152)
    assert smol.tied_embeddings and smol.gated_mlp and smol.norm == "rmsnorm"
    assert (llama8b.hidden, llama8b.layers, llama8b.heads, llama8b.kv_heads, llama8b.head_dim,
            llama8b.intermediate, llama8b.vocab) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert not llama8b.tied_embeddings and llama8b.context == 2048
    assert len(llama8b.linears) == 32 * 7 + 1
    # Llama-3.1-8B: 8.03 B parameters = fabric weights + the 525 M embedding table
    assert llama8b.weights + llama8b.vocab * llama8b.hidden == pytest.approx(8.03e9, rel=1e-3)
    assert smol.weights == pytest.approx(134.5e6, rel=1e-3)


@pytest.mark.parametrize("model", ["smol", "8b"])
@pytest.mark.parametrize("fmt", ["w3o6", "nvfp4"])
def test_keys_positive_and_components_sum(results, model, fmt):
    r = results[model, fmt]
    for k in TOTAL_KEYS:
        assert r[k] > 0, k
    assert r["tech"]["name"] == "n5" and r["tech"]["path"].endswith("n5.json")
    assert r["assumptions"] and all(isinstance(a, str) for a in r["assumptions"])
    comps = r["components"]
    assert {"rom_cells", "product_lines", "adder_trees", "kv_sram", "attention", "io"} <= set(comps)
    for name, c in comps.items():
        for k in COMPONENT_KEYS:
            assert k in c, (name, k)
        assert c["area_mm2"] > 0 and c["energy_per_token_j"] > 0, name
    for k in ("area_mm2", "transistors", "energy_per_token_j", "power_w"):
        assert sum(c[k] for c in comps.values()) == pytest.approx(r[k], rel=1e-9), k
    assert r["power_w"] == pytest.approx(r["energy_per_token_j"] * r["tokens_per_s"], rel=1e-9)
    assert r["tokens_per_s"] == pytest.approx(r["clock_hz"] / r["cycles_per_token"])
    assert r["tokens_per_s_mean"] > r["tokens_per_s"]
    assert comps["rom_cells"]["counts"]["weights"] == r["weights"]
    json.dumps(r)                                       # the CLI prints it with --json


def test_bigger_model_costs_more(results):
    for fmt in ("w3o6", "nvfp4"):
        small, big = results["smol", fmt], results["8b", fmt]
        assert big["area_mm2"] > 10 * small["area_mm2"]
        assert big["energy_per_token_j"] > small["energy_per_token_j"]
        assert big["rom_bits"] > 10 * small["rom_bits"] and big["sram_bytes"] > small["sram_bytes"]
        assert big["tokens_per_s"] < small["tokens_per_s"]


def test_formats_rom_bits(results, smol):
    for m in ("smol", "8b"):
        w3, fp4 = results[m, "w3o6"], results[m, "nvfp4"]
        assert fp4["rom_bits"] > w3["rom_bits"]
        assert 3.3 < w3["bits_per_weight"] < 3.6 and fp4["bits_per_weight"] == pytest.approx(4.5, abs=1e-3)
        assert w3["components"]["rom_cells"]["counts"]["vias_fine"] > 0
        assert fp4["components"]["rom_cells"]["counts"]["vias_fine"] == 0
    bits = {f: estimate(smol, f)["bits_per_weight"] for f in FORMATS}
    assert bits["int4"] < bits["mxfp4"] < bits["nvfp4"] < bits["int8"]


def test_bits_per_weight_match_the_quantiser():
    from tapeout.compiler.quant import quantize
    w = (np.random.default_rng(1).standard_normal((128, 512)) * 0.02).astype(np.float32)
    for fmt, kw in (("w3o6", {"outlier_frac": 0.03}), ("nvfp4", {}), ("mxfp4", {}),
                    ("int4", {"group_size": 128}), ("int8", {})):
        qt = quantize(w, fmt, rtn=fmt in ("w3o6", "int4", "int8"), **kw)
        assert FORMATS[fmt].bits_per_weight(128, 512, 0.03) == pytest.approx(qt.bits_per_weight, abs=0.02), fmt


def test_other_tech_is_larger(smol):
    n5, n16 = estimate(smol, "w3o6", "n5"), estimate(smol, "w3o6", "n16")
    assert n16["area_mm2"] > 2 * n5["area_mm2"]
    assert n16["energy_per_token_j"] > n5["energy_per_token_j"]
    assert n16["tech"]["name"] == "n16"
    assert estimate(smol, "w3o6", TECH_DIR / "n16.json")["area_mm2"] == n16["area_mm2"]


def test_tech_tables_cite_every_constant():
    for path in sorted(TECH_DIR.glob("*.json")):
        t = load_tech(path)
        assert set(TECH_KEYS) <= set(t["constants"]), path
        for key, c in t["constants"].items():
            assert c["kind"] in ("cited", "derived", "assumption") and len(c["source"]) > 20, (path, key)
    assert {p.stem for p in TECH_DIR.glob("*.json")} >= {"n5", "n16"}


def test_clock_context_and_fold(smol):
    base = estimate(smol, "w3o6")
    fast = estimate(smol, "w3o6", clock_hz=2e9)
    assert fast["tokens_per_s"] == pytest.approx(2 * base["tokens_per_s"]) and fast["clock_hz"] == 2e9
    short = estimate(smol, "w3o6", context=512)
    assert short["sram_bytes"] < base["sram_bytes"] and short["tokens_per_s"] > base["tokens_per_s"]
    folded = estimate(smol, "w3o6", arch={"row_fold": 64})
    assert folded["area_mm2"] < base["area_mm2"] / 3 and folded["tokens_per_s"] < base["tokens_per_s"]
    assert folded["rom_bits"] == base["rom_bits"]


def test_format_table(results):
    text = format_table(results["8b", "w3o6"])
    for needle in ("llama-3.1-8b", "w3o6", "tokens/s per user", "adder_trees", "kv_sram", "cycles per layer"):
        assert needle in text


def test_shape_from_summary_tiny_llama(tiny_llama):
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.structure import recognise
    summary = recognise(frontend(tiny_llama))
    s = shape_from_summary(summary)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim) == (64, 2, 4, 2, 16)
    assert s.gated_mlp and s.intermediate == 128 and s.vocab == 256
    assert len(s.linears) == 2 * 7 + 1 and ("lm_head", 256, 64) in s.linears
    r = estimate(s, "w3o6", context=64)
    assert r["weights"] == s.weights and r["area_mm2"] > 0 and r["tokens_per_s"] > 0
    # the same shape written as a config gives the same fabric
    from_cfg = ModelShape("tiny", 64, 2, 4, 2, 16, 128, 256)
    assert sorted(x[1:] for x in from_cfg.linears) == sorted(x[1:] for x in s.linears)


def test_gpt2_style_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                               "n_positions": 1024, "vocab_size": 50257, "activation_function": "gelu_new"}))
    s = shape_from_hf_config(cfg, context=1024)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate) == (768, 12, 12, 12, 3072)
    assert not s.gated_mlp and s.norm == "layernorm" and s.positions == 1024 and s.tied_embeddings
    assert s.weights == 12 * 12 * 768 * 768 + 50257 * 768
    assert estimate(s, "nvfp4")["components"]["embedding_rom"]["counts"]["rows"] == 50257 + 1024


def _error(fn, *args, **kw) -> str:
    with pytest.raises(TapeoutError) as exc:
        fn(*args, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path, smol):
    assert "unknown format 'fp8'" in _error(estimate, smol, "fp8")
    assert "w3o6" in _error(estimate, smol, "fp8")
    assert "unknown technology 'n3'" in _error(estimate, smol, "w3o6", "n3")
    table = json.loads((TECH_DIR / "n5.json").read_text())
    del table["constants"]["sram_bitcell_um2"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(table))
    msg = _error(estimate, smol, "w3o6", bad)
    assert "missing constant 'sram_bitcell_um2'" in msg and str(bad) in msg
    table["constants"]["sram_bitcell_um2"] = {"value": 0.02}
    bad.write_text(json.dumps(table))
    assert "'sram_bitcell_um2' needs" in _error(load_tech, bad)
    bad.write_text("{not json")
    assert "not valid JSON" in _error(load_tech, bad)

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "resnet", "num_channels": 3, "vocab_size": 10}))
    msg = _error(shape_from_hf_config, cfg)
    assert "not a transformer config: missing key 'hidden_size'" in msg and str(cfg) in msg
    cfg.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}))
    assert "missing key 'vocab_size'" in _error(shape_from_hf_config, cfg)
    assert "config file not found" in _error(shape_from_hf_config, tmp_path / "nope.json")
    cfg.write_text("[1, 2]")
    assert "expected a JSON object" in _error(shape_from_hf_config, cfg)

    assert "context must be a positive" in _error(estimate, smol, "w3o6", context=0)
    assert "row_fold must be" in _error(estimate, smol, "w3o6", arch={"row_fold": 3})
    assert "unknown architecture option" in _error(estimate, smol, "w3o6", arch={"rows": 3})
    assert "not a multiple of" in _error(ModelShape, "m", 64, 2, 3, 2, 16, 128, 256)
    assert "no transformer layers recognised" in _error(shape_from_summary, {"structure": {"blocks": []}})


def test_kv_cache_size(llama8b):
    r = estimate(llama8b, "w3o6", context=2048)
    per_token = 32 * 2 * 8 * 128
    assert r["components"]["kv_sram"]["counts"]["bytes"] == 2048 * (per_token + per_token // 32)
    assert math.isclose(r["components"]["kv_sram"]["counts"]["bytes"] / 2**20, 132, rel_tol=0.01)


# --- the row-serial fabric (backends/maskrom/rowchip.py) ----------------------------------------
def _llama8b(context=1024):
    return shape_from_hf_config(CONFIG_DIR / "llama-3.1-8b.json", context=context)


def test_rowserial_llama_8b_is_hc1_class():
    """The issue's targets on the N6 table at context 1,024: area <= 1.5x HC1, <= 80 G
    transistors, >= 17,000 tokens/s per user, <= 300 W."""
    from tapeout.backends.maskrom.rowchip import compare, estimate_rowserial
    for fmt in ("w3o6", "nvfp4"):
        r = estimate_rowserial(_llama8b(), fmt, "n6")
        assert r["area_mm2"] <= 1220 and r["transistors"] <= 80e9
        assert r["tokens_per_s"] >= 17000 and r["power_w"] <= 300
        c = compare(r, "hc1")["rows"]
        assert c["area_mm2"]["reference"] == 815 and abs(c["area_mm2"]["ratio"] - r["area_mm2"] / 815) < 1e-12


def test_rowserial_components_sum_and_price_the_rtl_cells():
    from tapeout.backends.maskrom.rowchip import cell_transistors, estimate_rowserial
    from tapeout.hdl.rowserial import ROW_FORMATS, RowSpec, stage_cycles
    r = estimate_rowserial(_llama8b(), "w3o6", "n7")
    comps = r["components"]
    for key, part in (("area_mm2", "area_mm2"), ("transistors", "transistors"),
                      ("energy_per_token_j", "energy_per_token_j")):
        assert abs(sum(c[part] for c in comps.values()) - r[key]) <= 1e-9 * r[key] + 1
    spec = RowSpec(ROW_FORMATS["w3o6"], word_lines=1024)
    counts = spec.counts()
    assert r["tile"]["cells"] == counts["cells"]
    per_tile = sum(cell_transistors(k, n, counts["multipliers"]) for k, n in counts["cells"].items()) \
        + counts["comparator_bits"] * 6 + counts["lut_bits"]
    tiles = comps["weight_rom"]["counts"]["tiles"]
    assert comps["tile_datapaths"]["counts"]["per_tile_transistors"] == round(per_tile)
    assert comps["weight_rom"]["counts"]["bits"] == tiles * 1024 * spec.word_bits
    # the cycle model is the whole-chip RTL's: the input's MXINT blocks (32 values, 256 lanes: 8
    # blocks a cycle, a 2-stage quantiser), the start cycle, then the row-serial stage formula
    P, K = r["groups"]["first"]["chains"], r["arch"]["chain_tiles"]
    assert r["cycles"]["per_layer"]["qkv_proj"] == (4096 // 32 // 8 + 2) + 1 + stage_cycles(
        4096 + 2 * 1024, 4096, chains=P, chain_tiles=K, cols=64)
    assert r["cycles"]["per_layer"]["mlp_out"] == (-(-14336 // 32 // 8) + 2) + 1 + stage_cycles(
        4096, 14336, chains=P, chain_tiles=K, cols=64)


def test_rowserial_arch_options_and_errors():
    from tapeout.backends.maskrom.rowchip import compare, estimate_rowserial
    base = estimate_rowserial(_llama8b(), "nvfp4", "n6")
    half = estimate_rowserial(_llama8b(), "nvfp4", "n6", arch={"word_lines": 512})
    assert half["components"]["weight_rom"]["counts"]["tiles"] > base["components"]["weight_rom"]["counts"]["tiles"]
    assert half["tokens_per_s"] > base["tokens_per_s"]
    with pytest.raises(TapeoutError, match=r"unknown row-serial architecture option\(s\) \['row_fold'\]"):
        estimate_rowserial(_llama8b(), "nvfp4", arch={"row_fold": 4})
    with pytest.raises(TapeoutError, match=r"architecture option word_lines must be an integer >= 1, not 0"):
        estimate_rowserial(_llama8b(), "nvfp4", arch={"word_lines": 0})
    with pytest.raises(TapeoutError, match=r"unknown reference chip 'h100'; known: hc1"):
        compare(base, "h100")


def test_estimate_cli_compare_and_fabric(capsys):
    from test_bad_input import assert_one_line_error, run_cli
    cfg = str(CONFIG_DIR / "llama-3.1-8b.json")
    code, out, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--tech", "n6",
                             "--context", "1024", "--compare", "hc1")
    assert code == 0, err
    assert "fabric row-serial" in out and "compared with Taalas HC1" in out
    assert re.search(r"^area_mm2\s+834\.\d\s+815\.0\s+1\.0\d$", out, re.M)
    code, out, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--fabric", "parallel",
                             "--arch", "row_fold=64")
    assert code == 0, err
    assert "row_fold 64" in out
    code, _, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--fabric", "parallel",
                           "--compare", "hc1")
    assert_one_line_error(code, err, "--compare applies to the row-serial fabric")
    code, _, err = run_cli(capsys, "estimate", "--hf-config", cfg, "--format", "w3o6", "--arch", "word_lines")
    assert_one_line_error(code, err, "--arch takes KEY=INTEGER, not 'word_lines'")


@pytest.mark.parametrize("fam", ["gpt2", "bert", "phi3"])
def test_rowserial_cycles_count_every_linear_once(tiny, capsys, fam):
    """Fused q/k/v (GPT-2, Phi-3), an MLM transform outside the layers (BERT): every linear's
    stage is in the token's cycles exactly once, in its layer or in the head."""
    from test_bad_input import run_cli
    code, out, err = run_cli(capsys, "estimate", tiny.export(fam, "dynamo", 20, "prefill"), "--format", "nvfp4",
                             "--json")
    assert code == 0, err
    r = json.loads(out)
    per_layer, head, layers = r["cycles"]["per_layer"], r["cycles"]["head"], r["cycles"]["layers"]
    assert layers == 2 and r["cycles"]["total"] == layers * sum(per_layer.values()) + sum(head.values())
    linear_stage_cycles = sum(c for g in r["groups"].values() for c in g["stages"].values())
    in_layers = sum(per_layer[k] for k in ("qkv_proj", "o_proj", "mlp_in", "mlp_out") if k in per_layer)
    in_layers += sum(c for k, c in per_layer.items() if k not in (
        "qkv_proj", "o_proj", "mlp_in", "mlp_out", "norm_1", "rope", "attention", "residual_1", "norm_2", "act",
        "residual_2"))
    in_head = sum(c for k, c in head.items() if k not in ("embed", "final_norm", "argmax"))
    assert linear_stage_cycles == layers * in_layers + in_head
    assert all(per_layer[k] > 0 for k in ("qkv_proj", "o_proj", "mlp_in", "mlp_out"))
