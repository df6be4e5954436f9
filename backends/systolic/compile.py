"""``tapeout compile --target systolic``: microcode, weight image, listing, schedule, trace,
per-layer report, and the ISA simulator's whole-model check (from the weight image) against
golden (spec: docs/isa.md)."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden.model import Golden
from tapeout.compiler.program import IntegerProgram

from .isa import OPS, encode, listing
from .isasim import run_program
from .lower import attention_geometry, linear_geometry, lower, strip_bytes
from .machine import Machine
from .weights import build_image

__all__ = ["compile_systolic", "layer_report", "throughput", "sample_feeds", "LISTING_LIMIT"]

LISTING_LIMIT = 200_000          # instructions written to program.lst (the binary has them all)


def sample_feeds(ip: IntegerProgram) -> dict:
    return ip.interface.sample_feeds(ip.graph)


def layer_report(ip: IntegerProgram, machine: Machine, low) -> list[dict]:
    """Per linear and attention: its share of the array's timeline, the roofline bound
    max(MACs / n^2, weight bytes / DRAM bandwidth), utilisation = bound / cycles, and its peak
    scratchpad and accumulator bytes (``lower.footprint``).

    ``cycles`` partitions the array's timeline: from the end of the previous layer's last
    MATMUL to the end of this layer's, so waiting for the inputs (the vector unit, a weight
    strip) counts against the layer that waits and the shares add up to the array's time.
    ``span`` is the first-to-last instruction interval (it overlaps the neighbours' prefetch)."""
    prog = low.program
    start = prog["cycle"].astype(np.int64)
    end = start + low.durations
    layer = prog["layer"].astype(np.int64)
    first = np.full(len(low.names), np.iinfo(np.int64).max)
    last = np.zeros(len(low.names), np.int64)
    np.minimum.at(first, layer, start)
    np.maximum.at(last, layer, end)
    mm = prog["op"] == OPS.index("MATMUL")
    array_end = np.full(len(low.names), -1, np.int64)
    np.maximum.at(array_end, layer[mm], end[mm])
    rows = []
    nn = machine.n * machine.n
    prev_end = 0                    # the array runs layers in program order
    for li, op in enumerate(ip.ops):
        fp = low.footprints.get(li)
        if fp is None:
            continue
        cycles = int(array_end[li] - prev_end)
        prev_end = max(prev_end, int(array_end[li]))
        if op.kind == "linear":
            geo = linear_geometry(ip, op.name, machine)
            T = int(np.prod(ip.graph.tensors[op.inputs[0]].shape[:-1]))
            macs = T * geo["out"] * geo["in"]
            memory = -(-int(geo["out"] * geo["in"] * geo["w_bits"] / 8) // machine.dram_bytes_per_cycle)
            row = {"layer": op.name, "kind": "linear", "shape": [geo["out"], geo["in"]], "tokens": T, "macs": macs,
                   "k_tile": geo["kt"]}
        else:
            a = attention_geometry(ip, op, machine)
            macs = 2 * a["batch"] * a["heads"] * a["queries"] * a["keys"] * a["d"]       # Q.K^T and P.V
            memory = 0                                     # q, k, v and the KV cache are on chip
            row = {"layer": op.name, "kind": "attention", "shape": [a["heads"], a["kv_heads"], a["queries"],
                                                                    a["keys"], a["d"]],
                   "tokens": a["batch"] * a["queries"], "macs": macs, "k_tile": a["width"]}
        compute = -(-macs // nn)
        row.update(cycles=cycles, compute_bound=compute, memory_bound=memory, roofline_bound=max(compute, memory),
                   utilisation=round(max(compute, memory) / cycles, 4) if cycles else 0.0,
                   span=int(last[li] - first[li]),
                   spad_bytes=int(fp["spad"]), acc_bytes=int(fp["acc"]))
        rows.append(row)
    return rows


def throughput(ip: IntegerProgram, machine: Machine, makespan: int) -> dict:
    """Cycles and tokens/s of one run of the graph: a decode graph (a KV cache among its inputs)
    produces one token per batch row, so its makespan is the cycles per decoded token; a
    prefill graph's makespan covers all its tokens. Beside it the weight-DMA roofline (every
    weight strip crosses the DRAM port once per run; the KV cache stays on chip)."""
    g, itf = ip.graph, ip.interface
    shape = g.tensors[itf.tokens].shape if itf.tokens else (1,)
    batch, seq = (int(shape[0]), int(shape[-1])) if len(shape) > 1 else (1, int(shape[-1]))
    decode = itf.mode == "decode"
    tokens = batch if decode else batch * seq
    weight_bytes = 0
    for op in ip.ops:
        if op.kind == "linear":
            geo = linear_geometry(ip, op.name, machine)
            weight_bytes += strip_bytes(geo, geo["out"])
    memory = -(-weight_bytes // machine.dram_bytes_per_cycle)
    # a decode step advances every batch row by one token: its cycles per token are the makespan
    r = {"mode": "decode" if decode else "prefill", "tokens_per_run": tokens,
         "cycles_per_token": int(makespan) if decode else round(makespan / tokens, 1),
         "tokens_per_s": round(machine.clock_hz * tokens / makespan, 1),
         "memory_roofline": {"weight_bytes": int(weight_bytes), "cycles": int(memory),
                             "tokens_per_s": round(machine.clock_hz * tokens / memory, 1) if memory else None,
                             "makespan_over_roofline": round(makespan / memory, 3) if memory else None}}
    if decode:
        r["past_len"] = int(itf.past)
    else:
        r["cycles_per_prefill"] = int(makespan)
    return r


def compile_systolic(ip: IntegerProgram, out, machine: Machine, *, verify: bool = True, step=None) -> dict:
    """Lower, schedule and write the artifacts into ``out`` (an OutputFolder); returns the report."""
    def stage(msg):
        return step(msg) if step else nullcontext()
    with stage("lowering to microcode and scheduling"):
        low = lower(ip, machine)
    sched = low.schedule
    with stage("checking the schedule (dependencies, one task per unit and cycle)"):
        sched.verify()
    prog = low.program
    with stage("writing the weight image (the strips the LOAD_W instructions read)"):
        image = build_image(ip, machine)
        out.write_bytes("weights.bin", image)
    with stage(f"writing {len(prog)} instructions"):
        out.write_bytes("program.bin", encode(prog))
        out.write_text("program.lst", listing(prog, low.names, machine.as_dict(),
                                              limit=LISTING_LIMIT if len(prog) > LISTING_LIMIT else None))
        out.write_json("trace.json", sched.to_chrome_trace())
    layers = layer_report(ip, machine, low)
    counts = {OPS[o]: int(c) for o, c in enumerate(np.bincount(prog["op"], minlength=len(OPS))) if c}
    report = {"target": "systolic", "machine": machine.as_dict(), "instructions": int(len(prog)),
              "program_bytes": 16 * int(len(prog)), "per_opcode": counts,
              "schedule": {"makespan": int(sched.makespan), "critical_path": int(sched.critical_path),
                           "resource_bound": int(sched.resource_bound), "lower_bound": int(sched.lower_bound),
                           "ratio": round(float(sched.ratio), 4), "per_resource": sched.per_resource()},
              "layers": layers, "names": low.names}
    report.update(throughput(ip, machine, int(sched.makespan)))
    # the array's own floor: every weight block enters it at n codes per cycle (PRELOAD), every
    # token row streams once per block (MATMUL); at one token per step the preloads dominate
    is_mm = prog["op"] == OPS.index("MATMUL")
    report["array_roofline"] = {"preload_cycles": machine.n * counts.get("PRELOAD", 0),
                                "matmul_cycles": int(prog["t"][is_mm].astype(np.int64).sum())}
    report["array_roofline"]["cycles"] = sum(report["array_roofline"].values())
    report["capacity"] = _capacity(machine, layers)
    big = [r for r in layers if r["kind"] == "linear" and r["macs"] >= max(x["macs"] for x in layers) / 4]
    report["large_matmul_utilisation"] = round(min(r["utilisation"] for r in big), 4) if big else None
    out.write_json("schedule.json", {k: report[k] for k in ("machine", "schedule", "instructions")})
    if verify:
        with stage("ISA simulator vs golden on a sample window (whole model)"):
            feeds = sample_feeds(ip)
            st: dict = {}
            got = run_program(ip, machine, prog, feeds, st, image=image, makespan=int(sched.makespan))
            gold = Golden(ip).run(feeds)
            checked = int(sum(v.size for v in gold.values()))
            mismatches = int(sum(np.count_nonzero(got[k] != gold[k]) for k in gold))
            if mismatches:
                raise TapeoutError(f"internal check failed: the ISA simulator differs from golden in {mismatches} "
                                   f"of {checked} outputs (a compiler bug)")
            report["isa_vs_golden"] = {"checked": checked, "mismatches": mismatches, "cycles": st["cycles"]}
        for name, v in feeds.items():
            out.write_npy(f"sim/feeds/{name}.npy", v)
        for name, v in gold.items():
            out.write_npy(f"sim/golden/{name}.npy", v)
    out.write_json("report.json", report)
    return report


def _capacity(machine: Machine, layers: list[dict]) -> dict:
    """The machine's memories beside the largest per-layer need (which layer needs it)."""
    r = {}
    for mem, kib in (("spad", machine.spad_kib), ("acc", machine.acc_kib)):
        top = max(layers, key=lambda x: x[f"{mem}_bytes"], default=None)
        r[mem] = {"bytes": kib * 1024, "peak_bytes": top[f"{mem}_bytes"] if top else 0,
                  "peak_layer": top["layer"] if top else None}
    return r
