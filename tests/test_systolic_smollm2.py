"""SmolLM2-135M on the systolic backend (slow tier: needs the export): one decode step with a
past of 16 tokens, nvfp4, through the ISA simulator against golden, with its cycles per token."""
from __future__ import annotations

import json

import pytest

from tapeout.cli import main

from _support import load_models_module

pytestmark = pytest.mark.slow


def test_smollm2_decode_step_isa_simulator_equals_golden(tmp_path, capsys):
    model = load_models_module("smollm2").export(variant="decode", past_len=16)
    out = tmp_path / "sys"
    assert main(["compile", str(model), "--target", "systolic", "--format", "nvfp4", "-o", str(out)]) == 0
    headline = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    iv = rep["isa_vs_golden"]
    assert iv["mismatches"] == 0 and iv["checked"] == 49152 + 30 * 2 * 3 * 17 * 64     # logits + present KV
    assert rep["mode"] == "decode" and rep["past_len"] == 16
    assert rep["cycles_per_token"] == iv["cycles"] == rep["schedule"]["makespan"]
    assert f"decode step {rep['cycles_per_token']} cycles/token" in headline
    # 30 layers x 3 KV head groups of attention on the array, every linear tiled
    assert rep["per_opcode"]["SOFTMAX"] == 90 and rep["per_opcode"]["QUANT_X"] == 211
    # at one token a step a weight-stationary array is bound by feeding it the weights
    assert rep["array_roofline"]["cycles"] <= rep["cycles_per_token"]
    assert rep["memory_roofline"]["cycles"] < rep["array_roofline"]["preload_cycles"]
