"""The whole mask-ROM chip as one Amaranth design: embedding ROM, the row-serial linears, the
vector units, attention over a KV cache in on-chip memories, argmax, and the sequencer that
runs them in order, one token at a time (spec: docs/chip.md, "The whole chip in RTL").

``ChipTop(spec)`` elaborates the micro-ops of ``backends.maskrom.chiprtl.build_spec``. The
protocol is as follows:
- with ``start = 1`` on a clock edge while idle, the chip latches ``token`` and runs it at its
  position counter (0 after reset, +1 per token);
- the edge after it finishes raises ``done`` for one cycle, with ``next_token`` (the argmax of
  the logits) and ``cycles`` (the token's cycles, start edge to done).

Each micro-op is a state of the sequencer's FSM. It streams its operands into its unit, one
element or block per cycle, and writes the unit's outputs back. The operands are read from the
activation memories (one per tensor of the token) through address ROMs, which carry the
program's data movement. Norm, activation, attention and MXINT units are shared by every
micro-op of their shape. Each linear has its own row-serial tiles with a folded ROM, which is
small enough for the tiny models. SRAM macros and the base-die tile view for large models are
open items in docs/chip.md.
"""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .rowserial import RowSerialLinear
from .vector import Activation, AttentionUnit, MulQ16, MxQuant, NormUnit, ResidualAdd, RopeLane

__all__ = ["ChipTop"]


def _rom_comb(m: Module, name: str, values):
    """A ROM of unsigned words read combinationally (address maps): returns the read port."""
    values = [int(v) for v in np.asarray(values).reshape(-1)]
    width = max(1, max(values, default=0).bit_length())
    mem = Memory(shape=unsigned(width), depth=max(len(values), 2), init=values + [0] * max(0, 2 - len(values)))
    m.submodules[name] = mem
    return mem.read_port(domain="comb")


def _rom(m: Module, name: str, values, shape):
    """A ROM (Memory with one synchronous read port): returns the port (addr -> data next cycle)."""
    values = [int(v) for v in np.asarray(values).reshape(-1)]
    mem = Memory(shape=shape, depth=max(len(values), 2), init=values + [0] * (2 - len(values)) if len(values) < 2 else values)
    m.submodules[name] = mem
    return mem.read_port()


class _Store:
    """One activation tensor of a token: a memory of Q16 words, comb read ports made on demand."""

    def __init__(self, m: Module, name: str, n: int):
        self.m, self.n = m, n
        self.mem = Memory(shape=signed(32), depth=max(n, 2), init=[])
        m.submodules[name] = self.mem

    def read(self, addr):
        rp = self.mem.read_port(domain="comb")
        self.m.d.comb += rp.addr.eq(addr)
        return rp.data

    def writer(self):
        wp = self.mem.write_port()
        self.m.d.comb += [wp.en.eq(0), wp.addr.eq(0), wp.data.eq(0)]
        return wp


