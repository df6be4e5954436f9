"""The ISA simulator: executes a whole model's microcode with the cycle model and returns the
model outputs (spec: docs/isa.md, "ISA simulator").

Instructions execute in issue order (issue cycle, then program order), each through its
opcode's handler (``HANDLERS``). Every instruction's end is its issue cycle plus its
cycle-model duration; every read is checked against the cycle its data became ready (a strip
buffer, the array's weights, an accumulator tile after the array's drain latency, a tensor), a
strip buffer may only be overwritten after its last reader finished, and no unit (``QUEUE``:
load, compute, vector, store) runs two instructions at once. A violation raises ``IsaError``
naming the instruction(s).

Weights come only from the weight image (``weights.WeightImage``, OUT/weights.bin): ``LOAD_W``
decodes its strip's bytes, and the linears' geometry is the strip table's; the program's
linears are never read. The vector unit's arithmetic (requantisation, MXINT quantisation,
softmax, the ``VEC`` kernels) is ``backends/vector.py``'s, written from the documented
semantics, not golden's code; the compile checks the outputs against golden bit for bit.

``MATMUL`` computes ``part = x_elems[:, K tile] @ codes[rows, K tile].T`` (int8 x int8 in the
array) and accumulates ``part * gs << (s_u - e_min)``. Attention (``QUANT_A``,
``PRELOAD``/``MATMUL``/``REQUANT`` with ``buf`` 2 = Q.K^T and 3 = P.V, ``SOFTMAX``) is the
integer attention cut into tiles: the scores' tiles accumulate ``part << (qs + ks - emin)``
(exponent alignment per element), P.V's ``part`` is ``digit(P) @ (ve << (vs - vmin))`` (the
preloaded rows' shifts) accumulated ``<< 7 * digit``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from tapeout.backends import vector as vu
from tapeout.compiler.interp import run_op

from .isa import BUF_SCORES, DIGIT_SHIFT, FLAG_FIRST, OPS, QUEUE, IsaError
from .lower import DIGIT_BITS, CycleModel
from .machine import Machine
from .weights import WeightImage

__all__ = ["run_program", "HANDLERS"]


class Instr(NamedTuple):
    """One instruction as its handler sees it (``end``: issue cycle + cycle-model duration)."""

    j: int
    op: str
    layer: int
    i: int
    k: int
    buf: int
    flags: int
    t: int
    cycle: int
    end: int


def run_program(ip, machine: Machine, prog: np.ndarray, feeds: dict, stats: dict | None = None, *,
                image: bytes | WeightImage, makespan: int | None = None) -> dict:
    """Execute ``prog`` on ``feeds`` (golden's integer feeds) with the weights of ``image`` (the
    bytes of OUT/weights.bin, or a parsed ``WeightImage``); returns the graph outputs. ``ip``
    (an IntegerProgram or a Golden) supplies the graph, the op attributes and the non-weight
    constants (norm gains, RoPE tables, the embedding), never the linears. ``makespan``: the
    schedule's, which the run's cycles must equal."""
    stats = {} if stats is None else stats
    sim = _Sim(ip, machine, image if isinstance(image, WeightImage) else WeightImage(image, machine), feeds)
    order = np.lexsort((np.arange(len(prog)), prog["cycle"]))
    counts = np.bincount(prog["op"], minlength=len(OPS))
    last = (0, -1, "")
    for j in order.tolist():
        r = prog[j]
        opname, layer = OPS[r["op"]], int(r["layer"])
        handler = HANDLERS.get(opname)
        if handler is None:
            raise IsaError(f"instruction {j}: {opname} is not executable here")
        cycle = int(r["cycle"])
        end = cycle + (sim.cost(opname, layer, int(r["i"]), int(r["t"]), int(r["buf"])) if handler is not _nop else 0)
        x = Instr(j, opname, layer, int(r["i"]), int(r["k"]), int(r["buf"]), int(r["flags"]), int(r["t"]), cycle, end)
        handler(sim, x)
        sim.occupy(x)
        last = max(last, (end, j, opname))
    missing = [t for t in sim.g.outputs if t not in sim.env]
    if missing:
        raise IsaError(f"the program never wrote the model outputs {missing}")
    if makespan is not None and last[0] != makespan:
        raise IsaError(f"the program runs {last[0]} cycles (instruction {last[1]} ({last[2]}) ends last), "
                       f"the schedule's makespan is {makespan}")
    stats.update(cycles=int(last[0]), instructions=int(len(prog)),
                 per_op={OPS[o]: int(c) for o, c in enumerate(counts) if c})
    return {t: sim.env[t] for t in sim.g.outputs}


class _Sim:
    """The machine state of one run: tensors on chip, strip buffers, the array's weights, the
    accumulator's tiles, the linears and attentions in flight, each unit's busy interval."""

    def __init__(self, ip, machine: Machine, image: WeightImage, feeds: dict):
        self.ip, self.m, self.image, self.g = ip, machine, image, ip.graph
        self.cost = CycleModel(ip, machine, geometry=lambda layer: image.geometry(layer, ip.config.block, machine))
        self.env: dict[str, np.ndarray] = {k: np.asarray(v).astype(np.int64) if np.asarray(v).dtype.kind in "iu"
                                           else np.asarray(v) for k, v in feeds.items()}
        self.ready: dict[str, int] = {k: 0 for k in self.env}
        self.xq: dict[int, tuple] = {}              # layer -> (elems, su, emin, ready, leading shape)
        self.strips: dict[int, dict] = {}           # buffer -> {"id", "w" (a weights.Strip), "ready", "last_read"}
        self.array: dict | None = None              # {"id": (layer, i, k), "buf", "w", "ready", "shift"}
        self.att: dict[int, _Attention] = {}        # attention layer -> its operands and tiles in flight
        self.acc: dict[tuple, list] = {}            # tile key -> [values, ready]
        self.outs: dict[int, dict] = {}             # layer -> {"y": array, "tiles": n, "ready": c}
        self.busy: dict[str, tuple[int, int, str]] = {}     # queue -> (end, instruction, opcode)

    def op(self, x: Instr):
        return self.ip.ops[x.layer] if x.layer < len(self.ip.ops) else None

    def need(self, what: str, at: int, x: Instr) -> None:
        if at > x.cycle:
            raise IsaError(f"instruction {x.j} ({x.op}) issues at cycle {x.cycle} but reads {what}, "
                           f"ready at cycle {at}")

    def tensor(self, t: str, x: Instr):
        if not t:
            return None
        if t in self.env:
            self.need(f"tensor {t!r}", self.ready[t], x)
            return self.env[t]
        if t in self.g.constants:
            return self.ip.const(t)
        raise IsaError(f"instruction {x.j} ({x.op}) reads tensor {t!r} before any instruction wrote it")

    def write(self, t: str, value: np.ndarray, at: int) -> None:
        self.env[t], self.ready[t] = value, at

    def occupy(self, x: Instr) -> None:
        """One instruction per unit at a time (zero-cycle instructions occupy no cycle)."""
        q = QUEUE[x.op]
        if x.end == x.cycle or q == "none":
            return
        prev = self.busy.get(q)
        if prev is not None and x.cycle < prev[0]:
            raise IsaError(f"instruction {x.j} ({x.op}) issues at cycle {x.cycle} on the {q} unit while "
                           f"instruction {prev[1]} ({prev[2]}) runs there until cycle {prev[0]}")
        if prev is None or x.end > prev[0]:
            self.busy[q] = (x.end, x.j, x.op)

    def open_tile(self, key, x: Instr) -> None:
        # the accumulator holds two tiles (docs/isa.md, "Capacity"): one filling, one being read
        if len(self.acc) >= 2:
            raise IsaError(f"instruction {x.j} (MATMUL) opens accumulator tile {key} while tiles {sorted(self.acc)} "
                           "are still live; the accumulator holds two")

    def accumulate(self, key, contrib: np.ndarray, x: Instr) -> None:
        if x.flags & FLAG_FIRST:
            self.open_tile(key, x)
            self.acc[key] = [contrib, x.end + self.m.latency]
            return
        if key not in self.acc:
            raise IsaError(f"instruction {x.j} (MATMUL) accumulates into tile {key}, never cleared")
        self.need(f"accumulator tile {key}", self.acc[key][1] - self.m.latency, x)
        self.acc[key][0] = self.acc[key][0] + contrib
        self.acc[key][1] = x.end + self.m.latency

    def drain(self, key, x: Instr) -> np.ndarray:
        if key not in self.acc:
            raise IsaError(f"instruction {x.j} (REQUANT) reads accumulator tile {key}, never written")
        a, ar = self.acc.pop(key)
        self.need(f"accumulator tile {key} (after the array's drain)", ar, x)
        return a

    def weights_in_array(self, key, x: Instr, buf: int | None = None) -> dict:
        a = self.array
        if a is None or a["id"] != key or (buf is not None and a["buf"] != buf):
            raise IsaError(f"instruction {x.j} (MATMUL) expects weights {key} in the array, "
                           f"found {None if a is None else a['id']}")
        self.need("the array's weights", a["ready"], x)
        return a

    def strip(self, x: Instr, key) -> dict:
        s = self.strips.get(x.buf)
        if s is None or s["id"] != key:
            raise IsaError(f"instruction {x.j} ({x.op}) expects strip {key} in buffer {x.buf}, "
                           f"found {None if s is None else s['id']}")
        return s

    def attention(self, x: Instr) -> "_Attention | None":
        op = self.op(x)
        if op is None or op.kind != "attention":
            return None
        st = self.att.get(x.layer)
        if st is None:
            raise IsaError(f"instruction {x.j} ({x.op}) of attention layer {x.layer} runs before its QUANT_A")
        self.need(f"the MXINT q, k, v of layer {x.layer}", st.ready, x)
        return st


# --- the handlers: one per opcode ------------------------------------------------------------------
def _nop(sim: _Sim, x: Instr) -> None:
    return None


def _quant_x(sim: _Sim, x: Instr) -> None:
    """MXINT-quantise a linear's input (units of the linear's geometry); open its output."""
    geo = sim.cost.geometry(x.layer)
    v = sim.tensor(sim.op(x).inputs[0], x)
    X = v.reshape(-1, geo["in"])
    elems, su, emin = vu.mx_rows(X, geo["unit"], sim.ip.config.act_bits, sim.ip.config.block)
    sim.xq[x.layer] = (elems, su, emin, x.end, v.shape[:-1])
    sim.outs[x.layer] = {"y": np.zeros((X.shape[0], geo["out"]), np.int64), "tiles": 0, "ready": 0}


def _load_w(sim: _Sim, x: Instr) -> None:
    """DMA strip ``(layer, i)`` of the weight image into strip buffer ``buf``."""
    old = sim.strips.get(x.buf)
    if old is not None:
        sim.need(f"the end of the last read of strip buffer {x.buf}", old["last_read"], x)
    sim.strips[x.buf] = {"id": (x.layer, x.i), "w": sim.image.strip(x.layer, x.i), "ready": x.end, "last_read": 0}


def _preload(sim: _Sim, x: Instr) -> None:
    """Weights into the array: K tile ``k`` of a strip, or an attention's K / V block."""
    st = sim.attention(x)
    if st is not None:
        w, shift = st.stationary(x.buf, x.i, x.k)
        sim.array = {"id": (x.layer, x.i, x.k), "buf": x.buf, "w": w, "ready": x.end, "shift": shift}
        return
    s = sim.strip(x, (x.layer, x.i))
    sim.need(f"strip buffer {x.buf}", s["ready"], x)
    kt = sim.cost.geometry(x.layer)["kt"]
    sim.array = {"id": (x.layer, x.i, x.k), "buf": x.buf, "w": s["w"].codes[:, x.k * kt:(x.k + 1) * kt],
                 "ready": x.end, "shift": None}
    s["last_read"] = max(s["last_read"], x.end)


