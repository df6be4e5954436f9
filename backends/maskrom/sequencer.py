"""The chip's sequencer: the integer program lowered to the instruction stream of one token
(spec: docs/chip.md).

The mask-ROM chip serves one user a token at a time: the token's embedding is read from ROM,
each layer runs its norms, linear stages, rope, attention over the KV cache in SRAM and its
activations, then the head and an argmax give the next token. The integer program describes a
whole window of ``S`` positions; the sequencer takes the same ops at one position:

- every activation tensor has at most one *sequence axis* (found here from the static shapes
  by following the ops from the token input); at a token it has length 1;
- constants that carry the sequence axis (rope tables, learned position embeddings) are
  *position tables*: the token at position ``t`` reads row ``t``;
- an attention op writes its token's keys and values into the KV cache at ``t`` and attends
  over positions ``0..t``;
- data movement (reshape, transpose, split) is addressing, free at run time.

Each instruction has a unit and a cycle count. The costs are the whole-chip RTL's
(``hdl.timing``), which the estimate uses too, so the sequencer's cycles per token, the RTL's
and ``tapeout estimate``'s agree by construction, and tests hold them equal on the compiled
tiny models.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden.model import KERNELS, PLUMBING
from tapeout.compiler.program import IntegerProgram
from tapeout.hdl import timing as tm

from .rowchip import LAYER_GROUP, ROW_ARCH_DEFAULTS, STAGE_OF

FORMAT, VERSION = "tapeout-sequencer", 2
ELEMENTWISE = {"Add", "Sub", "Mul", "Neg", "Where", "Identity", "Cast", "rmsnorm", "layernorm", "silu", "gelu",
               "gated_mlp"}
RESHAPES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten"}

class ChipLoweringError(TapeoutError):
    """The program cannot run one token at a time on the chip (names the op)."""


@dataclass
class Instr:
    """One step of the token: ``unit`` runs ``ops`` (program op names, in order) for ``cycles``
    cycles, plus ``per_key`` cycles per ``keys_per_cycle`` attended positions (attention)."""

    index: int
    unit: str                  # embed | vector | fabric | attention | argmax
    stage: str                 # the estimate's name: norm_1, qkv_proj, rope, attention, ...
    group: str                 # layers.N, or head
    ops: list[str]
    kinds: list[str]
    width: int                 # values per token the unit produces
    cycles: int                # fixed cycles
    per_key: int = 0           # attention: + per_key * ceil(attended / keys_per_cycle) (its passes)

    def at(self, attended: int, keys_per_cycle: int) -> int:
        return self.cycles + int(self.per_key) * -(-attended // keys_per_cycle)


@dataclass
class Sequencer:
    """The token program of a chip: the seq-axis analysis the executors need and the timed
    instruction stream (``instrs``); ``context`` positions fit the KV cache and the tables."""

    seq_len: int                       # positions of the program's window
    context: int                       # positions the chip runs (KV cache rows, table rows)
    axis: dict[str, int | None]        # tensor -> its sequence axis (None: position-independent)
    tables: dict[str, int]             # constant -> its sequence axis (position tables)
    attention: list[str]               # attention ops, in order: one KV cache each
    instrs: list[Instr]
    arch: dict[str, int]
    lm_head: str | None                # the logits tensor
    kv_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)   # attention -> (kv heads, head dim)

    def learned_positions(self, prog: IntegerProgram) -> int:
        """Rows of a learned position embedding (position tables that no rope reads), else 0."""
        rope = {t for op in prog.ops if op.kind == "rope" for t in op.inputs[1:3]}
        return self.seq_len if any(t not in rope for t in self.tables) else 0

    def cycles_at(self, position: int) -> int:
        """Cycles of the token at ``position`` (it attends ``position + 1`` keys)."""
        ppc = self.arch["attn_positions_per_cycle"]
        return sum(i.at(position + 1, ppc) for i in self.instrs)

    def by_stage(self, position: int) -> dict[str, int]:
        ppc, out = self.arch["attn_positions_per_cycle"], {}
        for i in self.instrs:
            out[i.stage] = out.get(i.stage, 0) + i.at(position + 1, ppc)
        return out

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "seq_len": self.seq_len, "context": self.context,
                "arch": dict(self.arch), "attention": list(self.attention),
                "kv_cache": {a: {"kv_heads": h, "head_dim": d, "positions": self.context}
                             for a, (h, d) in self.kv_shapes.items()},
                "position_tables": dict(sorted(self.tables.items())),
                "cycles": {"first_token": self.cycles_at(0), "last_token": self.cycles_at(self.context - 1)},
                "instructions": [{"index": i.index, "unit": i.unit, "stage": i.stage, "group": i.group,
                                  "ops": i.ops, "kinds": i.kinds, "width": i.width, "cycles": i.cycles,
                                  "per_key": i.per_key} for i in self.instrs]}

    def listing(self) -> str:
        ppc = self.arch["attn_positions_per_cycle"]
        lines = [f"# tapeout sequencer: one token; {len(self.instrs)} instructions, context {self.context}",
                 f"# cycles: {self.cycles_at(0):,} at position 0, {self.cycles_at(self.context - 1):,} at position "
                 f"{self.context - 1}; attention adds {tm.ATTENTION_PASSES} cycles per {ppc} keys",
                 f"# {'idx':>5} {'unit':9s} {'group':10s} {'stage':12s} {'width':>6} {'cycles':>7}  ops"]
        for i in self.instrs:
            cyc = f"{i.cycles}+{i.per_key}t/{ppc}" if i.per_key else str(i.cycles)
            lines.append(f"  {i.index:5d} {i.unit:9s} {i.group:10s} {i.stage:12s} {i.width:6d} {cyc:>7}  "
                         + ", ".join(f"{k} {o}" for k, o in zip(i.kinds, i.ops)))
        return "\n".join(lines) + "\n"

    def trace(self, position: int, clock_hz: float) -> dict:
        """A Chrome/Perfetto trace of the token at ``position``: one track per unit."""
        ppc, t, events = self.arch["attn_positions_per_cycle"], 0, []
        units = sorted({i.unit for i in self.instrs})
        tid = {u: n + 1 for n, u in enumerate(units)}
        ns = 1e9 / clock_hz
        for u in units:
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid[u], "args": {"name": u}})
        for i in self.instrs:
            c = i.at(position + 1, ppc)
            events.append({"ph": "X", "name": f"{i.group} {i.stage}", "cat": i.unit, "pid": 1, "tid": tid[i.unit],
                           "ts": t * ns / 1000, "dur": c * ns / 1000, "args": {"ops": i.ops, "cycles": c}})
            t += c
        return {"traceEvents": events, "displayTimeUnit": "ns",
                "otherData": {"position": position, "cycles": t, "clock_hz": clock_hz}}


# --- the sequence axis ---------------------------------------------------------------------------
def _prefix_axis(in_shape, axis: int, out_shape, S: int) -> int | None:
    """The output axis of a reshape that keeps the sequence axis whole, else None."""
    pre = int(np.prod(in_shape[:axis], dtype=np.int64))
    acc = 1
    for j, d in enumerate(out_shape):
        if acc == pre and d == S:
            return j
        acc *= int(d)
        if acc > pre:
            return None
    return None


def _const_axis(prog: IntegerProgram, t: str) -> np.ndarray | None:
    c = prog.graph.constants.get(t)
    return None if c is None else np.asarray(c)


def analyse(prog: IntegerProgram) -> tuple[dict[str, int | None], dict[str, int], int]:
    """Sequence axis of every tensor, the position tables, and the window length ``S``."""
    g, itf = prog.graph, prog.interface
    if itf.mode == "decode":
        raise ChipLoweringError(f"a decode export (KV cache of {itf.past} positions as inputs) fixes its position "
                                f"tables at position {itf.past}; the chip generates from a prefill export of the "
                                "model, whose tables cover every position of the context", file=g.meta.get("file"))
    if itf.tokens is None:
        raise ChipLoweringError("the chip runs token by token from a prefill export (input_ids [+ attention_mask, "
                                f"position_ids]); this program's inputs are {g.inputs}", file=g.meta.get("file"))
    tok_shape = g.tensors[itf.tokens].shape
    S = int(tok_shape[-1])
    axis: dict[str, int | None] = {}
    tables: dict[str, int] = {}
    for n in g.inputs:
        shape = g.tensors[n].shape
        axis[n] = len(shape) - 1 if shape and int(shape[-1]) == S else None
    shape_of = lambda t: tuple(int(d) for d in g.tensors[t].shape)   # noqa: E731

    def fail(op, why):
        raise ChipLoweringError(f"the chip cannot run this op one token at a time: {why}", node=op.name, op=op.kind)

    def ax(t):
        return axis.get(t) if t in axis else None

    def mark_table(op, t, a):
        if S > 1 and t in g.constants and 0 <= a < len(shape_of(t)) and shape_of(t)[a] == S:
            prev = tables.setdefault(t, a)
            if prev != a:
                fail(op, f"constant {t} is indexed by position along two axes")
            return True
        return False

    for op in prog.ops:
        ins = [t for t in op.inputs if t]
        outs = [t for t in op.outputs if t]
        k = op.kind
        carried = {t: ax(t) for t in ins if ax(t) is not None}
        if not carried and not any(t in g.constants and S > 1 and S in shape_of(t) for t in ins):
            for o in outs:
                axis[o] = None
            continue
        if k == "linear":
            a = ax(op.inputs[0])
            if a is None or a == len(shape_of(op.inputs[0])) - 1:
                fail(op, "a linear whose features run along the sequence")
            for o in outs:
                axis[o] = a
        elif k == "attention":
            if not op.attr("causal", False):
                fail(op, "bidirectional attention (an encoder): its tokens are not generated one at a time")
            for t in op.inputs[:3]:
                if ax(t) != len(shape_of(t)) - 2:
                    fail(op, f"attention input {t} is not [batch, heads, positions, dim]")
            if len(op.inputs) > 3 and op.inputs[3] and not op.attr("key_mask", False):
                fail(op, "an explicit attention mask (the chip applies causal and key masks)")
            axis[outs[0]] = len(shape_of(outs[0])) - 2
        elif k == "rope":
            a = ax(op.inputs[0])
            if a != len(shape_of(op.inputs[0])) - 2:
                fail(op, "rope on a tensor that is not [..., positions, dim]")
            for t in op.inputs[1:3]:
                if ax(t) is None and not mark_table(op, t, len(shape_of(t)) - 2) and S > 1:
                    fail(op, f"rope table {t} does not run over the positions")
            axis[outs[0]] = a
        elif k in ELEMENTWISE:
            r = len(shape_of(outs[0]))
            cand = {ax(t) + r - len(shape_of(t)) for t in carried}
            if len(cand) != 1:
                fail(op, "operands with different sequence axes")
            a = cand.pop()
            for t in ins:
                if ax(t) is None:
                    mark_table(op, t, a - (r - len(shape_of(t))))
            for o in outs:
                axis[o] = a
        elif k in RESHAPES or k == "Expand":
            src = op.inputs[0]
            if ax(src) is None:
                fail(op, f"{k} of a position table")
            if k == "Expand":
                a = ax(src) + len(shape_of(outs[0])) - len(shape_of(src))
            else:
                a = _prefix_axis(shape_of(src), ax(src), shape_of(outs[0]), S)
            if a is None:
                fail(op, "a reshape that merges the sequence axis with features")
            axis[outs[0]] = a
        elif k == "Transpose":
            perm = list(op.attr("perm", ()) or range(len(shape_of(op.inputs[0])))[::-1])
            axis[outs[0]] = perm.index(ax(op.inputs[0]))
        elif k in ("Split", "Concat"):
            data = [op.inputs[0]] if k == "Split" else ins
            a0 = ax(data[0])
            if a0 is None or any(ax(t) != a0 for t in data):
                fail(op, f"{k} of a position table with activations")
            if op.attr("axis", 0) % len(shape_of(data[0])) == a0:
                fail(op, f"{k} along the sequence axis")
            for o in outs:
                axis[o] = a0
        elif k == "Slice":
            a = ax(op.inputs[0])
            axes = _const_axis(prog, op.inputs[3]) if len(op.inputs) > 3 and op.inputs[3] else None
            r = len(shape_of(op.inputs[0]))
            axes = list(range(r)) if axes is None else [int(v) % r for v in axes.reshape(-1)]
            if a in axes:
                i = axes.index(a)
                st, en = (_const_axis(prog, op.inputs[j]).reshape(-1)[i] for j in (1, 2))
                if not (int(st) == 0 and int(en) >= S) or (len(op.inputs) > 4 and op.inputs[4]
                                                            and int(_const_axis(prog, op.inputs[4]).reshape(-1)[i]) != 1):
                    fail(op, "a slice of the positions")
            axis[outs[0]] = a
        elif k == "Gather":
            data, idx = op.inputs[0], op.inputs[1]
            ga = op.attr("axis", 0) % len(shape_of(data))
            if ax(data) is None and ax(idx) is not None:
                axis[outs[0]] = ga + ax(idx)
            elif ax(data) is not None and ax(idx) is None and ga != ax(data):
                a = ax(data)
                axis[outs[0]] = a if a < ga else a - 1 + len(shape_of(idx))
            else:
                fail(op, "a gather over the positions")
        else:
            fail(op, f"op {k} on values that run over the positions")
    return axis, tables, S


# --- instructions --------------------------------------------------------------------------------
def _width(prog: IntegerProgram, t: str, a: int | None) -> int:
    shape = [int(d) for d in prog.graph.tensors[t].shape]
    if a is not None:
        shape[a] = 1
    return int(np.prod(shape, dtype=np.int64))


def build(prog: IntegerProgram, plan: dict, *, context: int | None = None, arch: dict | None = None) -> Sequencer:
    """The token program of ``prog`` on a chip whose fabric ``plan`` is ``rowfabric.chip_plan``'s."""
    axis, tables, S = analyse(prog)
    a = {**ROW_ARCH_DEFAULTS, **(arch or {}), "chain_tiles": plan["chain_tiles"]}
    g = prog.graph
    ctx = S if context is None else min(int(context), S)
    roles = dict(prog.roles)
    group_of_linear = {n: (roles.get(n, n).rpartition(".")[0] or roles.get(n, n)) for n in prog.linears}
    lin_index = {n: i for i, n in enumerate(op.name for op in prog.ops if op.kind == "linear")}
    ops = prog.ops
    # the group of a non-linear op: norms take their consumer linear's, the rest the previous linear's
    consumers: dict[str, list] = {}
    for op in ops:
        for t in op.inputs:
            consumers.setdefault(t, []).append(op)

    def forward_group(op, depth=0):
        for o in op.outputs:
            for c in consumers.get(o, []):
                if c.kind == "linear":
                    return group_of_linear[c.name]
                if c.kind in PLUMBING and depth < 8:
                    r = forward_group(c, depth + 1)
                    if r:
                        return r
        return None

    instrs: list[Instr] = []
    attn: list[str] = []
    kv: dict[str, tuple[int, int]] = {}
    last_group = "head"
    lanes = a["vector_lanes"]
    logits = prog.interface.logits

    def add(unit, stage, group, op, width, cost, *, per_key=0, join=False, stacked=False):
        """A new instruction of ``cost(width)`` cycles, or with ``join`` this op added to the
        previous instruction of the same unit, stage and group: ``stacked`` (a fabric stage:
        q/k/v, gate/up) recomputes the cycles for the stacked rows; otherwise (the ropes of q
        and k) the ops run one after the other and their cycles add up. The costs are the
        RTL's (``hdl.timing``)."""
        prev = instrs[-1] if instrs else None
        if join and prev and (prev.unit, prev.stage, prev.group) == (unit, stage, group):
            prev.ops.append(op.name)
            prev.kinds.append(op.kind)
            prev.width += width
            prev.cycles = cost(prev.width) if stacked else prev.cycles + cost(width)
            return
        instrs.append(Instr(len(instrs), unit, stage, group, [op.name], [op.kind], width, cost(width), per_key))

    def table_operand(op) -> bool:
        """An elementwise op whose second operand is a ROM row (a constant or a position table)."""
        return any(t and axis.get(t) is None for t in op.inputs[:2])

    stage_in: dict[tuple[str, str], str] = {}
    for op in ops:
        k = op.kind
        outs = [t for t in op.outputs if t]
        if not outs or axis.get(outs[0]) is None and k != "linear":
            continue                                   # position-independent: folded at compile time
        if k in PLUMBING and not (k == "Gather" and op.inputs[0] in g.constants
                                  and axis.get(op.inputs[0]) is None and axis.get(op.inputs[1]) is not None):
            continue                                   # addressing
        if k == "Gather":
            stage = "embed" if op.inputs[1] == prog.interface.tokens else "table"
            add("embed", stage, "head", op, _width(prog, outs[0], axis[outs[0]]),
                lambda n: tm.embed(n, lanes) if stage == "embed" else 0)   # a position table: addressing
            continue
        if k == "linear":
            grp = group_of_linear[op.name]
            grp = grp if LAYER_GROUP.match(grp) else "head"
            role = roles.get(op.name, op.name).rpartition(".")[2]
            stage = STAGE_OF.get(role, role)
            name = {"qkv": "qkv_proj", "o": "o_proj"}.get(stage, stage)
            rows, cols = prog.linears[op.name].codes.shape
            P = plan["chains"][plan["group_of"][lin_index[op.name]]]
            same_input = stage_in.get((grp, name)) == op.inputs[0]    # linears of one stage read one input
            stage_in[(grp, name)] = op.inputs[0]
            add("fabric", name, grp, op, rows, lambda n, c=cols, P=P: tm.linear(
                c, n, lanes, chains=P, chain_tiles=plan["chain_tiles"], cols=plan["tile_cols"]),
                join=same_input, stacked=True)
            last_group = grp
            continue
        width = _width(prog, outs[0], axis[outs[0]])
        if k == "attention":
            attn.append(op.name)
            kshape = g.tensors[op.inputs[1]].shape
            kv[op.name] = (int(kshape[1]), int(kshape[-1]))
            qshape = g.tensors[op.inputs[0]].shape
            add("attention", "attention", last_group, op, width,
                lambda n, H=int(qshape[1]), Hkv=int(kshape[1]), D=int(qshape[-1]): tm.attention_fixed(H, Hkv, D, lanes),
                per_key=tm.ATTENTION_PASSES)
        elif k in ("rmsnorm", "layernorm"):
            grp = forward_group(op) or last_group
            grp = grp if LAYER_GROUP.match(grp) else "head"
            n = sum(1 for i in instrs if i.group == grp and i.stage.startswith("norm"))
            add("vector", f"norm_{n + 1}" if grp != "head" else "final_norm", grp, op, width,
                lambda n, kind=k: tm.norm(n, kind, lanes))
        elif k == "rope":
            add("vector", "rope", last_group, op, width, lambda n: tm.rope(n, lanes), join=True)
        elif k in ("gated_mlp", "silu", "gelu"):
            act = op.attr("activation", "silu") if k == "gated_mlp" else k
            kind = "gelu" if act.startswith("gelu") else "silu"
            add("vector", "act", last_group, op, width, lambda n, kind=kind: tm.act(n, kind, lanes))
        elif k in ("Add", "Sub", "Mul", "Neg"):
            cost = (lambda n, tb=table_operand(op): tm.elementwise(n, lanes, tb))
            if last_group == "head" and not attn:
                add("vector", "pos_embed", "head", op, width, cost)
            else:
                n = sum(1 for i in instrs if i.group == last_group and i.stage.startswith("residual"))
                add("vector", f"residual_{n + 1}", last_group, op, width, cost)
        elif k in KERNELS:
            raise ChipLoweringError(f"the sequencer has no unit for {k}", node=op.name, op=k)
    if logits is None or axis.get(logits) is None:
        raise ChipLoweringError("the chip needs the logits output to pick the next token")
    head_op = prog.graph.producer_op(logits)
    vocab = _width(prog, logits, axis[logits])
    instrs.append(Instr(len(instrs), "argmax", "argmax", "head", [head_op.name if head_op else logits], ["argmax"],
                        1, tm.argmax(vocab, lanes)))
    return Sequencer(S, ctx, axis, tables, attn, instrs, a, logits, kv)


def write(seq: Sequencer, out, clock_hz: float) -> None:
    """``chip/sequencer.json``, the listing and the trace of the last position."""
    out.write_text("chip/sequencer.json", json.dumps(seq.to_json(), indent=1) + "\n")
    out.write_text("chip/sequencer.txt", seq.listing())
    out.write_text("chip/trace.json", json.dumps(seq.trace(seq.context - 1, clock_hz)) + "\n")


def summary(seq: Sequencer, clock_hz: float) -> dict[str, Any]:
    first, last = seq.cycles_at(0), seq.cycles_at(seq.context - 1)
    return {"instructions": len(seq.instrs), "context": seq.context, "seq_len": seq.seq_len,
            "attention_layers": len(seq.attention), "position_tables": len(seq.tables),
            "cycles_first_token": first, "cycles_last_token": last,
            "tokens_per_s_last": clock_hz / last if last else math.inf}
