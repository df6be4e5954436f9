"""The SRAM load image ``OUT/banks.bin``: the contents of every resident copy of the memory map
(weight blocks and constants) at its chip, bank and address, plus each linear's block
geometry and code table (spec: docs/dataflow.md, "Load image").

The compiler writes it from the program (``build_banks``); the simulator takes its weights and
constants from it and from nothing else (``BankImage``). A weight block's bytes are exactly the
memory map's ``bytes`` for that copy: the codes as indices into the linear's code table at
``w_bits``, the group scales at ``gs_bits`` (one bit string), then on the last K block the
requantisation words.
"""
from __future__ import annotations

import numpy as np

from tapeout.backends.bitpack import pack_rows, unpack_rows
from tapeout.compiler.errors import TapeoutError

from .isa import QueueError

__all__ = ["MAGIC", "VERSION", "HEADER", "ENTRY", "LINEAR", "REQ_WORD", "BankError", "BankImage", "build_banks"]

MAGIC, VERSION, ALIGN = b"TDFB", 1, 64
HEADER = np.dtype([("magic", "S4"), ("version", "<u2"), ("reserved", "<u2"), ("count", "<u4"), ("pad", "<u4")])
KIND_BLOCK, KIND_CONST, KIND_LINEAR = 0, 1, 2
MAX_DIMS = 6
ENTRY = np.dtype([("kind", "<u4"), ("copy", "<u4"), ("chip", "<u4"), ("bank", "<u4"), ("addr", "<u4"),
                  ("layer", "<u4"), ("j", "<u4"), ("ndim", "<u4"), ("shape", "<u4", (MAX_DIMS,)),
                  ("offset", "<u8"), ("bytes", "<u8")])
# the payload of a KIND_LINEAR entry, followed by ``codes`` int16 values (the code table)
LINEAR = np.dtype([("out", "<u4"), ("in", "<u4"), ("unit", "<u4"), ("rows", "<u4"), ("cols", "<u4"),
                   ("n_k", "<u4"), ("group", "<u4"), ("gs_per_block", "<u4"), ("w_bits", "<u4"),
                   ("gs_bits", "<u4"), ("codes", "<u4"), ("pad", "<u4")])
# one per output column of a linear's last K block: the requantisation word (``req_bytes``)
REQ_WORD = np.dtype([("mult", "<i4"), ("shift", "<i2"), ("bias", "<i4")])
NONE = 0xFFFFFFFF


class BankError(QueueError):
    """A malformed load image, or one that does not match the memory map."""


def _fits(what: str, name: str, v: np.ndarray, lo: int, hi: int) -> None:
    v = np.asarray(v, np.int64)
    bad = (v < lo) | (v > hi)
    if bad.any():
        raise TapeoutError(f"{name}: {what} {int(v[bad].flat[0])} does not fit [{lo}, {hi}] in the load image "
                           "(banks.bin)", node=name)


