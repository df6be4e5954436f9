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
"""
from __future__ import annotations

import numpy as np

from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import KERNELS, Golden
from tapeout.compiler.interp import run_op

from .isa import FLAG_FIRST, OPS, IsaError
from .lower import CycleModel
from .machine import Machine

__all__ = ["run_program"]


def run_program(gm: Golden, machine: Machine, prog: np.ndarray, feeds: dict, stats: dict | None = None) -> dict:
    """Execute ``prog`` on ``feeds`` (golden's integer feeds); returns the graph outputs."""
    stats = {} if stats is None else stats
    cost = CycleModel(gm, machine)
    g, n, lat = gm.graph, machine.n, machine.latency
    env: dict[str, np.ndarray] = {k: np.asarray(v).astype(np.int64) if np.asarray(v).dtype.kind in "iu"
                                  else np.asarray(v) for k, v in feeds.items()}
    ready: dict[str, int] = {k: 0 for k in env}
    xq: dict[int, tuple] = {}                  # layer -> (elems, su, emin, ready, leading shape)
    strips: dict[int, dict] = {}               # buffer -> strip
    array = None                               # (layer, i, k, weights, ready)
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
            return gm.const(t)
        raise IsaError(f"instruction {j} ({opname}) reads tensor {t!r} before any instruction wrote it")

    for j in order.tolist():
        r = prog[j]
        opname, layer, i, k, buf = OPS[r["op"]], int(r["layer"]), int(r["i"]), int(r["k"]), int(r["buf"])
        cycle = int(r["cycle"])
        end = cycle + cost(opname, layer, i, int(r["t"]))
        end_max = max(end_max, end)
        counts[r["op"]] += 1
        op = gm.order[layer] if layer < len(gm.order) else None
        if opname == "QUANT_X":
            geo = cost.geometry(layer)
            x = tensor(op.inputs[0], cycle, j, opname)
            X = x.reshape(-1, geo["in"])
            elems, su, emin = fx.mx_units(X, geo["unit"], gm.config.act_bits, gm.config.block)
            xq[layer] = (elems, su, emin, end, x.shape[:-1])
            outs[layer] = {"y": np.zeros((X.shape[0], geo["out"]), np.int64), "tiles": 0, "ready": 0}
        elif opname == "LOAD_W":
            old = strips.get(buf)
            if old is not None:
                need(f"the end of the last read of strip buffer {buf}", old["last_read"], cycle, j, opname)
            L = gm.linears[op.name]
            rows = slice(i * n, min((i + 1) * n, L.codes.shape[0]))
            strips[buf] = {"id": (layer, i), "codes": np.asarray(L.codes[rows], np.int64),
                           "gs": L.group_scale[rows], "mult": L.mult[rows], "shift": L.shift[rows],
                           "bias": None if L.bias is None else L.bias[rows], "ready": end, "last_read": 0}
        elif opname == "PRELOAD":
            s = strips.get(buf)
            if s is None or s["id"] != (layer, i):
                raise IsaError(f"instruction {j} (PRELOAD) expects strip {(layer, i)} in buffer {buf}, "
                               f"found {None if s is None else s['id']}")
            need(f"strip buffer {buf}", s["ready"], cycle, j, opname)
            kt = cost.geometry(layer)["kt"]
            array = (layer, i, k, s["codes"][:, k * kt:(k + 1) * kt], end)
            s["last_read"] = max(s["last_read"], end)
        elif opname == "MATMUL":
            if array is None or array[:3] != (layer, i, k):
                raise IsaError(f"instruction {j} (MATMUL) expects weights {(layer, i, k)} in the array, "
                               f"found {None if array is None else array[:3]}")
            need("the array's weights", array[4], cycle, j, opname)
            elems, su, emin, xr, _ = xq[layer]
            need(f"the MXINT input of layer {layer}", xr, cycle, j, opname)
            geo = cost.geometry(layer)
            kt, unit = geo["kt"], geo["unit"]
            s = strips[buf]
            u = (k * kt) // unit
            part = elems[:, k * kt:(k + 1) * kt] @ array[3].T                       # the array
            gsu = s["gs"][:, (u * unit) // geo["group"]]
            contrib = (part * gsu[None, :]) << (su[:, u] - emin)[:, None]
            key = (layer, i)
            if r["flags"] & FLAG_FIRST:
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
            out = KERNELS[op.kind](gm, op, *args) if op.kind in KERNELS else run_op(op, args)
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
