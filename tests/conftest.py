"""Shared fixtures: the tiny model exports (built once per test session, cached in .cache/)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _support import REPO, TINY_CASES, load_models_module


def _exports() -> list[tuple[dict, list[str]]]:
    """(export keyword arguments, the same export as models/tiny.py options) for every model the
    default tier reads."""
    from test_masks import FAST  # masked exports of the default tier (tests/test_masks.py)
    jobs = [dict(family=f, exporter=e, opset=o, variant=v) for f, e, o, v in TINY_CASES]
    jobs += [dict(family="llama", exporter="dynamo", opset=20, variant="prefill", seq_len=s) for s in (8, 9)]
    jobs += [dict(family=f, exporter=e, opset=None, variant=v, mask=True) for f, e, v in FAST]
    jobs.append(dict(family="bert", exporter="dynamo", opset=20, variant="prefill", mask=True, batch=2))
    out = []
    for kw in jobs:
        argv = ["--family", kw["family"], "--exporter", kw["exporter"], "--variant", kw["variant"]]
        argv += ["--opset", str(kw["opset"])] if kw["opset"] else []
        argv += ["--seq-len", str(kw["seq_len"])] if "seq_len" in kw else []
        argv += ["--mask"] if kw.get("mask") else []
        argv += ["--batch", str(kw["batch"])] if "batch" in kw else []
        out.append((kw, argv))
    return out


def pytest_sessionstart(session: pytest.Session) -> None:
    # export once in the controller before xdist workers start (workers then hit the cache)
    if hasattr(session.config, "workerinput"):
        return
    tiny = load_models_module("tiny")
    todo = []
    for kw, argv in _exports():
        k = dict(kw)
        path = Path(tiny.default_out_dir()) / tiny.model_name(
            k["family"], k["exporter"], k["opset"] or tiny.DEFAULT_OPSET[k["exporter"]], k["variant"],
            k.get("seq_len", tiny.DEFAULT_SEQ_LEN), tiny.DEFAULT_PAST_LEN, k.get("mask", False), k.get("batch", 1))
        if not path.exists():
            todo.append(argv)
    # half the exports in one helper process (one torch import), half here, at the same time
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    theirs, mine = todo[1::2], todo[0::2]
    helper = None
    if theirs:
        code = ("import json, sys, importlib.util as u\n"
                f"s = u.spec_from_file_location('tiny', {str(REPO / 'models' / 'tiny.py')!r})\n"
                "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
                "for argv in json.loads(sys.argv[1]):\n    m.main(argv)\n")
        helper = subprocess.Popen([sys.executable, "-c", code, json.dumps(theirs)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for argv in mine:
        with contextlib.redirect_stdout(io.StringIO()):
            tiny.main(argv)
    if helper is not None:
        _, err = helper.communicate()
        if helper.returncode:
            raise RuntimeError(f"exporting {theirs} failed:\n{err.decode()[-3000:]}")


@pytest.fixture(scope="session")
def tiny():
    return load_models_module("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny) -> Path:
    return tiny.export("llama", "dynamo", 20, "prefill")
