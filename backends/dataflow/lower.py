"""Lowering a quantised graph to the dataflow machine: chips, tasks, the static schedule, memory
placement, stream allocation and one instruction queue per unit (spec: docs/dataflow.md).

1. **Partition**: ops in graph order fill chips until a chip's weight and constant SRAM is full
   (a pipeline of chips; ``--machine chips=N`` balances over exactly N).
2. **Tasks** for the shared list scheduler (``compiler.schedule``): a ``linear`` is one MXINT
   quantisation on a VXM (``QX``) and, per weight block (``rows x cols`` of the matrix), an
   install (``IW``) and a multiply (``MM``) on one MXM. Blocks are dealt to the MXMs so each
   gets the same share; an MXM runs its blocks in program order and holds ``mxm_buffers``
   installed blocks (an install waits for the multiply that frees its buffer). Every other op
   is one task on a VXM (integer kernels) or an SXM (data movement); pure reshapes are views.
   Tensors crossing chips go through the C2C slice (``TX``; the next chip's ``RX`` is exactly
   ``link_latency`` later). Stream and pipeline latencies are "flight" pseudo tasks, so every
   operand is in its bank before its reader issues.
3. **Placement** after scheduling: every read gets its own copy of the value (a producer's
   ``SEND`` is captured by every copy's bank at once), placed in the nearest bank whose read and
   write ports are free at those exact cycles and which has room while the copy is live.
   Activations use the ``act_banks`` nearest the compute slices, weights and constants the rest.
4. **Streams**: every transfer occupies one stream from its first vector leaving the producer to
   its last vector reaching the farthest reader; streams are dealt by interval colouring.
"""
from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import PLUMBING
from tapeout.compiler.program import IntegerProgram
from tapeout.compiler.schedule import Problem, Resource, list_schedule

from .isa import DF, FLAG_FIRST, FLAG_LAST, OP, WHOLE
from .machine import Machine

__all__ = ["Plan", "lower", "linear_blocks", "memory_map", "unit_slice", "is_immediate", "is_table_gather", "VIEWS"]

VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}     # no data moves
IMMEDIATE_ELEMS = 64            # constants this small ride in the instruction (shapes, axes, eps)
VEC_COST = {"rmsnorm": 4, "layernorm": 6, "softmax": 4, "silu": 2, "gelu": 2, "gated_mlp": 3, "rope": 3}
BIG = 1 << 62


