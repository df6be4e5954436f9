"""The fuzz campaign: seeded mutations of models, options, HF configs and compile folders through
every command, outcomes classified and counted (tests/fuzz/harness.py; docs/fuzz.md).

    python benchmarks/fuzz.py [--seed 0] [--cases 10000] [--groups model option config folder]
                              [--timeout 60] [--jobs 2] [--work DIR] [--show 20]

Prints one row per group (cases, outcome counts, median seconds a case) and the first
``--show`` cases of every bad outcome with the line they printed. Exit 1 if any bad outcome.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "models"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--groups", nargs="+", choices=("model", "option", "config", "folder", "adapter"))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    ap.add_argument("--work", help="scratch folder (default: a temporary one); failed cases are kept there")
    ap.add_argument("--show", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (forked children)")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import tiny
    from fuzz import harness
    work = Path(args.work or tempfile.mkdtemp(prefix="tapeout-fuzz-"))
    model = tiny.export("llama")
    seeds = harness.make_seeds(work / "seeds", model, REPO / "backends" / "maskrom" / "configs" / "smollm2-135m.json")
    t0 = time.perf_counter()

    def progress(k, n, r):
        if k % 100 == 0 or k == n:
            el = time.perf_counter() - t0
            print(f"[fuzz] {k}/{n} cases, {k / el:.1f}/s, {el / k * (n - k):.0f} s left", file=sys.stderr, flush=True)

    results = harness.campaign(args.seed, args.cases, seeds, work / "cases", timeout=args.timeout,
                               groups=args.groups, progress=progress, jobs=args.jobs)
    print(f"seed {args.seed}, {len(results)} cases in {time.perf_counter() - t0:.0f} s (work: {work})")
    print(harness.table(results))
    bad = harness.failures(results)
    by: dict[str, list[str]] = {}
    for line in bad:
        by.setdefault(line.split()[0], []).append(line)
    for outcome, lines in sorted(by.items()):
        print(f"\n{outcome}: {len(lines)}")
        for line in lines[: args.show]:
            print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
