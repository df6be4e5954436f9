"""The ISA simulator: executes a whole model's microcode with the cycle model and returns the
model outputs (spec: docs/isa.md, "ISA simulator").

Instructions execute in issue order (issue cycle, then program order). Every instruction's
end is its issue cycle plus its cycle-model duration; every read is checked against the
cycle its data became ready (a strip buffer, the array's weights, an accumulator tile after
the array's drain latency, a tensor), and a strip buffer may only be overwritten after its
last reader finished. A violation raises ``IsaError`` naming the instruction. Arithmetic:
``MATMUL`` computes ``part = x_elems[:, K tile] @ codes[rows, K tile].T`` (int8 x int8 in
the array) and accumulates ``part * gs << (s_u - e_min)``; ``REQUANT``, ``QUANT_X`` and
``VEC`` carry golden's integer semantics, so outputs equal golden bit for bit.

Attention (``QUANT_A``, ``PRELOAD``/``MATMUL``/``REQUANT`` with ``buf`` 2 = Q.K^T and 3 = P.V,
``SOFTMAX``) is golden's ``k_attention`` cut into tiles: the scores' tiles accumulate
``part << (qs + ks - emin)`` (golden's exponent alignment, per element), P.V's ``part`` is
``digit(P) @ (ve << (vs - vmin))`` (the preloaded rows' shifts) accumulated ``<< 7 * digit``.
"""
from __future__ import annotations

import math

import numpy as np

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import KERNELS, MASKED, softmax_q15
from tapeout.compiler.program import IntegerProgram
from tapeout.compiler.interp import run_op

from .isa import BUF_SCORES, DIGIT_SHIFT, FLAG_FIRST, OPS, IsaError
from .lower import DIGIT_BITS, CycleModel
from .machine import Machine

__all__ = ["run_program"]


