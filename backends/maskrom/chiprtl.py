"""The whole chip in RTL: the sequencer's token program resolved into the micro-ops of
``hdl.chip.ChipTop`` (spec: docs/chip.md, "The whole chip in RTL").

Each compute op of the token program becomes one micro-op on one RTL unit. Data movement
(reshape, transpose, split, ...) becomes address maps: for each operand element, the storage
holding it and its index there. These maps are found by running the program's own data-movement
ops on *provenance* arrays (storage id and index) instead of values. Every constant comes from
the chip's artifacts:
- linears: the row-serial word-line images of the extracted via layers;
- the embedding table, gains, rope and position tables: the program (ROM contents);
- attention scales: the op's scale as golden's multiplier.
"""
from __future__ import annotations

import math

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden import fixed as fx
from tapeout.compiler.golden.model import PLUMBING
from tapeout.compiler.interp import run_op

from . import rowfabric

ID = 1 << 24          # provenance encoding: storage * ID + index
MAX_RTL_ROM_BITS = 1 << 24   # folded word-line ROM a Verilator build of ChipTop handles here (tiny: ~1 Mbit)


def check_size(layers, plan) -> int:
    """The folded ROM bits of the chip's linears; refuses a chip too large for the RTL path."""
    from tapeout.hdl.rowserial import ROW_FORMATS, RowSpec
    K, C = plan["chain_tiles"], plan["tile_cols"]
    spec = RowSpec(ROW_FORMATS[plan["family"]], word_lines=plan["word_lines"], cols=C, unit=plan["unit"])
    bits = 0
    for (o, i), g in zip(layers.shapes, plan["group_of"]):
        P = plan["chains"][g]
        bits += P * K * (-(-o // P) * -(-i // (K * C))) * spec.word_bits
    if bits > MAX_RTL_ROM_BITS:
        raise TapeoutError(f"the whole-chip RTL of this chip folds {bits / 1e6:,.0f} Mbit of word-line ROM into its "
                           f"Verilog, more than the {MAX_RTL_ROM_BITS / 1e6:.0f} Mbit it builds here; the RTL path "
                           "runs the tiny models for now (docs/chip.md); use --engine chip")
    return bits


def _one(shape, a):
    s = [int(d) for d in shape]
    if a is not None:
        s[a] = 1
    return tuple(s)


def build_spec(prog, layers, plan, seq, adapter: dict | None = None) -> dict:
    """The ChipTop description of a compiled chip (see ``hdl.chip.ChipTop``); ``adapter`` (linear
    op -> LoraLinear) puts LoRA units after the linears it names."""
    g, itf = prog.graph, prog.interface
    axis, tables = seq.axis, seq.tables
    ctx = seq.context
    storages: list[tuple[str, int]] = []          # (tensor, width)
    prov: dict[str, np.ndarray] = {}
    ops: list[dict] = []

    def new_storage(t: str) -> np.ndarray:
        shape = _one(g.tensors[t].shape, axis.get(t))
        sid = len(storages)
        n = int(np.prod(shape, dtype=np.int64))
        storages.append((t, n))
        prov[t] = (sid * ID + np.arange(n, dtype=np.int64)).reshape(shape)
        return prov[t]

    def operand(t: str):
        """(storage id, index array) of tensor ``t``'s per-token elements, C order."""
        p = np.asarray(prov[t]).reshape(-1)
        if (p < 0).any():
            raise TapeoutError(f"operand {t} is not an activation of the token", node=t)
        sids = np.unique(p // ID)
        if len(sids) == 1:
            return int(sids[0]), (p % ID).astype(np.int64)
        # a concat of several tensors (e.g. a partial rope's two halves): the storage of every element
        return (p // ID).astype(np.int64), (p % ID).astype(np.int64)

    def const_rows(t: str, out_shape) -> np.ndarray:
        """A constant operand as ROM rows [ctx, n] (position tables) or [1, n], broadcast to
        ``out_shape`` (the op's per-token output)."""
        c = prog.const(t)
        a = tables.get(t)
        if a is None:
            return np.broadcast_to(c, out_shape).reshape(1, -1).astype(np.int64)
        return np.stack([np.broadcast_to(np.take(c, [p], axis=a), out_shape).reshape(-1) for p in range(ctx)])

    def is_act(t):
        return t in prov

    lin_index = {n: i for i, n in enumerate(layers.names)}
    for name in g.inputs:
        if name == itf.tokens:
            prov[name] = np.full(_one(g.tensors[name].shape, axis.get(name)), -1, np.int64)
    for op in prog.ops:
        k = op.kind
        outs = [o for o in op.outputs if o]
        if all(axis.get(o) is None for o in outs) and k != "linear":
            continue
        if k == "Gather" and op.inputs[1] == itf.tokens and op.inputs[0] in g.constants:
            table = prog.const(op.inputs[0])
            new_storage(outs[0])
            sid, _ = operand(outs[0])
            ops.append({"kind": "embed", "dst": sid, "table": np.asarray(table, np.int64).reshape(table.shape[0], -1)})
            continue
        if k in PLUMBING or k in ("Cast", "Squeeze", "Unsqueeze", "Flatten", "Expand"):
            if k in ("Identity", "Cast"):
                prov[outs[0]] = prov[op.inputs[0]]
                continue
            if k in ("Reshape", "Expand"):
                shape = _one(g.tensors[outs[0]].shape, axis.get(outs[0]))
                src = prov[op.inputs[0]]
                prov[outs[0]] = np.reshape(src, shape) if k == "Reshape" else np.broadcast_to(src, shape).copy()
                continue
            args = [prov[i] if i in prov else (prog.const(i) if i in g.constants else None) if i else None
                    for i in op.inputs]
            res = run_op(op, args)
            for o, v in zip(op.outputs, res):
                if o:
                    prov[o] = np.asarray(v, np.int64)
            continue
        out_shape = _one(g.tensors[outs[0]].shape, axis.get(outs[0]))
        if k == "linear":
            src = operand(op.inputs[0])
            li = lin_index[op.name]
            new_storage(outs[0])
            dst = operand(outs[0])[0]
            prev = ops[-1] if ops else None
            if (prev is not None and prev["kind"] == "linear" and _same(prev["src"], src)
                    and plan["group_of"][prev["linears"][0]] == plan["group_of"][li]
                    and _stage(layers.roles[prev["linears"][0]]) == _stage(layers.roles[li])):
                prev["linears"].append(li)             # one stage: the linears that read this input
                prev["dsts"].append((dst, int(layers.shapes[li][0])))
            else:
                ops.append({"kind": "linear", "src": src, "linears": [li],
                            "dsts": [(dst, int(layers.shapes[li][0]))], "block": fx.mx_block(int(layers.shapes[li][1]))})
        elif k in ("rmsnorm", "layernorm"):
            src = operand(op.inputs[0])
            d = int(g.tensors[op.inputs[0]].shape[-1])
            if len(src[1]) != d:
                raise TapeoutError("the chip RTL normalises one vector per token", node=op.name, op=k)
            gain = np.broadcast_to(prog.const(op.inputs[1]), (d,)).astype(np.int64)
            bias = (np.broadcast_to(prog.const(op.inputs[2]), (d,)).astype(np.int64)
                    if len(op.inputs) > 2 and op.inputs[2] else None)
            new_storage(outs[0])
            ops.append({"kind": "norm", "norm": k, "src": src, "dst": operand(outs[0])[0], "gain": gain, "bias": bias,
                        "eps": float(op.attr("eps", 1e-6 if k == "rmsnorm" else 1e-5))})
        elif k == "rope":
            ops.append(_rope(prog, op, operand(op.inputs[0]), out_shape, ctx, tables, new_storage, operand))
        elif k in ("Add", "Sub", "Mul"):
            a_t, b_t = op.inputs[0], op.inputs[1]
            if not is_act(a_t):
                a_t, b_t = b_t, a_t
                if k == "Sub":
                    raise TapeoutError("the chip RTL subtracts activations only", node=op.name, op=k)
            a = operand(a_t)
            if len(a[1]) != int(np.prod(out_shape)):
                raise TapeoutError("a broadcast activation operand", node=op.name, op=k)
            b = operand(b_t) if is_act(b_t) else None
            rows = None if b is not None else const_rows(b_t, out_shape)
            new_storage(outs[0])
            ops.append({"kind": {"Add": "add", "Sub": "sub", "Mul": "mul"}[k], "a": a, "b": b, "rows": rows,
                        "dst": operand(outs[0])[0]})
        elif k in ("gated_mlp", "silu", "gelu"):
            x = operand(op.inputs[0])
            up = operand(op.inputs[1]) if k == "gated_mlp" else None
            act = op.attr("activation", "silu") if k == "gated_mlp" else k
            new_storage(outs[0])
            ops.append({"kind": "act", "act": "gelu" if act.startswith("gelu") else "silu", "x": x, "up": up,
                        "dst": operand(outs[0])[0]})
        elif k == "attention":
            q, kk, v = (operand(t) for t in op.inputs[:3])
            qs, ks = g.tensors[op.inputs[0]].shape, g.tensors[op.inputs[1]].shape
            H, Hkv, D = int(qs[1]), int(ks[1]), int(qs[-1])
            scale = op.attr("scale", 1.0 / math.sqrt(D))
            M, n = fx.multiplier(np.float64(scale))
            new_storage(outs[0])
            ops.append({"kind": "attention", "name": op.name, "q": q, "k": kk, "v": v, "dst": operand(outs[0])[0],
                        "heads": H, "kv_heads": Hkv, "d": D, "scale": (int(M), int(n))})
        else:
            raise TapeoutError(f"the chip RTL has no unit for {k}", node=op.name, op=k)
    ops.append({"kind": "argmax", "src": operand(itf.logits)})
    for op in ops:                                  # each stage's stacked word-line image
        if op["kind"] == "linear":
            op["image"] = rowfabric.stage_image(layers, op["linears"], plan)
            op["lora"] = [(adapter or {}).get(layers.names[li]) for li in op["linears"]]
            lo, op["parts"] = 0, []
            for dst, rows in op["dsts"]:
                op["parts"].append((dst, lo, lo + rows))
                lo += rows
    return {"storages": storages, "ops": ops, "context": ctx, "vocab": int(itf.vocab),
            "act_bits": int(prog.config.act_bits), "lanes": int(seq.arch["vector_lanes"]),
            "positions": int(seq.arch["attn_positions_per_cycle"])}


def _stage(role: str) -> str:
    """The fabric stage a linear joins (q/k/v, gate/up: the sequencer's and the estimate's)."""
    from .rowchip import STAGE_OF
    r = role.rpartition(".")[2]
    return STAGE_OF.get(r, r)


def _same(a, b) -> bool:
    """Two operands read the same elements of the same storages."""
    return (np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(np.asarray(a[1]), np.asarray(b[1])))


def _rope(prog, op, x, out_shape, ctx, tables, new_storage, operand) -> dict:
    """Rope as per-element (partner, sign, cos row, sin row): out = round((x c + sign * x[p] s) / 2**16).
    Elements past the rotary dims pass through (c = 1, s = 0)."""
    shape = out_shape                                   # [.., 1, D] per token
    D = int(shape[-1])
    rd = int(op.attr("rotary_dim", D))
    n = int(np.prod(shape))
    lead = n // D
    partner = np.arange(n).reshape(lead, D).copy()
    sign = np.ones((lead, D), np.int64)
    col = np.full(D, -1, np.int64)                      # which table column each dim reads (-1: none)
    half = rd // 2
    cos_t, sin_t = op.inputs[1], op.inputs[2]

    def table(t):
        c = prog.const(t)
        a = tables.get(t)
        rows = [np.take(c, [p], axis=a) if a is not None else c for p in range(ctx)]
        return [np.asarray(r).reshape(-1, r.shape[-1])[0] if r.ndim > 1 else np.asarray(r) for r in rows]

    ct, st = table(cos_t), table(sin_t)
    width = ct[0].shape[-1]
    base = np.arange(lead)[:, None] * D
    if op.attr("interleaved", False):
        for j in range(rd):
            col[j] = j // 2
            partner[:, j] = (base[:, 0] + (j + 1 if j % 2 == 0 else j - 1))
            sign[:, j] = -1 if j % 2 == 0 else 1
    else:
        for j in range(rd):
            col[j] = j if width == rd else j % half
            partner[:, j] = base[:, 0] + (j + half if j < half else j - half)
            sign[:, j] = -1 if j < half else 1
    cos_rows = np.zeros((ctx, n), np.int64)
    sin_rows = np.zeros((ctx, n), np.int64)
    for p in range(ctx):
        c = np.where(col >= 0, ct[p][np.maximum(col, 0)], fx.ONE)
        s = np.where(col >= 0, st[p][np.maximum(col, 0)], 0)
        cos_rows[p], sin_rows[p] = np.tile(c, lead), np.tile(s, lead)
    sid, idx = x
    new_storage(op.outputs[0])
    pr = partner.reshape(-1)
    psid = sid if isinstance(sid, int) else np.asarray(sid)[pr]
    return {"kind": "rope", "x": x, "partner": (psid, idx[pr]), "sign": sign.reshape(-1),
            "cos": cos_rows, "sin": sin_rows, "dst": operand(op.outputs[0])[0]}
