"""`tapeout adapt`: LoRA adapters for a compiled mask-ROM chip, as SRAM images (docs/lora.md).

Two sources:
- a PEFT LoRA adapter folder: its lora_A / lora_B factors on the modules it names, mapped to the
  chip's linears by structural role (``model.layers.3.self_attn.q_proj`` -> ``layers.3.q_proj``);
- a fine-tuned ONNX model: per linear, the truncated SVD of (fine-tuned weights - the chip's
  dequantised ROM weights), so the SRAM also corrects part of the ROM's own quantisation error.

An adapter folder holds ``adapter/index.json`` + ``adapter/sram.bin`` (docs/formats.md), a
report and a manifest naming the chip (its ``manifest_sha256``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from tapeout.compiler import lora
from tapeout.compiler.errors import TapeoutError

INDEX, IMAGE = "adapter/index.json", "adapter/sram.bin"


def chip_linears(folder: Path) -> tuple[dict, object, dict[str, str], dict[str, tuple[int, int]]]:
    """(manifest, program, role -> op, op -> (out, in)) of a chip folder (hashes checked)."""
    from tapeout.driver import load_program, open_folder
    from .layers import load_layers
    man, target = open_folder(folder)
    if target.name != "maskrom" or man.get("command") != "compile":
        raise TapeoutError("`tapeout adapt` adapts a `compile --target maskrom` folder", file=str(folder))
    prog = load_program(folder)
    layers = load_layers(folder)
    by_role = {r: n for n, r in zip(layers.names, layers.roles) if r != "other"}
    shapes = {n: tuple(int(d) for d in s) for n, s in zip(layers.names, layers.shapes)}
    return man, prog, by_role, shapes


def _targets(spec: str | None, roles: dict[str, str]) -> list[str]:
    """The chip roles a ``--targets`` list selects: names such as q_proj,v_proj (every layer's),
    ``all`` (every linear but the head) or ``all+head``; default all."""
    body = sorted((r for r in roles if r != "lm_head"), key=_role_key)
    if not spec or spec == "all":
        return body
    if spec == "all+head":
        return body + (["lm_head"] if "lm_head" in roles else [])
    names = [t.strip() for t in spec.split(",") if t.strip()]
    known = {r.rsplit(".", 1)[-1] for r in roles}
    for t in names:
        if t not in known:
            raise TapeoutError(f"--targets names {t!r}; this chip's linears are {', '.join(sorted(known))}")
    return [r for r in sorted(roles, key=_role_key) if r.rsplit(".", 1)[-1] in names]


def _role_key(role: str):
    parts = role.split(".")
    return (0, int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() else (1, 0, role)


def from_peft(folder: str | Path, roles: dict[str, str], shapes: dict[str, tuple[int, int]],
              base: str | None = None) -> tuple[list[lora.LoraLinear], list[dict], dict]:
    """The SRAM contents of a PEFT adapter for a chip: (linears, report rows, adapter config)."""
    cfg, factors = lora.read_peft(folder)
    out, rows = [], []
    for module, (a, b, scale) in factors.items():
        role = lora.role_of_module(module)
        if role is None or role not in roles:
            near = sorted(r for r in roles if role and r.startswith(role.rsplit(".", 1)[0] + "."))
            hint = f"; that layer's linears are {', '.join(near)}" if near else ""
            raise TapeoutError(f"adapter module {module!r} maps to no linear of the chip (role {role}){hint}",
                               file=str(folder))
        op = roles[role]
        o, i = shapes[op]
        if b.shape[0] != o or a.shape[1] != i:
            raise TapeoutError(f"adapter module {module!r}: lora_B·lora_A is [{b.shape[0]}, {a.shape[1]}], the "
                               f"chip's {role} is [{o}, {i}]", file=str(folder))
        f = lora.quantize(op, role, a, b, scale)
        want = scale * (b.astype(np.float64) @ a.astype(np.float64))
        err = float(np.linalg.norm(f.dense() - want) / max(np.linalg.norm(want), 1e-30))
        out.append(f)
        rows.append({"role": role, "op": op, "module": module, "rank": f.rank, "shape": [o, i],
                     "sram_bytes": f.sram_bytes, "factor_error": round(err, 6)})
    order = {r: k for k, r in enumerate(sorted(roles, key=_role_key))}
    keyed = sorted(zip(out, rows), key=lambda p: order[p[0].role])
    return [f for f, _ in keyed], [r for _, r in keyed], cfg


def from_finetuned(prog, ft_graph, roles: dict[str, str], shapes: dict[str, tuple[int, int]], rank: int,
                   targets: str | None, step: Callable[[int, int], None] | None = None, stats=None
                   ) -> tuple[list[lora.LoraLinear], list[dict]]:
    """Rank-``rank`` SRAM corrections from a fine-tuned model's weights to the chip's ROM;
    ``stats`` (calibration of the fine-tuned model, with Hessians) weights them by the linears'
    inputs (``lora.low_rank``)."""
    from tapeout.compiler.qmodel import linear_roles
    if not isinstance(rank, int) or rank < 1:
        raise TapeoutError(f"--rank must be a positive integer, not {rank!r}")
    ft_roles = {r: n for n, r in linear_roles(ft_graph).items()}
    chosen = _targets(targets, roles)
    out, rows = [], []
    for k, role in enumerate(chosen):
        op = roles[role]
        if role not in ft_roles:
            raise TapeoutError(f"the fine-tuned model has no linear in the role {role} of the chip's {op!r}")
        fop = ft_graph.op(ft_roles[role])
        w = np.asarray(ft_graph.constants[fop.inputs[1]], np.float64)
        w = w if fop.attr("trans_w", False) else w.T                      # [out, in]
        if tuple(w.shape) != shapes[op]:
            raise TapeoutError(f"the fine-tuned {role} is {list(w.shape)}, the chip's is {list(shapes[op])}")
        if not np.isfinite(w).all():
            raise TapeoutError(f"the fine-tuned {role} holds a non-finite weight")
        d = w - lora.rom_weight(prog.linears[op])
        h = None if stats is None else stats.hessian.get(fop.inputs[0])
        a, b, rest = lora.low_rank(d, rank, h)
        f = lora.quantize(op, role, a, b)

        def size(m):                             # ||m||_F, or the output error sqrt(tr(M H M^T))
            return float(np.linalg.norm(m)) if h is None else math.sqrt(max(float(np.sum((m @ h) * m)), 0.0))
        dn = size(d)
        rest = size(d - b @ a) / dn if dn > 0 else 0.0
        stored = size(d - f.dense()) / dn if dn > 0 else 0.0
        out.append(f)
        rows.append({"role": role, "op": op, "rank": f.rank, "shape": list(shapes[op]), "sram_bytes": f.sram_bytes,
                     "gap_norm": round(dn, 6), "gap_left_svd": round(rest, 6), "gap_left": round(stored, 6)})
        if step:
            step(k + 1, len(chosen))
    return out, rows


def write(out, linears: list[lora.LoraLinear], rows: list[dict], meta: dict, act_bits: int) -> dict:
    """The adapter's artifacts into an OutputFolder; returns the report."""
    data, index_rows = lora.image(linears)
    out.write_bytes(IMAGE, data)
    out.write_json(INDEX, {"format": lora.FORMAT, "act_bits": act_bits, "bytes": len(data),
                           "linears": index_rows})
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    report = {**meta, "linears": len(rows), "sram_bytes": len(data), "sram_mib": round(len(data) / 2**20, 4),
              "ranks": sorted({r["rank"] for r in rows}),
              "bits_per_adapted_weight": round(8 * len(data) / max(weights, 1), 4), "rows": rows}
    out.write_json("report.json", report)
    out.write_text("report.txt", render(report))
    return report


def render(rep: dict) -> str:
    lines = [f"# tapeout adapter: {rep['source']} for {rep['chip']}",
             f"# {rep['linears']} linears, ranks {', '.join(map(str, rep['ranks']))}; SRAM {rep['sram_bytes']:,} bytes "
             f"({rep['sram_mib']} MiB), {rep['bits_per_adapted_weight']} bits per adapted ROM weight"]
    fin = rep["source"] == "finetuned"
    head = f"{'role':<24} {'shape':>12} {'rank':>5} {'SRAM B':>9} " + \
        (f"{'|gap|':>9} {'left (svd)':>10} {'left':>8}" if fin else f"{'factor err':>10}  module")
    lines.append(head)
    for r in rep["rows"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        tail = (f"{r['gap_norm']:>9.4f} {r['gap_left_svd']:>10.4f} {r['gap_left']:>8.4f}" if fin
                else f"{r['factor_error']:>10.5f}  {r['module']}")
        lines.append(f"{r['role']:<24} {shape:>12} {r['rank']:>5} {r['sram_bytes']:>9,} {tail}")
    if fin:
        what = ("the output error ||(W_finetuned - W_rom) X^T|| over the calibration inputs X" if rep.get("weighted")
                else "||W_finetuned - W_rom||_F")
        lines.append(f"# |gap|: {what}; left: the fraction of it the rank-r SRAM correction leaves (svd: before int8)")
    return "\n".join(lines) + "\n"


def load(folder: str | Path, chip_man: dict, prog) -> dict[str, lora.LoraLinear]:
    """The adapter folder's linears for a chip (hashes checked, the chip's and shapes matched)."""
    from tapeout.driver import open_folder
    folder = Path(folder)
    man, _ = open_folder(folder)
    if man.get("command") != "adapt":
        raise TapeoutError("--adapter expects a `tapeout adapt` folder", file=str(folder))
    if man.get("options", {}).get("chip_manifest_sha256") != chip_man.get("manifest_sha256"):
        raise TapeoutError("this adapter was made for another chip (its chip_manifest_sha256 differs from the "
                           "chip's manifest_sha256); adapt this chip", file=str(folder))
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TapeoutError(f"unreadable {INDEX}: {e}", file=str(folder)) from None
    linears = lora.read_image(index, (folder / IMAGE).read_bytes(), str(folder / INDEX))
    out = {}
    for f in linears:
        L = prog.linears.get(f.op)
        if L is None:
            raise TapeoutError(f"the adapter's linear {f.op!r} ({f.role}) is not on the chip", file=str(folder))
        if tuple(L.codes.shape) != f.shape:
            raise TapeoutError(f"the adapter's {f.role} is {list(f.shape)}, the chip's is {list(L.codes.shape)}",
                               file=str(folder))
        out[f.op] = f
    if index.get("act_bits") != prog.config.act_bits:
        raise TapeoutError(f"the adapter's act_bits {index.get('act_bits')} differ from the chip's "
                           f"{prog.config.act_bits}", file=str(folder))
    return out


def kld(prog, ref_graph, ids, adapter: dict | None = None, *, refs=None) -> dict:
    """The chip's golden logits (with ``adapter`` in its SRAM) scored against a float model on
    windows of ``ids``: KLD, top-1 agreement (compiler/evaluate.py). ``refs``: the float
    model's logits of the same windows (``reference_logits``), to score several chips."""
    from tapeout.compiler.evaluate import reference_logits, score
    from tapeout.compiler.golden.model import Golden
    from tapeout.compiler.qmodel import seq_len_of, windows
    from .chipmodel import window_feeds
    seq = seq_len_of(ref_graph)
    wins = windows(ids, seq)
    if not wins:
        raise TapeoutError(f"{len(ids)} tokens are fewer than one window of {seq}")
    refs = reference_logits(ref_graph, wins) if refs is None else refs
    gm, itf = Golden(prog, lora=adapter), prog.interface
    qs = [gm.run(window_feeds(prog, list(w), seq), outputs=[itf.logits])[itf.logits].reshape(seq, -1)[:-1] / 65536.0
          for w in wins]
    return score(refs, qs, [w[1:] for w in wins])
