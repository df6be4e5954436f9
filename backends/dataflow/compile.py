"""``tapeout compile --target dataflow``: per-unit queues, SRAM map and load image, schedule,
trace, report, the checker's proof and the simulator's whole-model check against golden (spec: docs/dataflow.md)."""
from __future__ import annotations

from contextlib import nullcontext

from collections import Counter, defaultdict

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden.model import Golden
from tapeout.compiler.program import IntegerProgram

from .banks import build_banks
from .check import check
from .isa import OP, OPS, QueueError, encode, listing
from .lower import lower, memory_map
from .machine import Machine
from .sim import run_queues

__all__ = ["compile_dataflow", "chrome_trace", "is_decode"]

LISTING_ROWS = 2000          # rows per unit in queues.lst (queues.bin has them all)
TRACE_EVENTS = 200_000


def is_decode(ip: IntegerProgram) -> bool:
    return ip.interface.mode == "decode"


def chrome_trace(queues: dict[str, np.ndarray], names: list[str], makespan: int) -> dict:
    """The queues as a Chrome/Perfetto trace: one process per chip, one thread per unit, one
    event per instruction (``ts``/``dur`` in cycles shown as microseconds)."""
    events, pids, n = [], {}, 0
    for t, (unit, q) in enumerate(queues.items()):
        chip = unit.split(".", 1)[0]
        if chip not in pids:
            pids[chip] = len(pids) + 1
            events.append({"name": "process_name", "ph": "M", "pid": pids[chip], "args": {"name": f"chip {chip[1:]}"}})
        if not len(q):
            continue
        events.append({"name": "thread_name", "ph": "M", "pid": pids[chip], "tid": t + 1,
                       "args": {"name": unit.split(".", 1)[1]}})
        for r in q:
            if n >= TRACE_EVENTS:
                break
            events.append({"name": OPS[r["op"]], "cat": unit.split(".", 1)[1].rstrip("0123456789"), "ph": "X",
                           "ts": int(r["cycle"]), "dur": max(1, int(r["n"])), "pid": pids[chip], "tid": t + 1,
                           "args": {"layer": names[r["layer"]] if r["layer"] < len(names) else ""}})
            n += 1
    total = sum(len(q) for q in queues.values())
    other = {"time_unit": "1 us = 1 cycle", "makespan": makespan, "instructions": total}
    if n < total:
        other["note"] = f"truncated to {n} of {total} instructions (per unit in issue order)"
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": other}


