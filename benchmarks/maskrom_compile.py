"""Compile time and peak memory of SmolLM2-135M to mask-ROM artifacts.

    python benchmarks/maskrom_compile.py [--format nvfp4 w3o6] [--repeat 3] [--seq-len 128] [--ref REV]

Each compile runs `tapeout compile MODEL --target maskrom --format F` in a fresh process;
wall time (median) and peak RSS (ru_maxrss of that child, the largest over the runs) are
reported beside the targets of issue 4 (<= 60 s, <= 4 GiB on 2 cores). w3o6 calibrates on the
built-in text first, in windows of the export's sequence length: the model is SmolLM2 exported
with its attention mask at ``--seq-len`` (128 by default, the quality benchmark's export; at 16
the same 1,920 calibration tokens take eight times as many forward passes). ``--ref REV`` runs the same compiles on another revision too
(benchmarks/_ref.py), alternating before/after per repeat, and prints them side by side.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))


def one(model: Path, fmt: str, out: Path, python: str = sys.executable, env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one compile, the RSS from wait4 on that child alone."""
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        p = subprocess.Popen([python, "-m", "tapeout", "compile", str(model), "--target", "maskrom",
                              "--format", fmt, "-o", str(out)], stdout=f, stderr=subprocess.STDOUT,
                             env={**(env or os.environ), "OPENBLAS_NUM_THREADS": "1"}, cwd=out.parent)
        _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if status:
        sys.exit(f"compile --format {fmt} failed:\n{log.read_text()[-2000:]}")
    return dt, usage.ru_maxrss / 2**20        # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", nargs="+", default=["nvfp4", "w3o6"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--model")
    ap.add_argument("--seq-len", type=int, default=128, help="the SmolLM2 export's sequence length")
    ap.add_argument("--ref", help="also run this revision (before/after side by side)")
    ap.add_argument("--rev", help="the 'after' revision (default: the working tree)")
    args = ap.parse_args()
    import smollm2
    from tapeout.compiler.qmodel import WORKERS
    model = Path(args.model) if args.model else smollm2.export(seq_len=args.seq_len, mask=True)
    tmp = Path(tempfile.mkdtemp(prefix="tapeout-bench-"))
    print(f"model {model.name}, {os.cpu_count()} cores, {WORKERS} worker threads; medians of {args.repeat}")
    if not args.ref:
        print(f"{'format':8s} {'wall s':>8s} {'peak RSS GiB':>13s}   target: <= 60 s, <= 4 GiB")
    try:
        if args.ref:
            sys.path.insert(0, str(REPO / "benchmarks"))
            import _ref
            ref_py, ref_env, _, sha = _ref.ref_env(args.ref)
            new_py, new_env, after = sys.executable, None, "working tree"
            if args.rev:
                new_py, new_env, _, rsha = _ref.ref_env(args.rev)
                after = f"{args.rev} ({rsha[:8]})"
            print(f"{'format':8s} {'before s':>9s} {'after s':>8s} {'ratio':>6s} {'before GiB':>11s} {'after GiB':>10s}"
                  f"   before = {args.ref} ({sha[:8]}), after = {after}")
        for fmt in args.format:
            if args.ref:
                before, after = [], []
                for i in range(args.repeat):
                    before.append(one(model, fmt, tmp / f"{fmt}-ref{i}", ref_py, ref_env))
                    after.append(one(model, fmt, tmp / f"{fmt}{i}", new_py, new_env))
                tb, ta = (statistics.median(r[0] for r in x) for x in (before, after))
                mb, ma = (max(r[1] for r in x) for x in (before, after))
                print(f"{fmt:8s} {tb:9.1f} {ta:8.1f} {ta / tb:6.2f} {mb:11.2f} {ma:10.2f}", flush=True)
                continue
            runs = [one(model, fmt, tmp / f"{fmt}{i}") for i in range(args.repeat)]
            t = statistics.median(r[0] for r in runs)
            m = max(r[1] for r in runs)
            print(f"{fmt:8s} {t:8.1f} {m:13.2f}   time {'met' if t <= 60 else 'MISSED'}, "
                  f"memory {'met' if m <= 4 else 'MISSED'}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
