"""Shared fixtures: the tiny model exports (built once per test session, cached in .cache/)."""
from __future__ import annotations

from pathlib import Path

import pytest

from _support import TINY_CASES, load_models_module


def pytest_sessionstart(session: pytest.Session) -> None:
    # export once in the controller before xdist workers start (workers then hit the cache)
    if hasattr(session.config, "workerinput"):
        return
    tiny = load_models_module("tiny")
    for fam, exp, opset, var in TINY_CASES:
        tiny.export(fam, exp, opset, var)
    for seq in (8, 9):  # the golden KV-cache test pairs prefill(8)+decode with prefill(9)
        tiny.export("llama", "dynamo", 20, "prefill", seq_len=seq)
    from test_masks import FAST  # masked exports of the default tier (tests/test_masks.py)
    for fam, exp, var in FAST:
        tiny.export(fam, exp, None, var, mask=True)
    tiny.export("bert", "dynamo", 20, "prefill", mask=True, batch=2)


@pytest.fixture(scope="session")
def tiny():
    return load_models_module("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny) -> Path:
    return tiny.export("llama", "dynamo", 20, "prefill")
