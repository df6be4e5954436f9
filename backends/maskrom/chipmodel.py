"""Generating tokens on a compiled mask-ROM chip (spec: docs/chip.md).

Two engines, one interface (``generate``):

- ``golden``: the integer reference. The program is a window of ``S`` positions; each new
  token runs golden on the prompt so far (the rest of the window padded, its mask 0) and takes
  the argmax of the logits at the last real position. Nothing is carried from one token to
  the next, so it shares nothing with the chip's token-by-token path.
- ``chip``: the chip's cycle model. It runs the sequencer's token program one position at a
  time: the embedding row from the ROM table, every linear from its **row-serial word-line
  image read back from the via layers** (``hdl.rowserial.row_dense``: the image's code
  values times their scales as one matrix, equal to ``row_reference`` and tested so), the vector ops with
  the vector unit's own kernels (``backends/vector.py``, written without golden), keys and
  values written into a KV cache of ``context`` positions and attended from it, the argmax of
  the head. Cycles come from the sequencer (the estimate's costs).

Ties in the argmax go to the lowest token id in both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tapeout.backends import vector as vu
from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.golden.model import PLUMBING, Golden
from tapeout.compiler.interp import run_op
from tapeout.compiler.program import IntegerProgram
from tapeout.hdl.rowserial import row_dense, row_dense_apply

from . import rowfabric, sequencer
from .layers import ViaLayers, extract

ENGINES = ("golden", "chip", "verilator")


@dataclass
class Generation:
    tokens: list[int]                  # the new tokens
    prompt: list[int]
    engine: str
    cycles: list[int] = field(default_factory=list)      # per generated token (chip engine)
    logits: list[np.ndarray] = field(default_factory=list)   # per position run, when kept
    seconds: float = 0.0


def check_prompt(prompt, n_new: int, vocab: int, context: int) -> list[int]:
    ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
    if not ids:
        raise TapeoutError("the prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise TapeoutError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
    if n_new < 0:
        raise TapeoutError(f"--new-tokens must be >= 0, not {n_new}")
    runs = len(ids) + max(n_new - 1, 0)                   # the last new token is never fed back
    if runs > context:
        raise TapeoutError(f"the prompt ({len(ids)} tokens) and {n_new} new tokens need {runs} positions; "
                           f"the chip's context is {context} (the KV cache and the position tables)")
    return ids


def argmax(logits: np.ndarray) -> int:
    return int(np.argmax(np.asarray(logits).reshape(-1)))


# --- golden: whole windows ----------------------------------------------------------------------
def window_feeds(prog: IntegerProgram, ids, seq: int) -> dict[str, np.ndarray]:
    """Golden's feeds for one window holding ``ids`` at positions 0..n-1: the rest of the window
    padded with token 0 and mask 0, positions 0..S-1, token types 0."""
    g, itf = prog.graph, prog.interface
    n = len(ids)
    feeds = {}
    for name in g.inputs:
        info = g.tensors[name]
        shape = tuple(int(d) for d in info.shape)
        if name == itf.tokens:
            w = np.zeros(seq, np.int64)
            w[:n] = ids
            feeds[name] = w.reshape(shape).astype(info.dtype)
        elif name == itf.positions:
            feeds[name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(info.dtype)
        elif name == itf.mask:
            m = np.zeros(shape[-1], info.dtype)
            m[:n] = 1
            feeds[name] = np.broadcast_to(m, shape).copy()
        elif name == itf.token_types:
            feeds[name] = np.zeros(shape, info.dtype)
        else:
            raise TapeoutError(f"golden generation cannot fill the input {name!r}")
    return feeds


def golden_generate(prog: IntegerProgram, prompt, n_new: int, *, context: int | None = None,
                    keep_logits: bool = False, progress: Callable[[int], None] | None = None,
                    adapter: dict | None = None) -> Generation:
    itf = prog.interface
    seq = sequencer.analyse(prog)[2]
    ctx = seq if context is None else min(context, seq)
    ids = check_prompt(prompt, n_new, itf.vocab, ctx)
    gm, t0 = Golden(prog, lora=adapter), time.perf_counter()
    out = Generation([], list(ids), "golden")
    cur = list(ids)
    for step in range(n_new):
        n = len(cur)
        logits = gm.run(window_feeds(prog, cur, seq), outputs=[itf.logits])[itf.logits]
        row = logits.reshape(-1, seq, logits.shape[-1])[0, n - 1]
        if keep_logits:
            out.logits.append(row)
        nxt = argmax(row)
        out.tokens.append(nxt)
        cur.append(nxt)
        if progress:
            progress(step + 1)
    out.seconds = time.perf_counter() - t0
    return out


def golden_window_logits(prog: IntegerProgram, ids) -> np.ndarray:
    """Golden's logits [n, vocab] for the positions of ``ids`` (one window run)."""
    itf = prog.interface
    seq = sequencer.analyse(prog)[2]
    logits = Golden(prog).run(window_feeds(prog, list(ids), seq), outputs=[itf.logits])[itf.logits]
    return logits.reshape(-1, seq, logits.shape[-1])[0, :len(ids)]


