"""``tapeout compile --target systolic``: microcode, listing, schedule, trace, per-layer report,
and the ISA simulator's whole-model check against golden (spec: docs/isa.md)."""
from __future__ import annotations

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden.model import Golden
from tapeout.compiler.qmodel import sample_feeds as _sample_feeds

from .isa import OPS, encode, listing
from .isasim import run_program
from .lower import linear_geometry, lower
from .machine import Machine

__all__ = ["compile_systolic", "layer_report", "sample_feeds", "LISTING_LIMIT"]

LISTING_LIMIT = 200_000          # instructions written to program.lst (the binary has them all)


def sample_feeds(gm: Golden) -> dict:
    return _sample_feeds(gm.graph)


def layer_report(gm: Golden, machine: Machine, low) -> list[dict]:
    """Per linear: cycles from its first to its last instruction, the roofline bound
    max(MACs / n^2, weight bytes / DRAM bandwidth) and utilisation = bound / cycles."""
    prog = low.program
    start = prog["cycle"].astype(np.int64)
    end = start + low.durations
    layer = prog["layer"].astype(np.int64)
    first = np.full(len(low.names), np.iinfo(np.int64).max)
    last = np.zeros(len(low.names), np.int64)
    np.minimum.at(first, layer, start)
    np.maximum.at(last, layer, end)
    rows = []
    for li, op in enumerate(gm.order):
        if op.kind != "linear":
            continue
        geo = linear_geometry(gm, op.name, machine)
        T = int(np.prod(gm.graph.tensors[op.inputs[0]].shape[:-1]))
        macs = T * geo["out"] * geo["in"]
        compute = -(-macs // (machine.n * machine.n))
        memory = -(-int(geo["out"] * geo["in"] * geo["w_bits"] / 8) // machine.dram_bytes_per_cycle)
        cycles = int(last[li] - first[li])
        rows.append({"layer": op.name, "shape": [geo["out"], geo["in"]], "tokens": T, "macs": macs,
                     "cycles": cycles, "compute_bound": compute, "memory_bound": memory,
                     "roofline_bound": max(compute, memory),
                     "utilisation": round(max(compute, memory) / cycles, 4) if cycles else 0.0,
                     "k_tile": geo["kt"]})
    return rows


def compile_systolic(gm: Golden, out, machine: Machine, *, verify: bool = True, step=None) -> dict:
    """Lower, schedule and write the artifacts into ``out`` (an OutputFolder); returns the report."""
    def stage(msg):
        return step(msg) if step else _Null()
    with stage("lowering to microcode and scheduling"):
        low = lower(gm, machine)
    sched = low.schedule
    with stage("checking the schedule (dependencies, one task per unit and cycle)"):
        sched.verify()
    prog = low.program
    with stage(f"writing {len(prog)} instructions"):
        out.write_bytes("program.bin", encode(prog))
        out.write_text("program.lst", listing(prog, low.names, machine.as_dict(),
                                              limit=LISTING_LIMIT if len(prog) > LISTING_LIMIT else None))
        out.write_json("trace.json", sched.to_chrome_trace())
    layers = layer_report(gm, machine, low)
    counts = {OPS[o]: int(c) for o, c in enumerate(np.bincount(prog["op"], minlength=len(OPS))) if c}
    report = {"target": "systolic", "machine": machine.as_dict(), "instructions": int(len(prog)),
              "program_bytes": 16 * int(len(prog)), "per_opcode": counts,
              "schedule": {"makespan": int(sched.makespan), "critical_path": int(sched.critical_path),
                           "resource_bound": int(sched.resource_bound), "lower_bound": int(sched.lower_bound),
                           "ratio": round(float(sched.ratio), 4), "per_resource": sched.per_resource()},
              "layers": layers, "names": low.names}
    big = [r for r in layers if r["macs"] >= max(x["macs"] for x in layers) / 4] if layers else []
    report["large_matmul_utilisation"] = round(min(r["utilisation"] for r in big), 4) if big else None
    out.write_json("schedule.json", {k: report[k] for k in ("machine", "schedule", "instructions")})
    if verify:
        with stage("ISA simulator vs golden on a sample window (whole model)"):
            feeds = sample_feeds(gm)
            st: dict = {}
            got = run_program(gm, machine, prog, feeds, st)
            gold = gm.run(feeds)
            checked = int(sum(v.size for v in gold.values()))
            mismatches = int(sum(np.count_nonzero(got[k] != gold[k]) for k in gold))
            if mismatches:
                raise TapeoutError(f"internal check failed: the ISA simulator differs from golden in {mismatches} "
                                   f"of {checked} outputs (a compiler bug)")
            report["isa_vs_golden"] = {"checked": checked, "mismatches": mismatches, "cycles": st["cycles"]}
        for name, v in feeds.items():
            out.write_bytes(f"sim/feeds/{name}.npy", _npy(v))
        for name, v in gold.items():
            out.write_bytes(f"sim/golden/{name}.npy", _npy(v))
    out.write_json("report.json", report)
    return report


def _npy(a) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
