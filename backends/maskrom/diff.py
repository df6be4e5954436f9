"""``tapeout diff``: compare the two via layers of two compiled chips.

A *via site* is a (cell, product line) pair of the cell array, or one bit of a tile's scale-ROM
or routing words. A cell whose code changes moves its via: one removed, one added.
``fraction`` = (added + removed) / |sites holding a via in A or in B|. Work is vectorised over the
packed maps, ``CHUNK`` tiles at a time, so memory stays bounded whatever the chip size.
JSON schema: docs/diff.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapeout.compiler.errors import TapeoutError

from .render import LAYERS

CHUNK = 2048
SCHEMA_VERSION = 1
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


@dataclass
class Chip:
    path: Path
    base: dict
    base_bytes: bytes
    index: dict
    v_code: np.memmap
    v_fine: np.memmap


def load_chip(folder: str | Path) -> Chip:
    folder = Path(folder)
    need = ["base/base.json", "layers/index.json", "layers/V_CODE.bin", "layers/V_FINE.bin"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise TapeoutError(f"not a maskrom compile output (missing {', '.join(missing)}); run "
                           "`tapeout compile MODEL --target maskrom --format F -o FOLDER` first", file=str(folder))
    base_bytes = (folder / "base/base.json").read_bytes()
    index = json.loads((folder / "layers/index.json").read_text())
    return Chip(folder, json.loads(base_bytes), base_bytes, index,
                np.memmap(folder / "layers/V_CODE.bin", np.uint8, "r"),
                np.memmap(folder / "layers/V_FINE.bin", np.uint8, "r"))


def base_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Parameters that differ between two base descriptions, as 'key: A -> B'."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += base_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            show = lambda v: v if not isinstance(v, list) or len(v) < 6 else f"[{len(v)} values]"  # noqa: E731
            out.append(f"{prefix}{k}: {show(va)} -> {show(vb)}")
    return out


def _nibbles(rec: np.ndarray, n: int) -> np.ndarray:
    """[T, n/2] packed bytes -> [T, n] 4-bit entries."""
    return np.stack([rec & 0x0F, rec >> 4], axis=-1).reshape(rec.shape[0], n)


def _entries(rec: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 4:
        return _nibbles(rec, n)
    per, mask = 8 // bits, (1 << bits) - 1
    return np.stack([(rec >> (k * bits)) & mask for k in range(per)], axis=-1).reshape(rec.shape[0], n)


def _count(a_ent: np.ndarray, b_ent: np.ndarray, a_bytes: np.ndarray, b_bytes: np.ndarray):
    """Per tile: (added, removed, union) for entry-coded cells plus bit-coded words."""
    diff = a_ent != b_ent
    added = np.sum(diff & (b_ent != 0), axis=1)
    removed = np.sum(diff & (a_ent != 0), axis=1)
    union = np.sum((a_ent != 0) | (b_ent != 0), axis=1) + np.sum(diff & (a_ent != 0) & (b_ent != 0), axis=1)
    add_bits = POPCOUNT[b_bytes & ~a_bytes].sum(axis=1)
    rem_bits = POPCOUNT[a_bytes & ~b_bytes].sum(axis=1)
    union_bits = POPCOUNT[a_bytes | b_bytes].sum(axis=1)
    return added + add_bits, removed + rem_bits, union + union_bits


def diff_chips(a: Chip, b: Chip, *, force_shapes: bool = False) -> dict:
    """The full comparison as a JSON-ready dict (schema in docs/diff.md)."""
    same_base = a.base_bytes == b.base_bytes
    if not same_base and not force_shapes:
        diffs = base_differences(a.base, b.base)
        raise TapeoutError(f"different base dies ({a.base['name']} vs {b.base['name']}): " + "; ".join(diffs[:6])
                           + " (--force-shapes compares the shapes only)")
    result = {"schema": SCHEMA_VERSION, "a": str(a.path), "b": str(b.path), "base_identical": same_base,
              "base": {"a": a.base["name"], "b": b.base["name"], "sha256_a": a.index["base_sha256"],
                       "sha256_b": b.index["base_sha256"], "differences": base_differences(a.base, b.base)}}
    if not same_base:
        result.update(_shape_diff(a, b))
        return result
    fam = a.base["family"]
    R, C, U, fb = fam["tile_rows"], fam["tile_cols"], fam["unit"], fam["fine_bits"]
    code_rec, fine_rec = (a.index["record_bytes"]["V_CODE"], a.index["record_bytes"]["V_FINE"])
    n_cells = R * C
    tiles = max(a.index["tiles_used"], b.index["tiles_used"])
    per_tile = {name: np.zeros((tiles, 3), np.int64) for name in ("V_CODE", "V_FINE")}
    vc_a = a.v_code.reshape(-1, code_rec)
    vc_b = b.v_code.reshape(-1, code_rec)
    vf_a = a.v_fine.reshape(-1, fine_rec)
    vf_b = b.v_fine.reshape(-1, fine_rec)
    nf = n_cells * fb // 8
    for t0 in range(0, tiles, CHUNK):
        t1 = min(t0 + CHUNK, tiles)
        ca, cb = np.asarray(vc_a[t0:t1]), np.asarray(vc_b[t0:t1])
        per_tile["V_CODE"][t0:t1] = np.stack(_count(_nibbles(ca[:, : n_cells // 2], n_cells),
                                                    _nibbles(cb[:, : n_cells // 2], n_cells),
                                                    ca[:, n_cells // 2:], cb[:, n_cells // 2:]), axis=1)
        fa, fbb = np.asarray(vf_a[t0:t1]), np.asarray(vf_b[t0:t1])
        ea = _entries(fa[:, :nf], fb, n_cells) if nf else np.zeros((t1 - t0, 0), np.uint8)
        eb = _entries(fbb[:, :nf], fb, n_cells) if nf else np.zeros((t1 - t0, 0), np.uint8)
        per_tile["V_FINE"][t0:t1] = np.stack(_count(ea, eb, fa[:, nf:], fbb[:, nf:]), axis=1)
    layer_of = _tile_owner(a, tiles)
    layers = {}
    total_changed = total_union = 0
    for name, arr in per_tile.items():
        added, removed, union = (int(x) for x in arr.sum(axis=0))
        layers[name] = {"added": added, "removed": removed, "changed": added + removed, "vias_a_or_b": union,
                        "fraction": (added + removed) / union if union else 0.0}
        total_changed += added + removed
        total_union += union
    changed_tile = (per_tile["V_CODE"][:, :2].sum(axis=1) + per_tile["V_FINE"][:, :2].sum(axis=1)) > 0
    per_layer: dict[str, dict] = {}
    for t in range(tiles):
        key = layer_of[t]
        d = per_layer.setdefault(key, {"tiles": 0, "tiles_changed": 0, "changed": 0, "vias_a_or_b": 0})
        d["tiles"] += 1
        d["tiles_changed"] += int(changed_tile[t])
        d["changed"] += int(per_tile["V_CODE"][t, :2].sum() + per_tile["V_FINE"][t, :2].sum())
        d["vias_a_or_b"] += int(per_tile["V_CODE"][t, 2] + per_tile["V_FINE"][t, 2])
    for d in per_layer.values():
        d["fraction"] = d["changed"] / d["vias_a_or_b"] if d["vias_a_or_b"] else 0.0
    result.update({
        "total_vias": total_union, "changed_vias": total_changed,
        "fraction": total_changed / total_union if total_union else 0.0,
        "tiles": tiles, "tiles_untouched": int(tiles - changed_tile.sum()),
        "layers": layers, "per_layer": dict(sorted(per_layer.items(), key=lambda kv: _layer_sort(kv[0]))),
        "per_tile": [{"tile": t, "network_layer": layer_of[t],
                      "V_CODE": {"added": int(per_tile["V_CODE"][t, 0]), "removed": int(per_tile["V_CODE"][t, 1])},
                      "V_FINE": {"added": int(per_tile["V_FINE"][t, 0]), "removed": int(per_tile["V_FINE"][t, 1])}}
                     for t in np.flatnonzero(changed_tile).tolist()],
    })
    result["_tile_changes"] = per_tile   # for the PNG; dropped before JSON output
    return result


def _layer_sort(key: str):
    return (0, int(key.split(".")[1])) if key.startswith("layers.") else (1, key)


def _tile_owner(chip: Chip, tiles: int) -> list[str]:
    owner = ["unused"] * tiles
    for lin in chip.index["linears"]:
        role = lin["role"]
        key = ".".join(role.split(".")[:2]) if role.startswith("layers.") else role
        n = lin["grid"][0] * lin["grid"][1]
        for t in range(lin["first_tile"], min(lin["first_tile"] + n, tiles)):
            owner[t] = key
    return owner


def _shape_diff(a: Chip, b: Chip) -> dict:
    """--force-shapes: compare the linears' shapes and tile counts, not vias."""
    la = {x["role"]: x for x in a.index["linears"]}
    lb = {x["role"]: x for x in b.index["linears"]}
    rows = []
    for role in sorted(set(la) | set(lb), key=_layer_sort):
        x, y = la.get(role), lb.get(role)
        rows.append({"role": role, "shape_a": x and x["shape"], "shape_b": y and y["shape"],
                     "same_shape": bool(x and y and x["shape"] == y["shape"])})
    return {"shapes": rows, "tiles_a": a.index["tiles_used"], "tiles_b": b.index["tiles_used"]}


