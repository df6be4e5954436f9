"""The whole mask-ROM chip as one Amaranth design: embedding ROM, the row-serial linears, the
vector units, attention over a KV cache in on-chip memories, argmax, and the sequencer that
runs them in order, one token at a time (spec: docs/chip.md, "The whole chip in RTL").

``ChipTop(spec)`` elaborates the micro-ops of ``backends.maskrom.chiprtl.build_spec``. The
protocol is as follows:
- with ``start = 1`` on a clock edge while idle, the chip latches ``token`` and runs it at its
  position counter (0 after reset, +1 per token);
- the edge after it finishes raises ``done`` for one cycle, with ``next_token`` (the argmax of
  the logits) and ``cycles`` (the token's cycles, start edge to done).

Each micro-op is a state (or a few) of the sequencer's FSM. It streams its operands into its
unit in chunks of ``spec["lanes"]`` values (or MXINT blocks) per cycle and writes the unit's
outputs back. The operands are read from the activation registers (one set per tensor of the
token); where each lane reads from is static, so the program's data movement is wiring (a mux
over the chunks when there are several). Norm, activation and MXINT units are shared by every
micro-op of their shape; each attention op has its ``AttentionEngine`` with its KV cache. Each
fabric stage has its own row-serial tiles with a folded ROM, which is small enough for the tiny
models. The cycles of every micro-op are ``hdl.timing``'s. SRAM macros and the base-die tile
view for large models are open items in docs/chip.md.
"""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .lora import LoraUnit
from .rowserial import RowSerialLinear
from tapeout.compiler.golden.fixed import mx_block

from .vector import (INT32_MIN, Activation, ArgmaxTree, AttentionEngine, MulQ16, MxQuant, NormUnit, ResidualAdd,
                     RopeLane)

__all__ = ["ChipTop"]


def _rom_wide(m: Module, name: str, rows, width: int):
    """A ROM of words that pack a row of ``width``-bit values each (lane k at bits
    k*width..), one synchronous read port: returns it (addr -> the row next cycle)."""
    rows = np.asarray(rows, np.int64)
    mask = (1 << width) - 1
    words = [sum((int(v) & mask) << (width * k) for k, v in enumerate(r)) for r in rows]
    words += [0] * max(0, 2 - len(words))
    mem = Memory(shape=unsigned(width * rows.shape[1]), depth=len(words), init=words)
    m.submodules[name] = mem
    return mem.read_port()


