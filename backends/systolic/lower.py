"""Lowering a quantised graph to systolic microcode, and its static schedule
(spec: docs/isa.md, "Compiler").

Every ``linear`` becomes, per output tile ``i`` of ``n`` rows: one ``LOAD_W`` of the weight
strip (codes, group scales, requantisation words) into one of two strip buffers (double
buffering: strip ``g`` waits for the ``REQUANT`` of strip ``g - 2``, its last reader), then per K tile ``k``
a ``PRELOAD`` of the ``n x kt`` weight block into the array and a ``MATMUL`` streaming the
``T`` tokens' MXINT elements through it (accumulating ``part * gs << sh`` into the output
tile's accumulator), then a ``REQUANT`` on the vector unit. The input is MXINT-quantised once
per linear by ``QUANT_X``.

Every ``attention`` runs its two matmuls on the array, per KV head group (the ``rep`` query
heads sharing one KV head are streamed through the same stationary tile): ``QUANT_A``
MXINT-quantises q, k, v; per key tile a ``PRELOAD`` of K (``buf=2``) and ``MATMUL``s streaming
the group's query elements accumulate the scores with golden's exponent alignment, a
``REQUANT`` (``buf=2``) scales them to Q16; ``SOFTMAX`` runs the integer softmax on the
vector unit; per output column tile a ``PRELOAD`` of V (``buf=3``, aligned exponents as row
shifts) and three ``MATMUL``s stream the probabilities' 7-bit digits; a ``REQUANT``
(``buf=3``) rounds the result. Every other op is one ``VEC`` instruction. The vector unit's
arithmetic is ``backends.vector`` (docs/golden.md's integer semantics). The shared list
scheduler (``compiler.schedule``) assigns issue cycles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import PLUMBING
from tapeout.compiler.program import IntegerProgram
from tapeout.compiler.schedule import Problem, Resource, list_schedule

from .isa import BUF_SCORES, BUF_VALUES, DIGIT_SHIFT, FLAG_FIRST, FLAG_LAST, INSTR, OP
from .machine import Machine

__all__ = ["Lowered", "lower", "linear_geometry", "tile_geometry", "code_bits", "strip_bytes", "attention_geometry",
           "footprint", "CycleModel", "VEC_COST", "DIGITS", "DIGIT_BITS"]

# ops that only change the view of a tensor cost nothing; gathers and Where move data
FREE_OPS = PLUMBING - {"Gather", "GatherElements", "GatherND", "Where"}
# vector-unit work per output element, in lane-cycles (docs/isa.md, "Cycle model")
VEC_COST = {"rmsnorm": 4, "layernorm": 6, "softmax": 4, "silu": 2, "gelu": 2, "gated_mlp": 3, "rope": 3}
# P.V streams the Q15 probabilities ([0, 2**15]) as three non-negative 7-bit digits (int8 lanes)
DIGIT_BITS, DIGITS = 7, 3
ACC_WORD = 6                 # bytes of one int48 accumulator word
ACC_WORD_PV = 8              # P.V accumulates up to 63 bits (golden's bound): two words' worth


@dataclass
class Lowered:
    program: np.ndarray          # INSTR rows, program order, issue cycles filled in
    names: list[str]             # layer index -> op name
    schedule: object             # compiler.schedule.Schedule over instructions and pseudo (drain) tasks
    durations: np.ndarray        # per instruction, cycles
    footprints: dict             # layer index -> {"spad": bytes, "acc": bytes} (linears and attentions)


def linear_geometry(ip: IntegerProgram, name: str, machine: Machine) -> dict:
    """Tiling of one linear: unit (MXINT/group unit), kt (K tile width), tile counts."""
    L = ip.linears[name]
    o_dim, i_dim = L.codes.shape
    return tile_geometry(ip.config.block, machine, o_dim, i_dim, L.group_size, code_bits(L.codes))


def code_bits(codes: np.ndarray) -> int:
    """Two's complement bits of a linear's codes in its weight strips (at least 2)."""
    return max(2, int(np.abs(codes).max(initial=1)).bit_length() + 1)


def tile_geometry(block: int, machine: Machine, o_dim: int, i_dim: int, group: int, w_bits: int) -> dict:
    """``linear_geometry`` from the strip table's fields alone (the ISA simulator's view: it
    knows a linear from its weight image, not from the program's linears)."""
    unit = fx.linear_unit(i_dim, group, block)
    kt = math.gcd(machine.n, unit)                   # a K tile never straddles a unit
    return {"out": o_dim, "in": i_dim, "unit": unit, "kt": kt, "n_i": -(-o_dim // machine.n),
            "n_k": i_dim // kt, "group": group, "w_bits": w_bits}


def attention_geometry(ip: IntegerProgram, op, machine: Machine) -> dict | None:
    """Tiling of one attention on the array, or None when its shapes fall outside it (then it
    runs as one VEC). Rows: the ``rep * S`` query rows of one KV head group; ``width``: the
    d-tile (scores' K tile and P.V's output tile), never straddling an MXINT block."""
    g = ip.graph
    if len(op.inputs) < 3 or not all(op.inputs[:3]):
        return None
    q, k, v = (tuple(g.tensors[t].shape) for t in op.inputs[:3])
    if not (len(q) == len(k) == len(v) == 4):
        return None
    B, H, S, d = q
    Hkv, T = k[1], k[2]
    if k[0] != B or v[:3] != k[:3] or k[3] != d or v[3] != d or H % Hkv:
        return None
    blk = fx.mx_block(d, ip.config.block)
    w = math.gcd(machine.n, blk)
    rep = H // Hkv
    return {"n": machine.n, "batch": B, "heads": H, "kv_heads": Hkv, "rep": rep, "queries": S, "keys": T, "d": d,
            "block": blk, "width": w, "rows": rep * S, "groups": B * Hkv, "n_kt": -(-T // machine.n),
            "n_dt": d // w}


def footprint(ip: IntegerProgram, op, machine: Machine) -> dict | None:
    """Peak scratchpad and accumulator bytes of one linear or attention (docs/isa.md, "Capacity").

    linear: two weight strips (double buffering) + its MXINT input + two Q16 output tiles (the
    outputs leave tile by tile) in the scratchpad; two int48 output tiles in the accumulator.
    attention: MXINT q, k, v + one group's Q16 scores and Q15 probabilities; two accumulator
    tiles (int48 scores, 8-byte P.V words)."""
    n, act = machine.n, ip.config.act_bits
    if op.kind == "linear":
        geo = linear_geometry(ip, op.name, machine)
        T = _rows(ip, op.inputs[0])
        strip = strip_bytes(geo, min(n, geo["out"]))
        x = -(-T * geo["in"] * act // 8) + T * (geo["in"] // geo["unit"])
        out = 2 * T * min(n, geo["out"]) * 4
        acc = 2 * T * min(n, geo["out"]) * ACC_WORD
        return {"spad": 2 * strip + x + out, "acc": acc, "strip": strip, "tile": acc // 2,
                "what": f"{T} tokens x {min(n, geo['out'])} columns x {ACC_WORD} B"}
    if op.kind == "attention":
        a = attention_geometry(ip, op, machine)
        if a is None:
            return None
        B, H, S, d, T = a["batch"], a["heads"], a["queries"], a["d"], a["keys"]
        nb = d // a["block"]
        mx = -(-(B * H * S + 2 * B * a["kv_heads"] * T) * d * act // 8) + (B * H * S + 2 * B * a["kv_heads"] * T) * nb
        spad = mx + a["rows"] * T * (4 + 2)
        tile = max(a["rows"] * n * ACC_WORD, a["rows"] * a["width"] * ACC_WORD_PV)
        return {"spad": spad, "acc": 2 * tile, "strip": 0, "tile": tile,
                "what": f"{a['rows']} query rows x {n} columns x {ACC_WORD} B"}
    return None


def strip_bytes(geo: dict, rows: int) -> int:
    """Bytes of one weight strip, per row: its codes at ``w_bits`` (the row padded to a byte),
    its group scales (2 B each) and its requantisation word (8 B); docs/isa.md, "Weight image"."""
    return int(rows * (-(-geo["in"] * geo["w_bits"] // 8) + -(-geo["in"] // geo["group"]) * 2 + 8))


def check_capacity(name: str, fp: dict, machine: Machine) -> None:
    """A layer whose tiles do not fit the machine's memories fails with one line naming it."""
    acc, spad = machine.acc_kib * 1024, machine.spad_kib * 1024
    if fp["acc"] > acc:
        raise TapeoutError(f"layer {name}: two accumulator tiles of {fp['what']} need {fp['acc']} B but "
                           f"acc_kib={machine.acc_kib} holds {acc} B (raise --machine acc_kib or shorten the sequence)")
    if fp["spad"] > spad:
        raise TapeoutError(f"layer {name}: needs {fp['spad']} B of scratchpad (weight strips of {fp['strip']} B "
                           f"double-buffered + activations in flight) but spad_kib={machine.spad_kib} holds {spad} B "
                           "(raise --machine spad_kib or shorten the sequence)")


def _rows(ip: IntegerProgram, t: str) -> int:
    shape = ip.graph.tensors[t].shape
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _elems(ip: IntegerProgram, t: str) -> int:
    return int(np.prod(ip.graph.tensors[t].shape)) if t else 0


def vec_work(ip: IntegerProgram, op) -> int:
    """Lane-cycles of one VEC op (before dividing by the lanes)."""
    out = sum(_elems(ip, t) for t in op.outputs if t)
    if op.kind == "attention":          # shapes the array tiling does not cover: all on the vector unit
        q, k = ip.graph.tensors[op.inputs[0]].shape, ip.graph.tensors[op.inputs[1]].shape
        b, h, s, d = q
        return 2 * b * h * s * k[2] * d + 6 * b * h * s * k[2]        # two matmuls + softmax
    return out * VEC_COST.get(op.kind, 1)


class CycleModel:
    """Cycles of each instruction (docs/isa.md, "Cycle model"); shared by the compiler and the
    ISA simulator."""

    def __init__(self, ip: IntegerProgram, machine: Machine, geometry=None):
        self.ip, self.m = ip, machine
        self.geo: dict[int, dict] = {}
        self.att: dict[int, dict] = {}
        # layer -> linear geometry; the ISA simulator's comes from the weight image
        self._linear = geometry or (lambda layer: linear_geometry(ip, ip.ops[layer].name, machine))

    def geometry(self, layer: int) -> dict:
        if layer not in self.geo:
            self.geo[layer] = self._linear(layer)
        return self.geo[layer]

    def attention(self, layer: int) -> dict:
        if layer not in self.att:
            self.att[layer] = attention_geometry(self.ip, self.ip.ops[layer], self.m)
        return self.att[layer]

    def dma(self, nbytes) -> int:
        return self.m.dram_latency + -(-int(nbytes) // self.m.dram_bytes_per_cycle)

    def __call__(self, opname: str, layer: int, i: int = 0, t: int = 1, buf: int = 0) -> int:
        m, lanes = self.m, self.m.vector_lanes
        if opname == "PRELOAD":
            return m.n
        if opname == "MATMUL":
            return t
        if opname in ("QUANT_A", "SOFTMAX") or (opname == "REQUANT" and self.ip.ops[layer].kind == "attention"):
            a = self.attention(layer)
            if opname == "QUANT_A":       # q, k, v to MXINT, the scores' minimum exponents
                q_el, kv_el = a["batch"] * a["heads"] * a["queries"] * a["d"], a["groups"] * a["keys"] * a["d"]
                scores = a["batch"] * a["heads"] * a["queries"] * a["keys"]
                work = 2 * (q_el + 2 * kv_el) + scores * (a["d"] // a["block"])
                return -(-work // lanes) + 4
            if opname == "SOFTMAX":       # mask + integer softmax + digit split of one group's rows
                return -(-a["rows"] * a["keys"] * (VEC_COST["softmax"] + 2) // lanes) + 1
            return -(-t * (m.n if buf == BUF_SCORES else a["width"]) // lanes)
        if opname in ("QUANT_X", "LOAD_W", "REQUANT"):
            geo = self.geometry(layer)
            rows_i = min(m.n, geo["out"] - i * m.n)
            if opname == "QUANT_X":
                return -(-t * geo["in"] // lanes) + 4
            if opname == "REQUANT":
                return -(-t * rows_i // lanes)
            return self.dma(strip_bytes(geo, rows_i))
        op = self.ip.ops[layer]
        if opname == "VEC":
            work = vec_work(self.ip, op) if op.kind not in FREE_OPS else 0
            return -(-work // lanes) + (1 if work else 0)
        if opname == "STORE":
            return sum(self.dma(4 * _elems(self.ip, o)) for o in self.ip.graph.outputs)
        raise ValueError(f"no cycle model for {opname}")


def lower(ip: IntegerProgram, machine: Machine, progress=None) -> Lowered:
    """Microcode and static schedule of ``ip``'s whole graph; raises TapeoutError when a layer's
    tiles do not fit the scratchpad or the accumulator (``footprint``)."""
    n = machine.n
    g = ip.graph
    names = [op.name for op in ip.ops]
    p = Problem(resources=[Resource("dma_in"), Resource("array"), Resource("vector"), Resource("dma_out"),
                           Resource("pipe", machine.latency + 1)])
    rows: list[tuple] = []            # (op, buf, flags, layer, i, k, t0, t)
    durs: list[int] = []
    producers: dict[str, list[int]] = {}      # tensor -> tasks that write it
    task_of: list[int] = []           # instruction index -> task id (pseudo tasks have no instruction)
    cost = CycleModel(ip, machine)
    footprints: dict[int, dict] = {}

    def emit(opname, resource, deps, layer, i=0, k=0, buf=0, flags=0, t=0):
        duration = cost(opname, layer, i, t, buf)
        tid = p.add(opname, resource, int(duration), deps)
        task_of.append(tid)
        rows.append((OP[opname], buf, flags, layer, i, k, 0, t))
        durs.append(int(duration))
        return tid

    strip_last_read: list[int] = []   # last reader (REQUANT) of every weight strip, in strip order
    acc_last_read: list[int] = []     # reader of every accumulator tile, in tile order (two tiles live)
    last_mm: list[int] = []           # the array holds one weight block: PRELOAD/MATMUL run in order

    def acc_war() -> list[int]:
        return [acc_last_read[-2]] if len(acc_last_read) >= 2 else []

    def array_tile(layer, i, ks, buf, src, streams, t):
        """PRELOAD + MATMULs over the K tiles ``ks`` into one accumulator tile, then its drain.
        ``streams(k)``: [(flags, extra deps)] of the MATMULs after the PRELOAD of K tile k."""
        first = True
        for k in ks:
            pl = emit("PRELOAD", "array", src + last_mm[-1:] + (acc_war() if first else []), layer, i=i, k=k,
                      buf=buf, t=t)
            for flags, deps in streams(k):
                last_mm[:] = [emit("MATMUL", "array", [pl] + last_mm[-1:] + deps, layer, i=i, k=k, buf=buf,
                                   flags=flags, t=t)]
            first = False
        return p.add("drain", "pipe", machine.latency, [last_mm[-1]])     # fill/drain: a pseudo task

    def lower_linear(layer, op, deps):
        geo = linear_geometry(ip, op.name, machine)
        T = _rows(ip, op.inputs[0])
        qx = emit("QUANT_X", "vector", deps, layer, t=T)
        req = []
        for i in range(geo["n_i"]):
            s = len(strip_last_read)
            war = [strip_last_read[s - 2]] if s >= 2 else []       # double buffering
            lw = emit("LOAD_W", "dma_in", war, layer, i=i, buf=s % 2, t=T)
            last = geo["n_k"] - 1
            drain = array_tile(layer, i, range(geo["n_k"]), s % 2, [lw], lambda k: [
                ((FLAG_FIRST if k == 0 else 0) | (FLAG_LAST if k == last else 0), [qx])], T)
            rq = emit("REQUANT", "vector", [drain], layer, i=i, buf=s % 2, t=T)
            strip_last_read.append(rq)    # REQUANT reads the strip's requantisation words
            acc_last_read.append(rq)
            req.append(rq)
        return req

    def lower_attention(layer, op, deps, a):
        R = a["rows"]
        qa = emit("QUANT_A", "vector", deps, layer, t=R)
        n_dt, n_kt = a["n_dt"], a["n_kt"]

        def scores(grp):                  # Q.K^T: K tiles stationary, the group's queries streamed
            reads = []
            for kt in range(n_kt):
                i = grp * n_kt + kt
                drain = array_tile(layer, i, range(n_dt), BUF_SCORES, [qa], lambda u: [
                    ((FLAG_FIRST if u == 0 else 0) | (FLAG_LAST if u == n_dt - 1 else 0), [])], R)
                rq = emit("REQUANT", "vector", [drain], layer, i=i, buf=BUF_SCORES, t=R)
                acc_last_read.append(rq)
                reads.append(rq)
            return emit("SOFTMAX", "vector", reads, layer, i=grp, t=R)

        def values(grp, sm):              # P.V: V tiles stationary, P's 7-bit digits streamed
            out = []
            for c in range(n_dt):
                i = grp * n_dt + c
                drain = array_tile(layer, i, range(n_kt), BUF_VALUES, [qa], lambda kk: [
                    ((FLAG_FIRST if kk == 0 and dg == 0 else 0) | (FLAG_LAST if kk == n_kt - 1 and dg == DIGITS - 1
                                                                    else 0) | dg << DIGIT_SHIFT, [sm])
                    for dg in range(DIGITS)], R)
                rq = emit("REQUANT", "vector", [drain], layer, i=i, buf=BUF_VALUES, t=R)
                acc_last_read.append(rq)
                out.append(rq)
            return out

        out, prev = [], None              # software pipeline: scores of group g+1 before P.V of group g
        for grp in range(a["groups"]):
            sm = scores(grp)
            if prev is not None:
                out += values(*prev)
            prev = (grp, sm)
        return out + values(*prev)

    for layer, op in enumerate(ip.ops):
        ins = [t for t in op.inputs if t and t in producers]
        deps = sorted({d for t in ins for d in producers[t]})
        fp = footprint(ip, op, machine)
        if fp is not None:
            check_capacity(op.name, fp, machine)
            footprints[layer] = fp
        if op.kind == "linear":
            out_tasks = lower_linear(layer, op, deps)
        elif op.kind == "attention" and fp is not None:
            out_tasks = lower_attention(layer, op, deps, cost.attention(layer))
        else:
            T = _rows(ip, op.outputs[0]) if op.outputs and op.outputs[0] else 1
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
    return Lowered(prog, names, sched, np.array(durs, np.int64), footprints)
