"""Tiny model export (models/tiny.py) runs in onnxruntime."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def load_models_module(name: str) -> ModuleType:
    """Import ``models/<name>.py`` (models/ is a folder of scripts, not an installed package)."""
    key = f"tapeout_models_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, MODELS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny() -> ModuleType:
    return load_models_module("tiny")


def test_tiny_llama_dynamo_op20_prefill_runs_in_onnxruntime(tiny, tmp_path):
    path = tiny.export("llama", "dynamo", 20, "prefill", seq_len=16, out_dir=tmp_path)
    assert path == tmp_path / "llama-dynamo-op20-prefill.onnx"
    assert path.is_file() and not list(tmp_path.glob("*.data"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder gone

    feeds = tiny.sample_inputs(path)
    assert set(feeds) == {"input_ids"}
    ids = feeds["input_ids"]
    assert ids.shape == (1, 16) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 256
    np.testing.assert_array_equal(ids, tiny.sample_inputs(path)["input_ids"])  # deterministic

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], feeds)
    assert logits.shape == (1, 16, 256)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()

    # cached: a second call returns the same file without re-exporting
    mtime = path.stat().st_mtime_ns
    assert tiny.export("llama", "dynamo", 20, "prefill", seq_len=16, out_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
