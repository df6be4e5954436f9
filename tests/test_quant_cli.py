"""`tapeout quantize` and `tapeout eval` on the tiny Llama, and their bad-input handling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tapeout.cli import main
from tapeout.compiler.quant import unpack

from test_bad_input import assert_one_line_error, run_cli

EVAL_KEYS = {"format", "path", "bits_per_weight", "tokens", "kld_mean", "kld_p99", "top1_agree", "ppl", "ppl_ref"}


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(p, np.random.default_rng(3).integers(0, 256, 16 * 6).astype(np.int64))
    return p


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A word-level tokenizer with 256 entries, trained on the built-in calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    text = (Path(__file__).resolve().parents[1] / "compiler/data/calib.txt").read_text()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=256, special_tokens=["[UNK]"]))
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(p))
    return p


def test_quantize_writes_weights_and_report(tmp_path, tiny_llama, ids_file, capsys):
    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", tiny_llama, "--format", "w3o6", "--outlier-frac", "0.02",
                                "--calib-tokens", ids_file, "-o", out)
    assert code == 0, err
    report = json.loads((out / "quant_report.json").read_text())
    assert report["format"] == "w3o6" and len(report["tensors"]) == 15
    assert 3.0 < report["bits_per_weight"] <= 3.6
    body = [t for t in report["tensors"] if t["role"] != "lm_head"]
    assert all(t["format"] == "w3o6" and 0.0 < t["outlier_fraction"] <= 0.03 for t in body)
    index = json.loads((out / "weights/index.json").read_text())
    qt = unpack((out / index[0]["file"]).read_bytes())
    assert qt.fmt == "w3o6" and list(qt.shape) == index[0]["shape"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"quant_report.json", "weights/index.json"} | {i["file"] for i in index}
    assert "3." in stdout and "bits/weight" in stdout


def test_eval_json_from_token_ids(tiny_llama, ids_file, capsys):
    code, stdout, err = run_cli(capsys, "eval", tiny_llama, "--format", "int4", "--group", "32",
                                "--tokens", ids_file, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert EVAL_KEYS <= set(r) and r["format"] == "int4" and r["path"] == "float"
    assert r["tokens"] == 6 * 15 and r["kld_mean"] > 0 and 0 <= r["top1_agree"] <= 1


def test_eval_golden_path_from_text_with_a_tokenizer(tiny_llama, tokenizer_file, capsys):
    text = Path(__file__).resolve().parents[1] / "benchmarks/data/eval.txt"
    code, stdout, err = run_cli(capsys, "eval", tiny_llama, "--format", "w3o6", "--text", text,
                                "--tokenizer", tokenizer_file, "--path", "golden", "--max-tokens", "64", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["path"] == "golden" and r["tokens"] == 4 * 15 and r["calibration_tokens"] >= 16


@pytest.mark.parametrize("args,needles", [
    (["--format", "int5x"], ["unknown weight format 'int5x'", "w3o6"]),
    (["--format", "w3o6", "--outlier-frac", "1.5"], ["--outlier-frac", "[0, 1]"]),
    (["--format", "int4", "--group", "48"], ["group size 48 does not divide the 64 input features"]),
    (["--format", "w3o6"], ["calibration needs a tokenizer"]),
    (["--format", "w3o6", "--gptq-damp", "-1"], ["--gptq-damp must be a positive number"]),
])
def test_quantize_bad_options(tmp_path, tiny_llama, capsys, args, needles):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", tiny_llama, *args, "-o", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_calibration_shorter_than_a_window(tmp_path, tiny_llama, capsys):
    short = tmp_path / "short.npy"
    np.save(short, np.arange(5, dtype=np.int64))
    code, _, err = run_cli(capsys, "quantize", tiny_llama, "--format", "w3o6", "--calib-tokens", short, "-o", tmp_path / "q")
    assert_one_line_error(code, err, "5 tokens", "fewer than one window of 16")


def test_eval_bad_token_ids(tmp_path, tiny_llama, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1, 2, 999] * 10, np.int64))
    code, _, err = run_cli(capsys, "eval", tiny_llama, "--format", "int8", "--tokens", bad, "--json")
    assert_one_line_error(code, err, "outside the model's vocabulary")


def test_quantize_non_finite_weights(tmp_path, tiny_llama, ids_file, capsys):
    model = onnx.load(str(tiny_llama))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 2
                and "embed" not in i.name)
    w = numpy_helper.to_array(init).copy()
    w[0, 0] = np.inf
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    p = tmp_path / "inf.onnx"
    onnx.save(model, str(p))
    code, _, err = run_cli(capsys, "quantize", p, "--format", "int8", "-o", tmp_path / "q")
    assert_one_line_error(code, err, "inf.onnx", "non-finite", init.name)


def test_eval_per_layer_table(tiny_llama, ids_file, capsys):
    """One row per block and the LM head, then one per role across the blocks; the rows'
    weights add up to the model's; int2 layers cost far more KLD than int8 ones."""
    code, stdout, err = run_cli(capsys, "eval", tiny_llama, "--format", "int8", "--tokens", ids_file,
                                "--per-layer", "--json")
    assert code == 0, err
    r8 = json.loads(stdout)
    rows = r8["per_layer"]
    layers = [x for x in rows if not x["layer"].startswith("all ")]
    roles = [x["layer"] for x in rows if x["layer"].startswith("all ")]
    assert [x["layer"] for x in layers] == ["layers.0", "layers.1", "lm_head"]
    assert roles == ["all q_proj", "all k_proj", "all v_proj", "all o_proj", "all gate_proj",
                     "all up_proj", "all down_proj"]
    assert sum(x["linears"] for x in layers) == 15
    assert sum(x["weights"] for x in layers[:-1]) == sum(x["weights"] for x in rows if x["layer"] in roles)
    code, stdout, err = run_cli(capsys, "eval", tiny_llama, "--format", "int2", "--tokens", ids_file,
                                "--per-layer", "--json")
    r2 = json.loads(stdout)
    for a, b in zip(r8["per_layer"][:2], r2["per_layer"][:2]):
        assert a["kld_mean"] > 0 and b["kld_mean"] > 10 * a["kld_mean"]
    code, stdout, err = run_cli(capsys, "eval", tiny_llama, "--format", "int4", "--tokens", ids_file, "--per-layer")
    assert code == 0, err
    assert "with the LM head" in stdout and "layers.1 " in stdout and "all down_proj" in stdout
    assert "sum over the layers" in stdout


def test_help_states_the_quantiser_defaults():
    """The CLI keeps numpy out of --help, so its help text repeats two constants: keep them equal."""
    from tapeout.cli import build_parser
    from tapeout.compiler.quant.formats import W3O6_OUTLIER_FRAC
    from tapeout.compiler.quant.gptq import DAMP
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["quantize"].format_help().split())
    assert f"(default {W3O6_OUTLIER_FRAC}:" in text and f"(default {DAMP})" in text