def summary_line(r: dict) -> str:
    if not r["base_identical"]:
        same = sum(x["same_shape"] for x in r["shapes"])
        return (f"bases differ ({r['base']['a']} vs {r['base']['b']}); shape comparison: {same} of "
                f"{len(r['shapes'])} linears have the same shape")
    L = r["layers"]
    n_changed = sum(1 for v in L.values() if v["changed"])
    verb = "layer differs" if n_changed == 1 else "layers differ"
    return (f"base identical; {n_changed} {verb}: {100 * r['fraction']:.1f}% of vias ("
            + ", ".join(f"{k} {100 * v['fraction']:.1f}%" for k, v in L.items())
            + f"); {r['tiles_untouched']} of {r['tiles']} tiles untouched")


def render_text(r: dict, top: int = 12) -> str:
    lines = [summary_line(r)]
    if not r["base_identical"]:
        lines += [f"  {d}" for d in r["base"]["differences"]]
        lines += [f"  {x['role']:28s} {str(x['shape_a']):14s} {str(x['shape_b']):14s}"
                  f"{'' if x['same_shape'] else '  differs'}" for x in r["shapes"]]
        return "\n".join(lines)
    lines.append("")
    lines.append(f"{'metal layer':12s} {'added':>12s} {'removed':>12s} {'changed':>12s} {'vias (A|B)':>12s} {'fraction':>9s}")
    for k, v in r["layers"].items():
        lines.append(f"{k:12s} {v['added']:12d} {v['removed']:12d} {v['changed']:12d} {v['vias_a_or_b']:12d} "
                     f"{100 * v['fraction']:8.2f}%")
    lines.append("")
    lines.append(f"{'network layer':14s} {'tiles':>6s} {'changed':>8s} {'vias changed':>13s} {'fraction':>9s}")
    for k, v in r["per_layer"].items():
        lines.append(f"{k:14s} {v['tiles']:6d} {v['tiles_changed']:8d} {v['changed']:13d} {100 * v['fraction']:8.2f}%")
    if r["per_tile"]:
        lines.append("")
        worst = sorted(r["per_tile"], key=lambda x: -(x["V_CODE"]["added"] + x["V_CODE"]["removed"]
                                                        + x["V_FINE"]["added"] + x["V_FINE"]["removed"]))[:top]
        lines.append(f"most changed tiles (of {len(r['per_tile'])} changed):")
        for x in worst:
            lines.append(f"  tile {x['tile']:6d} {x['network_layer']:12s} V_CODE +{x['V_CODE']['added']} "
                         f"-{x['V_CODE']['removed']}  V_FINE +{x['V_FINE']['added']} -{x['V_FINE']['removed']}")
    return "\n".join(lines)


