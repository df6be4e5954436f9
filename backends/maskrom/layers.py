"""The two customised via layers of a model: placement, packed via maps, extraction.

Record layout per tile (little-endian; docs/layout.md):

V_CODE  cells   R*C entries, 4 bits each (0 = no via, k = coarse line k-1), two per byte, row-major
        scales  R * (C/unit) uint32 group-scale words (row-major)
        rows    R * 8 bytes: int16 mult, int8 shift, uint8 0, int32 bias (Q16); zero except in
                the first column tile of a linear
V_FINE  cells   R*C entries, ``fine_bits`` (0, 2 or 4) bits each (0 = no via, k = fine line k-1)
        route   uint16 linear index + 1 (0 = unused tile), uint16 row tile, uint16 column tile, uint16 0

A tile's record has a fixed size, so tile t sits at offset t * record_size in each layer file.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from tapeout.compiler.errors import TapeoutError

from tapeout.hdl.reference import decompose as via_indices

from .base import BaseDie, Family

ROW_BYTES = 8
ROUTE_BYTES = 8
ROW_DTYPE = np.dtype([("mult", "<i2"), ("shift", "i1"), ("pad", "u1"), ("bias", "<i4")])


@dataclass(frozen=True)
class LinearSpec:
    """One linear as the chip sees it: integer content, no floats."""

    name: str
    role: str
    codes: np.ndarray          # int [out, in]
    group_size: int
    group_scale: np.ndarray    # int [out, in/group]
    mult: np.ndarray           # int [out]
    shift: np.ndarray          # int [out]
    bias: np.ndarray           # Q16 int [out] (zeros when the linear has none)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def record_sizes(fam: Family) -> tuple[int, int]:
    r, c = fam.tile_rows, fam.tile_cols
    code = r * c // 2 + r * (c // fam.unit) * 4 + r * ROW_BYTES
    fine = r * c * fam.fine_bits // 8 + ROUTE_BYTES
    return code, fine


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned entries of ``bits`` (1, 2, 4 or 8) little-endian into bytes."""
    if bits == 0:
        return np.zeros(0, np.uint8)
    per = 8 // bits
    v = values.astype(np.uint8).reshape(-1, per)
    out = np.zeros(v.shape[0], np.uint8)
    for k in range(per):
        out |= v[:, k] << (k * bits)
    return out


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 0:
        return np.zeros(count, np.uint8)
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.stack([(data >> (k * bits)) & mask for k in range(per)], axis=-1).reshape(-1)
    return out[:count]


def decompose(codes: np.ndarray, fam: Family) -> tuple[np.ndarray, np.ndarray]:
    """codes -> (V_CODE entries, V_FINE entries) of the layer files: entry = via index + 1
    (0 = no via, k = line k-1 of the alphabet), the indices from ``hdl.reference.decompose``."""
    try:
        vc, vf = via_indices(codes, fam.coarse, fam.fine)
    except ValueError:
        bad = _inexpressible(codes, fam)
        raise TapeoutError(f"code {bad} has no product line in base family {fam.name}") from None
    return (vc + 1).astype(np.uint8), (vf + 1).astype(np.uint8)


def _inexpressible(codes: np.ndarray, fam: Family) -> int:
    for v in np.unique(np.asarray(codes)):
        try:
            via_indices(np.array([v]), fam.coarse, fam.fine)
        except ValueError:
            return int(v)
    return 0


def compose(v_code: np.ndarray, v_fine: np.ndarray, fam: Family) -> np.ndarray:
    """The inverse of :func:`decompose`: via entries -> integer codes (extraction)."""
    lut_c = np.array((0,) + fam.coarse, np.int64)
    lut_f = np.array((0,) + fam.fine, np.int64)
    return lut_c[v_code] + lut_f[v_fine]


@dataclass
class Placement:
    tile: int
    linear: int            # index into the layers' linear list
    row_tile: int
    col_tile: int


@dataclass
class ViaLayers:
    """The packed layers of one model on one base die."""

    base: BaseDie
    names: list[str]             # linear op names, in placement order
    roles: list[str]
    shapes: list[tuple[int, int]]
    group_sizes: list[int]
    first_tile: list[int]        # first tile of each linear
    v_code: bytes
    v_fine: bytes

    @property
    def sha256(self) -> dict[str, str]:
        return {"V_CODE": hashlib.sha256(self.v_code).hexdigest(),
                "V_FINE": hashlib.sha256(self.v_fine).hexdigest()}

    def grid(self, i: int) -> tuple[int, int]:
        fam = self.base.family
        o, n = self.shapes[i]
        return math.ceil(o / fam.tile_rows), math.ceil(n / fam.tile_cols)

    def index(self) -> dict:
        return {"base": self.base.name, "base_sha256": self.base.sha256, "sha256": self.sha256,
                "record_bytes": dict(zip(("V_CODE", "V_FINE"), record_sizes(self.base.family))),
                "tiles_used": sum(a * b for a, b in (self.grid(i) for i in range(len(self.names)))),
                "linears": [{"op": n, "role": r, "shape": list(s), "group_size": g, "first_tile": t,
                             "grid": list(self.grid(i))}
                            for i, (n, r, s, g, t) in enumerate(zip(self.names, self.roles, self.shapes,
                                                                     self.group_sizes, self.first_tile))]}


