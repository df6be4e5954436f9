"""Sizing a dataflow pipeline from shapes alone (``tapeout estimate --target dataflow``;
spec: docs/dataflow.md, "Many chips").

For models too big to compile on this machine (Llama-3.1-8B), the same rules the compiler
uses, applied to shapes: weight blocks of each linear (``rows x cols``, codes at the format's
bits plus its scales), the embedding table at 4 bytes per value (golden's Q16), chips filled
in layer order up to the SRAM outside the activation banks, and per chip the weight-streaming
bound of a decode step: every block's install vectors, dealt evenly over the MXMs. A decode
step of one user visits every chip in turn (plus one link hop per chip boundary); a full
pipeline keeps one token per chip in flight, so it produces a token every slowest-stage time.
These are bounds: the compiled SmolLM2 decode step shows how far a real schedule is from its
own (the report prints both).
"""
from __future__ import annotations

import math

from tapeout.backends.model_shape import ModelShape, format_cost
from tapeout.compiler.quant.formats import W3O6_OUTLIER_FRAC

from .machine import Machine

__all__ = ["estimate_dataflow", "format_dataflow"]


def _block_cycles(out: int, inp: int, bpw: float, m: Machine, unit: int) -> tuple[int, int]:
    """(install cycles of the whole linear on one MXM-share, bytes) following linear_blocks."""
    rows = max(r for r in range(unit, min(m.mxm_k, inp) + 1, unit) if inp % r == 0) if inp % unit == 0 \
        else min(m.mxm_k, inp)
    even = [c for c in range(1, min(m.mxm_n, out) + 1) if out % c == 0 and (out // c) % m.mxm == 0]
    cols = max(even) if even else min(m.mxm_n, out)
    n_i, n_k = -(-out // cols), -(-inp // rows)
    block = math.ceil(rows * cols * bpw / 8)
    per_block = -(-block // m.lanes)
    req = -(-10 * cols // m.lanes)
    cycles = -(-n_i // m.mxm) * (n_k * per_block + req)
    return cycles, n_i * n_k * block + n_i * 10 * cols


def estimate_dataflow(shape: ModelShape, fmt: str, m: Machine, outlier_frac: float = W3O6_OUTLIER_FRAC) -> dict:
    fc = format_cost(fmt)
    unit = 16 if fmt == "nvfp4" else 32
    per_layer = {}
    items = []             # (name, bytes, install cycles) in model order
    emb = 4 * shape.vocab * shape.hidden
    items.append(("embed_tokens (Q16 gather table)", emb, 0))
    for name, o, i in shape.linears:
        bpw = fc.bits_per_weight(o, i, outlier_frac)
        cyc, nbytes = _block_cycles(o, i, bpw, m, unit)
        items.append((name, nbytes, cyc))
        layer = name.split(".", 1)[0]
        per_layer.setdefault(layer, [0, 0])
        per_layer[layer][0] += nbytes
        per_layer[layer][1] += cyc
    cap = m.store_bytes
    chips, used, cyc = [], 0, 0
    too_big = [(n, b) for n, b, _ in items if b > cap]
    for name, b, c in items:
        if b > cap:                    # split over whole chips of its own
            k = -(-b // cap)
            chips += [{"bytes": b // k, "install_cycles": -(-c // k), "items": 1} for _ in range(k)]
            used = cap
            continue
        if chips and used + b <= cap:
            used += b
            chips[-1]["bytes"] += b
            chips[-1]["install_cycles"] += c
            chips[-1]["items"] += 1
        else:
            chips.append({"bytes": b, "install_cycles": c, "items": 1})
            used = b
    n = len(chips)
    step = sum(c["install_cycles"] for c in chips)
    link = (n - 1) * (m.link_latency + -(-4 * shape.hidden // m.link_bytes_per_cycle))
    per_user = step + link
    slowest = max(c["install_cycles"] for c in chips)
    clock = m.clock_hz
    return {
        "model": shape.name, "format": fmt, "target": "dataflow", "machine": m.as_dict(),
        "weights": shape.weights, "weight_bytes": sum(b for nm, b, _ in items[1:]), "table_bytes": emb,
        "chip_sram_bytes": m.mem_banks * m.bank_kib * 1024, "chip_store_bytes": cap, "chips": n,
        "split_items": [n for n, _ in too_big],
        "decode_cycles_bound": per_user, "link_cycles": link,
        "tokens_per_s_per_user_bound": round(clock / per_user, 1) if per_user else 0.0,
        "pipeline_tokens_per_s_bound": round(clock / slowest, 1) if slowest else 0.0,
        "stages": [{"chip": k, **c} for k, c in enumerate(chips)],
        "clock_hz": clock,
        "note": ("bounds: weight streaming into the MXMs (install vectors / MXM count per chip) plus one link "
                 "hop per chip boundary; a single linear bigger than a chip is listed in split_items (the "
                 "compiler rejects it, the estimate assumes it is split across chips)"),
    }


def format_dataflow(r: dict) -> str:
    lines = [f"{r['model']} on the dataflow machine, {r['format']}: {r['weights'] / 1e6:.1f} M weights = "
             f"{r['weight_bytes'] / 2**20:.1f} MiB + {r['table_bytes'] / 2**20:.1f} MiB gather table",
             f"chips: {r['chips']} (each {r['chip_sram_bytes'] / 2**20:.0f} MiB SRAM, "
             f"{r['chip_store_bytes'] / 2**20:.0f} MiB for weights and constants)",
             f"decode step bound: {r['decode_cycles_bound']} cycles ({r['link_cycles']} on links) -> "
             f"{r['tokens_per_s_per_user_bound']:.0f} tokens/s per user at {r['clock_hz'] / 1e6:.0f} MHz",
             f"pipeline bound (one token per chip in flight): {r['pipeline_tokens_per_s_bound']:.0f} tokens/s"]
    if r["split_items"]:
        lines.append(f"larger than one chip (assumed split): {', '.join(r['split_items'])}")
    return "\n".join(lines)