def compile_dataflow(ip: IntegerProgram, out, machine: Machine, *, verify: bool = True, step=None) -> dict:
    """Lower, schedule, place and write the artifacts into ``out`` (an OutputFolder)."""
    def stage(msg):
        return step(msg) if step else nullcontext()
    with stage("lowering to stream operations, scheduling, placing copies and streams"):
        plan = lower(ip, machine)
    mm = memory_map(plan.copies)
    with stage("checking the queues (streams, ports, arrivals, memory)"):
        try:
            proof = check(machine, plan.queues, mm)
        except QueueError as e:
            raise TapeoutError(f"internal check failed: {e} (a compiler bug)") from None
    sched = plan.schedule
    q = plan.queues
    total = sum(len(v) for v in q.values())
    with stage(f"writing {total} instructions in {sum(1 for v in q.values() if len(v))} queues"):
        out.write_bytes("queues.bin", encode(q))
        out.write_text("queues.lst", listing({u: v for u, v in q.items() if len(v)}, plan.names, machine.as_dict(),
                                             plan.makespan, limit=LISTING_ROWS))
        out.write_json("memory.json", {"banks": machine.mem_banks, "bank_bytes": machine.bank_kib * 1024,
                                       "lanes": machine.lanes, "copies": mm})
    with stage("writing the load image (the weight blocks and constants of every bank)"):
        image = build_banks(ip, plan.geometry, mm)
        out.write_bytes("banks.bin", image)
        out.write_json("trace.json", chrome_trace(q, plan.names, plan.makespan))
    per_kind: dict[str, Counter] = defaultdict(Counter)
    for u, v in q.items():
        kind = u.split(".", 1)[1].rstrip("0123456789")
        for o, c in zip(*np.unique(v["op"], return_counts=True)):
            per_kind[kind][OPS[o]] += int(c)
    # a pipeline stage: from its input arriving (RX; chip 0: cycle 0) to its last instruction, plus
    # the weight installs it did before the input came (in a full pipeline they follow the
    # previous token's work on the same chip, they cannot hide behind it)
    stages = []
    for c in range(plan.chips):
        mine = {u: v for u, v in q.items() if u.startswith(f"c{c}.") and len(v)}
        last = max(int((v["cycle"] + v["n"]).max()) for v in mine.values())
        rx = [int(v["cycle"][v["op"] == OP["RX"]].min()) for v in mine.values() if (v["op"] == OP["RX"]).any()]
        start = min(rx) if c and rx else 0
        pre = max([int(v["n"][(v["op"] == OP["IW"]) & (v["cycle"] < start)].sum()) for u, v in mine.items()
                   if ".mxm" in u] + [0])
        stages.append({"chip": c, "input_cycle": start, "last_cycle": last, "cycles": last - start + pre,
                       "installs_before_input": pre, "ops": sum(1 for x in plan.chip_of if x == c),
                       **plan.chip_bytes[c]})
    iw_busy = defaultdict(int)
    for t in plan.tasks:
        if t.kind == "iw":
            iw_busy[(t.chip, t.mxm)] += t.busy
    weight_bound = max(iw_busy.values(), default=0)
    lb = int(sched.lower_bound)
    decode = is_decode(ip)
    g, itf = ip.graph, ip.interface
    tok = int(np.prod(g.tensors[itf.tokens].shape)) if itf.tokens else 1
    clock = machine.clock_hz
    report = {
        "target": "dataflow", "machine": machine.as_dict(), "chips": plan.chips, "instructions": total,
        "queue_bytes": len(encode(q)), "per_unit_kind": {k: dict(sorted(v.items())) for k, v in sorted(per_kind.items())},
        "step": "decode" if decode else "prefill", "tokens_per_step": tok,
        "schedule": {"makespan": plan.makespan, "critical_path": int(sched.critical_path),
                     "resource_bound": int(sched.resource_bound), "lower_bound": lb,
                     "ratio": round(plan.makespan / lb, 4) if lb else 1.0,
                     "weight_stream_bound": weight_bound,
                     "tasks": len(plan.tasks)},
        "streams_used": {f"c{c}": n for c, n in sorted(plan.streams_used.items())},
        "stages": stages,
        "checker": proof,
        "tokens_per_s_per_user": round(clock * tok / plan.makespan, 1) if plan.makespan else 0.0,
        "pipeline_tokens_per_s": round(clock * tok / max(s["cycles"] for s in stages), 1),
        "names": plan.names,
    }
    out.write_json("schedule.json", {"machine": report["machine"], "schedule": report["schedule"],
                                     "stages": stages, "tasks": sched.to_json()["tasks"][:TRACE_EVENTS]})
    if verify:
        with stage("cycle-accurate simulator vs golden on a sample input (whole model)"):
            feeds = ip.interface.sample_feeds(g)
            st: dict = {}
            try:
                got = run_queues(ip, machine, q, mm, feeds, st, image=image)
            except QueueError as e:
                raise TapeoutError(f"internal check failed: the simulator stopped: {e} (a compiler bug)") from None
            gold = Golden(ip).run(feeds)
            checked = int(sum(v.size for v in gold.values()))
            mismatches = int(sum(np.count_nonzero(got[k] != gold[k]) for k in gold))
            if mismatches or st["cycles"] != plan.makespan:
                raise TapeoutError(f"internal check failed: the simulator differs from golden in {mismatches} of "
                                   f"{checked} outputs, or its {st['cycles']} cycles from the makespan "
                                   f"{plan.makespan} (a compiler bug)")
            report["sim_vs_golden"] = {"checked": checked, "mismatches": mismatches, "cycles": st["cycles"]}
        for name, v in feeds.items():
            out.write_npy(f"sim/feeds/{name}.npy", v)
        for name, v in gold.items():
            out.write_npy(f"sim/golden/{name}.npy", v)
    out.write_json("report.json", report)
    return report