def _chunked(rows, count: int, L: int) -> np.ndarray:
    """ROM rows [r, count] -> [r * chunks, L], each row's chunks of ``L`` lanes, zero-padded."""
    rows = np.asarray(rows, np.int64).reshape(-1, count)
    pad = np.zeros((rows.shape[0], -(-count // L) * L), np.int64)
    pad[:, :count] = rows
    return pad.reshape(-1, L)


def _lane(word, k: int, width: int):
    return word[k * width:(k + 1) * width].as_signed()


class _Store:
    """One activation tensor of a token: ``n`` Q16 registers. Every element's place in each
    micro-op's chunks is static, so reads are wires (or a mux over the micro-op's steps) and
    writes go to fixed registers."""

    def __init__(self, m: Module, name: str, n: int):
        self.n = n
        self.regs = [Signal(signed(32), name=f"{name}_{k}") for k in range(n)]

    def write(self, m: Module, step, L: int, values, count: int | None = None):
        """Lane k of chunk ``step`` (a signal) is element step*L + k: a sync write of ``values``."""
        count = self.n if count is None else count
        st = -(-count // L)
        if st == 1:
            m.d.sync += [self.regs[k].eq(values[k]) for k in range(min(L, count))]
            return
        with m.Switch(step):
            for c in range(st):
                with m.Case(c):
                    m.d.sync += [self.regs[c * L + k].eq(values[k]) for k in range(L) if c * L + k < count]


class ChipTop(wiring.Component):
    def __init__(self, spec: dict):
        self.spec = spec
        vocab, ctx = spec["vocab"], spec["context"]
        self.vocab, self.context = vocab, ctx
        self.L = int(spec.get("lanes", 1))
        self.P = int(spec.get("positions", 1))
        super().__init__({"start": In(1), "token": In(unsigned(max(1, (vocab - 1).bit_length()))),
                          "done": Out(1), "next_token": Out(unsigned(max(1, (vocab - 1).bit_length()))),
                          "cycles": Out(unsigned(32)), "position": Out(unsigned(16))})

    def elaborate(self, platform):
        m = Module()
        spec = self.spec
        S = [_Store(m, f"store{sid}", n) for sid, (_, n) in enumerate(spec["storages"])]
        token = Signal.like(self.token)
        pos = Signal(16)
        cyc = Signal(32)
        m.d.comb += [self.position.eq(pos), self.done.eq(0), self.cycles.eq(cyc)]
        running = Signal()
        with m.If(running):
            m.d.sync += cyc.eq(cyc + 1)

        def read(operand, elems, at=None):
            """The word of an operand's element: ``elems`` is the element read at each step (a
            list; ``None`` reads 0), ``at`` the step signal. One step: a wire. Several: a mux
            over the steps."""
            sid, idx = operand
            idx = np.asarray(idx)
            multi = not isinstance(sid, int)
            sids = np.asarray(sid) if multi else None

            def word(e):
                if e is None:
                    return Const(0, signed(32))
                return S[int(sids[e]) if multi else sid].regs[int(idx[e])]
            if len(elems) == 1 or at is None:
                return word(elems[0])
            return Array([word(e) for e in elems])[at]

        self.read = read
        ops = spec["ops"]
        self._shared_units(m, ops)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [token.eq(self.token), cyc.eq(1), running.eq(1)]
                    m.next = "op0"
            for n, op in enumerate(ops):
                nxt = f"op{n + 1}" if n + 1 < len(ops) else "FINISH"
                # counters of this micro-op alone: the others' logic stays quiet while it runs
                i, o, j = Signal(32, name=f"i{n}"), Signal(32, name=f"o{n}"), Signal(16, name=f"j{n}")
                getattr(self, f"_{op['kind']}")(m, n, op, nxt, S, read, token, pos, i, o, j)
            with m.State("FINISH"):
                m.d.comb += [self.done.eq(1)]
                m.d.sync += [pos.eq(pos + 1), running.eq(0)]
                m.next = "IDLE"
        return m

    def lanes(self, count: int) -> int:
        return max(1, min(self.L, count))

    @staticmethod
    def chunks(count: int, L: int) -> list[list[int | None]]:
        """elems[lane][step]: the element lane ``lane`` handles at each step (None: padding)."""
        st = -(-count // L)
        return [[s * L + k if s * L + k < count else None for s in range(st)] for k in range(L)]

    # --- shared units ---------------------------------------------------------------------
    def _shared_units(self, m, ops):
        """One unit per kind and shape, shared by every micro-op that uses it (one runs at a
        time): norms of one width and kind (each op's gains, bias and eps are its rows of the
        unit's ROMs, picked by ``sel``), activations of one kind, attention engines of one
        shape (one per op: each holds its layer's KV cache), MXINT quantisers of one block size."""
        self.units, self.sel = {}, {}
        norms: dict = {}
        for n, op in enumerate(ops):
            if op["kind"] == "norm":
                key = ("norm", len(op["gain"]), op["norm"], op["bias"] is None)
                norms.setdefault(key, []).append(n)
        for key, members in norms.items():
            rows = [ops[n] for n in members]
            unit = NormUnit(key[1], np.stack([r["gain"] for r in rows]),
                            None if key[3] else np.stack([r["bias"] for r in rows]),
                            eps=[r["eps"] for r in rows], kind=key[2], lanes=self.lanes(key[1]))
            self._add_unit(m, key, unit)
            for k, n in enumerate(members):
                self.sel[n] = k

    def _add_unit(self, m, key, unit):
        m.submodules[f"unit{len(self.units)}"] = unit
        m.d.comb += unit.valid.eq(0)
        if hasattr(unit, "last"):
            m.d.comb += unit.last.eq(0)
        self.units[key] = unit
        return unit

    def _unit(self, m, key, make):
        return self.units[key] if key in self.units else self._add_unit(m, key, make())

    def _mx(self, m, B, bits):
        """``max(1, lanes // B)`` MXINT quantisers of block B, shared by the linears and attention."""
        q = max(1, self.L // B)
        return [self._unit(m, ("mx", B, bits, u), lambda: MxQuant(B, bits)) for u in range(q)]

    # --- micro-ops --------------------------------------------------------------------------
    @staticmethod
    def _reset(m, i, o, j):
        m.d.sync += [i.eq(0), o.eq(0), j.eq(0)]

    def _embed(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        table = op["table"]
        V, F = table.shape
        L = self.lanes(F)
        st = -(-F // L)
        rp = _rom_wide(m, f"embed{n}", _chunked(table, F, L), 32)
        with m.State(f"op{n}"):
            m.d.comb += rp.addr.eq(token * st + i)
            m.d.sync += i.eq(i + 1)
            with m.If(i > 0):
                S[op["dst"]].write(m, i - 1, L, [_lane(rp.data, k, 32) for k in range(L)], F)
            with m.If(i == st):
                self._reset(m, i, o, j)
                m.next = nxt

    def _stream(self, m, n, ready, ys, count, L, nxt, dst, i, o, j, valids, lag: int = 0):
        """Issue ``ceil(count / L)`` chunks (the caller's feed drives the units' data ports
        with chunk ``i``, ``lag`` cycles ahead of ``valid``) and write every output chunk to
        ``dst`` (lane k of chunk o is element o*L + k)."""
        st = -(-count // L)
        v = Signal(name=f"v{n}")
        m.d.comb += v.eq(i < st)
        for k in range(lag):
            d = Signal(name=f"v{n}_d{k}")
            m.d.sync += d.eq(v)
            v = d
        for valid in valids:
            m.d.comb += valid.eq(v)
        m.d.sync += i.eq(Mux(i < st, i + 1, i))
        with m.If(ready):
            dst.write(m, o, L, ys, count)
            m.d.sync += o.eq(o + 1)
            with m.If(o == st - 1):
                self._reset(m, i, o, j)
                m.next = nxt

    def _norm(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        d = len(op["src"][1])
        unit = self.units[("norm", d, op["norm"], op["bias"] is None)]
        L = unit.lanes
        with m.State(f"op{n}"):
            for k, elems in enumerate(self.chunks(d, L)):
                m.d.comb += unit.x[k].eq(read(op["src"], elems, i))
            if unit.ops > 1:
                m.d.comb += unit.sel.eq(self.sel[n])
            self._stream(m, n, unit.ready, list(unit.y), d, L, nxt, S[op["dst"]], i, o, j, [unit.valid])

    def _act(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        cnt = len(op["x"][1])
        gated = op["up"] is not None
        L = self.lanes(cnt)
        units = [self._unit(m, ("act", op["act"], gated, k), lambda: Activation(op["act"], gated=gated))
                 for k in range(L)]
        with m.State(f"op{n}"):
            for k, elems in enumerate(self.chunks(cnt, L)):
                m.d.comb += units[k].x.eq(read(op["x"], elems, i))
                if gated:
                    m.d.comb += units[k].up.eq(read(op["up"], elems, i))
            self._stream(m, n, units[0].ready, [u.y for u in units], cnt, L, nxt, S[op["dst"]], i, o, j,
                         [u.valid for u in units])

    def _add(self, m, n, op, nxt, S, read, token, pos, i, o, j, kind="add"):
        cnt = len(op["a"][1])
        L = self.lanes(cnt)
        st = -(-cnt // L)
        unit = m.submodules[f"{kind}{n}"] = MulQ16(L) if kind == "mul" else ResidualAdd(L)
        m.d.comb += unit.valid.eq(0)
        rows = op["rows"]
        rp = None if rows is None else _rom_wide(m, f"rows{n}", _chunked(rows, cnt, L), 32)
        with m.State(f"op{n}"):
            if rp is not None:
                m.d.comb += rp.addr.eq((pos if rows.shape[0] > 1 else 0) * st + i)
            for k, elems in enumerate(self.chunks(cnt, L)):
                a = read(op["a"], elems, i)
                if rp is not None:
                    ad = Signal(signed(32), name=f"a{n}_{k}_d")
                    m.d.sync += ad.eq(a)
                    a, b = ad, _lane(rp.data, k, 32)
                else:
                    b = read(op["b"], elems, i)
                m.d.comb += [unit.a[k].eq(a), unit.b[k].eq(-b if kind == "sub" else b)]
            self._stream(m, n, unit.ready, list(unit.y), cnt, L, nxt, S[op["dst"]], i, o, j, [unit.valid],
                         lag=0 if rp is None else 1)

    def _sub(self, *a):
        return self._add(*a, kind="sub")

    def _mul(self, *a):
        return self._add(*a, kind="mul")

    def _rope(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        cnt = len(op["x"][1])
        L = self.lanes(cnt)
        st = -(-cnt // L)
        unit = m.submodules[f"rope{n}"] = RopeLane(L)
        m.d.comb += unit.valid.eq(0)
        cp = _rom_wide(m, f"cos{n}", _chunked(op["cos"], cnt, L), 32)
        sp = _rom_wide(m, f"sin{n}", _chunked(op["sin"], cnt, L), 32)
        neg = _chunked(np.asarray(op["sign"]) < 0, cnt, L)
        with m.State(f"op{n}"):
            m.d.comb += [cp.addr.eq(pos * st + i), sp.addr.eq(pos * st + i)]
            for k, elems in enumerate(self.chunks(cnt, L)):
                x, r = Signal(signed(32), name=f"rx{n}_{k}"), Signal(signed(33), name=f"rr{n}_{k}")
                p = read(op["partner"], elems, i)
                if st == 1:
                    sg = int(neg[0, k])
                    m.d.sync += r.eq(-p if sg else p)
                else:
                    m.d.sync += r.eq(Mux(Array([Const(int(v), 1) for v in neg[:, k]])[i], -p, p))
                m.d.sync += x.eq(read(op["x"], elems, i))
                m.d.comb += [unit.x[k].eq(x), unit.r[k].eq(r), unit.c[k].eq(_lane(cp.data, k, 32)),
                             unit.s[k].eq(_lane(sp.data, k, 32))]
            self._stream(m, n, unit.ready, list(unit.y), cnt, L, nxt, S[op["dst"]], i, o, j, [unit.valid], lag=1)

    def _mx_phase(self, m, n, state, blocks, B, bits, nxt, i, o, j, on_block, on_cycle=None):
        """Quantise ``blocks`` (per block: a list of B (operand, element) pairs) through the
        shared MXINT quantisers, ``len(mxs)`` blocks a cycle; ``on_block(slot, block index
        signal, mx)`` consumes each result as it comes."""
        mxs = self._mx(m, B, bits)
        q = len(mxs)
        st = -(-len(blocks) // q)
        with m.State(state):
            for u, mx in enumerate(mxs):
                per_step = [blocks[s * q + u] if s * q + u < len(blocks) else None for s in range(st)]
                for k in range(B):
                    srcs = [(b[k] if b is not None else None) for b in per_step]
                    m.d.comb += mx.x[k].eq(self._read_pairs(srcs, i))
                m.d.comb += mx.valid.eq(i < st)
            m.d.sync += i.eq(Mux(i < st, i + 1, i))
            with m.If(mxs[0].ready):
                for u, mx in enumerate(mxs):
                    bi = Signal(32, name=f"bi{n}_{u}")
                    m.d.comb += bi.eq(o * q + u)
                    with m.If(bi < len(blocks)):
                        on_block(u, bi, mx)
                if on_cycle is not None:
                    on_cycle(mxs)
                m.d.sync += o.eq(o + 1)
                with m.If(o == st - 1):
                    self._reset(m, i, o, j)
                    m.next = nxt

    def _read_pairs(self, srcs, at):
        """Per step, an (operand, element) or None: the word read at step ``at``. The operands
        of one lane may differ by step (k, v and q blocks of attention)."""
        groups: dict = {}
        for s, p in enumerate(srcs):
            if p is not None:
                groups.setdefault(id(p[0]), (p[0], [None] * len(srcs)))[1][s] = p[1]
        if not groups:
            return Const(0, signed(32))
        out = None
        for operand, elems in groups.values():
            v = self.read(operand, elems, at)
            out = v if out is None else v | out          # the others read 0 at this step
        return out

    def _linear(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        """A fabric stage: the input's MXINT blocks into the x registers, the start pulse, then
        the row-serial linear of the stage's stacked rows (``parts``: each linear's destination
        and its rows ``lo..hi`` of the stack), whose chain outputs are written as they come."""
        img = op["image"]
        s = img.spec
        B = op["block"]
        nblk = img.in_dim // B
        lin = m.submodules[f"lin{n}"] = RowSerialLinear(img)
        xe = [Signal(signed(s.act_bits), name=f"xe{n}_{k}") for k in range(img.in_dim)]
        xs = [Signal(unsigned(6), name=f"xs{n}_{b}") for b in range(nblk)]
        emin = Signal(signed(8), name=f"emin{n}")
        m.d.comb += [lin.start.eq(0), lin.valid.eq(0), lin.emin.eq(emin)]
        for k in range(img.in_dim):
            m.d.comb += lin.x[k].eq(xe[k])
        for u in range(img.in_dim // s.unit):
            m.d.comb += lin.sh[u].eq((xs[(u * s.unit) // B] - emin)[:s.shift_bits])
        blocks = [[(op["src"], b * B + k) for k in range(B)] for b in range(nblk)]

        def on_block(u, bi, mx):
            for b in range(nblk):
                with m.If(bi == b):
                    m.d.sync += [xe[b * B + k].eq(mx.elems[k]) for k in range(B)]
                    m.d.sync += xs[b].eq(mx.shift)

        def on_cycle(mxs):                          # emin: the least block shift so far
            cur = Signal(signed(8), name=f"em{n}_0")
            m.d.comb += cur.eq(Mux(o == 0, 127, emin))
            for u, mx in enumerate(mxs):
                c = Signal(signed(8), name=f"em{n}_{u + 1}")
                m.d.comb += c.eq(Mux((o * len(mxs) + u < nblk) & (mx.shift < cur), mx.shift, cur))
                cur = c
            m.d.sync += emin.eq(cur)

        self._mx_phase(m, n, f"op{n}", blocks, B, s.act_bits, f"op{n}_run", i, o, j, on_block, on_cycle)
        P = img.chains
        parts = op["parts"]
        lora_states = [f"op{n}_lora{p}" for p, f in enumerate(op.get("lora") or []) if f is not None]
        with m.State(f"op{n}_run"):
            m.d.comb += lin.start.eq(1)
            m.next = f"op{n}_collect"
        with m.State(f"op{n}_collect"):                  # row slot j of every chain
            with m.If(lin.ready):
                with m.Switch(j):
                    for slot in range(img.slots):
                        with m.Case(slot):
                            for p in range(P):
                                r = slot * P + p
                                for dst, lo, hi in parts:
                                    if lo <= r < hi:
                                        m.d.sync += S[dst].regs[r - lo].eq(lin.y[p])
                m.d.sync += j.eq(j + 1)
                with m.If(j == img.slots - 1):
                    self._reset(m, i, o, j)
                    m.next = lora_states[0] if lora_states else nxt
        # the LoRA units (docs/lora.md): each adapted linear of the stage adds B(Ax) to its outputs,
        # from its SRAM banks, on the x registers the fabric read
        adapted = [(p, f) for p, f in enumerate(op.get("lora") or []) if f is not None]
        for q, (p, f) in enumerate(adapted):
            dst, lo, hi = parts[p]
            unit = m.submodules[f"lora{n}_{p}"] = LoraUnit(f, img.in_dim, s.act_bits)
            m.d.comb += unit.start.eq(0)
            for k in range(img.in_dim):
                m.d.comb += unit.xe[k].eq(xe[k])
            for b in range(nblk):
                m.d.comb += unit.xs[b].eq(xs[b])
            m.d.comb += unit.emin.eq(emin)
            for r in range(hi - lo):
                m.d.comb += unit.y[r].eq(S[dst].regs[r])
            after = lora_states[q + 1] if q + 1 < len(adapted) else nxt
            with m.State(lora_states[q]):
                m.d.comb += unit.start.eq(1)
                m.next = lora_states[q] + "_wait"
            with m.State(lora_states[q] + "_wait"):
                with m.If(unit.ready):
                    m.d.sync += [S[dst].regs[r].eq(unit.out[r]) for r in range(hi - lo)]
                    m.next = after

    def _attention(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        """The token's k and v MXINT-quantised into the engine's KV cache at the position
        counter, q into registers; then the engine attends positions 0..pos for every head."""
        H, Hkv, D = op["heads"], op["kv_heads"], op["d"]
        bits = self.spec["act_bits"]
        B = mx_block(D)
        nb = D // B
        nk = Hkv * nb
        q_ports = max(1, self.L // B)
        eng = m.submodules[f"att{n}"] = AttentionEngine(H, Hkv, D, self.context, *op["scale"], block=B, bits=bits,
                                                        positions=self.P, ports=q_ports)
        m.d.comb += [eng.start.eq(0), eng.t.eq(pos)]
        for w in range(q_ports):
            m.d.comb += [eng.kv_en[w].eq(0), eng.kv_v[w].eq(0), eng.kv_addr[w].eq(0), eng.kv_e[w].eq(0),
                         eng.kv_s[w].eq(0)]
        QE = [Signal(signed(bits), name=f"qe{n}_{k}") for k in range(H * D)]
        QS = [Signal(unsigned(6), name=f"qs{n}_{b}") for b in range(H * nb)]
        for k in range(H * D):
            m.d.comb += eng.qe[k].eq(QE[k])
        for b in range(H * nb):
            m.d.comb += eng.qs[b].eq(QS[b])
        blocks = ([[(op["k"], c * B + k) for k in range(B)] for c in range(nk)]
                  + [[(op["v"], c * B + k) for k in range(B)] for c in range(nk)]
                  + [[(op["q"], c * B + k) for k in range(B)] for c in range(H * nb)])

        def on_block(u, bi, mx):
            with m.If(bi < 2 * nk):                         # a key or value block: into the cache
                is_v = bi >= nk
                blk = Mux(is_v, bi - nk, bi)
                m.d.comb += [eng.kv_en[u].eq(1), eng.kv_v[u].eq(is_v), eng.kv_addr[u].eq(pos * nk + blk),
                             eng.kv_e[u].eq(Cat(*mx.elems)), eng.kv_s[u].eq(mx.shift)]
            with m.Else():
                for c in range(H * nb):
                    with m.If(bi == 2 * nk + c):
                        m.d.sync += [QE[c * B + k].eq(mx.elems[k]) for k in range(B)]
                        m.d.sync += QS[c].eq(mx.shift)

        self._mx_phase(m, n, f"op{n}", blocks, B, bits, f"op{n}_run", i, o, j, on_block)
        with m.State(f"op{n}_run"):
            m.d.comb += eng.start.eq(1)
            m.next = f"op{n}_wait"
        with m.State(f"op{n}_wait"):
            with m.If(eng.ready):
                m.d.sync += [S[op["dst"]].regs[k].eq(eng.out[k]) for k in range(H * D)]
                self._reset(m, i, o, j)
                m.next = nxt

    def _argmax(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        V = len(op["src"][1])
        L = self.lanes(V)
        st = -(-V // L)
        tree = m.submodules[f"argmax{n}"] = ArgmaxTree(L)
        best = Signal(signed(32), name="best")
        with m.State(f"op{n}"):
            for k, elems in enumerate(self.chunks(V, L)):
                v = read(op["src"], elems, i)
                if any(e is None for e in elems):             # padding: never above a real logit
                    live = Array([Const(int(e is not None), 1) for e in elems])[i] if len(elems) > 1 else 0
                    v = Mux(live, v, INT32_MIN)
                m.d.comb += tree.x[k].eq(v)
            m.d.comb += tree.valid.eq(i < st)
            m.d.sync += i.eq(Mux(i < st, i + 1, i))
            with m.If(tree.ready):
                with m.If((o == 0) | (tree.value > best)):
                    m.d.sync += [best.eq(tree.value), self.next_token.eq(o * L + tree.index)]
                m.d.sync += o.eq(o + 1)
                with m.If(o == st - 1):
                    self._reset(m, i, o, j)
                    m.next = nxt


def run_tokens(top: ChipTop, prompt, n_new: int, *, max_cycles: int = 10_000_000) -> tuple[list[int], list[int]]:
    """Drive the chip with the prompt, then its own tokens, on the Amaranth simulator.
    Returns (the n_new generated tokens, the cycles of every token run)."""
    from amaranth.sim import Simulator
    ids = [int(t) for t in prompt]
    out, cycles = [], []

    async def bench(ctx):
        cur = list(ids)
        t = 0
        while len(out) < n_new:
            ctx.set(top.token, cur[t])
            ctx.set(top.start, 1)
            await ctx.tick()
            ctx.set(top.start, 0)
            for _ in range(max_cycles):
                if ctx.get(top.done):
                    break
                await ctx.tick()
            else:
                raise RuntimeError("the chip never raised done")
            cycles.append(ctx.get(top.cycles))
            nxt = ctx.get(top.next_token)
            await ctx.tick()
            t += 1
            if t >= len(cur):
                out.append(nxt)
                cur.append(nxt)

    sim = Simulator(top)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    return out, cycles


def _tick_driver(top: str) -> str:
    return f"""// generated by tapeout.hdl.chip: runs the whole chip token by token
#include "V{top}.h"
#include "verilated.h"
#include <chrono>
#include <cstdio>
#include <vector>

static void tick(V{top}* m) {{ m->clk = 0; m->eval(); m->clk = 1; m->eval(); }}

int main(int argc, char** argv) {{
  if (argc < 3) {{ std::fprintf(stderr, "usage: %s PROMPT OUTPUT\\n", argv[0]); return 2; }}
  std::FILE* fin = std::fopen(argv[1], "r");
  long n_prompt = 0, n_new = 0, max_cycles = 0;
  if (!fin || std::fscanf(fin, "%ld %ld %ld", &n_prompt, &n_new, &max_cycles) != 3) return 2;
  std::vector<long> cur(n_prompt);
  for (auto& v : cur) if (std::fscanf(fin, "%ld", &v) != 1) return 2;
  std::fclose(fin);
  VerilatedContext ctx;
  V{top}* m = new V{top}{{&ctx}};
  m->rst = 1; m->start = 0; tick(m); m->rst = 0;
  std::vector<long> out, cycles;
  long t = 0, total = 0;
  auto t0 = std::chrono::steady_clock::now();
  while ((long)out.size() < n_new) {{
    m->token = cur[t]; m->start = 1; tick(m); m->start = 0; ++total;
    long c = 0;
    while (!m->done) {{ tick(m); ++total; if (++c > max_cycles) {{ std::fprintf(stderr, "no done\\n"); return 3; }} }}
    cycles.push_back((long)m->cycles);
    long nxt = (long)m->next_token;
    tick(m); ++total;
    if (++t >= (long)cur.size()) {{ out.push_back(nxt); cur.push_back(nxt); }}
  }}
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m->final();
  delete m;
  std::FILE* fout = std::fopen(argv[2], "w");
  for (long v : out) std::fprintf(fout, "%ld ", v);
  std::fprintf(fout, "\\n");
  for (long v : cycles) std::fprintf(fout, "%ld ", v);
  std::fprintf(fout, "\\n");
  std::fclose(fout);
  std::printf("cycles %ld seconds %.9f\\n", total, secs);
  return 0;
}}
"""


def run_tokens_verilator(top: ChipTop, prompt, n_new: int, *, stats: dict | None = None,
                         max_cycles: int = 100_000_000) -> tuple[list[int], list[int]]:
    """As ``run_tokens``, on the chip's Verilog under Verilator (built once, cached by hash).
    ``stats`` receives ``convert_s``, ``build_s``, ``cached``, ``run_s``, ``sim_cycles``."""
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from .sim import _build, to_verilog, verilator_available, verilator_env
    ok, why = verilator_available()
    if not ok:
        raise RuntimeError(why)
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    text = to_verilog(top, "chip")
    stats["convert_s"] = time.perf_counter() - t0
    exe = _build(text, _tick_driver("chip"), "chip", verilator_env(), stats)
    ids = [int(v) for v in prompt]
    with tempfile.TemporaryDirectory(prefix="tapeout-chip-") as tmp:
        tmp = Path(tmp)
        (tmp / "prompt.txt").write_text(f"{len(ids)} {n_new} {max_cycles}\n" + " ".join(map(str, ids)) + "\n")
        proc = subprocess.run([str(exe), str(tmp / "prompt.txt"), str(tmp / "out.txt")], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the chip's Verilator simulation failed ({proc.returncode}): {proc.stderr[-2000:]}")
        fields = proc.stdout.split()
        rep = {fields[k]: float(fields[k + 1]) for k in range(0, len(fields) - 1, 2)}
        lines = (tmp / "out.txt").read_text().split("\n")
    stats["run_s"], stats["sim_cycles"] = rep["seconds"], int(rep["cycles"])
    return [int(v) for v in lines[0].split()], [int(v) for v in lines[1].split()]


def rtl_cycles(spec: dict, position: int) -> dict[str, int]:
    """The cycles ChipTop takes for a token at ``position``, micro-op by micro-op, from
    ``hdl.timing`` (``tests/test_chip_rtl.py`` holds the RTL's cycle counter to it). Keys:
    ``"{index} {kind}"``; the argmax's includes the done cycle."""
    from . import timing as tm
    L, P = int(spec.get("lanes", 1)), int(spec.get("positions", 1))
    out: dict[str, int] = {}
    for n, op in enumerate(spec["ops"]):
        k = op["kind"]
        if k == "embed":
            c = tm.embed(op["table"].shape[1], L)
        elif k in ("add", "sub", "mul"):
            c = tm.elementwise(len(op["a"][1]), L, op["rows"] is not None)
        elif k == "rope":
            c = tm.rope(len(op["x"][1]), L)
        elif k == "act":
            c = tm.act(len(op["x"][1]), op["act"], L)
        elif k == "norm":
            c = tm.norm(len(op["src"][1]), op["norm"], L)
        elif k == "linear":
            img = op["image"]
            c = tm.linear(img.in_dim, img.out_dim, L, chains=img.chains,
                          chain_tiles=img.chain_tiles, cols=img.spec.cols)
            c += sum(f.cycles for f in op.get("lora") or [] if f is not None)     # the LoRA units
        elif k == "attention":
            c = tm.attention(position + 1, op["heads"], op["kv_heads"], op["d"], L, P)
        elif k == "argmax":
            c = tm.argmax(len(op["src"][1]), L)
        else:
            raise ValueError(f"no cycle rule for {k}")
        out[f"{n} {k}"] = c
    return out
