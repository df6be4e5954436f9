"""The die's floorplan, to scale, from the estimate's component areas (spec: docs/layout.md,
"Floorplan").

Blocks: the ROM fabric of every network layer group (its tiles' ROM, periphery, datapaths,
chains and input registers, split by the group's share of the tiles), the head's fabric, the
embedding and constant ROMs, the KV-cache and activation SRAMs, the attention engine, the vector
units, the sequencer and the I/O ring. Routing is spread over the logic blocks it was computed
from. The placement is a two-level squarified treemap: fabric, memories, compute and I/O first,
then the blocks inside each. It is not a placed design. Every block's area is the estimate's,
and the picture is drawn to scale.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

FABRIC_PARTS = ("weight_rom", "rom_periphery", "tile_datapaths", "chains", "x_registers")
LOGIC_PARTS = ("rom_periphery", "tile_datapaths", "chains", "x_registers", "attention", "vector_units", "sequencer")
KINDS = {  # kind -> (legend label, colour)
    "fabric": ("ROM fabric of a layer group (tiles, chains)", "#4c72b0"),
    "head": ("ROM fabric of the head (LM head)", "#8172b3"),
    "rom": ("embedding and constant ROM", "#64b5cd"),
    "sram": ("SRAM: KV cache, activations", "#dd8452"),
    "compute": ("attention engine, vector units", "#55a868"),
    "control": ("sequencer", "#c44e52"),
    "io": ("I/O ring and PHY", "#999999"),
}


@dataclass
class Block:
    name: str
    kind: str
    area_mm2: float
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0


def blocks_of(est: dict, group_tiles: dict[str, int]) -> list[Block]:
    """The floorplan's blocks from an ``estimate_rowserial`` result and the tiles per group."""
    comp = {k: c["area_mm2"] for k, c in est["components"].items()}
    logic = sum(comp.get(k, 0.0) for k in LOGIC_PARTS)
    spread = comp.get("routing", 0.0) / logic if logic else 0.0

    def area(k):
        return comp.get(k, 0.0) * (1 + (spread if k in LOGIC_PARTS else 0.0))

    fabric = sum(area(k) for k in FABRIC_PARTS)
    tiles = sum(group_tiles.values()) or 1
    out = []
    for g, n in group_tiles.items():
        layer = g.startswith("layers.") or g.startswith("L")
        name = f"L{g.split('.')[-1]}" if g.startswith("layers.") else g
        out.append(Block(name, "fabric" if layer else "head", fabric * n / tiles))
    for k, name, kind in (("embedding_rom", "embedding ROM", "rom"), ("constants_rom", "norm/rope ROM", "rom"),
                          ("kv_sram", "KV cache SRAM", "sram"), ("act_sram", "activation SRAM", "sram"),
                          ("attention", "attention", "compute"), ("vector_units", "vector units", "compute"),
                          ("sequencer", "sequencer", "control"), ("io", "I/O", "io")):
        if area(k) > 0:
            out.append(Block(name, kind, area(k)))
    return out


def _worst(row: list[float], side: float) -> float:
    s = sum(row)
    return max(max(side * side * r / (s * s), s * s / (side * side * r)) for r in row)


def squarify(areas: list[float], x: float, y: float, w: float, h: float) -> list[tuple[float, float, float, float]]:
    """Rectangles of the given areas (sum = w*h) tiling (x, y, w, h), close to square (Bruls,
    Huizing and van Wijk's squarified treemap), in the order given."""
    rects: list[tuple[float, float, float, float]] = []
    i = 0
    while i < len(areas):
        side = min(w, h)
        row = [areas[i]]
        j = i + 1
        while j < len(areas) and _worst(row + [areas[j]], side) <= _worst(row, side):
            row.append(areas[j])
            j += 1
        s = sum(row)
        if w >= h:                                   # a column on the left
            cw = s / h if h else 0.0
            yy = y
            for r in row:
                rh = r / cw if cw else 0.0
                rects.append((x, yy, cw, rh))
                yy += rh
            x, w = x + cw, w - cw
        else:                                        # a row at the bottom
            rh = s / w if w else 0.0
            xx = x
            for r in row:
                rw = r / rh if rh else 0.0
                rects.append((xx, y, rw, rh))
                xx += rw
            y, h = y + rh, h - rh
        i = j
    return rects