def heatmap_png(r: dict, base_tiles: int) -> bytes:
    """Changed-via fraction per tile over the die floorplan (tile t at row t // side)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pt = r["_tile_changes"]
    changed = pt["V_CODE"][:, :2].sum(axis=1) + pt["V_FINE"][:, :2].sum(axis=1)
    union = pt["V_CODE"][:, 2] + pt["V_FINE"][:, 2]
    frac = np.where(union > 0, changed / np.maximum(union, 1), 0.0)
    side = math.ceil(math.sqrt(base_tiles))
    img = np.full(side * side, np.nan)
    img[: len(frac)] = frac
    fig, ax = plt.subplots(figsize=(6.5, 6))
    im = ax.imshow(img.reshape(side, side), cmap=plt.get_cmap("magma").with_extremes(bad="#cccccc"), vmin=0, vmax=max(float(frac.max(initial=0)), 1e-9),
                   interpolation="nearest")
    ax.set_title(summary_line(r)[:90], fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.75, label="fraction of the tile's vias that change (grey: unused)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def gds_xor(a: Chip, b: Chip, tile: int, path: Path) -> dict:
    """GDSII of one tile's via differences: A-only vias on datatype 1, B-only on datatype 2 of
    each via layer (101/1, 101/2, 102/1, 102/2), the common vias on datatype 0."""
    import gdstk

    from .render import PITCH, ROW_PITCH, VIA
    fam = a.base["family"]
    R, C, fb = fam["tile_rows"], fam["tile_cols"], fam["fine_bits"]
    nc, nfl = len(fam["coarse"]), len(fam["fine"])
    if not 0 <= tile < max(a.index["tiles_used"], b.index["tiles_used"]):
        raise TapeoutError(f"--gds-xor: tile {tile} is not used by either chip "
                           f"(tiles 0..{max(a.index['tiles_used'], b.index['tiles_used']) - 1})")
    code_rec, fine_rec = a.index["record_bytes"]["V_CODE"], a.index["record_bytes"]["V_FINE"]
    n = R * C
    ent = {}
    for tag, chip in (("a", a), ("b", b)):
        vc = np.asarray(chip.v_code[tile * code_rec: tile * code_rec + n // 2])
        vf = np.asarray(chip.v_fine[tile * fine_rec: tile * fine_rec + n * fb // 8])
        ent[tag] = (_nibbles(vc[None], n)[0].reshape(R, C),
                    _entries(vf[None], fb, n)[0].reshape(R, C) if fb else np.zeros((R, C), np.uint8))
    col_w = (nc + nfl + 1) * PITCH
    cell = gdstk.Cell(f"XOR_TILE_{tile}")
    cell.add(gdstk.rectangle((0, 0), (C * col_w, R * ROW_PITCH), *LAYERS["TILE"]))
    counts = {}
    for li, (name, offset) in enumerate((("V_CODE", 0), ("V_FINE", nc))):
        layer = LAYERS[name][0]
        va, vb = ent["a"][li], ent["b"][li]
        for dt, sel in ((0, (va == vb) & (va > 0)), (1, (va != vb) & (va > 0)), (2, (va != vb) & (vb > 0))):
            rr, cc = np.nonzero(sel)
            src = vb if dt == 2 else va
            for r_, c_ in zip(rr.tolist(), cc.tolist()):
                x = c_ * col_w + (offset + int(src[r_, c_])) * PITCH
                y = (r_ + 0.5) * ROW_PITCH
                cell.add(gdstk.rectangle((x - VIA / 2, y - VIA / 2), (x + VIA / 2, y + VIA / 2), layer, dt))
            counts[f"{name}/{dt}"] = int(len(rr))
    lib = gdstk.Library(name="TAPEOUT_XOR", unit=1e-6, precision=1e-9)
    lib.add(cell)
    from .render import _EPOCH
    lib.write_gds(str(path), timestamp=_EPOCH)
    return counts