# --- the chip: one token at a time ----------------------------------------------------------------
class ChipModel:
    """The whole chip, token by token, from its artifacts: the program's op list as the
    sequencer runs it, linears from the via layers' word-line images, a KV cache per attention."""

    def __init__(self, prog: IntegerProgram, layers: ViaLayers, plan: dict, seq: sequencer.Sequencer,
                 adapter: dict | None = None):
        self.prog, self.layers, self.plan, self.seq = prog, layers, plan, seq
        self.adapter = dict(adapter or {})          # linear op -> LoraLinear read from the SRAM image
        self.lora_cycles = sum(f.cycles for f in self.adapter.values())   # the LoRA unit, after its linears
        index = {n: i for i, n in enumerate(layers.names)}
        missing = [op.name for op in prog.ops if op.kind == "linear" and op.name not in index]
        if missing:
            raise TapeoutError(f"the via layers hold no linear {missing[0]!r} of the program")
        self.images = {}
        for op in prog.ops:
            if op.kind == "linear":
                li = index[op.name]
                self.images[op.name] = row_dense(rowfabric.linear_image(layers, li, plan, extract(layers, li)))
        self.unit = layers.base.family.unit
        self.act_bits = layers.base.family.act_bits
        self.reset()

    def reset(self) -> None:
        g = self.prog.graph
        self.cache = {}
        for a in self.seq.attention:
            op = g.op(a)
            kshape = [int(d) for d in g.tensors[op.inputs[1]].shape]
            vshape = [int(d) for d in g.tensors[op.inputs[2]].shape]
            kshape[-2], vshape[-2] = self.seq.context, self.seq.context
            self.cache[a] = (np.zeros(kshape, np.int64), np.zeros(vshape, np.int64))
        self.position = 0

    def _linear(self, name: str, x: np.ndarray, out_shape) -> np.ndarray:
        img = self.images[name]
        rows = x.reshape(-1, x.shape[-1]).astype(np.int64)
        i_dim = rows.shape[-1]
        if vu.block_width(i_dim) % self.unit:
            raise TapeoutError(f"the fabric unit {self.unit} does not divide the input blocks of {i_dim} features")
        elems, su, emin = vu.mx_rows(rows, self.unit, self.act_bits)
        y = row_dense_apply(img, elems, su - emin[:, None], emin)
        return y.reshape(out_shape)

    def step(self, token: int) -> tuple[np.ndarray, int]:
        """Run the token at the current position; returns (logits [vocab], cycles)."""
        prog, seq, g, itf = self.prog, self.seq, self.prog.graph, self.prog.interface
        t = self.position
        if t >= seq.context:
            raise TapeoutError(f"position {t} is past the chip's context of {seq.context}")
        axis, tables = seq.axis, seq.tables

        def one(shape, a):
            s = [int(d) for d in shape]
            if a is not None:
                s[a] = 1
            return tuple(s)

        env: dict[str, np.ndarray] = {}
        for name in g.inputs:
            info = g.tensors[name]
            shape = one(info.shape, axis.get(name))
            if name == itf.tokens:
                env[name] = np.full(shape, token, np.int64)
            elif name == itf.positions:
                env[name] = np.full(shape, t, np.int64)
            elif name == itf.mask:
                env[name] = np.ones(shape, np.int64)
            else:
                env[name] = np.zeros(shape, np.int64)

        def value(name):
            if not name:
                return None
            if name in env:
                return env[name]
            c = prog.const(name)
            a = tables.get(name)
            return np.take(c, [t], axis=a) if a is not None else c

        for op in prog.ops:
            outs = [o for o in op.outputs if o]
            k = op.kind
            args = [value(op.inputs[0])] if k == "linear" else [value(i) for i in op.inputs]
            if k == "linear":
                y = self._linear(op.name, args[0], one(g.tensors[outs[0]].shape, axis.get(outs[0])))
                if op.name in self.adapter:             # the LoRA unit: + B(Ax) from the SRAM
                    y = vu.lora(y, args[0], self.adapter[op.name], self.act_bits)
                res = (y,)
            elif k == "attention":
                kc, vc = self.cache[op.name]
                kc[:, :, t:t + 1] = args[1]
                vc[:, :, t:t + 1] = args[2]
                res = (vu.attention(prog, op, args[0], kc[:, :, :t + 1], vc[:, :, :t + 1], None),)
            elif k in ("Reshape", "Expand"):
                shape = one(g.tensors[outs[0]].shape, axis.get(outs[0]))
                res = (np.reshape(args[0], shape) if k == "Reshape" else np.broadcast_to(args[0], shape).copy(),)
            elif k in vu.KERNELS:
                res = vu.KERNELS[k](prog, op, *args)
                res = res if isinstance(res, tuple) else (res,)
            elif k in PLUMBING or k in ("Cast", "Squeeze", "Unsqueeze", "Flatten"):
                res = run_op(op, args)
            else:
                raise TapeoutError(f"the chip model has no unit for {k}", node=op.name, op=k)
            for o, v in zip(op.outputs, res):
                if o:
                    env[o] = v
        logits = env[seq.lm_head].reshape(-1)
        cycles = seq.cycles_at(t) + self.lora_cycles
        self.position += 1
        return logits, cycles

    def generate(self, prompt, n_new: int, *, keep_logits: bool = False,
                 progress: Callable[[int], None] | None = None) -> Generation:
        ids = check_prompt(prompt, n_new, self.prog.interface.vocab, self.seq.context)
        self.reset()
        t0 = time.perf_counter()
        out = Generation([], list(ids), "chip")
        cur = list(ids)
        pos = 0
        while len(out.tokens) < n_new:
            logits, cyc = self.step(cur[pos])
            pos += 1
            if keep_logits:
                out.logits.append(logits)
            if pos < len(cur):
                continue                      # still reading the prompt: its next token is given
            nxt = argmax(logits)
            out.tokens.append(nxt)
            out.cycles.append(cyc)
            cur.append(nxt)
            if progress:
                progress(len(out.tokens))
        out.seconds = time.perf_counter() - t0
        return out


def load_chip(folder: str | Path):
    """(program, via layers, plan, sequencer) of a compiled chip folder (hashes checked)."""
    from tapeout.driver import load_program, open_folder
    from .layers import load_layers
    folder = Path(folder)
    man, target = open_folder(folder)
    if target.name != "maskrom":
        raise TapeoutError(f"`tapeout run` runs mask-ROM chips; this folder is a {target.name} compile",
                           file=str(folder))
    prog = load_program(folder)
    layers = load_layers(folder)
    plan = rowfabric.chip_plan(layers)
    seq = sequencer.build(prog, plan, context=man["options"].get("context"), arch=man["options"].get("arch"))
    return man, prog, layers, plan, seq
