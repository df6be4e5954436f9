"""Layout outputs: GDSII of chosen tiles (gdstk) and PNG renderings (matplotlib).

GDS layers (schematic geometry in micrometres, not a foundry PDK):

| layer/datatype | name      | what |
|---|---|---|
| 1/0            | TILE      | tile outline (base die) |
| 2/0            | PLINE     | product lines: per column, one vertical wire per coarse then fine alphabet value (base die) |
| 3/0            | ROWLINE   | row (sum) lines, one horizontal wire per row (base die) |
| 101/0          | V_CODE    | coarse vias: cell (r, c) to coarse product line k of column c (per model) |
| 102/0          | V_FINE    | fine vias (per model) |
| 10/0           | BLOCK     | floorplan block boundaries (cell DIE, millimetre blocks in micrometres) |
| 63/0           | TEXT      | labels |
"""
from __future__ import annotations

import datetime
import io
import math

import numpy as np

from .layers import ViaLayers, record_sizes, unpack

PITCH = 0.1            # um between product lines
ROW_PITCH = 0.2        # um between row lines
VIA = 0.04             # um via square
_EPOCH = datetime.datetime(2000, 1, 1)   # GDS headers carry a timestamp: fixed for determinism
LAYERS = {"TILE": (1, 0), "PLINE": (2, 0), "ROWLINE": (3, 0), "V_CODE": (101, 0), "V_FINE": (102, 0),
          "TEXT": (63, 0)}


def tile_vias(layers: ViaLayers, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(V_CODE, V_FINE) entries [R, C] of one tile (0 = no via, k = line k-1)."""
    fam = layers.base.family
    R, C = fam.tile_rows, fam.tile_cols
    code_rec, fine_rec = record_sizes(fam)
    vc = np.frombuffer(layers.v_code, np.uint8, code_rec, tile * code_rec)
    vf = np.frombuffer(layers.v_fine, np.uint8, fine_rec, tile * fine_rec)
    return (unpack(vc[: R * C // 2], 4, R * C).reshape(R, C),
            unpack(vf[: R * C * fam.fine_bits // 8], fam.fine_bits, R * C).reshape(R, C))


def tile_cell(layers: ViaLayers, tile: int, gdstk):
    fam = layers.base.family
    R, C = fam.tile_rows, fam.tile_cols
    nc, nf = len(fam.coarse), len(fam.fine)
    col_w = (nc + nf + 1) * PITCH
    cell = gdstk.Cell(f"TILE_{tile}")
    w, h = C * col_w, R * ROW_PITCH
    cell.add(gdstk.rectangle((0, 0), (w, h), *LAYERS["TILE"]))
    for c in range(C):                    # base die: product lines and row lines
        for k in range(nc + nf):
            x = c * col_w + (k + 1) * PITCH
            cell.add(gdstk.rectangle((x - 0.01, 0), (x + 0.01, h), *LAYERS["PLINE"]))
    for r in range(R):
        y = (r + 0.5) * ROW_PITCH
        cell.add(gdstk.rectangle((0, y - 0.01), (w, y + 0.01), *LAYERS["ROWLINE"]))
    vc, vf = tile_vias(layers, tile)
    for name, v, offset in (("V_CODE", vc, 0), ("V_FINE", vf, nc)):
        rr, cc = np.nonzero(v)
        xs = cc * col_w + (offset + v[rr, cc]) * PITCH
        ys = (rr + 0.5) * ROW_PITCH
        for x, y in zip(xs.tolist(), ys.tolist()):
            cell.add(gdstk.rectangle((x - VIA / 2, y - VIA / 2), (x + VIA / 2, y + VIA / 2), *LAYERS[name]))
    route = placement_of(layers, tile)
    label = f"tile {tile}" + (f": {route[0]} rows {route[1]} cols {route[2]}" if route else ": unused")
    cell.add(gdstk.Label(label, (0, h + 0.5), layer=LAYERS["TEXT"][0], texttype=LAYERS["TEXT"][1]))
    return cell


def placement_of(layers: ViaLayers, tile: int) -> tuple[str, str, str] | None:
    fam = layers.base.family
    for i, t0 in enumerate(layers.first_tile):
        gr, gc = layers.grid(i)
        if t0 <= tile < t0 + gr * gc:
            k = tile - t0
            rt, ct = divmod(k, gc)
            return (layers.names[i], f"{rt * fam.tile_rows}..{(rt + 1) * fam.tile_rows - 1}",
                    f"{ct * fam.tile_cols}..{(ct + 1) * fam.tile_cols - 1}")
    return None


def write_gds(layers: ViaLayers, tiles: list[int], path, extra=()) -> int:
    """GDSII with one cell per chosen tile, placed side by side under a TOP cell, and the
    ``extra`` cells (the floorplan's ``DIE``) as further top cells; returns vias drawn."""
    import gdstk
    lib = gdstk.Library(name="TAPEOUT", unit=1e-6, precision=1e-9)
    top = gdstk.Cell("TOP")
    x = 0.0
    vias = 0
    for t in tiles:
        cell = tile_cell(layers, t, gdstk)
        vias += sum(1 for p in cell.polygons if (p.layer, p.datatype) in (LAYERS["V_CODE"], LAYERS["V_FINE"]))
        lib.add(cell)
        top.add(gdstk.Reference(cell, (x, 0)))
        bb = cell.bounding_box()
        x += (bb[1][0] - bb[0][0]) + 5.0
    lib.add(top)
    for cell in extra:
        lib.add(cell)
    lib.write_gds(str(path), timestamp=_EPOCH)
    return vias




def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def die_png(layers: ViaLayers) -> bytes:
    """The die's tile grid, tiles coloured by network layer (grey: unused)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = layers.base.tiles
    side = math.ceil(math.sqrt(n))
    img = np.full(side * side, -1.0)
    roles = sorted({r.split(".")[1] if r.startswith("layers.") else -1 for r in layers.roles}, key=str)
    for i, t0 in enumerate(layers.first_tile):
        gr, gc = layers.grid(i)
        r = layers.roles[i]
        img[t0:t0 + gr * gc] = int(r.split(".")[1]) if r.startswith("layers.") else len(roles)
    img = np.ma.masked_less(img.reshape(side, side), 0)
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    ax.imshow(img, cmap=cmap, interpolation="nearest")
    ax.set_title(f"{layers.base.name}: {sum(a * b for a, b in map(layers.grid, range(len(layers.names))))}"
                 f" of {n} tiles used (colour = network layer)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def tile_png(layers: ViaLayers, tile: int) -> bytes:
    """One tile's vias: coarse code value per cell; fine vias outlined in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fam = layers.base.family
    vc, vf = tile_vias(layers, tile)
    values = np.array((0,) + fam.coarse)[vc]
    fig, ax = plt.subplots(figsize=(6, 6))
    lim = max(abs(v) for v in fam.coarse)
    im = ax.imshow(np.ma.masked_where(vc == 0, values), cmap="coolwarm", interpolation="nearest",
                   vmin=-lim, vmax=lim)
    rr, cc = np.nonzero(vf)
    ax.scatter(cc, rr, s=8, facecolors="none", edgecolors="red", linewidths=0.6)
    place = placement_of(layers, tile)
    ax.set_title(f"tile {tile}: " + (f"{place[0]} rows {place[1]}, cols {place[2]}" if place else "unused")
                 + f"\n{int((vc > 0).sum())} V_CODE vias, {int((vf > 0).sum())} V_FINE vias", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7, label="coarse code value (white: no via)")
    return _png(fig)