def run_program(ip: IntegerProgram, machine: Machine, prog: np.ndarray, feeds: dict, stats: dict | None = None) -> dict:
    """Execute ``prog`` on ``feeds`` (golden's integer feeds); returns the graph outputs."""
    stats = {} if stats is None else stats
    cost = CycleModel(ip, machine)
    g, n, lat = ip.graph, machine.n, machine.latency
    env: dict[str, np.ndarray] = {k: np.asarray(v).astype(np.int64) if np.asarray(v).dtype.kind in "iu"
                                  else np.asarray(v) for k, v in feeds.items()}
    ready: dict[str, int] = {k: 0 for k in env}
    xq: dict[int, tuple] = {}                  # layer -> (elems, su, emin, ready, leading shape)
    strips: dict[int, dict] = {}               # buffer -> strip
    array = None                               # {"id": (layer, i, k), "buf", "w", "ready", "shift"}
    att: dict[int, _Attention] = {}            # attention layer -> its operands and tiles in flight
    acc: dict[tuple[int, int], list] = {}      # (layer, i) -> [values, ready]
    outs: dict[int, dict] = {}                 # layer -> {"y": array, "tiles": n, "ready": c}
    order = np.lexsort((np.arange(len(prog)), prog["cycle"]))
    end_max, counts = 0, np.zeros(len(OPS), np.int64)

    def need(what: str, at: int, cycle: int, j: int, opname: str):
        if at > cycle:
            raise IsaError(f"instruction {j} ({opname}) issues at cycle {cycle} but reads {what}, "
                           f"ready at cycle {at}")

    def tensor(t: str, cycle: int, j: int, opname: str):
        if not t:
            return None
        if t in env:
            need(f"tensor {t!r}", ready[t], cycle, j, opname)
            return env[t]
        if t in g.constants:
            return ip.const(t)
        raise IsaError(f"instruction {j} ({opname}) reads tensor {t!r} before any instruction wrote it")

    def open_tile(key, j: int):
        # the accumulator holds two tiles (docs/isa.md, "Capacity"): one filling, one being read
        if len(acc) >= 2:
            raise IsaError(f"instruction {j} (MATMUL) opens accumulator tile {key} while tiles {sorted(acc)} "
                           "are still live; the accumulator holds two")

    for j in order.tolist():
        r = prog[j]
        opname, layer, i, k, buf = OPS[r["op"]], int(r["layer"]), int(r["i"]), int(r["k"]), int(r["buf"])
        cycle = int(r["cycle"])
        end = cycle + cost(opname, layer, i, int(r["t"]), buf)
        end_max = max(end_max, end)
        counts[r["op"]] += 1
        op = ip.ops[layer] if layer < len(ip.ops) else None
        if opname == "QUANT_X":
            geo = cost.geometry(layer)
            x = tensor(op.inputs[0], cycle, j, opname)
            X = x.reshape(-1, geo["in"])
            elems, su, emin = fx.mx_units(X, geo["unit"], ip.config.act_bits, ip.config.block)
            xq[layer] = (elems, su, emin, end, x.shape[:-1])
            outs[layer] = {"y": np.zeros((X.shape[0], geo["out"]), np.int64), "tiles": 0, "ready": 0}
        elif opname == "LOAD_W":
            old = strips.get(buf)
            if old is not None:
                need(f"the end of the last read of strip buffer {buf}", old["last_read"], cycle, j, opname)
            L = ip.linears[op.name]
            rows = slice(i * n, min((i + 1) * n, L.codes.shape[0]))
            strips[buf] = {"id": (layer, i), "codes": np.asarray(L.codes[rows], np.int64),
                           "gs": L.group_scale[rows], "mult": L.mult[rows], "shift": L.shift[rows],
                           "bias": None if L.bias is None else L.bias[rows], "ready": end, "last_read": 0}
        elif opname == "QUANT_A":
            ins = [tensor(t, cycle, j, opname) for t in op.inputs]
            att[layer] = _Attention(ip, op, cost.attention(layer), *ins, ready=end)
        elif op is not None and op.kind == "attention" and opname in ("PRELOAD", "MATMUL", "REQUANT", "SOFTMAX"):
            st = att.get(layer)
            if st is None:
                raise IsaError(f"instruction {j} ({opname}) of attention layer {layer} runs before its QUANT_A")
            need(f"the MXINT q, k, v of layer {layer}", st.ready, cycle, j, opname)
            if opname == "PRELOAD":
                w, shift = st.stationary(buf, i, k)
                array = {"id": (layer, i, k), "buf": buf, "w": w, "ready": end, "shift": shift}
            elif opname == "MATMUL":
                if array is None or array["id"] != (layer, i, k) or array["buf"] != buf:
                    raise IsaError(f"instruction {j} (MATMUL) expects weights {(layer, i, k)} in the array, "
                                   f"found {None if array is None else array['id']}")
                need("the array's weights", array["ready"], cycle, j, opname)
                digit = int(r["flags"]) >> DIGIT_SHIFT
                x, xr = st.streamed(buf, i, k, digit, j)
                need(f"the probabilities of layer {layer}", xr, cycle, j, opname)
                w = array["w"] if array["shift"] is None else array["w"] << array["shift"][None, :]
                part = x @ w.T                                                     # the array
                if buf == BUF_SCORES:
                    contrib = part << st.score_shift(i, k)
                else:
                    contrib = part << (DIGIT_BITS * digit)
                key = (layer, i, buf)
                if r["flags"] & FLAG_FIRST:
                    open_tile(key, j)
                    acc[key] = [contrib, end + lat]
                else:
                    if key not in acc:
                        raise IsaError(f"instruction {j} (MATMUL) accumulates into tile {key}, never cleared")
                    need(f"accumulator tile {key}", acc[key][1] - lat, cycle, j, opname)
                    acc[key][0] = acc[key][0] + contrib
                    acc[key][1] = end + lat
            elif opname == "REQUANT":
                key = (layer, i, buf)
                if key not in acc:
                    raise IsaError(f"instruction {j} (REQUANT) reads accumulator tile {key}, never written")
                a, ar = acc.pop(key)
                need(f"accumulator tile {key} (after the array's drain)", ar, cycle, j, opname)
                done = st.requant(buf, i, a, end)
                if done:
                    env[op.outputs[0]], ready[op.outputs[0]] = done
                    del att[layer]
            else:
                st.softmax(i, cycle, end, j, need)
        elif opname == "PRELOAD":
            s = strips.get(buf)
            if s is None or s["id"] != (layer, i):
                raise IsaError(f"instruction {j} (PRELOAD) expects strip {(layer, i)} in buffer {buf}, "
                               f"found {None if s is None else s['id']}")
            need(f"strip buffer {buf}", s["ready"], cycle, j, opname)
            kt = cost.geometry(layer)["kt"]
            array = {"id": (layer, i, k), "buf": buf, "w": s["codes"][:, k * kt:(k + 1) * kt], "ready": end,
                     "shift": None}
            s["last_read"] = max(s["last_read"], end)
        elif opname == "MATMUL":
            if array is None or array["id"] != (layer, i, k):
                raise IsaError(f"instruction {j} (MATMUL) expects weights {(layer, i, k)} in the array, "
                               f"found {None if array is None else array['id']}")
            need("the array's weights", array["ready"], cycle, j, opname)
            elems, su, emin, xr, _ = xq[layer]
            need(f"the MXINT input of layer {layer}", xr, cycle, j, opname)
            geo = cost.geometry(layer)
            kt, unit = geo["kt"], geo["unit"]
            s = strips[buf]
            u = (k * kt) // unit
            part = elems[:, k * kt:(k + 1) * kt] @ array["w"].T                     # the array
            gsu = s["gs"][:, (u * unit) // geo["group"]]
            contrib = (part * gsu[None, :]) << (su[:, u] - emin)[:, None]
            key = (layer, i)
            if r["flags"] & FLAG_FIRST:
                open_tile(key, j)
                acc[key] = [contrib, end + lat]
            else:
                need(f"accumulator tile {key}", acc[key][1] - lat, cycle, j, opname)
                acc[key][0] = acc[key][0] + contrib
                acc[key][1] = end + lat
            s["last_read"] = max(s["last_read"], end)
        elif opname == "REQUANT":
            key = (layer, i)
            if key not in acc:
                raise IsaError(f"instruction {j} (REQUANT) reads accumulator tile {key}, never written")
            a, ar = acc.pop(key)
            need(f"accumulator tile {key} (after the array's drain)", ar, cycle, j, opname)
            fx.check_acc(a, op.name)
            s = strips[buf]
            if s["id"] != key:
                raise IsaError(f"instruction {j} (REQUANT) expects strip {key} in buffer {buf}, found {s['id']}")
            s["last_read"] = max(s["last_read"], end)
            _, _, emin, _, lead = xq[layer]
            y = fx.rshift_round(a * s["mult"][None, :], s["shift"][None, :] - emin[:, None])
            if s["bias"] is not None:
                y = y + s["bias"]
            o = outs[layer]
            o["y"][:, i * n:i * n + a.shape[1]] = fx.saturate32(y)
            o["tiles"] += 1
            o["ready"] = max(o["ready"], end)
            if o["tiles"] == cost.geometry(layer)["n_i"]:
                env[op.outputs[0]] = o["y"].reshape(*lead, -1)
                ready[op.outputs[0]] = o["ready"]
                del xq[layer]
        elif opname == "VEC":
            args = [tensor(t, cycle, j, opname) for t in op.inputs]
            out = KERNELS[op.kind](ip, op, *args) if op.kind in KERNELS else run_op(op, args)
            out = out if isinstance(out, tuple) else (out,)
            for name, value in zip(op.outputs, out):
                if name:
                    env[name], ready[name] = value, end
        elif opname == "STORE":
            for t in g.outputs:
                tensor(t, cycle, j, opname)
        elif opname not in ("NOP", "HALT"):
            raise IsaError(f"instruction {j}: {opname} is not executable here")
    missing = [t for t in g.outputs if t not in env]
    if missing:
        raise IsaError(f"the program never wrote the model outputs {missing}")
    stats.update(cycles=int(end_max), instructions=int(len(prog)),
                 per_op={OPS[o]: int(c) for o, c in enumerate(counts) if c})
    return {t: env[t] for t in g.outputs}


class _Attention:
    """One attention layer in flight: golden's MXINT q, k, v (``QUANT_A``), the scores' tiles
    scaled to Q16, the probabilities per KV head group and the output being assembled."""

    def __init__(self, ip: IntegerProgram, op, a: dict, q, k, v, mask=None, *, ready: int):
        bits, blk = ip.config.act_bits, ip.config.block
        self.op, self.a, self.ready, self.mask = op, a, ready, mask
        self.qe, self.qs = fx.mx_quantize(q, bits, blk)
        self.ke, self.ks = fx.mx_quantize(k, bits, blk)
        self.ve, self.vs = fx.mx_quantize(v, bits, blk)
        self.vmin = self.vs.min(axis=2)                                        # [B, Hkv, nb]
        self.ms, self.ns = fx.multiplier(np.float64(op.attr("scale", 1.0 / math.sqrt(a["d"]))))
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
        """Golden's per-score minimum exponent over the d blocks, [R, T]."""
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
        """Scores tile -> Q16 (golden's scale); P.V tile -> rounded output columns. Returns
        (output, ready) once the last output tile is in."""
        if buf == BUF_SCORES:
            grp, kt = divmod(i, self.a["n_kt"])
            fx.check_acc(acc, f"{self.op.name} scores")
            z = fx.rshift_round(acc * self.ms, self.ns - self.emin(grp)[:, self.keys(kt)] + fx.Q)
            self.z.setdefault(grp, {})[kt] = (z, end)
            return None
        grp, c = divmod(i, self.a["n_dt"])
        b, hk, hs = self.group(grp)
        w, a = self.a["width"], self.a
        fx.check_acc(acc, f"{self.op.name} values", bits=63)
        y = fx.rshift_round(acc, 15 - self.vmin[b, hk, (c * w) // a["block"]])
        self.out[b, hs, :, c * w:(c + 1) * w] = fx.saturate32(y).reshape(a["rep"], a["queries"], w)
        self.tiles += 1
        self.out_ready = max(self.out_ready, end)
        if self.tiles == a["groups"] * a["n_dt"]:
            return self.out, self.out_ready
        return None

    def softmax(self, grp: int, cycle: int, end: int, j: int, need) -> None:
        """Golden's causal/explicit masking and integer softmax over one group's score rows."""
        a = self.a
        tiles = self.z.pop(grp, {})
        if len(tiles) != a["n_kt"]:
            raise IsaError(f"instruction {j} (SOFTMAX) reads {a['n_kt']} score tiles of group {grp}, "
                           f"{len(tiles)} were written")
        for kt, (_, zr) in tiles.items():
            need(f"score tile {kt} of group {grp}", zr, cycle, j, "SOFTMAX")
        z = np.concatenate([tiles[kt][0] for kt in range(a["n_kt"])], axis=1)
        S, T = a["queries"], a["keys"]
        z = z.reshape(a["rep"], S, T)
        if self.op.attr("causal", False):
            z = np.where(np.tril(np.ones((S, T), bool), k=T - S), z, MASKED)
        if self.mask is not None:
            b, _, hs = self.group(grp)
            mask = np.broadcast_to(self.mask, (a["batch"], a["heads"], S, T))[b, hs]
            z = np.where(mask, z, MASKED) if mask.dtype == bool else np.where(mask <= MASKED // 2, MASKED, z + mask)
        self.p[grp] = (softmax_q15(z).reshape(a["rows"], T), end)
