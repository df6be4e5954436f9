"""Compile time and peak memory of SmolLM2-135M to mask-ROM artifacts.

    python benchmarks/maskrom_compile.py [--format nvfp4 w3o6] [--repeat 3]

Each compile runs `tapeout compile MODEL --target maskrom --format F` in a fresh process;
wall time and peak RSS (ru_maxrss of the child) are reported as medians, beside the targets of
issue 4 (<= 60 s, <= 4 GiB on 2 cores). w3o6 calibrates on the built-in text first.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))


def one(model: Path, fmt: str, out: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tapeout", "compile", str(model), "--target", "maskrom", "--format", fmt,
                    "-o", str(out)], check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dt, max(peak, before) / 2**20        # KiB -> GiB (the max over children so far)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", nargs="+", default=["nvfp4", "w3o6"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--model")
    args = ap.parse_args()
    import smollm2
    model = Path(args.model) if args.model else smollm2.export()
    tmp = Path(tempfile.mkdtemp(prefix="tapeout-bench-"))
    print(f"model {model.name}, {os.cpu_count()} cores; medians of {args.repeat}")
    print(f"{'format':8s} {'wall s':>8s} {'peak RSS GiB':>13s}   target: <= 60 s, <= 4 GiB")
    try:
        for fmt in args.format:
            runs = [one(model, fmt, tmp / f"{fmt}{i}") for i in range(args.repeat)]
            t = statistics.median(r[0] for r in runs)
            m = max(r[1] for r in runs)
            print(f"{fmt:8s} {t:8.1f} {m:13.2f}   {'met' if t <= 60 and m <= 4 else 'MISSED'}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("peak RSS is ru_maxrss over the child processes so far (a running maximum across rows)")


if __name__ == "__main__":
    main()
