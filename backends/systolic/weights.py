"""The weight image ``OUT/weights.bin``: the DRAM contents the ``LOAD_W`` instructions read, one
strip per linear and output tile (spec: docs/isa.md, "Weight image").

The compiler writes it from the program's linears (``build_image``); the ISA simulator and the
RTL replay read their weights from it and from nothing else (``WeightImage``). A strip's bytes
are exactly the ones the cycle model's DMA moves (``lower.strip_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tapeout.compiler.errors import TapeoutError

from tapeout.backends.bitpack import pack_signed, unpack_signed

from .isa import IsaError
from .lower import linear_geometry, strip_bytes, tile_geometry
from .machine import Machine

__all__ = ["MAGIC", "VERSION", "HEADER", "STRIP", "REQUANT_WORD", "ImageError", "Strip", "WeightImage", "build_image",
           "pack_codes", "unpack_codes"]

MAGIC, VERSION, ALIGN = b"TSWI", 1, 64
HEADER = np.dtype([("magic", "S4"), ("version", "<u2"), ("n", "<u2"), ("count", "<u4"), ("reserved", "<u4")])
STRIP = np.dtype([("layer", "<u4"), ("i", "<u4"), ("rows", "<u4"), ("in", "<u4"), ("w_bits", "<u4"),
                  ("group", "<u4"), ("offset", "<u8"), ("bytes", "<u8")])
# one per output row: the requantisation word of the mask-ROM's via layers (maskrom/layers.py ROW_DTYPE)
REQUANT_WORD = np.dtype([("mult", "<i2"), ("shift", "i1"), ("pad", "u1"), ("bias", "<i4")])
GROUP_SCALE = np.dtype("<u2")


class ImageError(IsaError):
    """A malformed weight image, or one that does not hold the strip an instruction loads."""


@dataclass(frozen=True)
class Strip:
    """One decoded strip: what a LOAD_W puts in a strip buffer."""

    codes: np.ndarray           # int64 [rows, in]
    group_scale: np.ndarray     # int64 [rows, ceil(in / group)]
    mult: np.ndarray            # int64 [rows]
    shift: np.ndarray           # int64 [rows]
    bias: np.ndarray            # int64 [rows] (0 for a linear without bias)


# --- codes at w_bits -------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """int [rows, in] -> uint8 [rows, ceil(in * bits / 8)], two's complement at ``bits``
    (``backends/bitpack.py``: code ``c`` is bits ``c*bits ..`` of the row, LSB first)."""
    return pack_signed(codes, bits)


def unpack_codes(data: np.ndarray, n_in: int, bits: int) -> np.ndarray:
    """The inverse of ``pack_codes``: uint8 [rows, row_bytes] -> int64 [rows, n_in]."""
    return unpack_signed(data, n_in, bits)


# --- writing ---------------------------------------------------------------------------------------
def _fit(name: str, what: str, v: np.ndarray, lo: int, hi: int, field: str) -> None:
    """No silent truncation: a value outside its field fails the compile naming the layer."""
    v = np.asarray(v, np.int64)
    bad = (v < lo) | (v > hi)
    if bad.any():
        raise TapeoutError(f"layer {name}: {what} {int(v[bad].flat[0])} does not fit its {field} "
                           f"[{lo}, {hi}] in the weight image (weights.bin)", node=name)


def _layer_rows(name: str, L, geo: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output row of one linear: packed codes, group scales, requantisation word (bytes)."""
    bits = geo["w_bits"]
    _fit(name, "code", L.codes, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, f"{bits} bits")
    gs = np.asarray(L.group_scale, np.int64)
    if gs.shape != (geo["out"], -(-geo["in"] // geo["group"])):
        raise TapeoutError(f"layer {name}: group scales of shape {gs.shape} for {geo['out']} rows of "
                           f"{geo['in']} inputs in groups of {geo['group']}", node=name)
    _fit(name, "group scale", gs, 0, 0xFFFF, "2 bytes (uint16)")
    words = np.zeros(geo["out"], REQUANT_WORD)
    bias = np.zeros(geo["out"], np.int64) if L.bias is None else L.bias
    for field, v, (lo, hi) in (("mult", L.mult, (-(1 << 15), (1 << 15) - 1)), ("shift", L.shift, (-128, 127)),
                               ("bias", bias, (-(1 << 31), (1 << 31) - 1))):
        _fit(name, f"requantisation {field}", v, lo, hi, f"{REQUANT_WORD[field].itemsize * 8}-bit field")
        words[field] = v
    return (pack_codes(L.codes, bits), np.ascontiguousarray(gs.astype(GROUP_SCALE)).view(np.uint8).reshape(geo["out"], -1),
            words.view(np.uint8).reshape(geo["out"], -1))


def build_image(ip, machine: Machine) -> bytes:
    """The weight image of ``ip``'s linears for ``machine`` (its strips have ``n`` rows);
    raises TapeoutError naming the layer when a value does not fit its field."""
    n = machine.n
    table, strips = [], []
    for layer, op in enumerate(ip.ops):
        if op.kind != "linear":
            continue
        geo = linear_geometry(ip, op.name, machine)
        sections = _layer_rows(op.name, ip.linears[op.name], geo)
        for i in range(geo["n_i"]):
            rows = slice(i * n, min((i + 1) * n, geo["out"]))
            blob = b"".join(np.ascontiguousarray(s[rows]).tobytes() for s in sections)
            nrows = rows.stop - rows.start
            assert len(blob) == strip_bytes(geo, nrows), (op.name, i)
            table.append((layer, i, nrows, geo["in"], geo["w_bits"], geo["group"], 0, len(blob)))
            strips.append(blob)
    entries = np.array(table, STRIP) if table else np.zeros(0, STRIP)
    offset = _align(HEADER.itemsize + STRIP.itemsize * len(entries))
    for e, blob in zip(entries, strips):
        e["offset"] = offset
        offset = _align(offset + len(blob))
    header = np.array([(MAGIC, VERSION, n, len(entries), 0)], HEADER)
    out = bytearray(offset)
    out[:HEADER.itemsize] = header.tobytes()
    out[HEADER.itemsize:HEADER.itemsize + entries.nbytes] = entries.tobytes()
    for e, blob in zip(entries, strips):
        out[int(e["offset"]):int(e["offset"]) + len(blob)] = blob
    return bytes(out)


def _align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


# --- reading ---------------------------------------------------------------------------------------
class WeightImage:
    """A parsed weight image: its strip table checked against the file and the machine."""

    def __init__(self, data: bytes, machine: Machine):
        self.data = np.frombuffer(data, np.uint8)
        if len(self.data) < HEADER.itemsize:
            raise ImageError(f"weight image of {len(self.data)} bytes has no header")
        h = self.data[:HEADER.itemsize].view(HEADER)[0]
        if h["magic"] != MAGIC:
            raise ImageError(f"not a systolic weight image (magic {bytes(h['magic'])!r}, expected {MAGIC!r})")
        if h["version"] != VERSION:
            raise ImageError(f"weight image version {int(h['version'])}; this tapeout reads version {VERSION}")
        if h["n"] != machine.n:
            raise ImageError(f"weight image has strips of {int(h['n'])} rows, the machine's array is n={machine.n}")
        end = HEADER.itemsize + STRIP.itemsize * int(h["count"])
        if end > len(self.data):
            raise ImageError(f"weight image of {len(self.data)} bytes is shorter than its strip table ({end} bytes)")
        self.n = machine.n
        self.table = self.data[HEADER.itemsize:end].view(STRIP)
        self.index = {(int(e["layer"]), int(e["i"])): j for j, e in enumerate(self.table)}
        for e in self.table:
            self._check(e)

    def _check(self, e) -> None:
        where = f"weight image strip (layer {int(e['layer'])}, i {int(e['i'])})"
        if not (1 <= e["rows"] <= self.n and e["in"] > 0 and e["group"] > 0 and 2 <= e["w_bits"] <= 32):
            raise ImageError(f"{where}: bad geometry rows={int(e['rows'])} in={int(e['in'])} "
                             f"w_bits={int(e['w_bits'])} group={int(e['group'])}")
        want = strip_bytes({"in": int(e["in"]), "w_bits": int(e["w_bits"]), "group": int(e["group"])}, int(e["rows"]))
        if e["bytes"] != want:
            raise ImageError(f"{where}: {int(e['bytes'])} bytes, its geometry needs {want}")
        if e["offset"] + e["bytes"] > len(self.data):
            raise ImageError(f"{where}: bytes {int(e['offset'])}..{int(e['offset'] + e['bytes'])} lie beyond the "
                             f"image's {len(self.data)} bytes")

    def entry(self, layer: int, i: int):
        j = self.index.get((layer, i))
        if j is None:
            raise ImageError(f"the weight image holds no strip (layer {layer}, i {i})")
        return self.table[j]

    def strip(self, layer: int, i: int) -> Strip:
        """Decode strip ``(layer, i)``: exactly the bytes its LOAD_W moves."""
        e = self.entry(layer, i)
        rows, n_in, bits, ng = int(e["rows"]), int(e["in"]), int(e["w_bits"]), -(-int(e["in"]) // int(e["group"]))
        raw = self.data[int(e["offset"]):int(e["offset"] + e["bytes"])]
        cb, gb = rows * -(-n_in * bits // 8), rows * ng * GROUP_SCALE.itemsize
        words = raw[cb + gb:].view(REQUANT_WORD)
        return Strip(unpack_codes(raw[:cb].reshape(rows, -1), n_in, bits),
                     raw[cb:cb + gb].view(GROUP_SCALE).reshape(rows, ng).astype(np.int64),
                     words["mult"].astype(np.int64), words["shift"].astype(np.int64), words["bias"].astype(np.int64))

    def geometry(self, layer: int, block: int, machine: Machine) -> dict:
        """A linear's tiling from its strips' table entries (``lower.tile_geometry``)."""
        first = self.entry(layer, 0)
        n_i, out = 0, 0
        while (layer, n_i) in self.index:
            out += int(self.table[self.index[(layer, n_i)]]["rows"])
            n_i += 1
        return tile_geometry(block, machine, out, int(first["in"]), int(first["group"]), int(first["w_bits"]))