def build_layers(base: BaseDie, specs: list[LinearSpec]) -> ViaLayers:
    """Place every linear on its own grid of tiles (in order) and pack the two via layers."""
    fam = base.family
    R, C, U = fam.tile_rows, fam.tile_cols, fam.unit
    code_rec, fine_rec = record_sizes(fam)
    total = sum(math.ceil(s.shape[0] / R) * math.ceil(s.shape[1] / C) for s in specs)
    if total > base.tiles:
        raise TapeoutError(f"{total} tiles needed, base {base.name} has {base.tiles}")
    v_code = np.zeros((base.tiles, code_rec), np.uint8)
    v_fine = np.zeros((base.tiles, fine_rec), np.uint8)
    first, t = [], 0
    for li, s in enumerate(specs):
        first.append(t)
        o, n = s.shape
        if s.group_size % U and U % s.group_size:
            raise TapeoutError(f"group size {s.group_size} of {s.name} does not tile into units of {U}")
        gr, gc = math.ceil(o / R), math.ceil(n / C)
        # pad to whole tiles: padded cells have no via, padded rows no constants
        codes = np.zeros((gr * R, gc * C), np.int64)
        codes[:o, :n] = s.codes
        vc, vf = decompose(codes, fam)
        unit_gs = np.repeat(s.group_scale, s.group_size, axis=1)[:, ::U] if s.group_size >= U else \
            s.group_scale[:, :: U // s.group_size]
        gs = np.zeros((gr * R, gc * C // U), np.uint32)
        gs[:o, : n // U] = unit_gs[:, : n // U]
        rows = np.zeros(gr * R, ROW_DTYPE)
        rows["mult"][:o], rows["shift"][:o], rows["bias"][:o] = s.mult, s.shift, s.bias
        # [gr, R, gc, C] -> tiles in row-major tile order
        vc_t = vc.reshape(gr, R, gc, C).transpose(0, 2, 1, 3).reshape(gr * gc, R * C)
        vf_t = vf.reshape(gr, R, gc, C).transpose(0, 2, 1, 3).reshape(gr * gc, R * C)
        gs_t = gs.reshape(gr, R, gc, C // U).transpose(0, 2, 1, 3).reshape(gr * gc, -1)
        n_cells = R * C // 2
        v_code[t:t + gr * gc, :n_cells] = pack(vc_t, 4).reshape(gr * gc, -1)
        v_code[t:t + gr * gc, n_cells:n_cells + gs_t.shape[1] * 4] = gs_t.astype("<u4").view(np.uint8)
        row_bytes = np.zeros((gr * gc, R * ROW_BYTES), np.uint8)
        row_bytes[::gc] = rows.view(np.uint8).reshape(gr, R * ROW_BYTES)   # first column tile only
        v_code[t:t + gr * gc, code_rec - R * ROW_BYTES:] = row_bytes
        nf = R * C * fam.fine_bits // 8
        if nf:
            v_fine[t:t + gr * gc, :nf] = pack(vf_t, fam.fine_bits).reshape(gr * gc, -1)
        route = np.zeros((gr * gc, 4), "<u2")
        route[:, 0] = li + 1
        route[:, 1] = np.repeat(np.arange(gr), gc)
        route[:, 2] = np.tile(np.arange(gc), gr)
        v_fine[t:t + gr * gc, nf:] = route.view(np.uint8).reshape(gr * gc, -1)
        t += gr * gc
    return ViaLayers(base, [s.name for s in specs], [s.role for s in specs], [s.shape for s in specs],
                     [s.group_size for s in specs], first, v_code.tobytes(), v_fine.tobytes())


def extract(layers: ViaLayers, li: int) -> LinearSpec:
    """Read linear ``li`` back from the packed via layers alone (the RTL's ROM contents)."""
    fam = layers.base.family
    R, C, U = fam.tile_rows, fam.tile_cols, fam.unit
    code_rec, fine_rec = record_sizes(fam)
    gr, gc = layers.grid(li)
    t0 = layers.first_tile[li]
    o, n = layers.shapes[li]
    g = layers.group_sizes[li]
    vc_all = np.frombuffer(layers.v_code, np.uint8).reshape(-1, code_rec)[t0:t0 + gr * gc]
    vf_all = np.frombuffer(layers.v_fine, np.uint8).reshape(-1, fine_rec)[t0:t0 + gr * gc]
    n_cells = R * C // 2
    nf = R * C * fam.fine_bits // 8
    route = vf_all[:, nf:].copy().view("<u2").reshape(-1, 4)
    if not (np.all(route[:, 0] == li + 1) and np.array_equal(route[:, 1], np.repeat(np.arange(gr), gc))
            and np.array_equal(route[:, 2], np.tile(np.arange(gc), gr))):
        raise TapeoutError(f"routing words of {layers.names[li]} do not match its placement")
    vc = np.stack([unpack(vc_all[i, :n_cells], 4, R * C) for i in range(gr * gc)])
    vf = np.stack([unpack(vf_all[i, :nf], fam.fine_bits, R * C) for i in range(gr * gc)])
    codes = compose(vc, vf, fam).reshape(gr, gc, R, C).transpose(0, 2, 1, 3).reshape(gr * R, gc * C)[:o, :n]
    gs_t = vc_all[:, n_cells:n_cells + R * (C // U) * 4].copy().view("<u4").reshape(gr, gc, R, C // U)
    unit_gs = gs_t.transpose(0, 2, 1, 3).reshape(gr * R, gc * C // U)[:o, : n // U].astype(np.int64)
    group_scale = unit_gs[:, :: max(g // U, 1)] if g >= U else np.repeat(unit_gs, U // g, axis=1)
    rows = vc_all[::gc, code_rec - R * ROW_BYTES:].copy().view(ROW_DTYPE).reshape(-1)[:o]
    return LinearSpec(layers.names[li], layers.roles[li], codes, g, group_scale,
                      rows["mult"].astype(np.int64), rows["shift"].astype(np.int64), rows["bias"].astype(np.int64))


def lvs(layers: ViaLayers, specs: list[LinearSpec]) -> int:
    """Extract every linear and compare with what was placed; returns the values compared."""
    compared = 0
    for li, s in enumerate(specs):
        e = extract(layers, li)
        for field in ("codes", "group_scale", "mult", "shift", "bias"):
            a, b = getattr(e, field), getattr(s, field)
            if a.shape != b.shape or not np.array_equal(a, b):
                raise TapeoutError(f"LVS mismatch in {s.name}: extracted {field} differs from the quantised weights")
            compared += a.size
    return compared


def load_layers(folder) -> ViaLayers:
    """Rebuild a chip's ViaLayers from a compile output folder (base/, layers/)."""
    import json
    from pathlib import Path

    from .base import BaseDie, Family
    folder = Path(folder)
    try:
        desc = json.loads((folder / "base/base.json").read_text())
        index = json.loads((folder / "layers/index.json").read_text())
        v_code = (folder / "layers/V_CODE.bin").read_bytes()
        v_fine = (folder / "layers/V_FINE.bin").read_bytes()
    except FileNotFoundError as e:
        raise TapeoutError(f"not a maskrom compile output (missing {Path(e.filename).name}); run "
                           "`tapeout compile MODEL --target maskrom --format F -o FOLDER`", file=str(folder)) from None
    fam = dict(desc["family"])
    fam["coarse"], fam["fine"], fam["formats"] = tuple(fam["coarse"]), tuple(fam["fine"]), tuple(fam["formats"])
    base = BaseDie(Family(**fam), desc["tiles"], desc["sram_bytes"], desc["name"])
    if base.sha256 != index["base_sha256"]:
        raise TapeoutError("base/base.json does not match the base hash the layers were built for", file=str(folder))
    lin = index["linears"]
    return ViaLayers(base, [x["op"] for x in lin], [x["role"] for x in lin], [tuple(x["shape"]) for x in lin],
                     [x["group_size"] for x in lin], [x["first_tile"] for x in lin], v_code, v_fine)


def via_maps(layers: ViaLayers, li: int) -> dict:
    """The RTL's view of linear ``li``: via indices (-1 = no via), per-unit group scales and
    requantisation constants, all read from the packed layers."""
    fam = layers.base.family
    e = extract(layers, li)
    vc, vf = via_indices(e.codes, fam.coarse, fam.fine)
    U = fam.unit
    g = e.group_size
    unit_gs = np.repeat(e.group_scale, g // U, axis=1) if g >= U else e.group_scale[:, :: U // g]
    return {"v_code": vc, "v_fine": vf, "coarse": fam.coarse,
            "fine": fam.fine, "group_scale": unit_gs, "unit": U, "mult": e.mult, "nshift": e.shift,
            "bias": e.bias, "tile_rows": fam.tile_rows, "tile_cols": fam.tile_cols, "act_bits": fam.act_bits,
            "acc_bits": fam.acc_bits}
