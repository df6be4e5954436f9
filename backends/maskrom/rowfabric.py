"""A compiled chip on the row-serial fabric: which tiles and chains hold each linear, its
word-line image read back from the via layers, and the check that the image computes golden's
outputs (spec: docs/layout.md, "Row-serial fabric").

The via layers record each weight's code (docs/layout.md); the row-serial tile stores the same
codes as word-line ROM bits. The image of a linear is derived from the *extracted* layers, so a
via the layout lost or gained changes the image, and the check sees it.
"""
from __future__ import annotations

import numpy as np

from tapeout.compiler.errors import TapeoutError
from tapeout.hdl.rowserial import ROW_FORMATS, RowImage, RowSpec, row_image, row_reference, stage_cycles

from .layers import ViaLayers, extract
from .rowchip import ROW_ARCH_DEFAULTS, default_chain_tiles, fit_chains, stages_of


def chip_plan(layers: ViaLayers, arch: dict | None = None) -> dict:
    """Tiles of the chip: ``chain_tiles`` per chain (the model's width, at most 32), chains per
    layer group (the fewest whose stacked word lines fit ``word_lines``), as the estimate plans."""
    a = {**ROW_ARCH_DEFAULTS, **(arch or {})}
    fam = layers.base.family
    C, W = a["tile_cols"], a["word_lines"]
    hidden = layers.shapes[0][1]
    K = a["chain_tiles"] or default_chain_tiles(hidden, C)
    named = [(role, o, i) for role, (o, i) in zip(layers.roles, layers.shapes)]
    groups = stages_of(named)
    chains = {g: fit_chains(st, W, K * C) for g, st in groups.items()}
    group_of = [role.rpartition(".")[0] or role for role in layers.roles]
    return {"family": fam.name, "word_lines": W, "tile_cols": C, "unit": fam.unit, "chain_tiles": K,
            "chains": chains, "group_of": group_of,
            "tiles": sum(P * K for P in chains.values())}


def linear_image(layers: ViaLayers, li: int, plan: dict, e=None) -> RowImage:
    """The word lines of linear ``li`` (from the extracted via layers) on its group's chains.
    The image's tile window holds this linear's word lines only; the other stages of its layer
    use the tiles' other word lines."""
    return stage_image(layers, [li], plan, None if e is None else [e])


def stage_image(layers: ViaLayers, lis: list[int], plan: dict, es=None) -> RowImage:
    """The word lines of a fabric stage: the linears ``lis`` (one input, one layer group) with
    their rows stacked in order on the group's chains, as the estimate's stage prices them.
    Row ``r`` of the stack is on chain ``r % chains``, row slot ``r // chains``. ``es``: their
    extractions, when the caller has them."""
    fam = layers.base.family
    es = [extract(layers, li) for li in lis] if es is None else es
    U = fam.unit

    def unit_gs(e):
        g = e.group_size
        return np.repeat(e.group_scale, g // U, axis=1) if g >= U else e.group_scale[:, :: U // g]
    def cat(xs):                       # one linear (the compile's checks): no copy
        return xs[0] if len(xs) == 1 else np.concatenate(xs)
    P, K, C = plan["chains"][plan["group_of"][lis[0]]], plan["chain_tiles"], plan["tile_cols"]
    codes = cat([e.codes for e in es])
    o, i = codes.shape
    bias = None
    if any(e.bias is not None for e in es):
        bias = cat([e.bias if e.bias is not None else np.zeros(e.codes.shape[0], np.int64) for e in es])
    spec = RowSpec(ROW_FORMATS[plan["family"]], word_lines=-(-o // P) * -(-i // (K * C)), cols=C, unit=U,
                   act_bits=fam.act_bits, acc_bits=fam.acc_bits)
    try:
        return row_image(spec, codes, cat([unit_gs(e) for e in es]), cat([e.mult for e in es]),
                         cat([e.shift for e in es]), bias, chains=P, chain_tiles=K)
    except ValueError as err:
        what = ", ".join(f"{layers.roles[li]} ({layers.names[li]})" for li in lis)
        raise TapeoutError(f"{what} does not fit the row-serial word line: {err}") from None


def check_image(layers: ViaLayers, plan: dict, li: int, x: np.ndarray, y: np.ndarray, e=None) -> int:
    """Linear ``li``'s image computes golden's ``y`` from its Q16 input ``x``; returns the values checked."""
    from .simulate import fabric_inputs
    img = linear_image(layers, li, plan, e)
    elems, sh, emin = fabric_inputs(x, img.spec.unit, img.spec.act_bits)
    got = row_reference(img, elems, sh, emin)
    if not np.array_equal(got, y):
        raise TapeoutError(f"internal check failed: the row-serial image of {layers.roles[li]} differs from "
                           "golden (a compiler bug)")
    return int(got.size)


def check_images(layers: ViaLayers, plan: dict, stimulus: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Every linear's image computes golden's outputs on the stimulus (``{li: (x_q16, y)}``)."""
    checked = sum(check_image(layers, plan, li, *stimulus[li]) for li in range(len(layers.names)))
    return {"values_checked": int(checked), "equal": True}


def linear_cycles(layers: ViaLayers, plan: dict) -> int:
    """Cycles of every linear once (one token), from the stage formula the estimate uses."""
    K, C = plan["chain_tiles"], plan["tile_cols"]
    return sum(stage_cycles(o, i, chains=plan["chains"][g], chain_tiles=K, cols=C)
               for (o, i), g in zip(layers.shapes, plan["group_of"]))


def describe(plan: dict) -> dict:
    """The plan as the report records it."""
    P = plan["chains"]
    return {"word_lines": plan["word_lines"], "tile_cols": plan["tile_cols"], "chain_tiles": plan["chain_tiles"],
            "tiles": plan["tiles"], "chains": dict(P) if len(P) <= 8 else
            {"groups": len(P), "min": min(P.values()), "max": max(P.values())},
            "word_bits": RowSpec(ROW_FORMATS[plan["family"]], word_lines=plan["word_lines"], cols=plan["tile_cols"],
                                 unit=plan["unit"]).word_bits}
