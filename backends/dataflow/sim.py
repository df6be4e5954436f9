"""The cycle-accurate simulator of the dataflow machine (spec: docs/dataflow.md, "Simulator").

It runs the per-unit queues exactly as issued: every instruction happens at its cycle, every
vector a producer puts on a stream is taken by its readers at the cycle it reaches them
(``issue + hop_cycles * distance``; anything else is an error), MEM banks hold copies at
addresses, MXMs hold installed weight blocks and an accumulator, and C2C links deliver
``link_latency`` cycles after sending. Weights and constants come from the load image
(``banks.py``); the vector arithmetic is ``backends/vector.py``'s, written from docs/golden.md
and sharing no code with golden, and the compile checks the outputs against golden bit for
bit. There is no runtime arbitration, so the latency is the same on every
run: the end of the last instruction.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from tapeout.backends import vector as vu
from tapeout.compiler.program import IntegerProgram
from tapeout.compiler.interp import run_op

from .banks import BankImage
from .isa import FLAG_FIRST, FLAG_LAST, OP, OPS, WHOLE, QueueError
from .lower import is_immediate, is_table_gather, unit_slice
from .machine import Machine

__all__ = ["run_queues"]

# at one cycle: producers first, then readers, then the units acting on what they read
RANK = {OP["READ"]: 0, OP["SEND"]: 0, OP["RX"]: 0, OP["WRITE"]: 1, OP["RECV"]: 1, OP["IW"]: 1, OP["MM"]: 1,
        OP["EXEC"]: 2, OP["TX"]: 2, OP["NOP"]: 3}


def run_queues(ip: IntegerProgram, m: Machine, queues: dict[str, np.ndarray], memmap: list[dict], feeds: dict,
               stats: dict | None = None, *, image: "bytes | BankImage") -> dict:
    """Run the queues on ``feeds`` (golden's integer feeds) with the banks loaded from ``image``
    (the bytes of OUT/banks.bin, or a parsed ``BankImage``); returns the model outputs. ``ip``
    supplies the graph, the op attributes and the instructions' immediates, never the weights
    or the banks' constants."""
    g = ip.graph
    if not isinstance(image, BankImage):
        image = BankImage(image, memmap)
    geo = image.geometry

    # the load image: weights and constants from banks.bin, graph inputs from the host
    mem: dict[int, object] = {}
    written: dict[int, list] = defaultdict(list)        # copy -> [(end cycle, region)]
    for c in memmap:
        if not c["resident"]:
            continue
        if c["value"][0] == "input":
            mem[c["id"]] = np.asarray(feeds[c["value"][1]]).astype(np.int64)
        else:
            mem[c["id"]] = image.value(c["id"])
    by_id = {c["id"]: c for c in memmap}

    units = list(queues)
    uid = {u: i for i, u in enumerate(units)}
    slices = [unit_slice(u) for u in units]
    chip = [int(u.split(".", 1)[0][1:]) for u in units]
    parts = []
    for u, q in queues.items():
        if len(q):
            parts.append(np.stack([q["cycle"].astype(np.int64), np.vectorize(RANK.get)(q["op"]),
                                   np.full(len(q), uid[u]), np.arange(len(q))], axis=1))
    order = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    order = order[np.lexsort((order[:, 3], order[:, 2], order[:, 1], order[:, 0]))]

    streams: dict[tuple, dict] = {}
    regs: dict[int, dict] = defaultdict(lambda: {"ops": {}, "parts": {}, "out": [], "bufs": {}, "acc": None})
    links: dict[int, dict] = {}
    end_max = 0
    counts = np.zeros(len(OPS), np.int64)

    def fail(u: int, cyc: int, msg: str):
        raise QueueError(f"{units[u]} @ cycle {cyc}: {msg}")

    def take(u: int, r, what: str):
        key = (chip[u], int(r["stream"]))
        rec = streams.get(key)
        cyc = int(r["cycle"])
        if rec is None:
            fail(u, cyc, f"{what} reads stream {key[1]}, on which nothing was sent")
        arrive = rec["c"] + m.hop(rec["pos"], slices[u])
        if arrive != cyc or rec["n"] != int(r["n"]):
            fail(u, cyc, f"{what} reads stream {key[1]} at cycle {cyc}, but the {rec['n']} vectors sent by "
                         f"{units[rec['u']]} at cycle {rec['c']} reach it at cycle {arrive}")
        rec["taken"] += 1
        return rec["data"]

    def put(u: int, r, data):
        key = (chip[u], int(r["stream"]))
        old = streams.get(key)
        if old is not None and not old["taken"]:
            fail(old["u"], old["c"], f"the vectors sent on stream {key[1]} were never read")
        streams[key] = {"c": int(r["cycle"]), "pos": slices[u], "n": int(r["n"]), "data": data, "u": u, "taken": 0}

    for cyc, _, u, idx in order.tolist():
        r = queues[units[u]][idx]
        op = OPS[r["op"]]
        counts[r["op"]] += 1
        end_max = max(end_max, cyc + int(r["n"]))
        layer = int(r["layer"])
        if op == "READ":
            c = by_id.get(int(r["a"]))
            if c is None or c["bank"] != slices[u][1] or c["chip"] != chip[u] or c["addr"] != int(r["addr"]):
                fail(u, cyc, f"READ of copy {int(r['a'])} at address {int(r['addr']):#x}: not in this bank")
            cid = c["id"]
            if cid not in mem:
                fail(u, cyc, f"READ of copy {cid} ({c['value']}) before anything was written to it")
            if not c["resident"]:
                got = written[cid]
                if len({reg for _, reg in got}) < c["regions"] or max(e for e, _ in got) > cyc:
                    fail(u, cyc, f"READ of copy {cid} ({c['value']}) before its writes completed")
            data = mem[cid]
            if c["gather"]:
                data = np.take(data, np.asarray(feeds[c["gather"]]).astype(np.int64), axis=0)
            elif int(r["b"]) != WHOLE:                          # K block k of an MXINT input
                k = int(r["b"])
                gl = geo(layer)
                el, su, emin = data
                rows, unit = gl["rows"], gl["unit"]
                data = (el[:, k * rows:(k + 1) * rows], su[:, k * rows // unit:(k + 1) * rows // unit], emin)
            put(u, r, data)
        elif op == "WRITE":
            data = take(u, r, "WRITE")
            cid = int(r["a"])
            reg = int(r["b"])
            if reg == WHOLE or by_id[cid]["part"] is not None:
                mem[cid] = data
            else:                                               # output block i of a linear
                gl = geo(layer)
                if cid not in mem:
                    mem[cid] = np.zeros((data.shape[0], gl["out"]), np.int64)
                mem[cid][:, reg * gl["cols"]:reg * gl["cols"] + data.shape[1]] = data
            written[cid].append((cyc + int(r["n"]), reg))
        elif op == "RECV":
            data = take(u, r, "RECV")
            if int(r["b"]) == WHOLE:
                regs[u]["ops"][int(r["a"])] = data
            else:                                               # one output block of a linear
                regs[u]["parts"].setdefault(int(r["a"]), {})[int(r["b"])] = data
        elif op == "EXEC":
            st = regs[u]
            _assemble(st)
            opr = ip.ops[layer]
            if opr.kind == "linear":                            # QX: MXINT quantisation of the input
                gl = geo(layer)
                x = st["ops"][0].reshape(-1, gl["in"])
                out = [vu.mx_rows(x, gl["unit"], ip.config.act_bits, ip.config.block)]
            elif st["ops"] and is_table_gather(g, opr):
                out = [st["ops"][0].reshape(g.tensors[opr.outputs[0]].shape)]
            else:
                args, j = [], 0
                for t in opr.inputs:
                    if not t:
                        args.append(None)
                    elif is_immediate(g, t):
                        args.append(ip.const(t))
                    else:
                        if j not in st["ops"]:
                            fail(u, cyc, f"EXEC of {opr.name} without operand {j}")
                        args.append(np.asarray(st["ops"][j]).reshape(g.tensors[t].shape))
                        j += 1
                res = vu.KERNELS[opr.kind](ip, opr, *args) if opr.kind in vu.KERNELS else run_op(opr, args)
                res = res if isinstance(res, tuple) else (res,)
                out = [v for name, v in zip(opr.outputs, res) if name]
            st["ops"] = {}
            st["out"] = list(out)
        elif op == "SEND":
            st = regs[u]
            if not st["out"]:
                fail(u, cyc, "SEND with no result to send")
            put(u, r, st["out"].pop(0))
        elif op == "IW":
            blk = take(u, r, "IW")
            regs[u]["bufs"][int(r["flags"])] = (layer, int(r["a"]), blk)
        elif op == "MM":
            el, su, emin = take(u, r, "MM")
            st = regs[u]
            hit = [b for b in st["bufs"].values() if b[0] == layer and b[1] == int(r["a"])]
            if not hit:
                fail(u, cyc, f"MM of block {int(r['a'])} of {ip.ops[layer].name}, which is not installed")
            blk = hit[0][2]
            gl = geo(layer)
            unit = gl["unit"]
            T, rows = el.shape
            xs = (el.reshape(T, rows // unit, unit) << (su - emin[:, None])[:, :, None]).reshape(T, rows)
            w = blk["codes"] * np.repeat(blk["gs"], unit, axis=1)
            part = vu.exact_matmul(xs, w.T)
            st["acc"] = part if r["flags"] & FLAG_FIRST else st["acc"] + part
            if r["flags"] & FLAG_LAST:
                acc = vu.check(st["acc"], ip.ops[layer].name)
                st["out"].append(vu.requant(acc, blk["mult"], blk["shift"], emin, blk["bias"]))
                st["acc"] = None
        elif op == "TX":
            st = regs[u]
            _assemble(st)
            links[int(r["a"])] = {"c": cyc, "data": st["ops"].pop(0), "n": int(r["n"])}
        elif op == "RX":
            tx = links.pop(int(r["a"]), None)
            if tx is None or tx["c"] + m.link_latency != cyc or tx["n"] != int(r["n"]):
                fail(u, cyc, f"RX of transfer {int(r['a'])}: nothing arrives on the link at this cycle")
            regs[u]["out"].append(tx["data"])
        elif op != "NOP":
            fail(u, cyc, f"{op} cannot run here")
    for rec in streams.values():
        if not rec["taken"]:
            fail(rec["u"], rec["c"], "vectors sent on a stream were never read")
    host: dict[str, dict] = defaultdict(dict)
    for c in memmap:
        if c["host"]:
            name = c["value"][1]
            if c["id"] not in mem:
                raise QueueError(f"the queues never wrote the model output {name!r}")
            host[name][c["part"] if c["part"] is not None else -1] = np.asarray(mem[c["id"]])
    out = {name: np.concatenate([p[i] for i in sorted(p)], axis=-1).reshape(g.tensors[name].shape)
           for name, p in host.items()}
    missing = [t for t in g.outputs if t not in out]
    if missing:
        raise QueueError(f"the queues never wrote the model outputs {missing}")
    if stats is not None:
        stats.update(cycles=int(end_max), instructions=int(len(order)),
                     per_op={OPS[o]: int(n) for o, n in enumerate(counts) if n})
    return {t: out[t] for t in g.outputs}


def _assemble(st: dict) -> None:
    """Operands received as column blocks, concatenated in block order."""
    for j, parts in st["parts"].items():
        st["ops"][j] = np.concatenate([parts[i] for i in sorted(parts)], axis=-1)
    st["parts"] = {}
