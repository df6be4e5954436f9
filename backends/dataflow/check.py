"""The static checker of dataflow queues (spec: docs/dataflow.md, "Checker").

From the queues, the memory map and the machine alone it proves, without running anything:

* **streams**: every vector put on a stream (``READ``, ``SEND``) is taken by at least one
  reader (``WRITE``, ``RECV``, ``IW``, ``MM``) exactly at the cycle it reaches the reader
  (``issue + hop_cycles * distance``), with the same length, and no stream carries two
  transfers in one cycle (a transfer holds its stream from its first vector leaving the
  producer to its last vector reaching the farthest reader);
* **ports**: no MEM bank's read port or write port, and no unit's issue, receive or send port
  is used by two instructions in one cycle (a striped table's read holds every stripe);
* **memory**: every READ names a copy that lives at that bank and address, and reads it only
  after every write into it has landed; MXM multiplies find their block installed and not yet
  overwritten; every ``RX`` is exactly ``link_latency`` after its ``TX``.

The first violation raises ``QueueError`` naming the unit, the cycle and the resource.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .isa import OP, OPS, QueueError
from .lower import unit_slice
from .machine import Machine

__all__ = ["check"]

PRODUCERS = {OP["READ"], OP["SEND"]}
READERS = {OP["WRITE"], OP["RECV"], OP["IW"], OP["MM"]}
# port of each opcode on its unit: instructions on one port may not overlap
PORT = {"READ": "read port", "WRITE": "write port", "RECV": None, "SEND": "send port", "EXEC": "issue port",
        "IW": "weight port", "MM": "activation port", "TX": "link transmit", "RX": "link receive"}


def check(m: Machine, queues: dict[str, np.ndarray], memmap: list[dict]) -> dict:
    """Raise ``QueueError`` at the first conflict; returns counts of what was proven."""
    by_id = {c["id"]: c for c in memmap}
    ev: list[tuple] = []              # (chip, stream, cycle, is_reader, unit, row)
    ports: dict[tuple, list] = defaultdict(list)
    writes: dict[int, list] = defaultdict(list)
    reads: list[tuple] = []
    iw: dict[str, list] = defaultdict(list)
    mm: list[tuple] = []
    tx, rx = {}, {}
    for unit, q in queues.items():
        chip = int(unit.split(".", 1)[0][1:])
        sl = unit_slice(unit)
        if len(q) and np.any(np.diff(q["cycle"].astype(np.int64)) < 0):
            i = int(np.flatnonzero(np.diff(q["cycle"].astype(np.int64)) < 0)[0]) + 1
            raise QueueError(f"{unit} @ cycle {int(q['cycle'][i])}: queue not in issue order (instruction {i})")
        for i, r in enumerate(q):
            op, cyc, n = OPS[r["op"]], int(r["cycle"]), int(r["n"])
            if r["op"] in PRODUCERS:
                ev.append((chip, int(r["stream"]), cyc, 0, unit, i))
            elif r["op"] in READERS:
                ev.append((chip, int(r["stream"]), cyc, 1, unit, i))
            port = PORT.get(op)
            if port:
                ports[(unit, port)].append((cyc, cyc + n, i))
            if op == "READ":
                c = by_id.get(int(r["a"]))
                if c is None or c["chip"] != chip or c["bank"] != sl[1] or c["addr"] != int(r["addr"]):
                    raise QueueError(f"{unit} @ cycle {cyc}: READ of copy {int(r['a'])} at address "
                                     f"{int(r['addr']):#x}, which the memory map does not place in this bank")
                for extra in c["stripes"][1:]:
                    ports[(f"c{chip}.mem{extra}", "read port")].append((cyc, cyc + n, -1 - i))
                reads.append((unit, cyc, c))
            elif op == "WRITE":
                c = by_id.get(int(r["a"]))
                if c is None or c["chip"] != chip or c["bank"] != sl[1] or c["addr"] != int(r["addr"]):
                    raise QueueError(f"{unit} @ cycle {cyc}: WRITE into copy {int(r['a'])}, which the memory map "
                                     "does not place in this bank")
                writes[c["id"]].append((cyc + n, int(r["b"])))
            elif op == "IW":
                iw[unit].append((cyc, cyc + n, int(r["flags"]), int(r["layer"]), int(r["a"])))
            elif op == "MM":
                mm.append((unit, cyc, int(r["layer"]), int(r["a"])))
            elif op == "TX":
                tx[int(r["a"])] = (unit, cyc, n)
            elif op == "RX":
                rx[int(r["a"])] = (unit, cyc, n)
    # ports: no two instructions of one port in one cycle
    for (unit, port), iv in ports.items():
        iv.sort()
        for (s0, e0, i0), (s1, e1, i1) in zip(iv, iv[1:]):
            if s1 < e0 and e1 > s1 and e0 > s0:
                raise QueueError(f"{unit} @ cycle {s1}: {port} used twice (instructions {abs(i0)} and {abs(i1)} "
                                 f"overlap over cycles {s1}..{min(e0, e1) - 1})")
    # streams: exact arrival, no overlap
    ev.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    transfers = 0
    cur = None              # (chip, stream, producer unit, cycle, n, pos, occupied until, readers)
    def close(cur):
        if cur is not None and cur[7] == 0:
            raise QueueError(f"{cur[2]} @ cycle {cur[3]}: the {cur[4]} vectors it sends on stream {cur[1]} "
                             "reach no reader")
    for chip, s, cyc, is_reader, unit, i in ev:
        r = queues[unit][i]
        n = int(r["n"])
        pos = unit_slice(unit)
        if not is_reader:
            if cur is not None and (cur[0], cur[1]) == (chip, s):
                close(cur)
                if cyc < cur[6]:
                    raise QueueError(f"{unit} @ cycle {cyc}: stream {s} of chip {chip} is still carrying the "
                                     f"transfer {cur[2]} started at cycle {cur[3]} (busy until cycle {cur[6]})")
            elif cur is not None:
                close(cur)
            cur = [chip, s, unit, cyc, n, pos, cyc + n, 0]
            transfers += 1
            continue
        if cur is None or (cur[0], cur[1]) != (chip, s):
            raise QueueError(f"{unit} @ cycle {cyc}: {OPS[r['op']]} reads stream {s} of chip {chip}, on which "
                             "nothing was sent before")
        arrive = cur[3] + m.hop(cur[5], pos)
        if arrive != cyc or cur[4] != n:
            raise QueueError(f"{unit} @ cycle {cyc}: {OPS[r['op']]} reads {n} vectors from stream {s}, but the "
                             f"{cur[4]} vectors {cur[2]} sent at cycle {cur[3]} reach it at cycle {arrive}")
        cur[6] = max(cur[6], cyc + n)
        cur[7] += 1
    close(cur)
    # memory: reads after the writes landed
    for unit, cyc, c in reads:
        if c["resident"]:
            continue
        got = writes.get(c["id"], [])
        if len({reg for _, reg in got}) < c["regions"] or max((e for e, _ in got), default=cyc + 1) > cyc:
            raise QueueError(f"{unit} @ cycle {cyc}: READ of copy {c['id']} ({c['value']}) before its writes "
                             f"landed (last write ends at cycle {max((e for e, _ in got), default='never')})")
    # MXM: a multiply finds its block installed, and no later install overwrote it first
    for unit, cyc, layer, block in mm:
        mine = [w for w in iw[unit] if w[0] <= cyc]
        hit = [w for w in mine if (w[3], w[4]) == (layer, block)]
        if not hit or hit[-1][1] > cyc:
            raise QueueError(f"{unit} @ cycle {cyc}: MM of block {block} of layer {layer} before its install "
                             "finished")
        later = [w for w in mine if w[0] > hit[-1][0] and w[2] == hit[-1][2]]
        if later:
            raise QueueError(f"{unit} @ cycle {cyc}: MM of block {block}: weight buffer {hit[-1][2]} was "
                             f"overwritten at cycle {later[0][0]}")
    for t, (unit, cyc, n) in tx.items():
        got = rx.get(t)
        if got is None or got[1] != cyc + m.link_latency or got[2] != n:
            raise QueueError(f"{unit} @ cycle {cyc}: link transfer {t} is not received exactly link_latency="
                             f"{m.link_latency} cycles later")
    return {"transfers": transfers, "port_uses": sum(len(v) for v in ports.values()), "reads": len(reads),
            "multiplies": len(mm), "links": len(tx)}
