"""Lowering a quantised graph to systolic microcode, and its static schedule
(spec: docs/isa.md, "Compiler").

Every ``linear`` becomes, per output tile ``i`` of ``n`` rows: one ``LOAD_W`` of the weight
strip (codes, group scales, requantisation words) into one of two strip buffers (double
buffering: strip ``g`` waits for the ``REQUANT`` of strip ``g - 2``, its last reader), then per K tile ``k``
a ``PRELOAD`` of the ``n x kt`` weight block into the array and a ``MATMUL`` streaming the
``T`` tokens' MXINT elements through it (accumulating ``part * gs << sh`` into the output
tile's accumulator), then a ``REQUANT`` on the vector unit. The input is MXINT-quantised once
per linear by ``QUANT_X``. Every other op is one ``VEC`` instruction with golden's integer
semantics. The shared list scheduler (``compiler.schedule``) assigns issue cycles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import PLUMBING, Golden
from tapeout.compiler.schedule import Problem, Resource, list_schedule

from .isa import FLAG_FIRST, FLAG_LAST, INSTR, OP
from .machine import Machine

__all__ = ["Lowered", "lower", "linear_geometry", "VEC_COST"]

# ops that only change the view of a tensor cost nothing; gathers and Where move data
FREE_OPS = PLUMBING - {"Gather", "GatherElements", "GatherND", "Where"}
# vector-unit work per output element, in lane-cycles (docs/isa.md, "Cycle model")
VEC_COST = {"rmsnorm": 4, "layernorm": 6, "softmax": 4, "silu": 2, "gelu": 2, "gated_mlp": 3, "rope": 3}


@dataclass
class Lowered:
    program: np.ndarray          # INSTR rows, program order, issue cycles filled in
    names: list[str]             # layer index -> op name
    schedule: object             # compiler.schedule.Schedule over instructions and pseudo (drain) tasks
    durations: np.ndarray        # per instruction, cycles


def linear_geometry(gm: Golden, name: str, machine: Machine) -> dict:
    """Tiling of one linear: unit (MXINT/group unit), kt (K tile width), tile counts."""
    L = gm.linears[name]
    o_dim, i_dim = L.codes.shape
    unit = math.gcd(fx.mx_block(i_dim, gm.config.block), L.group_size)
    kt = math.gcd(machine.n, unit)                   # a K tile never straddles a unit
    return {"out": o_dim, "in": i_dim, "unit": unit, "kt": kt, "n_i": -(-o_dim // machine.n),
            "n_k": i_dim // kt, "group": L.group_size,
            "w_bits": max(2, int(np.abs(L.codes).max(initial=1)).bit_length() + 1)}


def _rows(gm: Golden, t: str) -> int:
    shape = gm.graph.tensors[t].shape
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _elems(gm: Golden, t: str) -> int:
    return int(np.prod(gm.graph.tensors[t].shape)) if t else 0


def vec_work(gm: Golden, op) -> int:
    """Lane-cycles of one VEC op (before dividing by the lanes)."""
    out = sum(_elems(gm, t) for t in op.outputs if t)
    if op.kind == "attention":
        q, k = gm.graph.tensors[op.inputs[0]].shape, gm.graph.tensors[op.inputs[1]].shape
        b, h, s, d = q
        return 2 * b * h * s * k[2] * d + 6 * b * h * s * k[2]        # two matmuls + softmax
    return out * VEC_COST.get(op.kind, 1)


class CycleModel:
    """Cycles of each instruction (docs/isa.md, "Cycle model"); shared by the compiler and the
    ISA simulator."""

    def __init__(self, gm: Golden, machine: Machine):
        self.gm, self.m = gm, machine
        self.geo: dict[int, dict] = {}

    def geometry(self, layer: int) -> dict:
        if layer not in self.geo:
            self.geo[layer] = linear_geometry(self.gm, self.gm.order[layer].name, self.m)
        return self.geo[layer]

    def dma(self, nbytes) -> int:
        return self.m.dram_latency + -(-int(nbytes) // self.m.dram_bytes_per_cycle)

    def __call__(self, opname: str, layer: int, i: int = 0, t: int = 1) -> int:
        m, lanes = self.m, self.m.vector_lanes
        if opname == "PRELOAD":
            return m.n
        if opname == "MATMUL":
            return t
        if opname in ("QUANT_X", "LOAD_W", "REQUANT"):
            geo = self.geometry(layer)
            rows_i = min(m.n, geo["out"] - i * m.n)
            if opname == "QUANT_X":
                return -(-t * geo["in"] // lanes) + 4
            if opname == "REQUANT":
                return -(-t * rows_i // lanes)
            return self.dma(rows_i * (geo["in"] * geo["w_bits"] / 8 + (geo["in"] // geo["group"]) * 2 + 8))
        op = self.gm.order[layer]
        if opname == "VEC":
            work = vec_work(self.gm, op) if op.kind not in FREE_OPS else 0
            return -(-work // lanes) + (1 if work else 0)
        if opname == "STORE":
            return sum(self.dma(4 * _elems(self.gm, o)) for o in self.gm.graph.outputs)
        raise ValueError(f"no cycle model for {opname}")


def lower(gm: Golden, machine: Machine, progress=None) -> Lowered:
    """Microcode and static schedule of ``gm``'s whole graph."""
    n = machine.n
    g = gm.graph
    names = [op.name for op in gm.order]
    p = Problem(resources=[Resource("dma_in"), Resource("array"), Resource("vector"), Resource("dma_out"),
                           Resource("pipe", machine.latency + 1)])
    rows: list[tuple] = []            # (op, buf, flags, layer, i, k, t0, t)
    durs: list[int] = []
    producers: dict[str, list[int]] = {}      # tensor -> tasks that write it
    task_of: list[int] = []           # instruction index -> task id (pseudo tasks have no instruction)
    cost = CycleModel(gm, machine)

    def emit(opname, resource, deps, layer, i=0, k=0, buf=0, flags=0, t=0):
        duration = cost(opname, layer, i, t)
        tid = p.add(opname, resource, int(duration), deps)
        task_of.append(tid)
        rows.append((OP[opname], buf, flags, layer, i, k, 0, t))
        durs.append(int(duration))
        return tid

    strip_last_read: list[int] = []   # last reader (REQUANT) of every weight strip, in strip order
    last_mm = None
    for layer, op in enumerate(gm.order):
        ins = [t for t in op.inputs if t and t in producers]
        deps = sorted({d for t in ins for d in producers[t]})
        if op.kind == "linear":
            geo = linear_geometry(gm, op.name, machine)
            T = _rows(gm, op.inputs[0])
            qx = emit("QUANT_X", "vector", deps, layer, t=T)
            req = []
            for i in range(geo["n_i"]):
                s = len(strip_last_read)
                war = [strip_last_read[s - 2]] if s >= 2 else []       # double buffering
                lw = emit("LOAD_W", "dma_in", war, layer, i=i, buf=s % 2, t=T)
                mm = last_mm                  # the array holds one weight block: in order
                for k in range(geo["n_k"]):
                    flags = (FLAG_FIRST if k == 0 else 0) | (FLAG_LAST if k == geo["n_k"] - 1 else 0)
                    pl = emit("PRELOAD", "array", [lw] + ([mm] if mm is not None else []), layer, i=i, k=k,
                              buf=s % 2, t=T)
                    mm = emit("MATMUL", "array", [pl, qx], layer, i=i, k=k, buf=s % 2, flags=flags, t=T)
                last_mm = mm
                # the array's fill/drain latency: a pseudo task, not an instruction
                drain = p.add("drain", "pipe", machine.latency, [mm])
                rq = emit("REQUANT", "vector", [drain], layer, i=i, buf=s % 2, t=T)
                strip_last_read.append(rq)    # REQUANT reads the strip's requantisation words
                req.append(rq)
            out_tasks = req
        else:
            T = _rows(gm, op.outputs[0]) if op.outputs and op.outputs[0] else 1
            out_tasks = [emit("VEC", "vector", deps, layer, t=min(T, 4095))]
        for t in op.outputs:
            if t:
                producers[t] = out_tasks
    # model outputs leave through the store DMA
    emit("STORE", "dma_out", sorted({d for t in g.outputs for d in producers.get(t, [])}), len(names) - 1)
    n_instr = len(rows)
    if progress:
        progress(f"scheduling {len(p)} tasks")
    sched = list_schedule(p)
    prog = np.zeros(n_instr, INSTR)
    arr = np.array(rows, np.int64).reshape(-1, 8)
    for j, f in enumerate(("op", "buf", "flags", "layer", "i", "k", "t0", "t")):
        prog[f] = arr[:, j]
    prog["cycle"] = np.asarray(sched.start)[np.array(task_of, np.int64)]
    return Lowered(prog, names, sched, np.array(durs, np.int64))