def nvec(nbytes: int, lanes: int) -> int:
    return max(1, -(-int(nbytes) // lanes))


def is_immediate(g, t: str) -> bool:
    """A constant small enough to ride in the instruction instead of being streamed."""
    return t in g.constants and g.constants[t].size <= IMMEDIATE_ELEMS


def is_table_gather(g, op) -> bool:
    """A Gather of rows of a constant table by a graph input (token ids): an indexed read."""
    return op.kind == "Gather" and op.inputs[0] in g.constants and op.inputs[1] in g.inputs \
        and op.attr("axis", 0) == 0


def linear_blocks(ip: IntegerProgram, name: str, m: Machine) -> dict:
    """Weight blocks of one linear: ``rows`` (a multiple of the MXINT/group unit dividing the
    input width, <= mxm_k) by ``cols`` (dividing the output width into a multiple of the MXM
    count when it can, <= mxm_n) and the bytes of one block: codes stored as indices into the
    layer's alphabet (4 bits for nvfp4/mxfp4/int4, 8 for int8; w3o6 stores its 6-bit outliers
    unpacked at the alphabet's width) plus the group scales; the last K block also carries the
    requantisation words (multiplier, shift, bias: 10 bytes per output)."""
    L = ip.linears[name]
    o_dim, i_dim = L.codes.shape
    unit = fx.linear_unit(i_dim, L.group_size, ip.config.block)
    rows = max(r for r in range(unit, min(m.mxm_k, i_dim) + 1, unit) if i_dim % r == 0)
    even = [c for c in range(1, min(m.mxm_n, o_dim) + 1) if o_dim % c == 0 and (o_dim // c) % m.mxm == 0]
    cols = max(even) if even else min(m.mxm_n, o_dim)
    n_i, n_k = -(-o_dim // cols), i_dim // rows
    codes = np.asarray(L.codes).ravel()
    lo = int(codes.min(initial=0))
    distinct = int(np.count_nonzero(np.bincount(codes.astype(np.int64) - lo)))
    w_bits = max(1, math.ceil(math.log2(max(distinct, 2))))      # codes stored as indices of their alphabet
    gs_bits = max(1, int(np.abs(L.group_scale).max(initial=1)).bit_length() + 1)
    # the groups one K block touches: ceil(rows / group), one more when blocks straddle groups
    gpb = max(((k + 1) * rows - 1) // L.group_size - (k * rows) // L.group_size + 1 for k in range(n_k))
    block = rows * cols * w_bits + cols * gpb * gs_bits                   # bits (banks.py packs them)
    return {"out": o_dim, "in": i_dim, "unit": unit, "rows": rows, "cols": cols, "n_i": n_i, "n_k": n_k,
            "group": L.group_size, "gs_per_block": gpb, "w_bits": w_bits, "gs_bits": gs_bits,
            "block_bytes": -(-block // 8), "req_bytes": 10 * cols, "blocks": n_i * n_k}


@dataclass
class Task:
    kind: str                   # vxm | sxm | iw | mm | tx | qx (a vxm task)
    chip: int
    layer: int
    reads: list                 # [(value key, vectors, region, operand, delay)]: operand parts arrive
                                # ``delay`` cycles after the issue; region = K block (xq) or output block
    outs: list                  # [(value key, vectors, region)] sent one after another
    busy: int                   # cycles the unit is occupied
    out_off: int = 0            # first output vector leaves at issue + out_off
    block: int = WHOLE
    flags: int = 0
    mxm: int = -1
    deps: list = field(default_factory=list)     # ordering edges besides the data (MXM order, buffers)
    dst_chip: int = -1          # tx: the chip receiving
    tid: int = -1
    issue: int = 0
    unit: str = ""


@dataclass
class Copy:
    id: int
    chip: int
    key: tuple                  # the value it holds
    nbytes: int
    resident: bool              # in the load image (weights, constants, graph inputs)
    writes: list = field(default_factory=list)     # (producer unit, send cycle, vectors, region)
    reads: list = field(default_factory=list)      # (reader unit, receive cycle, vectors, region)
    gather: str = ""            # an indexed read: rows picked by this resident index tensor
    bank: int = -1
    addr: int = -1
    stripes: list = field(default_factory=list)    # banks of a copy larger than one bank
    host: bool = False          # a model output, read by the host after the last instruction
    part: int | None = None     # the output block of a linear this copy holds (None: all of it)


@dataclass
class Plan:
    machine: Machine
    chips: int
    chip_of: list[int]                  # per op
    names: list[str]
    tasks: list[Task]
    copies: list[Copy]
    queues: dict[str, np.ndarray]
    schedule: object                    # compiler.schedule.Schedule over tasks + flights
    makespan: int                       # last instruction's end (cycles)
    streams_used: dict[int, int]
    geometry: dict[str, dict]
    chip_bytes: list[dict]


def _offsets(m: Machine) -> dict[str, int]:
    # a unit issues ``offset`` cycles after its task's scheduled start, so every READ feeding it
    # (issued ``hop`` earlier) issues at or after the start: constants and weights may sit in
    # any bank, activations only in the act pool
    return {"vxm": m.reach_all, "sxm": m.reach_all, "qx": m.reach_all, "iw": m.reach_all,
            "mm": m.reach_act, "tx": m.reach_act}


class _Builder:
    def __init__(self, ip: IntegerProgram, m: Machine):
        self.ip, self.m, self.g = ip, m, ip.graph
        self.off = _offsets(m)
        self.H = m.reach_act

    # --- sizes ------------------------------------------------------------------------------
    def elems(self, t: str) -> int:
        return int(np.prod(self.g.tensors[t].shape))

    def v32(self, t: str) -> int:
        return nvec(4 * self.elems(t), self.m.lanes)

    def is_immediate(self, t: str) -> bool:
        return is_immediate(self.g, t)

    def base(self, t: str) -> str:
        return self.alias.get(t, t)

    # --- partition --------------------------------------------------------------------------
    def partition(self) -> tuple[list[int], int]:
        ip, m = self.ip, self.m
        self.geo = {op.name: linear_blocks(ip, op.name, m) for op in ip.ops if op.kind == "linear"}
        need = []
        seen: set[str] = set()
        for op in ip.ops:
            b = 0
            if op.kind == "linear":
                geo = self.geo[op.name]
                b = geo["blocks"] * geo["block_bytes"] + geo["n_i"] * geo["req_bytes"]
            elif op.kind not in VIEWS:
                for t in op.inputs:
                    if t and t in self.g.constants and not self.is_immediate(t) and t not in seen:
                        seen.add(t)
                        b += 4 * self.g.constants[t].size
            need.append(b)
        cap = m.store_bytes
        for op, b in zip(ip.ops, need):
            if b > cap:
                raise TapeoutError(f"dataflow: op {op.name} needs {b / 2**20:.1f} MiB of weights/constants, more "
                                   f"than one chip's {cap / 2**20:.1f} MiB outside the activation banks; raise "
                                   "--machine bank_kib or mem_banks", node=op.name, op=op.kind)
        total = sum(need)
        if m.chips:
            target, chips = total / m.chips, m.chips
        else:
            target, chips = cap, None
        chip_of, c, used = [], 0, 0
        for b in need:
            if used + b > (cap if chips is None else min(cap, target * 1.0001)) and used > 0 \
                    and (chips is None or c + 1 < chips):
                c, used = c + 1, 0
            used += b
            chip_of.append(c)
        n_chips = chips or (c + 1)
        if chips and c + 1 < chips:
            raise TapeoutError(f"dataflow: --machine chips={m.chips} leaves chips without work: the "
                               f"{len(need)} ops of this model fill at most {c + 1} chips at balanced weights; "
                               f"use chips <= {c + 1} (or 0: as many as the weights need)")
        if chips:
            per = defaultdict(int)
            for ci, b in zip(chip_of, need):
                per[ci] += b
            if max(per.values()) > cap:
                raise TapeoutError(f"dataflow: chips={m.chips} cannot hold {total / 2**20:.1f} MiB of weights "
                                   f"and constants ({cap / 2**20:.1f} MiB per chip)")
        return chip_of, n_chips

    # --- tasks ------------------------------------------------------------------------------
    def build(self, progress=None) -> None:
        ip, m, g = self.ip, self.m, self.g
        self.alias: dict[str, str] = {}
        self.chip_of, self.n_chips = self.partition()
        res = []
        for c in range(self.n_chips):
            res += [Resource(f"c{c}.vxm", m.vxm), Resource(f"c{c}.sxm", m.sxm), Resource(f"c{c}.c2c")]
            for u in range(m.mxm):
                res += [Resource(f"c{c}.mxm{u}.w"), Resource(f"c{c}.mxm{u}.x")]
        res.append(Resource("flight", 1 << 16))
        self.p = Problem(res)
        self.tasks: list[Task] = []
        self.by_tid: dict[int, Task] = {}
        self.producers: dict[tuple, list[Task]] = defaultdict(list)   # value key -> producing tasks
        self.flights: dict[tuple, int] = {}                           # (producer tid, consumer kind) -> pseudo
        self.mxm_last_mm = {}                                         # (chip, u) -> last MM task
        self.mxm_last_iw = {}
        self.mxm_mm_hist = defaultdict(list)                          # (chip, u) -> MM tids in order
        self.mxm_next = defaultdict(int)                              # (chip) -> next MXM for uneven linears
        self.routes: dict[tuple, tuple] = {}                          # (tensor, chip) -> value key there
        for layer, op in enumerate(ip.ops):
            chip = self.chip_of[layer]
            if op.kind in VIEWS:
                src = op.inputs[0]
                self.alias[op.outputs[0]] = self.base(src)
                continue
            if op.kind == "linear":
                self.linear(layer, op, chip)
                continue
            reads, j = [], 0
            for t in op.inputs:
                if not t or self.is_immediate(t):
                    continue
                reads += self.operand(t, chip, j)
                j += 1
            if is_table_gather(g, op):         # an indexed read of only the rows the token ids pick
                t0, ids = op.inputs[0], op.inputs[1]
                rows = self.elems(ids) * nvec(4 * int(np.prod(g.tensors[t0].shape[1:])), m.lanes)
                reads = [(("gather", t0, ids, chip), rows, WHOLE, 0, 0)]
            outs = [(("t", o, chip), self.v32(o), WHOLE) for o in op.outputs if o]
            n_in = max((r[1] + r[4] for r in reads), default=0)
            if op.kind in PLUMBING:
                kind, work, lat = "sxm", n_in, m.sxm_latency
            else:
                kind, lat = "vxm", m.vxm_latency
                work = nvec(self._vec_work(op), m.lanes)
            out_off = max(n_in, work) + lat
            self.add_task(Task(kind, chip, layer, reads, outs, out_off + sum(o[1] for o in outs), out_off))
        # the host reads every model output from the chip that produced it, after the last instruction
        self.host_chip = {t: self.home(t) for t in g.outputs}

    def _vec_work(self, op) -> int:
        g = self.g
        out = sum(self.elems(t) for t in op.outputs if t)
        if op.kind == "attention":
            b, h, s, d = g.tensors[op.inputs[0]].shape
            t = g.tensors[op.inputs[1]].shape[2]
            return 2 * b * h * s * t * d + 6 * b * h * s * t
        return out * VEC_COST.get(op.kind, 1)

    def operand(self, t: str, chip: int, j: int) -> list[tuple]:
        """Read entries of operand ``j`` (tensor ``t``) for a reader on ``chip``: a linear's output
        arrives as its column blocks one after another (each block is its own copy, so the MXMs
        that write them never share a bank's write port), anything else whole."""
        key = self.value(t, chip)
        prods = self.producers.get(key, [])
        if prods and prods[0].kind == "mm":
            out, delay = [], 0
            for p in prods:
                _, n, region = p.outs[0]
                out.append((key, n, region, j, delay))
                delay += n
            return out
        return [(key, self.v32(self.base(t)) if key[0] != "const" and key[0] != "constv" else self.v32(t),
                 WHOLE, j, 0)]

    def home(self, t: str) -> int:
        b = self.base(t)
        return max((c for c in range(self.n_chips) if ("t", b, c) in self.producers), default=self.n_chips - 1)

    def value(self, t: str, chip: int) -> tuple:
        """The value key of tensor ``t`` for a reader on ``chip`` (routing it there if needed)."""
        b = self.base(t)
        if b in self.g.constants:
            return ("const", b, chip) if b == t else ("constv", t, b, chip)
        if b in self.g.inputs:
            return ("input", b, chip)
        key = ("t", b, chip)
        if key in self.producers:
            return key
        src = max((c for c in range(chip) if ("t", b, c) in self.producers), default=None)
        if src is None:
            raise TapeoutError(f"dataflow: tensor {b!r} is read before any op produces it", node=b)
        for c in range(src, chip):     # forward chip to chip along the pipeline
            k_src, k_dst = ("t", b, c), ("t", b, c + 1)
            if k_dst in self.producers:
                continue
            n = self.v32(b)
            d = max(n, -(-4 * self.elems(b) // self.m.link_bytes_per_cycle))
            reads = self.operand(b, c, 0) if c == src else [(k_src, n, WHOLE, 0, 0)]
            last = max(r[4] for r in reads)
            task = Task("tx", c, self.producers[k_src][0].layer, reads, [(k_dst, n, WHOLE)],
                        busy=last + d, out_off=last + self.m.link_latency + d, dst_chip=c + 1)
            self.add_task(task)
        return key

    def linear(self, layer: int, op, chip: int) -> None:
        m, g = self.m, self.g
        geo = self.geo[op.name]
        x = op.inputs[0]
        T = self.elems(x) // geo["in"]
        xq_vec = nvec(T * geo["in"] + T * (geo["in"] // geo["unit"]), m.lanes)
        qx = Task("qx", chip, layer, self.operand(x, chip, 0), [(("xq", layer, chip), xq_vec, WHOLE)], 0)
        qx.out_off = max(max(r[1] + r[4] for r in qx.reads), nvec(2 * T * geo["in"], m.lanes)) + m.vxm_latency
        qx.busy = qx.out_off + xq_vec
        self.add_task(qx)
        # deal the blocks: output block i -> MXM, evenly when n_i is a multiple of mxm
        n_i, n_k = geo["n_i"], geo["n_k"]
        start = self.mxm_next[chip]
        per_in = nvec(geo["rows"], m.lanes) * T + nvec(T * (geo["rows"] // geo["unit"]), m.lanes)
        out_vec = nvec(4 * T * geo["cols"], m.lanes)
        for i in range(n_i):
            u = (start + i) % m.mxm
            for k in range(n_k):
                j = i * n_k + k
                last = k == n_k - 1
                iw_vec = nvec(geo["block_bytes"] + (geo["req_bytes"] if last else 0), m.lanes)
                iw = Task("iw", chip, layer, [(("w", layer, j, chip), iw_vec, WHOLE, 0, 0)], [], iw_vec, block=j, mxm=u)
                hist = self.mxm_mm_hist[(chip, u)]
                iw.deps = ([hist[-m.mxm_buffers]] if len(hist) >= m.mxm_buffers else []) + \
                    ([self.mxm_last_iw[(chip, u)]] if (chip, u) in self.mxm_last_iw else [])
                iw.flags = len(hist) % m.mxm_buffers
                self.add_task(iw)
                self.mxm_last_iw[(chip, u)] = iw.tid
                flags = (FLAG_FIRST if k == 0 else 0) | (FLAG_LAST if last else 0)
                outs = [(("t", op.outputs[0], chip), out_vec, i)] if last else []
                mm = Task("mm", chip, layer, [(("xq", layer, chip), per_in, k, 0, 0)], outs,
                          per_in + (out_vec if last else 0), per_in + m.mxm_latency, block=j, flags=flags, mxm=u)
                # the install must have landed: IW issues reach_all after its start, MM reach_act
                lag = self.off["iw"] + iw.busy - self.off["mm"]
                dep = self.p.add("flight", "flight", max(0, lag - iw.busy), [iw.tid]) if lag > iw.busy else iw.tid
                mm.deps = [dep] + ([self.mxm_last_mm[(chip, u)]] if (chip, u) in self.mxm_last_mm else [])
                self.add_task(mm)
                self.mxm_last_mm[(chip, u)] = mm.tid
                hist.append(mm.tid)
        self.mxm_next[chip] = (start + n_i) % m.mxm

    def add_task(self, task: Task) -> None:
        deps = list(task.deps)
        for key, *_ in task.reads:
            for prod in self.producers.get(key, []):
                deps.append(self.flight(prod, task.kind))
        res = {"vxm": "vxm", "qx": "vxm", "sxm": "sxm", "tx": "c2c"}.get(task.kind)
        res = f"c{task.chip}.{res}" if res else f"c{task.chip}.mxm{task.mxm}.{'w' if task.kind == 'iw' else 'x'}"
        task.tid = self.p.add(f"{task.kind}:{self.ip.ops[task.layer].name}", res, task.busy, sorted(set(deps)),
                              layer=self.ip.ops[task.layer].name)
        self.tasks.append(task)
        self.by_tid[task.tid] = task
        for key, _, _ in task.outs:
            self.producers[key].append(task)

    def flight(self, prod: Task, consumer_kind: str) -> int:
        """A pseudo task covering the producer's output latency and the stream hops, so a
        consumer scheduled after it finds the value in its bank."""
        key = (prod.tid, consumer_kind)
        if key not in self.flights:
            tail = prod.out_off + sum(o[1] for o in prod.outs)
            lag = self.off[prod.kind] - self.off[consumer_kind] + tail + 2 * self.H
            self.flights[key] = self.p.add("flight", "flight", max(0, lag - prod.busy), [prod.tid]) \
                if lag > prod.busy else prod.tid
        return self.flights[key]


def lower(ip: IntegerProgram, m: Machine, progress=None) -> Plan:
    b = _Builder(ip, m)
    b.build(progress)
    if progress:
        progress(f"scheduling {len(b.p)} tasks")
    sched = list_schedule(b.p)
    for t in b.tasks:
        t.issue = int(sched.start[t.tid]) + b.off[t.kind]
        if t.kind in ("vxm", "qx"):
            t.unit = f"c{t.chip}.vxm{int(sched.unit[t.tid])}"
        elif t.kind == "sxm":
            t.unit = f"c{t.chip}.sxm{int(sched.unit[t.tid])}"
        elif t.kind == "tx":
            t.unit = f"c{t.chip}.c2c0"
        else:
            t.unit = f"c{t.chip}.mxm{t.mxm}"
    copies = _copies(b)
    _place(b, copies)
    queues, streams_used, makespan = _emit(b, copies)
    chip_bytes = []
    for c in range(b.n_chips):
        mine = [cp for cp in copies if cp.chip == c]
        chip_bytes.append({"weights": sum(cp.nbytes for cp in mine if cp.key[0] == "w"),
                           "constants": sum(cp.nbytes for cp in mine if cp.key[0] in ("const", "constv", "gather")),
                           "activations_peak": _peak_live(mine)})
    return Plan(m, b.n_chips, b.chip_of, [op.name for op in ip.ops], b.tasks, copies, queues, sched, makespan,
                streams_used, b.geo, chip_bytes)


# --- copies and placement ---------------------------------------------------------------------
def _copies(b: _Builder) -> list[Copy]:
    """Copies of every value: as few as its reads need (reads of one copy never overlap), plus
    one per model output (block) for the host."""
    ip, g, m = b.ip, b.g, b.m
    copies: list[Copy] = []
    index: dict[tuple, Copy] = {}

    def nbytes_of(key) -> tuple[int, bool, str]:
        kind = key[0]
        if kind == "w":
            geo = b.geo[ip.ops[key[1]].name]
            last = key[2] % geo["n_k"] == geo["n_k"] - 1
            return geo["block_bytes"] + (geo["req_bytes"] if last else 0), True, ""
        if kind == "xq":
            geo = b.geo[ip.ops[key[1]].name]
            T = b.elems(ip.ops[key[1]].inputs[0]) // geo["in"]
            return T * geo["in"] + T * (geo["in"] // geo["unit"]), False, ""
        if kind == "gather":
            return 4 * g.constants[key[1]].size, True, key[2]
        if kind in ("const", "constv"):
            return 4 * g.constants[key[-2]].size, True, ""
        if kind == "input":
            return 4 * b.elems(key[1]), True, ""
        return 4 * b.elems(key[1]), False, ""

    def new(key) -> Copy:
        nbytes, resident, gather = nbytes_of(key)
        c = Copy(len(copies), key[-1], key, nbytes, resident, gather=gather)
        copies.append(c)
        return c

    # the reads of one value (or one output block of a linear) share copies as long as they
    # never overlap: interval colouring, with each read widened by the longest hop so no two
    # reads of one copy can meet at its bank's read port whichever bank it lands in
    requests: dict[tuple, list] = defaultdict(list)
    for t in b.tasks:
        for j, (key, n, region, _, delay) in enumerate(t.reads):
            part = region if key[0] == "t" and region != WHOLE else None
            # an MXINT input: one copy per MXM; its reads are one after another and all cross
            # the same hop, so they cannot meet at the bank
            group = t.unit if key[0] == "xq" else None
            wide = 0 if group else m.reach_act if key[0] == "t" else m.reach_all
            requests[(key, part, group)].append((t.issue + delay - wide, t.issue + delay + n, t, j, n, region, delay))
    b.read_copy: dict[tuple, Copy] = {}          # (task tid, read index) -> copy
    for (key, part, _), reqs in requests.items():
        reqs.sort(key=lambda r: (r[0], r[1], r[2].tid, r[3]))
        free: list[tuple[int, int]] = []          # (end of last read, copy id)
        for s0, e0, t, j, n, region, delay in reqs:
            if free and free[0][0] <= s0:
                c = copies[heapq.heappop(free)[1]]
            else:
                c = new(key)
                c.part = part
                if part is not None:
                    c.nbytes = n * m.lanes          # one column block
            c.reads.append((t.unit, t.issue + delay, n, region))
            b.read_copy[(t.tid, j)] = c
            heapq.heappush(free, (e0, c.id))
    for name in g.outputs:
        key = b.value(name, b.host_chip[name])
        for _, n, region, _, _ in b.operand(name, b.host_chip[name], 0):
            c = new(key)
            c.host = True
            if key[0] == "t" and region != WHOLE:
                c.part = region
                c.nbytes = n * m.lanes
    by_key = defaultdict(list)
    for c in copies:
        by_key[c.key].append(c)
    for t in b.tasks:
        off = t.out_off
        src = f"c{t.dst_chip}.c2c0" if t.kind == "tx" else t.unit
        for key, n, region in t.outs:
            for c in by_key.get(key, []):
                if c.part in (None, region):
                    c.writes.append((src, t.issue + off, n, region))
            off += n
    b.copies_of = by_key
    for c in copies:
        if not c.resident and not c.writes:
            raise TapeoutError(f"dataflow: internal error: copy of {c.key} is read but never written")
    return copies


def memory_map(copies: list[Copy]) -> list[dict]:
    """The SRAM map (``memory.json``): every copy's value, chip, bank(s), address and size."""
    return [{"id": c.id, "chip": c.chip, "value": list(c.key[:-1]), "bank": c.bank,
             "stripes": list(c.stripes), "addr": c.addr, "bytes": c.nbytes, "resident": c.resident,
             "host": c.host, "gather": c.gather, "part": c.part, "regions": len({w[3] for w in c.writes})}
            for c in copies]


def unit_slice(unit: str) -> tuple[str, int]:
    kind = unit.split(".", 1)[1].rstrip("0123456789")
    return kind, int(unit[len(unit.split(".", 1)[0]) + 1 + len(kind):])


class _Ports:
    """Busy intervals of one port: sorted, non-overlapping."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def free(self, s: int, e: int) -> bool:
        i = bisect.bisect_right(self.starts, s)
        if i > 0 and self.ends[i - 1] > s:
            return False
        return not (i < len(self.starts) and self.starts[i] < e)

    def take(self, s: int, e: int) -> None:
        i = bisect.bisect_right(self.starts, s)
        self.starts.insert(i, s)
        self.ends.insert(i, e)


def _place(b: _Builder, copies: list[Copy]) -> None:
    m = b.m
    bank_bytes = m.bank_kib * 1024
    ports: dict[tuple, _Ports] = defaultdict(_Ports)            # (chip, bank, "r"/"w")
    live: dict[tuple, list] = defaultdict(list)                 # (chip, bank) -> [(addr, size, t0, t1)]
    act, store = m.act_pool, m.store_pool

    def intervals(c: Copy, bank: int):
        bs = ("mem", bank)
        w = [(cyc + m.hop(unit_slice(u), bs), n) for u, cyc, n, _ in c.writes]
        r = [(cyc - m.hop(bs, unit_slice(u)), n) for u, cyc, n, _ in c.reads]
        return w, r

    def first_event(c: Copy) -> int:
        return min([cyc for _, cyc, _, _ in c.writes] + [cyc for _, cyc, _, _ in c.reads] + [BIG])

    order = sorted(copies, key=lambda c: (not c.resident, first_event(c), c.id))
    ring = sorted(store, key=lambda bk: m.pos[("mem", bk)])
    for c in order:
        if c.nbytes > bank_bytes:          # a table bigger than a bank: striped over neighbours
            _place_striped(c, ring, ports, live, intervals, bank_bytes, m)
            continue
        anchor = (c.reads or c.writes)[0][0] if (c.reads or c.writes) else f"c{c.chip}.vxm0"
        here = unit_slice(anchor)
        near = lambda bk: (m.hop(here, ("mem", bk)), bk)          # noqa: E731
        # activations only in the act pool (their hop bounds the flights); the load image in the
        # other banks first, then in what the activations leave free
        cands = sorted(act, key=near) if not c.resident else sorted(store, key=near) + sorted(act, key=near)
        size = -(-c.nbytes // m.lanes) * m.lanes
        placed = False
        for bank in cands:
            w, r = intervals(c, bank)
            if any(s < 0 for s, _ in r):
                continue
            if not all(ports[(c.chip, bank, "w")].free(s, s + n) for s, n in w):
                continue
            if not all(ports[(c.chip, bank, "r")].free(s, s + n) for s, n in r):
                continue
            # overlapping reads/writes of one copy are checked pairwise too
            if _self_overlap(w) or _self_overlap(r):
                continue
            t0 = 0 if c.resident else min(s for s, _ in w)
            t1 = BIG if (c.resident or c.host) else max(s + n for s, n in r)
            addr = _fit(live[(c.chip, bank)], size, t0, t1, bank_bytes)
            if addr is None:
                continue
            for s, n in w:
                ports[(c.chip, bank, "w")].take(s, s + n)
            for s, n in r:
                ports[(c.chip, bank, "r")].take(s, s + n)
            live[(c.chip, bank)].append((addr, size, t0, t1))
            c.bank, c.addr = bank, addr
            placed = True
            break
        if not placed:
            what = "activation" if not c.resident else "weight/constant"
            raise TapeoutError(f"dataflow: no bank of chip {c.chip} can hold the {what} copy of {c.key[:2]} "
                               f"({c.nbytes} bytes) with free ports at its cycles; raise --machine "
                               f"{'act_banks' if not c.resident else 'bank_kib'}")


def _place_striped(c: Copy, ring, ports, live, intervals, bank_bytes: int, m: Machine) -> None:
    """Resident copies larger than a bank fill ``k`` neighbouring banks; a read of one reserves
    the read port of every stripe (an indexed read may land in any of them)."""
    k = -(-c.nbytes // bank_bytes)
    part = -(-(-(-c.nbytes // k)) // m.lanes) * m.lanes
    for w0 in range(len(ring) - k + 1):
        banks = ring[w0:w0 + k]
        _, r = intervals(c, banks[0])
        if any(s < 0 for s, _ in r) or _self_overlap(r):
            continue
        if not all(ports[(c.chip, bk, "r")].free(s, s + n) for bk in banks for s, n in r):
            continue
        addrs = [_fit(live[(c.chip, bk)], part, 0, BIG, bank_bytes) for bk in banks]
        if any(a is None or a != addrs[0] for a in addrs):
            continue
        for bk in banks:
            for s, n in r:
                ports[(c.chip, bk, "r")].take(s, s + n)
            live[(c.chip, bk)].append((addrs[0], part, 0, BIG))
        c.bank, c.addr, c.stripes = banks[0], addrs[0], banks
        return
    raise TapeoutError(f"dataflow: no {k} neighbouring banks of chip {c.chip} can hold {c.key[1]!r} "
                       f"({c.nbytes / 2**20:.1f} MiB); raise --machine bank_kib or mem_banks")


def _self_overlap(iv: list) -> bool:
    iv = sorted(iv)
    return any(a[0] + a[1] > b[0] for a, b in zip(iv, iv[1:]))


def _fit(allocs: list, size: int, t0: int, t1: int, cap: int) -> int | None:
    busy = sorted((a, a + s) for a, s, u0, u1 in allocs if u0 < t1 and t0 < u1)
    addr = 0
    for a, e in busy:
        if a - addr >= size:
            break
        addr = max(addr, e)
    return addr if addr + size <= cap else None


def _peak_live(copies: list[Copy]) -> int:
    ev = []
    for c in copies:
        if c.resident or not c.writes:
            continue
        t0 = min(cyc for _, cyc, _, _ in c.writes)
        t1 = max([cyc + n for _, cyc, n, _ in c.reads] + [t0 + 1]) if not c.host else BIG
        ev += [(t0, c.nbytes), (t1, -c.nbytes)]
    peak = cur = 0
    for _, d in sorted(ev):
        cur += d
        peak = max(peak, cur)
    return peak


# --- instructions and streams -----------------------------------------------------------------
def _emit(b: _Builder, copies: list[Copy]):
    m = b.m
    rows: dict[str, list] = defaultdict(list)     # unit -> [record tuples]
    transfers: dict[int, list] = defaultdict(list)  # chip -> [(start, end, [(unit, row index)])]
    unit_ids: dict[str, int] = {}
    for c in range(b.n_chips):
        for kind, i in m.slices:
            unit_ids[f"c{c}.{kind}{i}"] = len(unit_ids)

    def put(unit, cycle, op, n, layer=0, a=0, bb=WHOLE, addr=0, flags=0, peer=0xFFFF):
        rows[unit].append([cycle, OP[op], flags, 0, peer, n, layer, a, bb, addr])
        return (unit, len(rows[unit]) - 1)

    for t in b.tasks:
        us = unit_slice(t.unit)
        recv_op = {"iw": "IW", "mm": "MM"}.get(t.kind, "RECV")
        last = 0
        for j, (key, n, region, operand, delay) in enumerate(t.reads):
            c = b.read_copy[(t.tid, j)]
            bank_u = f"c{t.chip}.mem{c.bank}"
            h = m.hop(("mem", c.bank), us)
            at = t.issue + delay
            r = put(bank_u, at - h, "READ", n, t.layer, c.id, WHOLE if c.part is not None else region, c.addr,
                    peer=unit_ids[t.unit], flags=len(c.stripes))
            if recv_op == "RECV":
                x = put(t.unit, at, "RECV", n, t.layer, operand, region, peer=unit_ids[bank_u])
            else:
                x = put(t.unit, at, recv_op, n, t.layer, t.block, flags=t.flags, peer=unit_ids[bank_u])
            transfers[t.chip].append((at - h, at + n, [r, x]))
            last = max(last, delay)
        if t.kind in ("vxm", "qx", "sxm"):       # issues once the last operand part starts arriving
            put(t.unit, t.issue + last, "EXEC", t.out_off - last, t.layer, 0)
        if t.kind == "tx":
            dst = t.dst_chip
            d = t.busy - last
            put(t.unit, t.issue + last, "TX", d, t.layer, t.tid, peer=unit_ids[f"c{dst}.c2c0"])
            rx_unit = f"c{dst}.c2c0"
            put(rx_unit, t.issue + last + m.link_latency, "RX", d, t.layer, t.tid, peer=unit_ids[t.unit])
            src_unit, src_chip, send_at = rx_unit, dst, t.issue + t.out_off
        else:
            src_unit, src_chip, send_at = t.unit, t.chip, t.issue + t.out_off
        for key, n, region in t.outs:
            s = put(src_unit, send_at, "SEND", n, t.layer, 0, region)
            ends, members = send_at + n, [s]
            for c in b.copies_of[key]:
                if c.part not in (None, region):
                    continue
                bank_u = f"c{src_chip}.mem{c.bank}"
                at = send_at + m.hop(unit_slice(src_unit), ("mem", c.bank))
                members.append(put(bank_u, at, "WRITE", n, t.layer, c.id, region, c.addr, peer=unit_ids[src_unit]))
                ends = max(ends, at + n)
            transfers[src_chip].append((send_at, ends, members))
            send_at += n
    # streams: interval colouring per chip
    used = {}
    for chip, tr in transfers.items():
        tr.sort(key=lambda x: (x[0], x[1]))
        free = list(range(m.streams))
        busy: list[tuple[int, int]] = []
        peak = 0
        for s, e, members in tr:
            while busy and busy[0][0] <= s:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if not free:
                raise TapeoutError(f"dataflow: chip {chip} needs more than streams={m.streams} streams at cycle {s}; "
                                   "raise --machine streams")
            st = heapq.heappop(free)
            heapq.heappush(busy, (e, st))
            peak = max(peak, len(busy))
            for unit, idx in members:
                rows[unit][idx][3] = st
        used[chip] = peak
    queues = {}
    makespan = 0
    for unit in unit_ids:
        r = rows.get(unit, [])
        q = np.zeros(len(r), DF)
        if r:
            arr = np.array(r, np.int64)
            for k, f in enumerate(("cycle", "op", "flags", "stream", "peer", "n", "layer", "a", "b", "addr")):
                q[f] = arr[:, k]
            q = q[np.lexsort((np.arange(len(q)), q["op"] == OP["SEND"], q["cycle"]))]
            makespan = max(makespan, int((q["cycle"] + q["n"]).max()))
        queues[unit] = q
    return queues, used, makespan
