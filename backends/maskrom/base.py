"""Base dies: the fixed part of a mask-ROM chip, shared by every model of a family.

A family fixes the code alphabets (the product lines per input column), the tile geometry and
the datapath widths; its members differ in tile count and SRAM. A base die is described by a
canonical JSON document; its sha256 is the base hash that two chips must share to differ only
in their two via layers (docs/layout.md).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from tapeout.compiler.errors import TapeoutError

FP4_VALUES = (1, 2, 3, 4, 6, 8, 12)      # doubled E2M1 magnitudes


def split_alphabets(bits: int, fine_bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Alphabets of a signed ``bits``-bit code split as coarse 2**k * h plus fine l in [1, 2**k)."""
    k = fine_bits
    hi = 1 << (bits - k - 1)
    coarse = tuple((h << k) for h in range(-hi, hi) if h)
    fine = tuple(range(1, 1 << k)) if k else ()
    return coarse, fine


@dataclass(frozen=True)
class Family:
    """What every base die of a family shares."""

    name: str
    formats: tuple[str, ...]          # weight formats whose codes the alphabets cover
    coarse: tuple[int, ...]           # V_CODE product lines per column (code values)
    fine: tuple[int, ...]             # V_FINE product lines per column
    fine_bits: int                    # code = coarse_value + fine_value, fine = code mod 2**fine_bits
    unit: int                         # columns per scale unit (gcd of 32 and the group sizes served)
    tile_rows: int = 64
    tile_cols: int = 64
    act_bits: int = 8
    group_scale_bits: int = 32        # scale ROM: group scale word per (row, unit)
    acc_bits: int = 48
    vector_lanes: int = 64            # integer vector units (norms, softmax, rope, activations)


def _int_family(bits: int) -> Family:
    k = 0 if bits <= 4 else bits // 2
    coarse, fine = split_alphabets(bits, k)
    return Family(f"int{bits}", (f"int{bits}",), coarse, fine, k, unit=32)


FAMILIES: dict[str, Family] = {
    "w3o6": Family("w3o6", ("w3o6",), *split_alphabets(6, 2), fine_bits=2, unit=32),
    "fp4": Family("fp4", ("mxfp4", "nvfp4"), tuple(sorted({s * v for v in FP4_VALUES for s in (1, -1)})), (),
                  fine_bits=0, unit=16),
    **{f"int{b}": _int_family(b) for b in range(2, 9)},
}

# the members of every family: (tiles, SRAM MiB) from small to large
LADDER = ((64, 1), (256, 4), (1024, 16), (4096, 64), (16384, 256), (65536, 1024), (262144, 4096))


@dataclass(frozen=True)
class BaseDie:
    family: Family
    tiles: int
    sram_bytes: int
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.family.name}-t{self.tiles}-s{self.sram_bytes >> 20}m")

    def describe(self) -> dict:
        """The canonical description (everything the base die is made of)."""
        fam = asdict(self.family)
        fam["coarse"], fam["fine"], fam["formats"] = list(fam["coarse"]), list(fam["fine"]), list(fam["formats"])
        return {"name": self.name, "family": fam, "tiles": self.tiles, "sram_bytes": self.sram_bytes,
                "cells": self.tiles * self.family.tile_rows * self.family.tile_cols,
                "layers": {"V_CODE": {"gds": [101, 0]}, "V_FINE": {"gds": [102, 0]}},
                "rowserial": rowserial_tile(self.family)}

    def canonical(self) -> bytes:
        return (json.dumps(self.describe(), sort_keys=True, separators=(",", ":")) + "\n").encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


def rowserial_tile(fam: Family) -> dict:
    """The family's row-serial tile (hdl/rowserial.py): geometry and word format, part of the
    base die (the chain wiring a compile plans is in its report)."""
    from tapeout.hdl.rowserial import ROW_ARCH_WORD_LINES, ROW_FORMATS, RowSpec
    spec = RowSpec(ROW_FORMATS[fam.name], word_lines=ROW_ARCH_WORD_LINES, cols=fam.tile_cols, unit=fam.unit,
                   act_bits=fam.act_bits, acc_bits=fam.acc_bits)
    f = spec.fmt
    return {"word_lines": spec.word_lines, "cols": spec.cols, "unit": spec.unit, "word_bits": spec.word_bits,
            "fields": {k: list(v) for k, v in spec.fields().items()}, "code_values": list(f.values),
            "outlier_slots": f.slots, "scale_bits": [f.m_bits, f.e_bits], "multiply": f.multiply}


def family_for(fmt: str) -> Family:
    for fam in FAMILIES.values():
        if fmt in fam.formats:
            return fam
    raise TapeoutError(f"no mask-ROM base family serves format {fmt!r}; families: "
                       + ", ".join(f"{f.name} ({'/'.join(f.formats)})" for f in FAMILIES.values()))


def all_bases() -> dict[str, BaseDie]:
    out = {}
    for fam in FAMILIES.values():
        for tiles, mib in LADDER:
            b = BaseDie(fam, tiles, mib << 20)
            out[b.name] = b
    return out


def tiles_needed(shapes: list[tuple[int, int]], family: Family) -> int:
    """Tiles for linears of [out, in] shapes: each gets its own grid of tiles."""
    return sum(math.ceil(o / family.tile_rows) * math.ceil(i / family.tile_cols) for o, i in shapes)


def choose_base(fmt: str, shapes: list[tuple[int, int]], sram_needed: int, name: str | None = None) -> BaseDie:
    """The smallest base of the format's family that fits, or the named one (checked)."""
    fam = family_for(fmt)
    need = tiles_needed(shapes, fam)
    if name is not None:
        base = all_bases().get(name)
        if base is None:
            known = ", ".join(b for b in all_bases() if b.startswith(fam.name + "-"))
            raise TapeoutError(f"unknown base {name!r}; bases of family {fam.name}: {known}")
        if base.family != fam:
            raise TapeoutError(f"base {name!r} is of family {base.family.name}, which does not serve {fmt}")
        if base.tiles < need or base.sram_bytes < sram_needed:
            raise TapeoutError(f"model needs {need} tiles and {sram_needed} bytes of SRAM; base {name} has "
                               f"{base.tiles} tiles and {base.sram_bytes} bytes")
        return base
    for tiles, mib in LADDER:
        if tiles >= need and (mib << 20) >= sram_needed:
            return BaseDie(fam, tiles, mib << 20)
    raise TapeoutError(f"model needs {need} tiles and {sram_needed} bytes of SRAM: more than the largest "
                       f"{fam.name} base ({LADDER[-1][0]} tiles); shard it across chips")
