"""``--target maskrom`` behind the target interface (backends/target.py)."""
from __future__ import annotations

import math

from tapeout.backends.target import Target
from tapeout.compiler.errors import TapeoutError


def tile_list(text: str) -> list[int] | None:
    """``--gds-tiles``: ``all`` or tile numbers like ``0,5,17``."""
    if text == "all":
        return None
    try:
        tiles = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TapeoutError(f"--gds-tiles expects tile numbers like 0,5,17 or 'all', not {text!r}") from None
    if not tiles or min(tiles) < 0:
        raise TapeoutError(f"--gds-tiles expects non-negative tile numbers, not {text!r}")
    return tiles


class MaskromTarget(Target):
    name = "maskrom"
    needs_format = True

    def options(self, args) -> dict:
        tile_list(args.gds_tiles)
        if args.context is not None and args.context < 1:
            raise TapeoutError(f"--context must be >= 1, not {args.context}")
        from tapeout.commands import _arch_options
        from .rowchip import CHIP_ARCH_KEYS, check_arch
        arch = _arch_options(getattr(args, "arch", None) or [])
        wrong = sorted(set(arch) - set(CHIP_ARCH_KEYS))
        if wrong:
            raise TapeoutError(f"compile --arch takes {' and '.join(CHIP_ARCH_KEYS)}, not {', '.join(wrong)} "
                               "(the fabric's options are the base die's; tapeout estimate takes them all)")
        check_arch(arch)
        return {"base": args.base, "context": args.context, "gds_tiles": args.gds_tiles, "verify": args.verify,
                "arch": arch}

    def preflight(self, graph, summary: dict, fmt: str, opts: dict) -> None:
        from tapeout.compiler.qmodel import linear_ops, weight_matrix

        from .compile import check_gds_tiles, plan_base
        shapes = [tuple(int(d) for d in weight_matrix(graph, op).shape) for op in linear_ops(graph)]
        base, _ = plan_base(fmt, shapes, summary, opts["context"], opts["base"])
        check_gds_tiles(base, tile_list(opts["gds_tiles"]))

    def quant_config(self, config):
        """w3o6: at most the row-serial word line's outlier slots per 64 weights (hdl/rowserial.py)."""
        if config.fmt != "w3o6" or config.outlier_cap is not None:
            return config
        import dataclasses

        from tapeout.compiler.quant.formats import W3O6_GROUP
        from tapeout.hdl.rowserial import ROW_FORMATS, RowSpec
        g = config.group_size or W3O6_GROUP
        spec = RowSpec(ROW_FORMATS["w3o6"])
        if g != spec.scale_span:
            raise TapeoutError(f"--group {g}: the row-serial w3o6 word line holds one group of {spec.scale_span} "
                               f"weights (its scale and {ROW_FORMATS['w3o6'].slots} outlier slots); use --group "
                               f"{spec.scale_span} for --target maskrom")
        cap = ROW_FORMATS["w3o6"].slots
        need = math.ceil(config.outlier_frac * g - 1e-9)
        if need > cap:                       # before any work (quantize checks each layer exactly)
            raise TapeoutError(f"--outlier-frac {config.outlier_frac:g} needs {need} outliers per group of {g}; "
                               f"the row-serial w3o6 word line holds {cap} (use --outlier-frac <= {cap / g:.4f})")
        return dataclasses.replace(config, outlier_cap=cap)

    def compile(self, program, out, opts: dict, step) -> tuple[dict, str]:
        from .compile import compile_maskrom
        report = compile_maskrom(program, out, base_name=opts["base"], context=opts["context"],
                                 gds_tiles=tile_list(opts["gds_tiles"]), verify=opts["verify"], step=step,
                                 arch=opts.get("arch"))
        report["quantization"] = dict(program.quant)
        out.write_json("report.json", report)
        headline = (f"{report['base']} ({report['tiles_used']} of {report['tiles']} tiles), "
                    f"{report['vias']['V_CODE']} V_CODE + {report['vias']['V_FINE']} V_FINE vias, "
                    f"LVS {report['lvs']['values_compared']} values equal, fabric == golden "
                    f"({report['fabric_vs_golden']['mode']}) on {report['fabric_vs_golden']['values_checked']} outputs; "
                    f"row-serial: {report['rowserial']['tiles']} tiles of {report['rowserial']['word_lines']}x"
                    f"{report['rowserial']['tile_cols']}" + (
                        f", word-line images == golden on {report['rowserial']['values_checked']} outputs"
                        if report["rowserial"]["equal"] else ", images not checked (--verify none)"))
        return report, headline

    def simulate(self, folder, program, opts: dict, args, step) -> tuple[dict, int, str]:
        from .simulate import simulate_chip
        r = simulate_chip(folder, args.layer, args.engine, progress=step, rtl=args.rtl,
                          fabric=getattr(args, "fabric", "rowserial"), tokens=getattr(args, "tokens", None))
        lines = [f"{x['role']:24s} {x['shape'][0]:6d}x{x['shape'][1]:<6d} {x['rtl']:15s} {x['checked']:8d} checked "
                 f"{x['mismatches']:4d} mismatches {x['cycles']:6d} cycles" for x in r["per_linear"]]
        lines.append(f"{r['engine']}: {r['linears']} linears, {r['checked']} values checked, {r['mismatches']} "
                     f"mismatches, {r['cycles']} cycles, {r['seconds']} s")
        return r, 1 if r["mismatches"] else 0, "\n".join(lines)


TARGET = MaskromTarget()