def _matmul(sim: _Sim, x: Instr) -> None:
    """Stream rows through the array's weights and accumulate the scaled partial sums."""
    st = sim.attention(x)
    if st is not None:
        return _matmul_attention(sim, st, x)
    arr = sim.weights_in_array((x.layer, x.i, x.k), x)
    elems, su, emin, xr, _ = sim.xq[x.layer]
    sim.need(f"the MXINT input of layer {x.layer}", xr, x)
    geo = sim.cost.geometry(x.layer)
    kt, unit = geo["kt"], geo["unit"]
    s = sim.strips[x.buf]
    u = (x.k * kt) // unit
    part = elems[:, x.k * kt:(x.k + 1) * kt] @ arr["w"].T                        # the array
    gsu = s["w"].group_scale[:, (u * unit) // geo["group"]]
    sim.accumulate((x.layer, x.i), (part * gsu[None, :]) << (su[:, u] - emin)[:, None], x)
    s["last_read"] = max(s["last_read"], x.end)


def _matmul_attention(sim: _Sim, st: "_Attention", x: Instr) -> None:
    arr = sim.weights_in_array((x.layer, x.i, x.k), x, x.buf)
    digit = x.flags >> DIGIT_SHIFT
    rows, xr = st.streamed(x.buf, x.i, x.k, digit, x.j)
    sim.need(f"the probabilities of layer {x.layer}", xr, x)
    w = arr["w"] if arr["shift"] is None else arr["w"] << arr["shift"][None, :]
    part = rows @ w.T                                                            # the array
    contrib = part << st.score_shift(x.i, x.k) if x.buf == BUF_SCORES else part << (DIGIT_BITS * digit)
    sim.accumulate((x.layer, x.i, x.buf), contrib, x)


def _requant(sim: _Sim, x: Instr) -> None:
    """Accumulator tile -> Q16 output columns with the strip's requantisation words."""
    st = sim.attention(x)
    if st is not None:
        done = st.requant(x.buf, x.i, sim.drain((x.layer, x.i, x.buf), x), x.end)
        if done:
            sim.write(st.op.outputs[0], *done)
            del sim.att[x.layer]
        return
    op, key = sim.op(x), (x.layer, x.i)
    a = sim.drain(key, x)
    vu.check(a, op.name)
    s = sim.strip(x, key)
    s["last_read"] = max(s["last_read"], x.end)
    w = s["w"]
    _, _, emin, _, lead = sim.xq[x.layer]
    o = sim.outs[x.layer]
    n = sim.m.n
    o["y"][:, x.i * n:x.i * n + a.shape[1]] = vu.requant(a, w.mult, w.shift, emin, w.bias)
    o["tiles"] += 1
    o["ready"] = max(o["ready"], x.end)
    if o["tiles"] == sim.cost.geometry(x.layer)["n_i"]:
        sim.write(op.outputs[0], o["y"].reshape(*lead, -1), o["ready"])
        del sim.xq[x.layer]


def _quant_a(sim: _Sim, x: Instr) -> None:
    op = sim.op(x)
    ins = [sim.tensor(t, x) for t in op.inputs]
    sim.att[x.layer] = _Attention(sim.ip, op, sim.cost.attention(x.layer), *ins, ready=x.end)


def _softmax(sim: _Sim, x: Instr) -> None:
    st = sim.attention(x)
    if st is None:
        raise IsaError(f"instruction {x.j} (SOFTMAX) on layer {x.layer}, which is not an attention")
    st.softmax(x.i, x.end, x.j, lambda what, at: sim.need(what, at, x))


def _vec(sim: _Sim, x: Instr) -> None:
    """One graph op on the vector unit (data movement: the interpreter, exact on integers)."""
    op = sim.op(x)
    args = [sim.tensor(t, x) for t in op.inputs]
    out = vu.KERNELS[op.kind](sim.ip, op, *args) if op.kind in vu.KERNELS else run_op(op, args)
    out = out if isinstance(out, tuple) else (out,)
    for name, value in zip(op.outputs, out):
        if name:
            sim.write(name, value, x.end)


def _store(sim: _Sim, x: Instr) -> None:
    for t in sim.g.outputs:
        sim.tensor(t, x)


HANDLERS: dict[str, Callable[[_Sim, Instr], None]] = {
    "NOP": _nop, "HALT": _nop, "QUANT_X": _quant_x, "LOAD_W": _load_w, "PRELOAD": _preload, "MATMUL": _matmul,
    "REQUANT": _requant, "QUANT_A": _quant_a, "SOFTMAX": _softmax, "VEC": _vec, "STORE": _store,
}


class _Attention:
    """One attention layer in flight: the MXINT q, k, v (``QUANT_A``), the scores' tiles
    scaled to Q16, the probabilities per KV head group and the output being assembled."""

    def __init__(self, ip, op, a: dict, q, k, v, mask=None, *, ready: int):
        bits, blk = ip.config.act_bits, ip.config.block
        self.op, self.a, self.ready, self.mask = op, a, ready, mask
        self.qe, self.qs = vu.mx(q, bits, blk)
        self.ke, self.ks = vu.mx(k, bits, blk)
        self.ve, self.vs = vu.mx(v, bits, blk)
        self.vmin = self.vs.min(axis=2)                                        # [B, Hkv, nb]
        self.ms, self.ns = vu.scale_multiplier(float(op.attr("scale", 1.0 / math.sqrt(a["d"]))))
        self.emins: dict[int, np.ndarray] = {}
        self.z: dict[int, dict] = {}                # group -> key tile -> (Q16 scores, ready)
        self.p: dict[int, tuple] = {}               # group -> (Q15 probabilities [R, T], ready)
        self.out = np.zeros(tuple(q.shape[:-1]) + (a["d"],), np.int64)
        self.tiles, self.out_ready = 0, 0

    def group(self, grp: int) -> tuple[int, int, slice]:
        b, hk = divmod(grp, self.a["kv_heads"])
        return b, hk, slice(hk * self.a["rep"], (hk + 1) * self.a["rep"])

    def keys(self, kt: int) -> slice:
        n = self.a["n"]
        return slice(kt * n, min((kt + 1) * n, self.a["keys"]))

    def emin(self, grp: int) -> np.ndarray:
        """The per-score minimum exponent over the d blocks, [R, T]."""
        if grp not in self.emins:
            b, hk, hs = self.group(grp)
            qs = self.qs[b, hs].reshape(self.a["rows"], -1)
            self.emins[grp] = np.min(qs[:, None, :] + self.ks[b, hk][None, :, :], axis=-1)
        return self.emins[grp]

    def stationary(self, buf: int, i: int, k: int):
        """The tile a PRELOAD puts in the array: K [keys, d-tile], or V [keys, d-tile] transposed
        with its rows' alignment shifts."""
        w, blk = self.a["width"], self.a["block"]
        if buf == BUF_SCORES:
            grp, kt = divmod(i, self.a["n_kt"])
            b, hk, _ = self.group(grp)
            return self.ke[b, hk, self.keys(kt), k * w:(k + 1) * w], None
        grp, c = divmod(i, self.a["n_dt"])
        b, hk, _ = self.group(grp)
        keys, jb = self.keys(k), (c * w) // blk
        return self.ve[b, hk, keys, c * w:(c + 1) * w].T, self.vs[b, hk, keys, jb] - self.vmin[b, hk, jb]

    def streamed(self, buf: int, i: int, k: int, digit: int, j: int):
        """The rows a MATMUL streams: the group's query elements of d-tile k, or digit ``digit``
        of the probabilities of key tile k; with the cycle they are ready."""
        w = self.a["width"]
        if buf == BUF_SCORES:
            b, _, hs = self.group(i // self.a["n_kt"])
            return self.qe[b, hs, :, k * w:(k + 1) * w].reshape(self.a["rows"], w), self.ready
        grp = i // self.a["n_dt"]
        if grp not in self.p:
            raise IsaError(f"instruction {j} (MATMUL) streams the probabilities of group {grp} before its SOFTMAX")
        p, pr = self.p[grp]
        return (p[:, self.keys(k)] >> (DIGIT_BITS * digit)) & ((1 << DIGIT_BITS) - 1), pr

    def score_shift(self, i: int, k: int) -> np.ndarray:
        grp, kt = divmod(i, self.a["n_kt"])
        b, hk, hs = self.group(grp)
        jb, keys = (k * self.a["width"]) // self.a["block"], self.keys(kt)
        qs = self.qs[b, hs, :, jb].reshape(-1)
        return qs[:, None] + self.ks[b, hk, keys, jb][None, :] - self.emin(grp)[:, keys]

    def requant(self, buf: int, i: int, acc: np.ndarray, end: int):
        """Scores tile -> Q16 (the attention's scale); P.V tile -> rounded output columns.
        Returns (output, ready) once the last output tile is in."""
        if buf == BUF_SCORES:
            grp, kt = divmod(i, self.a["n_kt"])
            vu.check(acc, f"{self.op.name} scores")
            z = vu.round_shift(acc * self.ms, self.ns - self.emin(grp)[:, self.keys(kt)] + vu.Q16)
            self.z.setdefault(grp, {})[kt] = (z, end)
            return None
        grp, c = divmod(i, self.a["n_dt"])
        b, hk, hs = self.group(grp)
        w, a = self.a["width"], self.a
        vu.check(acc, f"{self.op.name} values", vu.PV_BITS)
        y = vu.round_shift(acc, 15 - self.vmin[b, hk, (c * w) // a["block"]])
        self.out[b, hs, :, c * w:(c + 1) * w] = vu.clamp32(y).reshape(a["rep"], a["queries"], w)
        self.tiles += 1
        self.out_ready = max(self.out_ready, end)
        if self.tiles == a["groups"] * a["n_dt"]:
            return self.out, self.out_ready
        return None

    def softmax(self, grp: int, end: int, j: int, need: Callable[[str, int], None]) -> None:
        """Causal/explicit masking and the integer softmax over one group's score rows."""
        a = self.a
        tiles = self.z.pop(grp, {})
        if len(tiles) != a["n_kt"]:
            raise IsaError(f"instruction {j} (SOFTMAX) reads {a['n_kt']} score tiles of group {grp}, "
                           f"{len(tiles)} were written")
        for kt, (_, zr) in tiles.items():
            need(f"score tile {kt} of group {grp}", zr)
        z = np.concatenate([tiles[kt][0] for kt in range(a["n_kt"])], axis=1)
        S, T = a["queries"], a["keys"]
        z = z.reshape(a["rep"], S, T)
        mask = None
        if self.mask is not None:
            b, _, hs = self.group(grp)
            mask = np.broadcast_to(vu.key_mask(self.op, self.mask), (a["batch"], a["heads"], S, T))[b, hs]
        z = vu.masked_scores(z, self.op.attr("causal", False), mask)
        self.p[grp] = (vu.softmax(z).reshape(a["rows"], T), end)
