"""Per-unit instruction queues of the dataflow machine: fields, binary file, decoder, listing
(spec: docs/dataflow.md, "Queues").

Every functional unit (MEM bank, VXM, MXM, SXM, C2C of every chip) has one queue; every
instruction carries its absolute issue cycle. A queue is a numpy structured array (``DF``) in
issue order; ``queues.bin`` holds all of them behind a unit table.
"""
from __future__ import annotations

import struct

import numpy as np

__all__ = ["OPS", "OP", "DF", "FLAG_FIRST", "FLAG_LAST", "WHOLE", "encode", "decode", "listing", "QueueError"]


class QueueError(ValueError):
    """A malformed queue file, or a schedule the checker or the simulator rejects."""


# READ/WRITE: MEM bank <-> stream. RECV/SEND: a compute slice <-> stream. EXEC: a VXM or SXM
# operation. IW: an MXM installs a weight block from a stream; MM: it streams activations
# through it. TX/RX: a C2C slice sends / receives a tensor over the chip-to-chip link.
OPS = ("NOP", "READ", "WRITE", "RECV", "SEND", "EXEC", "IW", "MM", "TX", "RX")
OP = {name: i for i, name in enumerate(OPS)}
FLAG_FIRST, FLAG_LAST = 1, 2          # MM: first K block (clear the accumulator) / last (requantise, emit)
WHOLE = 0xFFFFFFFF                    # WRITE/READ region: the whole copy

DF = np.dtype([("cycle", "<u8"), ("op", "u1"), ("flags", "u1"), ("stream", "<u2"), ("peer", "<u2"),
               ("n", "<u4"), ("layer", "<u4"), ("a", "<u4"), ("b", "<u4"), ("addr", "<u4")])
MAGIC = b"TODF"
VERSION = 1
HEAD = struct.Struct("<4sIII")            # magic, version, units, record size
ENTRY = struct.Struct("<32sQQ")           # unit name, first record, records


def encode(queues: dict[str, np.ndarray]) -> bytes:
    """``{unit name: DF array}`` -> bytes: header, unit table, then the records of every unit."""
    parts, first = [], 0
    table = []
    for name, q in queues.items():
        raw = name.encode("ascii")
        if len(raw) > 32:
            raise QueueError(f"unit name {name!r} is longer than 32 bytes")
        table.append(ENTRY.pack(raw, first, len(q)))
        parts.append(np.ascontiguousarray(q, DF).tobytes())
        first += len(q)
    return HEAD.pack(MAGIC, VERSION, len(queues), DF.itemsize) + b"".join(table) + b"".join(parts)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of ``encode``."""
    if len(data) < HEAD.size:
        raise QueueError(f"queue file is {len(data)} bytes, shorter than its header")
    magic, version, n, size = HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or size != DF.itemsize:
        raise QueueError(f"not a version-{VERSION} tapeout queue file (magic {magic!r}, version {version}, "
                         f"record size {size})")
    body = HEAD.size + n * ENTRY.size
    if len(data) < body:
        raise QueueError("queue file truncated in its unit table")
    recs = np.frombuffer(data, DF, offset=body) if (len(data) - body) % DF.itemsize == 0 else None
    if recs is None:
        raise QueueError(f"queue file: {len(data) - body} record bytes, not a multiple of {DF.itemsize}")
    out = {}
    for i in range(n):
        raw, first, count = ENTRY.unpack_from(data, HEAD.size + i * ENTRY.size)
        if first + count > len(recs):
            raise QueueError(f"queue file: unit {i} claims records {first}..{first + count}, file has {len(recs)}")
        q = recs[first:first + count].copy()
        if len(q) and int(q["op"].max()) >= len(OPS):
            raise QueueError(f"unit {raw.rstrip(bytes(1)).decode()}: unknown opcode {int(q['op'].max())}")
        out[raw.rstrip(bytes(1)).decode("ascii")] = q
    return out


LISTING = """\
; tapeout dataflow queues: {{ units }} units, {{ count }} instructions, makespan {{ makespan }} cycles
; machine: {% for k, v in machine.items() %}{{ k }}={{ v }} {% endfor %}
; columns: issue-cycle  opcode  operands  ; layer
{% for u in queues -%}
{{ u.name }}: {{ u.count }} instructions
{% for r in u.rows -%}
  @{{ "%-9d"|format(r.cycle) }} {{ "%-5s"|format(r.op) }} {{ r.args }}{% if r.note %}  ; {{ r.note }}{% endif %}
{% endfor -%}
{% if u.more %}  ; ... {{ u.more }} more
{% endif -%}
{% endfor -%}"""


def _args(r, units: list[str]) -> str:
    op = OPS[r["op"]]
    s, n = int(r["stream"]), int(r["n"])
    peer = units[r["peer"]] if r["peer"] < len(units) else str(int(r["peer"]))
    if op == "READ":
        return f"copy={r['a']} addr={r['addr']:#x} -> s{s} n={n} to {peer}" + ("" if r["b"] == WHOLE else f" k={r['b']}")
    if op == "WRITE":
        return f"s{s} -> copy={r['a']} addr={r['addr']:#x} n={n} from {peer}" + ("" if r["b"] == WHOLE else f" i={r['b']}")
    if op == "RECV":
        return f"s{s} n={n} operand={r['a']}"
    if op == "SEND":
        return f"s{s} n={n}" + ("" if r["b"] == WHOLE else f" block={r['b']}")
    if op == "EXEC":
        return f"busy={n}"
    if op in ("IW", "MM"):
        fl = "".join(f for f, b in (("F", FLAG_FIRST), ("L", FLAG_LAST)) if r["flags"] & b) if op == "MM" else ""
        return f"s{s} n={n} block={r['a']}" + (f" buf={r['flags']}" if op == "IW" else f" {fl}")
    if op in ("TX", "RX"):
        return f"transfer={r['a']} n={n} {'to' if op == 'TX' else 'from'} {peer}"
    return ""


def listing(queues: dict[str, np.ndarray], names: list[str], machine: dict, makespan: int,
            limit: int | None = None) -> str:
    """Human-readable listing of every queue (jinja2); ``limit`` caps the rows per unit."""
    import jinja2
    units = list(queues)
    view = []
    for u, q in queues.items():
        keep = q if limit is None else q[:limit]
        rows = [{"cycle": int(r["cycle"]), "op": OPS[r["op"]], "args": _args(r, units),
                 "note": names[r["layer"]] if r["layer"] < len(names) else ""} for r in keep]
        view.append({"name": u, "count": len(q), "rows": rows, "more": len(q) - len(keep)})
    env = jinja2.Environment(keep_trailing_newline=True, autoescape=False)
    return env.from_string(LISTING).render(units=len(queues), count=sum(len(q) for q in queues.values()),
                                           makespan=makespan, machine=machine, queues=view)
