"""The systolic microcode: instruction fields, 128-bit binary encoding, decoder, listing
(spec: docs/isa.md, "ISA").

A program is a numpy structured array (``INSTR``), one row per instruction, in program order.
Every instruction carries the cycle at which the static schedule issues it: dependencies are
resolved at compile time (the scheduler proves them, ``compiler.schedule``), so the four queues
(load, compute, vector, store) need no runtime tokens; the ISA simulator re-checks every read
against the cycle its data is ready.
"""
from __future__ import annotations

import numpy as np

__all__ = ["OPS", "QUEUE", "INSTR", "encode", "decode", "listing", "IsaError", "BUF_SCORES", "BUF_VALUES",
           "DIGIT_SHIFT"]


class IsaError(ValueError):
    """Malformed microcode, or a schedule that reads data before it is ready."""


# opcode -> (name, queue)
OPS = ("NOP", "LOAD_X", "LOAD_W", "PRELOAD", "MATMUL", "REQUANT", "STORE", "QUANT_X", "VEC", "HALT",
       "QUANT_A", "SOFTMAX")
OP = {name: i for i, name in enumerate(OPS)}
QUEUE = {"NOP": "none", "LOAD_X": "load", "LOAD_W": "load", "PRELOAD": "compute", "MATMUL": "compute",
         "REQUANT": "vector", "STORE": "store", "QUANT_X": "vector", "VEC": "vector", "HALT": "none",
         "QUANT_A": "vector", "SOFTMAX": "vector"}
FLAG_FIRST, FLAG_LAST = 1, 2          # MATMUL: first K tile (clear the accumulator), last K tile
DIGIT_SHIFT = 2                       # MATMUL of P.V: flags bits 2-3 = the 7-bit digit of P streamed
BUF_SCORES, BUF_VALUES = 2, 3         # PRELOAD/MATMUL/REQUANT of an attention: Q.K^T or P.V

INSTR = np.dtype([("op", "u1"), ("buf", "u1"), ("flags", "u1"), ("layer", "u2"), ("i", "u2"), ("k", "u2"),
                  ("t0", "u2"), ("t", "u2"), ("cycle", "u8")])

# (field, bit offset, width) of the two little-endian 64-bit words
WORD0 = (("op", 0, 5), ("buf", 5, 3), ("flags", 8, 4), ("layer", 12, 16), ("i", 28, 16), ("k", 44, 16))
WORD1 = (("cycle", 0, 40), ("t", 40, 12), ("t0", 52, 12))


def encode(prog: np.ndarray) -> bytes:
    """Program -> bytes (16 per instruction: word0, word1, little-endian)."""
    words = np.zeros((len(prog), 2), "<u8")
    for w, layout in enumerate((WORD0, WORD1)):
        for name, off, width in layout:
            v = prog[name].astype(np.uint64)
            if len(v) and int(v.max()) >= 1 << width:
                bad = int(np.argmax(v >= np.uint64(1 << width)))
                raise IsaError(f"instruction {bad} ({OPS[prog['op'][bad]]}): field {name}={int(v[bad])} "
                               f"does not fit its {width} bits")
            words[:, w] |= v << np.uint64(off)
    return words.tobytes()


def decode(data: bytes) -> np.ndarray:
    """Bytes -> program (the inverse of ``encode``)."""
    if len(data) % 16:
        raise IsaError(f"microcode is {len(data)} bytes, not a multiple of 16")
    words = np.frombuffer(data, "<u8").reshape(-1, 2)
    prog = np.zeros(len(words), INSTR)
    for w, layout in enumerate((WORD0, WORD1)):
        for name, off, width in layout:
            prog[name] = (words[:, w] >> np.uint64(off)) & np.uint64((1 << width) - 1)
    if len(prog) and int(prog["op"].max()) >= len(OPS):
        bad = int(np.argmax(prog["op"] >= len(OPS)))
        raise IsaError(f"instruction {bad}: unknown opcode {int(prog['op'][bad])}")
    return prog


LISTING = """\
; tapeout systolic microcode: {{ count }} instructions, {{ nbytes }} bytes
; machine: {% for k, v in machine.items() %}{{ k }}={{ v }} {% endfor %}
; columns: index  issue-cycle  queue  opcode  operands  ; layer
{% for r in rows -%}
{{ "%8d"|format(r.idx) }} @{{ "%-10d"|format(r.cycle) }} {{ "%-7s"|format(r.queue) }} {{ "%-8s"|format(r.op) }} {{ r.args }}{% if r.name %}  ; {{ r.name }}{% endif %}
{% endfor -%}
{% if more %}; ... {{ more }} more instructions (--listing-limit)
{% endif %}"""


def _args(r) -> str:
    op = OPS[r["op"]]
    if op in ("PRELOAD", "MATMUL"):
        fl = "".join(f for f, b in (("F", FLAG_FIRST), ("L", FLAG_LAST)) if r["flags"] & b)
        if r["buf"] == BUF_VALUES and op == "MATMUL":
            fl += f" d{r['flags'] >> DIGIT_SHIFT}"
        return f"i={r['i']} k={r['k']} buf={r['buf']} t={r['t0']}+{r['t']}" + (f" {fl.strip()}" if fl else "")
    if op in ("LOAD_W", "REQUANT", "STORE", "SOFTMAX"):
        return f"i={r['i']} buf={r['buf']} t={r['t0']}+{r['t']}"
    if op in ("QUANT_X", "QUANT_A", "VEC", "LOAD_X"):
        return f"t={r['t0']}+{r['t']}"
    return ""


def listing(prog: np.ndarray, names: list[str], machine: dict, limit: int | None = None) -> str:
    """Human-readable listing (jinja2); ``names[layer]`` annotates each instruction."""
    import jinja2
    n = len(prog) if limit is None else min(limit, len(prog))
    rows = [dict(idx=j, cycle=int(prog["cycle"][j]), queue=QUEUE[OPS[prog["op"][j]]], op=OPS[prog["op"][j]],
                 args=_args(prog[j]), name=names[prog["layer"][j]] if prog["layer"][j] < len(names) else "")
            for j in range(n)]
    env = jinja2.Environment(keep_trailing_newline=True, autoescape=False, undefined=jinja2.StrictUndefined)
    return env.from_string(LISTING).render(count=len(prog), nbytes=16 * len(prog), machine=machine, rows=rows,
                                           more=len(prog) - n)
