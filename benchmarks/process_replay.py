"""Process replay: compile a corpus of tiny models on two revisions and compare every artifact.

    python benchmarks/process_replay.py [--ref REV] [--keep DIR]

Each case runs ``tapeout compile`` (or ``quantize``) in a fresh process on the working tree and
on ``--ref`` (default ``origin/main`` if it exists, else ``HEAD~1``; see benchmarks/_ref.py),
then compares the sha256 of every artifact listed in the two manifests. A refactor must leave
the table all ``equal`` except where a format changed on purpose. The tiny models are the test
session's exports (``models/tiny.py``, cached in ``.cache/models/tiny``); calibration uses a
fixed token sequence.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ref  # noqa: E402

REPO = _ref.REPO

# (name, model (family, variant), command and options)
CASES = [
    ("llama-maskrom-nvfp4", ("llama", "prefill"), ["compile", "--target", "maskrom", "--format", "nvfp4",
                                                   "--gds-tiles", "0,3"]),
    ("llama-maskrom-w3o6", ("llama", "prefill"), ["compile", "--target", "maskrom", "--format", "w3o6", "CALIB",
                                                  "--gds-tiles", "0"]),
    ("llama-maskrom-int4", ("llama", "prefill"), ["compile", "--target", "maskrom", "--format", "int4",
                                                  "--gds-tiles", "0"]),
    ("llama-maskrom-int8", ("llama", "prefill"), ["compile", "--target", "maskrom", "--format", "int8",
                                                  "--gds-tiles", "0"]),
    ("llama-maskrom-mxfp4", ("llama", "prefill"), ["compile", "--target", "maskrom", "--format", "mxfp4",
                                                   "--gds-tiles", "0"]),
    ("gpt2-maskrom-nvfp4", ("gpt2", "prefill"), ["compile", "--target", "maskrom", "--format", "nvfp4",
                                                 "--gds-tiles", "0"]),
    ("bert-maskrom-int4", ("bert", "prefill"), ["compile", "--target", "maskrom", "--format", "int4",
                                                "--gds-tiles", "0"]),
    ("llama-systolic-nvfp4", ("llama", "prefill"), ["compile", "--target", "systolic", "--format", "nvfp4"]),
    ("llama-systolic-w3o6", ("llama", "prefill"), ["compile", "--target", "systolic", "--format", "w3o6", "CALIB"]),
    ("llama-decode-systolic-int8", ("llama", "decode"), ["compile", "--target", "systolic", "--format", "int8"]),
    ("gpt2-systolic-mxfp4", ("gpt2", "prefill"), ["compile", "--target", "systolic", "--format", "mxfp4"]),
    ("bert-systolic-int4", ("bert", "prefill"), ["compile", "--target", "systolic", "--format", "int4"]),
    ("llama-dataflow-nvfp4", ("llama", "prefill"), ["compile", "--target", "dataflow", "--format", "nvfp4"]),
    ("llama-decode-dataflow-nvfp4", ("llama", "decode"), ["compile", "--target", "dataflow", "--format", "nvfp4"]),
    ("gpt2-dataflow-int8", ("gpt2", "prefill"), ["compile", "--target", "dataflow", "--format", "int8"]),
    ("llama-dataflow-w3o6", ("llama", "prefill"), ["compile", "--target", "dataflow", "--format", "w3o6", "CALIB"]),
    ("llama-none", ("llama", "prefill"), ["compile", "--target", "none"]),
    ("llama-quantize-w3o6", ("llama", "prefill"), ["quantize", "--format", "w3o6", "CALIB"]),
    ("gpt2-quantize-int4", ("gpt2", "prefill"), ["quantize", "--format", "int4"]),
]


def models() -> dict:
    sys.path.insert(0, str(REPO / "models"))
    import tiny
    return {(fam, var): tiny.export(fam, "dynamo", 20, var) for fam, var in {c[1] for c in CASES}}


def run(python: str, env: dict, case, model: Path, calib: Path, out: Path) -> dict:
    name, _, argv = case
    argv = [str(calib) if a == "CALIB" else a for a in argv]
    argv = [argv[0], str(model)] + [a for a in argv[1:] if a != str(calib)]
    if "CALIB" in case[2]:
        argv += ["--calib-tokens", str(calib)]
    p = subprocess.run([python, "-m", "tapeout", *argv, "-o", str(out)], env=env, cwd=out.parent,
                       capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads((out / "manifest.json").read_text())["artifacts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=None)
    ap.add_argument("--rev", help="the new revision (default: the working tree)")
    ap.add_argument("--keep", help="keep the compiled folders here")
    ap.add_argument("--only", nargs="*", help="case names")
    ap.add_argument("--json", help="write the per-artifact comparison here")
    args = ap.parse_args()
    ref = args.ref or ("origin/main" if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q",
                                                         "origin/main"], capture_output=True).returncode == 0
                       else "HEAD~1")
    ref_py, ref_env, _, sha = _ref.ref_env(ref)
    new_py, new_env, new_name = sys.executable, _ref.current_env(), "working tree"
    if args.rev:
        new_py, new_env, _, nsha = _ref.ref_env(args.rev)
        new_name = f"{args.rev} ({nsha[:10]})"
    mods = models()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="tapeout-replay-"))
    tmp.mkdir(parents=True, exist_ok=True)
    calib = tmp / "calib.npy"
    np.save(calib, (np.arange(64, dtype=np.int64) * 37 + 11) % 256)
    cases = [c for c in CASES if not args.only or c[0] in args.only]
    print(f"process replay: {new_name} vs {ref} ({sha[:10]}), {len(cases)} cases")
    print(f"{'case':32s} {'artifacts':>9s} {'equal':>6s} {'changed':>8s} {'only new':>9s} {'only old':>9s}")
    detail, total_changed = {}, 0
    for case in cases:
        model = mods[case[1]]
        (tmp / "new").mkdir(exist_ok=True)
        (tmp / "old").mkdir(exist_ok=True)
        new = run(new_py, new_env, case, model, calib, tmp / "new" / case[0])
        old = run(ref_py, ref_env, case, model, calib, tmp / "old" / case[0])
        if "error" in new or "error" in old:
            print(f"{case[0]:32s} error: new {new.get('error')} old {old.get('error')}")
            detail[case[0]] = {"new": new.get("error"), "old": old.get("error")}
            continue
        both = sorted(set(new) & set(old))
        changed = [f for f in both if new[f] != old[f]]
        only_new, only_old = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        total_changed += len(changed)
        detail[case[0]] = {"changed": changed, "only_new": only_new, "only_old": only_old}
        print(f"{case[0]:32s} {len(both):9d} {len(both) - len(changed):6d} {len(changed):8d} {len(only_new):9d} "
              f"{len(only_old):9d}", flush=True)
        for f in changed:
            print(f"    changed: {f}")
        for f in only_old:
            print(f"    only old: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(detail, indent=1, sort_keys=True) + "\n")
    print(f"{total_changed} artifacts changed")


if __name__ == "__main__":
    main()
