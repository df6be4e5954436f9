"""Dataflow backend on one SmolLM2-135M decode step (past 16, nvfp4): makespan beside its lower
bounds and tokens/s for a few machine variants, side by side in one run. Lowering and the
checker run for every variant; the cycle-accurate simulator (== golden) for the default.

    python benchmarks/dataflow_decode.py [--model PATH] [--format nvfp4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [[], ["mxm_buffers=4"], ["mxm_buffers=8"], ["hop_cycles=2"], ["mxm=2"], ["link_latency=5000"]]


def main() -> int:
    from tapeout.backends.dataflow.check import check
    from tapeout.backends.dataflow.lower import lower, memory_map
    from tapeout.backends.dataflow.machine import Machine
    from tapeout.backends.dataflow.banks import build_banks
    from tapeout.backends.dataflow.sim import run_queues
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.qmodel import QuantConfig, quantize_model, sample_feeds
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / ".cache/models/smollm2/smollm2-135m-decode-p16.onnx"))
    ap.add_argument("--format", default="nvfp4")
    a = ap.parse_args()
    if not Path(a.model).exists():
        print(f"missing {a.model}: run python models/smollm2.py --variant decode --past-len 16", file=sys.stderr)
        return 2
    g = frontend(a.model)
    gm = quantize_model(g, QuantConfig(a.format, quantize_head=True), None).golden()
    print(f"{Path(a.model).name}, {a.format}")
    print(f"{'machine':18s} {'chips':>5s} {'instr':>7s} {'makespan':>9s} {'crit.path':>9s} {'res.bound':>9s} "
          f"{'ratio':>6s} {'w-stream':>8s} {'tok/s/user':>10s} {'lower s':>7s} {'sim':>12s}")
    for opts in VARIANTS:
        m = Machine.from_options(opts)
        t = time.perf_counter()
        plan = lower(gm, m)
        dt = time.perf_counter() - t
        mm = memory_map(plan.copies)
        check(m, plan.queues, mm)
        s = plan.schedule
        wb = max(sum(t.busy for t in plan.tasks if t.kind == "iw" and (t.chip, t.mxm) == k)
                 for k in {(t.chip, t.mxm) for t in plan.tasks if t.kind == "iw"})
        sim = "-"
        if not opts:
            st: dict = {}
            feeds = sample_feeds(g)
            got = run_queues(gm, m, plan.queues, mm, feeds, st, image=build_banks(gm, plan.geometry, mm))
            gold = gm.run(feeds)
            bad = sum(int(np.count_nonzero(got[k] != gold[k])) for k in gold)
            sim = f"{sum(v.size for v in gold.values())} eq" if not bad else f"{bad} DIFF"
            assert st["cycles"] == plan.makespan
        n = sum(len(q) for q in plan.queues.values())
        print(f"{' '.join(opts) or 'default':18s} {plan.chips:5d} {n:7d} {plan.makespan:9d} {s.critical_path:9d} "
              f"{s.resource_bound:9d} {plan.makespan / s.lower_bound:6.3f} {wb:8d} "
              f"{m.clock_hz / plan.makespan:10.0f} {dt:7.1f} {sim:>12s}")
    print("ratio = makespan / max(critical path, resource bound); w-stream = the busiest MXM's weight installs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