def block_groups(geo: dict, k: int) -> range:
    """The weight groups K block ``k`` of a linear touches (its first ``rows`` inputs from ``k * rows``)."""
    r0, r1 = k * geo["rows"], (k + 1) * geo["rows"] - 1
    return range(r0 // geo["group"], r1 // geo["group"] + 1)


def _block_payload(L, geo: dict, alphabet: np.ndarray, j: int) -> bytes:
    i, k = divmod(j, geo["n_k"])
    cols = slice(i * geo["cols"], min((i + 1) * geo["cols"], geo["out"]))
    rows = slice(k * geo["rows"], (k + 1) * geo["rows"])
    idx = np.searchsorted(alphabet, np.asarray(L.codes[cols, rows], np.int64))
    grp = block_groups(geo, k)
    gs = np.zeros((idx.shape[0], geo["gs_per_block"]), np.int64)
    gs[:, :len(grp)] = np.asarray(L.group_scale[cols, grp.start:grp.stop], np.int64)
    bits = np.concatenate([np.unpackbits(pack_rows(idx.reshape(1, -1), geo["w_bits"]), bitorder="little")
                           [:idx.size * geo["w_bits"]],
                           np.unpackbits(pack_rows(gs.reshape(1, -1), geo["gs_bits"]), bitorder="little")
                           [:gs.size * geo["gs_bits"]]])
    blob = np.packbits(bits, bitorder="little").tobytes()
    blob += bytes(geo["block_bytes"] - len(blob))
    if k == geo["n_k"] - 1:
        words = np.zeros(geo["cols"], REQ_WORD)
        n = cols.stop - cols.start
        words["mult"][:n], words["shift"][:n] = L.mult[cols], L.shift[cols]
        if L.bias is not None:
            words["bias"][:n] = L.bias[cols]
        blob += words.tobytes()
    return blob


def build_banks(ip, geos: dict[str, dict], memmap: list[dict]) -> bytes:
    """The load image of ``memmap``'s resident weight blocks and constants; ``geos``: the
    compiler's ``linear_blocks`` of every linear. Raises TapeoutError naming the layer or
    constant when a value does not fit its field."""
    g = ip.graph
    entries, blobs = [], []
    tables = {}
    for layer, op in enumerate(ip.ops):
        if op.kind != "linear":
            continue
        L, geo = ip.linears[op.name], geos[op.name]
        alphabet = np.unique(np.asarray(L.codes, np.int64))
        if len(alphabet) > 1 << geo["w_bits"]:
            raise TapeoutError(f"{op.name}: {len(alphabet)} distinct codes do not fit {geo['w_bits']}-bit indices",
                               node=op.name)
        _fits("code", op.name, alphabet, -(1 << 15), (1 << 15) - 1)
        _fits("group scale", op.name, L.group_scale, 0, (1 << geo["gs_bits"]) - 1)
        _fits("requantisation multiplier", op.name, L.mult, -(1 << 31), (1 << 31) - 1)
        _fits("requantisation shift", op.name, L.shift, -(1 << 15), (1 << 15) - 1)
        if L.bias is not None:
            _fits("bias", op.name, L.bias, -(1 << 31), (1 << 31) - 1)
        tables[layer] = alphabet
        head = np.zeros(1, LINEAR)
        for f in ("out", "in", "unit", "rows", "cols", "n_k", "group", "gs_per_block", "w_bits", "gs_bits"):
            head[f] = geo[f]
        head["codes"] = len(alphabet)
        entries.append((KIND_LINEAR, NONE, NONE, NONE, NONE, layer, NONE, 0, (0,) * MAX_DIMS))
        blobs.append(head.tobytes() + alphabet.astype("<i2").tobytes())
    for c in memmap:
        if not c["resident"] or c["value"][0] == "input":
            continue
        v = c["value"]
        if v[0] == "w":
            layer, j = int(v[1]), int(v[2])
            op = ip.ops[layer]
            blob = _block_payload(ip.linears[op.name], geos[op.name], tables[layer], j)
            entries.append((KIND_BLOCK, c["id"], c["chip"], c["bank"], c["addr"], layer, j, 0, (0,) * MAX_DIMS))
        else:
            name = v[1] if v[0] in ("const", "gather") else v[2]
            val = np.asarray(ip.const(name), np.int64)
            if v[0] == "constv":
                val = val.reshape(g.tensors[v[1]].shape)
            if val.ndim > MAX_DIMS:
                raise TapeoutError(f"constant {name}: {val.ndim} dimensions, the load image holds {MAX_DIMS}")
            _fits("value", f"constant {name}", val, -(1 << 31), (1 << 31) - 1)
            blob = val.astype("<i4").tobytes()
            entries.append((KIND_CONST, c["id"], c["chip"], c["bank"], c["addr"], NONE, NONE, val.ndim,
                            tuple(val.shape) + (0,) * (MAX_DIMS - val.ndim)))
        if len(blob) != c["bytes"]:
            raise TapeoutError(f"internal check failed: copy {c['id']} ({v}) is {c['bytes']} bytes in the memory "
                               f"map, {len(blob)} in the load image (a compiler bug)")
        blobs.append(blob)
    table = np.zeros(len(entries), ENTRY)
    for e, row in zip(table, entries):
        for f, x in zip(("kind", "copy", "chip", "bank", "addr", "layer", "j", "ndim", "shape"), row):
            e[f] = x
    offset = _align(HEADER.itemsize + table.nbytes)
    for e, blob in zip(table, blobs):
        e["offset"], e["bytes"] = offset, len(blob)
        offset = _align(offset + len(blob))
    out = bytearray(offset)
    out[:HEADER.itemsize] = np.array([(MAGIC, VERSION, 0, len(table), 0)], HEADER).tobytes()
    out[HEADER.itemsize:HEADER.itemsize + table.nbytes] = table.tobytes()
    for e, blob in zip(table, blobs):
        out[int(e["offset"]):int(e["offset"]) + len(blob)] = blob
    return bytes(out)


def _align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


class BankImage:
    """A parsed load image, checked against its own table and the memory map."""

    def __init__(self, data: bytes, memmap: list[dict]):
        self.data = np.frombuffer(data, np.uint8)
        if len(self.data) < HEADER.itemsize:
            raise BankError(f"load image of {len(self.data)} bytes has no header")
        h = self.data[:HEADER.itemsize].view(HEADER)[0]
        if h["magic"] != MAGIC:
            raise BankError(f"not a dataflow load image (magic {bytes(h['magic'])!r}, expected {MAGIC!r})")
        if h["version"] != VERSION:
            raise BankError(f"load image version {int(h['version'])}; this tapeout reads version {VERSION}")
        end = HEADER.itemsize + ENTRY.itemsize * int(h["count"])
        if end > len(self.data):
            raise BankError(f"load image of {len(self.data)} bytes is shorter than its table ({end} bytes)")
        self.table = self.data[HEADER.itemsize:end].view(ENTRY)
        for e in self.table:
            if e["offset"] + e["bytes"] > len(self.data) or e["offset"] < end:
                raise BankError(f"load image entry (kind {int(e['kind'])}, copy {int(e['copy'])}): bytes "
                                f"{int(e['offset'])}..{int(e['offset'] + e['bytes'])} lie outside the image's "
                                f"{len(self.data)} bytes")
        self.copies = {int(e["copy"]): e for e in self.table if e["kind"] != KIND_LINEAR}
        self.geo: dict[int, dict] = {}
        self.codes: dict[int, np.ndarray] = {}
        for e in self.table[self.table["kind"] == KIND_LINEAR]:
            raw = self._raw(e)
            if len(raw) < LINEAR.itemsize:
                raise BankError(f"load image: linear {int(e['layer'])}'s geometry is {len(raw)} bytes")
            head = raw[:LINEAR.itemsize].view(LINEAR)[0]
            geo = {f: int(head[f]) for f in LINEAR.names if f not in ("codes", "pad")}
            n = int(head["codes"])
            if len(raw) != LINEAR.itemsize + 2 * n or min(geo["rows"], geo["cols"], geo["unit"], geo["group"]) == 0:
                raise BankError(f"load image: linear {int(e['layer'])}'s geometry is malformed")
            geo["n_i"] = -(-geo["out"] // geo["cols"])
            geo["block_bytes"] = -(-(geo["rows"] * geo["cols"] * geo["w_bits"]
                                     + geo["cols"] * geo["gs_per_block"] * geo["gs_bits"]) // 8)
            geo["req_bytes"] = REQ_WORD.itemsize * geo["cols"]
            self.geo[int(e["layer"])] = geo
            self.codes[int(e["layer"])] = raw[LINEAR.itemsize:].view("<i2").astype(np.int64)
        for c in memmap:
            if not c["resident"] or c["value"][0] == "input":
                continue
            e = self.copies.get(c["id"])
            where = f"copy {c['id']} ({c['value']})"
            if e is None:
                raise BankError(f"the load image holds no {where}")
            if (int(e["chip"]), int(e["bank"]), int(e["addr"]), int(e["bytes"])) != \
                    (c["chip"], c["bank"], c["addr"], c["bytes"]):
                raise BankError(f"load image places {where} at chip {int(e['chip'])} bank {int(e['bank'])} address "
                                f"{int(e['addr']):#x} ({int(e['bytes'])} bytes); memory.json at chip {c['chip']} bank "
                                f"{c['bank']} address {c['addr']:#x} ({c['bytes']} bytes)")

    def _raw(self, e) -> np.ndarray:
        return self.data[int(e["offset"]):int(e["offset"] + e["bytes"])]

    def geometry(self, layer: int) -> dict:
        if layer not in self.geo:
            raise BankError(f"the load image holds no geometry of linear {layer}")
        return self.geo[layer]

    def value(self, copy: int):
        """What the bank holds at copy ``copy``: a weight block dict or a constant's array."""
        e = self.copies.get(copy)
        if e is None:
            raise BankError(f"the load image holds no copy {copy}")
        raw = self._raw(e)
        if e["kind"] == KIND_CONST:
            shape = tuple(int(d) for d in e["shape"][:int(e["ndim"])])
            if len(raw) != 4 * int(np.prod(shape, dtype=np.int64)):
                raise BankError(f"load image: constant copy {copy} of shape {shape} is {len(raw)} bytes")
            return raw.view("<i4").astype(np.int64).reshape(shape)
        layer, j = int(e["layer"]), int(e["j"])
        geo = self.geometry(layer)
        i, k = divmod(j, geo["n_k"])
        ncols = min(geo["cols"], geo["out"] - i * geo["cols"])
        nb, rows, unit = geo["block_bytes"], geo["rows"], geo["unit"]
        bits = np.unpackbits(raw[:nb], bitorder="little")
        cb, gb = geo["cols"] * rows * geo["w_bits"], geo["cols"] * geo["gs_per_block"] * geo["gs_bits"]
        n_code = ncols * rows
        idx = unpack_rows(np.packbits(bits[:n_code * geo["w_bits"]], bitorder="little")[None], n_code,
                          geo["w_bits"])[0]
        table = self.codes[layer]
        if idx.size and int(idx.max()) >= len(table):
            raise BankError(f"load image: block {j} of linear {layer} indexes code {int(idx.max())} of {len(table)}")
        n_gs = ncols * geo["gs_per_block"]
        gs = unpack_rows(np.packbits(bits[n_code * geo["w_bits"]:n_code * geo["w_bits"] + n_gs * geo["gs_bits"]],
                                     bitorder="little")[None], n_gs, geo["gs_bits"])[0]
        assert cb + gb <= 8 * nb
        gs = gs.reshape(ncols, geo["gs_per_block"])
        first = block_groups(geo, k).start
        units = (k * rows + np.arange(0, rows, unit)) // geo["group"] - first
        blk = {"codes": table[idx].reshape(ncols, rows), "gs": gs[:, units]}
        if k == geo["n_k"] - 1:
            words = raw[nb:nb + geo["req_bytes"]].view(REQ_WORD)[:ncols]
            blk.update(mult=words["mult"].astype(np.int64), shift=words["shift"].astype(np.int64),
                       bias=words["bias"].astype(np.int64))
        return blk