class ChipTop(wiring.Component):
    def __init__(self, spec: dict):
        self.spec = spec
        vocab, ctx = spec["vocab"], spec["context"]
        self.vocab, self.context = vocab, ctx
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
        roms = [0]

        def read(operand, at):
            """Element ``at`` (a signal or an int) of an operand: its storage's word, through
            the operand's address map (a ROM unless it is the identity)."""
            sid, idx = operand
            idx = np.asarray(idx)
            if not isinstance(sid, int):                  # several storages: one read per storage, a select
                sids = np.asarray(sid)
                if isinstance(at, int):
                    return S[int(sids[at])].read(int(idx[at]))
                roms[0] += 1
                which = sorted(set(int(v) for v in sids))
                sel = _rom_comb(m, f"sel{roms[0]}", [which.index(int(v)) for v in sids])
                adr = _rom_comb(m, f"adr{roms[0]}", idx)
                m.d.comb += [sel.addr.eq(at), adr.addr.eq(at)]
                out = S[which[0]].read(adr.data)
                for k, w in enumerate(which[1:], 1):
                    out = Mux(sel.data == k, S[w].read(adr.data), out)
                return out
            if isinstance(at, int):
                return S[sid].read(int(idx[at]))
            if np.array_equal(idx, np.arange(len(idx))):
                return S[sid].read(at)
            roms[0] += 1
            rp = _rom_comb(m, f"map{roms[0]}", idx)
            m.d.comb += rp.addr.eq(at)
            return S[sid].read(rp.data)

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

    # --- shared units ---------------------------------------------------------------------
    def _shared_units(self, m, ops):
        """One unit per kind and shape, shared by every micro-op that uses it (one runs at a
        time): norms of one width and kind (each op's gains, bias and eps are its rows of the
        unit's ROMs, picked by ``sel``), activations of one kind, attention of one head size
        and scale, MXINT quantisers of one block size."""
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
                            eps=[r["eps"] for r in rows], kind=key[2])
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

    # --- micro-ops --------------------------------------------------------------------------
    @staticmethod
    def _reset(m, i, o, j):
        m.d.sync += [i.eq(0), o.eq(0), j.eq(0)]

    def _embed(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        table = op["table"]
        V, F = table.shape
        rp = _rom(m, f"embed{n}", table, signed(32))
        wp = S[op["dst"]].writer()
        with m.State(f"op{n}"):
            m.d.comb += rp.addr.eq(token * F + i)
            m.d.sync += i.eq(i + 1)
            with m.If(i > 0):
                m.d.comb += [wp.en.eq(1), wp.addr.eq(i - 1), wp.data.eq(rp.data)]
            with m.If(i == F):
                self._reset(m, i, o, j)
                m.next = nxt

    def _stream(self, m, n, unit, count, feed, nxt, dst, i, o, j, lag: int = 0):
        """Issue ``count`` operand sets (``feed(i)`` drives the unit's data ports, ``lag``
        cycles ahead of ``valid``) and write every output to ``dst[o]``."""
        wp = dst.writer()
        with m.State(f"op{n}"):
            feed(i)
            v = Signal(name=f"v{n}")
            m.d.comb += v.eq(i < count)
            for k in range(lag):
                d = Signal(name=f"v{n}_d{k}")
                m.d.sync += d.eq(v)
                v = d
            m.d.comb += unit.valid.eq(v)
            m.d.sync += i.eq(Mux(i < count, i + 1, i))
            with m.If(unit.ready):
                y = unit.y if isinstance(unit.y, Value) else unit.y[0]      # a scalar port, or lane 0
                m.d.comb += [wp.en.eq(1), wp.addr.eq(o), wp.data.eq(y)]
                m.d.sync += o.eq(o + 1)
                with m.If(o == count - 1):
                    self._reset(m, i, o, j)
                    m.next = nxt

    def _norm(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        d = len(op["src"][1])
        unit = self.units[("norm", d, op["norm"], op["bias"] is None)]

        def feed(at):
            m.d.comb += unit.x.eq(read(op["src"], at))
            if unit.ops > 1:
                m.d.comb += unit.sel.eq(self.sel[n])
        self._stream(m, n, unit, d, feed, nxt, S[op["dst"]], i, o, j)

    def _act(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        cnt = len(op["x"][1])
        gated = op["up"] is not None
        unit = self._unit(m, ("act", op["act"], gated), lambda: Activation(op["act"], gated=gated))

        def feed(at):
            m.d.comb += unit.x.eq(read(op["x"], at))
            if op["up"] is not None:
                m.d.comb += unit.up.eq(read(op["up"], at))
        self._stream(m, n, unit, cnt, feed, nxt, S[op["dst"]], i, o, j)

    def _add(self, m, n, op, nxt, S, read, token, pos, i, o, j, kind="add"):
        cnt = len(op["a"][1])
        unit = m.submodules[f"{kind}{n}"] = MulQ16(1) if kind == "mul" else ResidualAdd(1)
        m.d.comb += unit.valid.eq(0)
        rows = op["rows"]
        rp = None if rows is None else _rom(m, f"rows{n}", rows, signed(32))

        def feed(at):
            a = read(op["a"], at)
            if rp is not None:
                m.d.comb += rp.addr.eq((pos if rows.shape[0] > 1 else 0) * cnt + at)
                ad = Signal(signed(32), name=f"a{n}_d")
                m.d.sync += ad.eq(a)
                a, b = ad, rp.data
            else:
                b = read(op["b"], at)
            m.d.comb += [unit.a[0].eq(a), unit.b[0].eq(-b if kind == "sub" else b)]
        self._stream(m, n, unit, cnt, feed, nxt, S[op["dst"]], i, o, j, lag=0 if rp is None else 1)

    def _sub(self, *a):
        return self._add(*a, kind="sub")

    def _mul(self, *a):
        return self._add(*a, kind="mul")

    def _rope(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        cnt = len(op["x"][1])
        unit = m.submodules[f"rope{n}"] = RopeLane(1)
        m.d.comb += unit.valid.eq(0)
        cp = _rom(m, f"cos{n}", op["cos"], signed(32))
        sp = _rom(m, f"sin{n}", op["sin"], signed(32))
        sg = _rom_comb(m, f"sign{n}", (np.asarray(op["sign"]) < 0).astype(np.int64))

        def feed(at):
            m.d.comb += [cp.addr.eq(pos * cnt + at), sp.addr.eq(pos * cnt + at), sg.addr.eq(at)]
            x, r = Signal(signed(32), name=f"rx{n}"), Signal(signed(33), name=f"rr{n}")
            p = read(op["partner"], at)
            m.d.sync += [x.eq(read(op["x"], at)), r.eq(Mux(sg.data[0], -p, p))]
            m.d.comb += [unit.x[0].eq(x), unit.r[0].eq(r), unit.c[0].eq(cp.data), unit.s[0].eq(sp.data)]
        self._stream(m, n, unit, cnt, feed, nxt, S[op["dst"]], i, o, j, lag=1)

    def _linear(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        img = op["image"]
        s = img.spec
        B = op["block"]
        nblk = img.in_dim // B
        lin = m.submodules[f"lin{n}"] = RowSerialLinear(img)
        mx = self._unit(m, ("mx", B, s.act_bits), lambda: MxQuant(B, s.act_bits))
        xe = [Signal(signed(s.act_bits), name=f"xe{n}_{k}") for k in range(img.in_dim)]
        xs = Array(Signal(unsigned(6), name=f"xs{n}_{b}") for b in range(nblk))
        emin = Signal(signed(8), name=f"emin{n}")
        m.d.comb += [lin.start.eq(0), lin.valid.eq(0), lin.emin.eq(emin)]
        for k in range(img.in_dim):
            m.d.comb += lin.x[k].eq(xe[k])
        for u in range(img.in_dim // s.unit):
            m.d.comb += lin.sh[u].eq((xs[(u * s.unit) // B] - emin)[:s.shift_bits])
        with m.State(f"op{n}"):                           # MXINT: one block per cycle
            for k in range(B):
                m.d.comb += mx.x[k].eq(read(op["src"], i * B + k) if nblk > 1 else read(op["src"], k))
            m.d.comb += mx.valid.eq(i < nblk)
            m.d.sync += i.eq(Mux(i < nblk, i + 1, i))
            with m.If(mx.ready):
                for b in range(nblk):
                    with m.If(o == b):
                        m.d.sync += [xe[b * B + k].eq(mx.elems[k]) for k in range(B)]
                m.d.sync += [xs[o].eq(mx.shift), o.eq(o + 1),
                             emin.eq(Mux((o == 0) | (mx.shift < emin), mx.shift, emin))]
                with m.If(o == nblk - 1):
                    self._reset(m, i, o, j)
                    m.next = f"op{n}_run"
        with m.State(f"op{n}_run"):
            m.d.comb += lin.start.eq(1)
            m.next = f"op{n}_collect"
        P = img.chains
        wps = [S[op["dst"]].writer() for _ in range(P)]
        with m.State(f"op{n}_collect"):                  # row slot j of every chain
            with m.If(lin.ready):
                for p in range(P):
                    idx = Signal(32, name=f"yo{n}_{p}")
                    m.d.comb += idx.eq(j * P + p)
                    m.d.comb += [wps[p].en.eq(idx < img.out_dim), wps[p].addr.eq(idx), wps[p].data.eq(lin.y[p])]
                m.d.sync += j.eq(j + 1)
                with m.If(j == img.slots - 1):
                    self._reset(m, i, o, j)
                    m.next = nxt

    def _attention(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        from amaranth.hdl import Cat
        H, Hkv, D = op["heads"], op["kv_heads"], op["d"]
        rep = H // Hkv
        bits = self.spec["act_bits"]
        B = D if D < 32 else 32 if D % 32 == 0 else int(np.gcd(D, 32))
        nb = D // B
        ctx = self.context
        unit = self._unit(m, ("att", D, *op["scale"], B, bits),
                          lambda: AttentionUnit(D, ctx, *op["scale"], block=B, bits=bits))
        mx = self._unit(m, ("mx", B, bits), lambda: MxQuant(B, bits))
        nk = Hkv * nb                                       # blocks per position: k, then v, then q
        kv = {}
        for name, width in (("ke", B * bits), ("ve", B * bits), ("ks", 6), ("vs", 6)):
            mem = m.submodules[f"{name}{n}"] = Memory(shape=unsigned(width), depth=ctx * nk, init=[])
            wp = mem.write_port()
            m.d.comb += [wp.en.eq(0), wp.addr.eq(0), wp.data.eq(0)]
            kv[name] = (mem, wp)
        QE = Array(Signal(signed(bits), name=f"qe{n}_{k}") for k in range(H * D))
        QS = Array(Signal(unsigned(6), name=f"qs{n}_{b}") for b in range(H * nb))
        total = 2 * nk + H * nb
        with m.State(f"op{n}"):                            # MXINT of this token's k, v and q blocks
            seg = Signal(2, name=f"seg{n}")
            off = Signal(32, name=f"off{n}")
            m.d.comb += [seg.eq(Mux(i < nk, 0, Mux(i < 2 * nk, 1, 2))),
                         off.eq(Mux(i < nk, i, Mux(i < 2 * nk, i - nk, i - 2 * nk)) * B)]
            for k in range(B):
                vk, vv, vq = (read(op[name], off + k) for name in ("k", "v", "q"))
                m.d.comb += mx.x[k].eq(Mux(seg == 0, vk, Mux(seg == 1, vv, vq)))
            m.d.comb += mx.valid.eq(i < total)
            m.d.sync += i.eq(Mux(i < total, i + 1, i))
            with m.If(mx.ready):
                with m.If(o < 2 * nk):
                    is_k = o < nk
                    blk = Mux(is_k, o, o - nk)
                    for name, sel in (("ke", is_k), ("ve", ~is_k)):
                        wp = kv[name][1]
                        m.d.comb += [wp.en.eq(sel), wp.addr.eq(pos * nk + blk), wp.data.eq(Cat(*mx.elems))]
                    for name, sel in (("ks", is_k), ("vs", ~is_k)):
                        wp = kv[name][1]
                        m.d.comb += [wp.en.eq(sel), wp.addr.eq(pos * nk + blk), wp.data.eq(mx.shift)]
                with m.Else():
                    qb = Signal(32, name=f"qb{n}")
                    m.d.comb += qb.eq(o - 2 * nk)
                    for c in range(H * nb):
                        with m.If(qb == c):
                            m.d.sync += [QE[c * B + k].eq(mx.elems[k]) for k in range(B)]
                            m.d.sync += QS[c].eq(mx.shift)
                m.d.sync += o.eq(o + 1)
                with m.If(o == total - 1):
                    self._reset(m, i, o, j)
                    m.next = f"op{n}_head"
        hk = Signal(range(max(Hkv, 2)), name=f"hk{n}")
        m.d.comb += hk.eq(j // rep if rep > 1 else j)
        words = []
        for b in range(nb):                                # position i, kv head hk, block b
            w = {}
            for name in ("ke", "ve", "ks", "vs"):
                rp = kv[name][0].read_port(domain="comb")
                m.d.comb += rp.addr.eq(i * nk + hk * nb + b)
                w[name] = rp.data
            words.append(w)
        wps = [S[op["dst"]].writer() for _ in range(D)]
        with m.State(f"op{n}_head"):                       # positions 0..pos into the unit
            for k in range(D):
                m.d.comb += unit.qe[k].eq(QE[j * D + k])
            for b in range(nb):
                m.d.comb += unit.qs[b].eq(QS[j * nb + b])
                for k in range(B):
                    m.d.comb += [unit.ke[b * B + k].eq(words[b]["ke"][k * bits:(k + 1) * bits].as_signed()),
                                 unit.ve[b * B + k].eq(words[b]["ve"][k * bits:(k + 1) * bits].as_signed())]
                m.d.comb += [unit.ks[b].eq(words[b]["ks"]), unit.vs[b].eq(words[b]["vs"])]
            m.d.comb += [unit.valid.eq(i <= pos), unit.last.eq(i == pos)]
            m.d.sync += i.eq(Mux(i <= pos, i + 1, i))
            with m.If(unit.ready):
                for k in range(D):
                    m.d.comb += [wps[k].en.eq(1), wps[k].addr.eq(j * D + k), wps[k].data.eq(unit.out[k])]
                m.d.sync += [j.eq(j + 1), i.eq(0)]
                with m.If(j == H - 1):
                    self._reset(m, i, o, j)
                    m.next = nxt

    def _argmax(self, m, n, op, nxt, S, read, token, pos, i, o, j):
        V = len(op["src"][1])
        best = Signal(signed(32), name="best")
        with m.State(f"op{n}"):
            v = read(op["src"], i)
            with m.If((i == 0) | (v > best)):
                m.d.sync += [best.eq(v), self.next_token.eq(i)]
            m.d.sync += i.eq(i + 1)
            with m.If(i == V - 1):
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
    """The cycles ChipTop takes for a token at ``position``, micro-op by micro-op, from the
    FSM's structure and the units' latencies (``tests/test_chip_rtl.py`` holds the RTL to it).
    Keys: ``"{index} {kind}"``; ``"finish"`` is the done cycle."""
    from .rowserial import stage_cycles
    from .vector import DivRound, ExpNeg
    T = position + 1
    att_div = DivRound.latency(17)
    out: dict[str, int] = {}
    for n, op in enumerate(spec["ops"]):
        k = op["kind"]
        if k == "embed":
            c = op["table"].shape[1] + 1
        elif k in ("add", "sub", "mul"):
            c = len(op["a"][1]) + 1 + (0 if op["rows"] is None else 1)
        elif k == "rope":
            c = len(op["x"][1]) + 2 + 1
        elif k == "act":
            c = len(op["x"][1]) + Activation.latency(op["act"])
        elif k == "norm":
            d = len(op["src"][1])
            c = d + NormUnit.latency(d, op["norm"])
        elif k == "linear":
            img = op["image"]
            c = (img.in_dim // op["block"] + MxQuant.LATENCY) + 1 + stage_cycles(
                img.out_dim, img.in_dim, chains=img.chains, chain_tiles=img.chain_tiles, cols=img.spec.cols)
        elif k == "attention":
            D, H, Hkv = op["d"], op["heads"], op["kv_heads"]
            B = D if D < 32 else 32 if D % 32 == 0 else int(np.gcd(D, 32))
            nb = D // B
            mx = 2 * Hkv * nb + H * nb + MxQuant.LATENCY
            c = mx + H * (4 * T + ExpNeg.LATENCY + att_div + 2)
        elif k == "argmax":
            c = len(op["src"][1])
        else:
            raise ValueError(f"no cycle rule for {k}")
        out[f"{n} {k}"] = c
    out["finish"] = 1
    return out