def place(blocks: list[Block]) -> tuple[float, list[Block]]:
    """Place the blocks on a square die of their total area; returns (side in mm, blocks).
    The I/O block is a ring around the core; the core holds the rest."""
    total = sum(b.area_mm2 for b in blocks)
    side = math.sqrt(total)
    ring = [b for b in blocks if b.kind == "io"]
    core_blocks = [b for b in blocks if b.kind != "io"]
    core = math.sqrt(sum(b.area_mm2 for b in core_blocks))
    m = (side - core) / 2
    for b in ring:
        b.x, b.y, b.w, b.h = 0.0, 0.0, side, side
    order = ("fabric", "head", "sram", "rom", "compute", "control")
    groups = [[b for b in core_blocks if b.kind in ks] for ks in (("fabric", "head"), ("sram", "rom"),
                                                                  ("compute", "control"))]
    groups = [g for g in groups if g]
    outer = squarify([sum(b.area_mm2 for b in g) for g in groups], m, m, core, core)
    for g, (x, y, w, h) in zip(groups, outer):
        g.sort(key=lambda b: (order.index(b.kind), -b.area_mm2) if b.kind != "fabric" else (0, 0))
        for b, (bx, by, bw, bh) in zip(g, squarify([b.area_mm2 for b in g], x, y, w, h)):
            b.x, b.y, b.w, b.h = bx, by, bw, bh
    return side, blocks


def _fmt(a: float) -> str:
    return f"{a:,.0f}" if a >= 100 else f"{a:.1f}" if a >= 1 else f"{a:.3f}" if a >= 0.001 else f"{a:.1e}"


def render(blocks: list[Block], side: float, title: str, fmt: str = "png") -> bytes:
    """The floorplan as PNG or SVG bytes (deterministic: no dates, fixed SVG ids)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle
    with matplotlib.rc_context({"svg.hashsalt": "tapeout", "svg.fonttype": "none"}):
        fig = plt.figure(figsize=(11, 7))
        ax = fig.add_axes((0.07, 0.08, 0.55, 0.82))
        for b in blocks:
            if b.kind == "io":                       # the ring: the die outline, the core drawn over it
                ax.add_patch(Rectangle((b.x, b.y), b.w, b.h, facecolor=KINDS[b.kind][1], edgecolor="black", lw=0.8))
                ax.text(side / 2, side - (side - math.sqrt(max(side * side - b.area_mm2, 0))) / 4, 
                        f"{b.name} ring {_fmt(b.area_mm2)} mm²", ha="center", va="center", fontsize=7, color="white")
        for b in blocks:
            if b.kind == "io":
                continue
            ax.add_patch(Rectangle((b.x, b.y), b.w, b.h, facecolor=KINDS[b.kind][1], edgecolor="white", lw=0.8))
            small = min(b.w, b.h) / side
            if small > 0.05:
                size = max(5.0, min(10.0, 60 * small))
                ax.text(b.x + b.w / 2, b.y + b.h / 2, f"{b.name}\n{_fmt(b.area_mm2)} mm²", ha="center", va="center",
                        fontsize=size, color="white")
        ax.set_xlim(0, side)
        ax.set_ylim(0, side)
        ax.set_aspect("equal")
        ax.set_xlabel("mm")
        ax.set_ylabel("mm")
        fig.suptitle(title, fontsize=9, x=0.02, ha="left")
        kinds = [k for k in KINDS if any(b.kind == k for b in blocks)]
        handles = []
        for k in kinds:
            mine = [b for b in blocks if b.kind == k]
            area = sum(b.area_mm2 for b in mine)
            label = f"{KINDS[k][0]}: {_fmt(area)} mm²" + (f" ({len(mine)} blocks)" if len(mine) > 1 else "")
            handles.append(Patch(facecolor=KINDS[k][1], label=label))
        small = [b for b in blocks if b.kind != "io" and min(b.w, b.h) / side <= 0.05]
        for b in small[:12]:                         # blocks too small to label in place
            handles.append(Patch(facecolor="none", edgecolor="none", label=f"   {b.name}: {_fmt(b.area_mm2)} mm²"))
        if len(small) > 12:
            handles.append(Patch(facecolor="none", edgecolor="none", label=f"   ... {len(small) - 12} more (report.json)"))
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.64, 0.9), fontsize=8, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Software": None} if fmt == "png" else {"Date": None,
                                                                                                   "Creator": None})
        plt.close(fig)
    return buf.getvalue()


def gds_cell(blocks: list[Block], gdstk, layer: tuple[int, int] = (10, 0), text: tuple[int, int] = (63, 0)):
    """The floorplan as a GDS cell ``DIE``: one labelled boundary per block, micrometres."""
    cell = gdstk.Cell("DIE")
    um = 1000.0
    for b in blocks:
        cell.add(gdstk.rectangle((b.x * um, b.y * um), ((b.x + b.w) * um, (b.y + b.h) * um), *layer))
        cell.add(gdstk.Label(f"{b.name} {b.area_mm2:.4g} mm2", ((b.x + b.w / 2) * um, (b.y + b.h / 2) * um),
                             layer=text[0], texttype=text[1]))
    return cell


def table(blocks: list[Block]) -> list[dict]:
    """The blocks as report.json records (mm, rounded for stable text)."""
    return [{"name": b.name, "kind": b.kind, "area_mm2": round(b.area_mm2, 6),
             "x_mm": round(b.x, 6), "y_mm": round(b.y, 6), "w_mm": round(b.w, 6), "h_mm": round(b.h, 6)}
            for b in blocks]
