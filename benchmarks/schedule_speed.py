"""List-scheduler speed and quality on random layered DAGs (100k and 1M tasks).

    python benchmarks/schedule_speed.py [--sizes 100000 1000000] [--widths 5 1000] [--seed 0]

Each DAG has layers of ``width`` tasks; a task depends on two random tasks of the previous
layer and runs 1..32 cycles on dma x1, array x1 or vector x2. Width 5 balances the critical
path against the busiest resource (the hard case for list scheduling); width 1000 is bound by
the busiest resource. Building the Problem (``Problem.add`` per task) and ``list_schedule``
are timed separately; 100k is the median of 3 runs, bigger sizes one run; every schedule is
verified. ``ratio`` = makespan / max(critical path, resource bound); peak RSS is the whole
process so far.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

from tapeout.compiler.schedule import Problem, Resource, list_schedule

RESOURCES = [Resource("dma", 1), Resource("array", 1), Resource("vector", 2)]


def layered_problem(n: int, width: int, seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    names = [r.name for r in RESOURCES]
    res, dur = rng.integers(0, len(names), n), rng.integers(1, 33, n)
    ids = np.arange(n)
    deps = rng.integers(0, width, (n, 2)) + (ids // width - 1)[:, None] * width   # previous layer
    p = Problem(RESOURCES)
    for lo in range(0, n, 1 << 16):            # tolist in chunks keeps the generator small
        hi = min(n, lo + (1 << 16))
        for i, r, d, ds in zip(range(lo, hi), res[lo:hi].tolist(), dur[lo:hi].tolist(), deps[lo:hi].tolist()):
            p.add(f"t{i}", names[r], d, ds if i >= width else ())
    return p


def run(n: int, width: int, seed: int) -> tuple[float, float, int, tuple[int, int, int, float]]:
    t0 = time.perf_counter()
    p = layered_problem(n, width, seed)
    t1 = time.perf_counter()
    s = list_schedule(p)
    t2 = time.perf_counter()
    s.verify()
    return t1 - t0, t2 - t1, p.n_deps, (s.makespan, s.critical_path, s.resource_bound, s.ratio)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--widths", type=int, nargs="+", default=[5, 1000])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{'tasks':>9s} {'width':>5s} {'deps':>9s} {'runs':>4s} {'build s':>8s} {'schedule s':>10s} {'makespan':>9s} "
          f"{'crit path':>9s} {'res bound':>9s} {'ratio':>6s} {'peak RSS MiB':>12s}")
    for n, width in ((n, w) for n in args.sizes for w in args.widths):
        repeat = 3 if n <= 100_000 else 1
        results = [run(n, width, args.seed) for _ in range(repeat)]
        build = statistics.median(r[0] for r in results)
        sched = statistics.median(r[1] for r in results)
        deps, (makespan, critical_path, resource_bound, ratio) = results[-1][2:]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n:9d} {width:5d} {deps:9d} {repeat:4d} {build:8.2f} {sched:10.2f} {makespan:9d} "
              f"{critical_path:9d} {resource_bound:9d} {ratio:6.3f} {peak:12.0f}")


if __name__ == "__main__":
    main()
