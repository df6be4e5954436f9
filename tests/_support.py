"""Helpers shared by the tests (importable: tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_models_module(name: str):
    """Import a script from the repo's models/ folder (it is not an installed package)."""
    mod_name = f"tapeout_models_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, REPO / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


# (family, exporter, opset, variant): both exporters, opsets 20 and 23, with and without KV cache
TINY_CASES = [
    (fam, exp, opset, var)
    for fam in ("llama", "gpt2", "bert")
    for exp, opset in (("dynamo", 20), ("dynamo", 23), ("legacy", 17))
    for var in (("prefill", "decode") if fam != "bert" else ("prefill",))
]


def tiny_id(case) -> str:
    return "-".join(str(c) for c in case)


def rehash(folder, rel: str) -> None:
    """After a test edits ``folder/rel`` on purpose: make the manifest's sha256 match again, so
    the edit reaches the simulator's own checks instead of the folder's hash check."""
    import hashlib
    import json
    folder = Path(folder)
    man = json.loads((folder / "manifest.json").read_text())
    data = (folder / rel).read_bytes()
    man["artifacts"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    resign(folder, man)


def resign(folder, man: dict) -> None:
    """Write ``man`` as the folder's manifest with its own digest made to match (a test's edit)."""
    from tapeout.output import dumps_json, manifest_digest
    man["manifest_sha256"] = manifest_digest(man)
    (Path(folder) / "manifest.json").write_text(dumps_json(man))
