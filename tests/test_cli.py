"""The CLI on the tiny Llama: inspect text/JSON, compile output folder and its determinism."""
from __future__ import annotations

import json
import subprocess
import sys

from tapeout.cli import main


def test_inspect_shows_structure(capsys, tiny_llama):
    assert main(["inspect", str(tiny_llama)]) == 0
    out = capsys.readouterr().out
    assert "2 layers x (attention 4/2 kv heads x 16 + gated_mlp silu 128; 7 linears)" in out
    assert "q_proj:64->64 k_proj:64->32" in out and "lm_head" in out


def test_inspect_json(capsys, tiny_llama):
    assert main(["inspect", str(tiny_llama), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["structure"]["layers"] == 2 and s["parameters"] == 106560
    assert s["unsupported"] == [] and s["histogram"]["linear"] == 15


def test_compile_is_deterministic_and_hashed(tmp_path, tiny_llama, capsys):
    for out in ("a", "b"):
        assert main(["compile", str(tiny_llama), "-o", str(tmp_path / out)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    names = sorted(p.name for p in a.iterdir())
    assert names == ["graph.json", "graph.txt", "manifest.json", "passes.txt"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    manifest = json.loads((a / "manifest.json").read_text())
    import hashlib
    for rel, info in manifest["artifacts"].items():
        assert hashlib.sha256((a / rel).read_bytes()).hexdigest() == info["sha256"]
    assert len(manifest["artifacts"]) == 3
    # recompiling over an earlier output replaces it atomically
    assert main(["compile", str(tiny_llama), "-o", str(a)]) == 0
    assert (a / "graph.json").read_bytes() == (b / "graph.json").read_bytes()


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "tapeout", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout and "compile" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tapeout"], capture_output=True, text=True)
    assert r.returncode == 2
