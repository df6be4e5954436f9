"""``--target systolic`` behind the target interface (backends/target.py)."""
from __future__ import annotations

from pathlib import Path

from tapeout.backends.target import Target
from tapeout.compiler.errors import TapeoutError


def compare_with_golden(got: dict, gold_dir: Path) -> tuple[int, int]:
    """(values checked, mismatches) of a simulation's outputs against OUT/sim/golden/*.npy."""
    import numpy as np
    checked = mismatches = 0
    for p in sorted(gold_dir.glob("*.npy")):
        g = np.load(p, allow_pickle=False)
        if p.stem not in got:
            raise TapeoutError(f"the simulation produced no output {p.stem!r}", file=str(p))
        checked += g.size
        mismatches += int(np.count_nonzero(got[p.stem] != g))
    if checked == 0:
        raise TapeoutError("simulated nothing: no values were checked")
    return int(checked), mismatches


def whole_model_only(args, what: str) -> None:
    if args.engine != "amaranth" or args.layer or args.rtl != "auto":
        raise TapeoutError(f"a {what} folder is simulated whole: --engine, --layer and --rtl apply to mask-ROM chips")


class SystolicTarget(Target):
    name = "systolic"
    needs_format = True
    takes_machine = True

    def options(self, args) -> dict:
        from .machine import Machine
        Machine.from_options(args.machine)
        return {"machine": sorted(args.machine or []), "verify": args.verify}

    def compile(self, program, out, opts: dict, step) -> tuple[dict, str]:
        from .compile import compile_systolic
        from .machine import Machine
        report = compile_systolic(program, out, Machine.from_options(opts["machine"]),
                                  verify=opts["verify"] != "none", step=step)
        sc, iv = report["schedule"], report.get("isa_vs_golden")
        rate = (f"decode step {report['cycles_per_token']} cycles/token" if report["mode"] == "decode" else
                f"prefill {report['tokens_per_run']} tokens, {report['cycles_per_token']:g} cycles/token")
        headline = (f"{report['instructions']} instructions, makespan {sc['makespan']} cycles "
                    f"({sc['ratio']:.3f}x the lower bound {sc['lower_bound']}); {rate}, "
                    f"{report['tokens_per_s']:,.0f} tokens/s at {report['machine']['clock_hz'] / 1e9:g} GHz "
                    f"(weight-DMA roofline {report['memory_roofline']['cycles']} cycles)"
                    + (f"; ISA simulator == golden on {iv['checked']} outputs" if iv else ""))
        return report, headline

    def simulate(self, folder, program, opts: dict, args, step) -> tuple[dict, int, str]:
        """Decode OUT/program.bin, run it on the ISA simulator with OUT/sim/feeds and the weight
        image OUT/weights.bin, check its cycles against the schedule's makespan (report.json),
        compare with OUT/sim/golden."""
        import json

        import numpy as np

        from .isa import IsaError, decode
        from .isasim import run_program
        from .machine import Machine
        from .weights import ImageError
        whole_model_only(args, "systolic")
        folder = Path(folder)
        gold_dir = folder / "sim/golden"
        if not gold_dir.is_dir():
            raise TapeoutError("no golden outputs in sim/ (compiled with --verify none)", file=str(folder))
        machine = Machine.from_options(opts["machine"])
        try:
            prog = decode((folder / "program.bin").read_bytes())
            image = (folder / "weights.bin").read_bytes()
            makespan = json.loads((folder / "report.json").read_text())["schedule"]["makespan"]
            feeds = {p.stem: np.load(p, allow_pickle=False) for p in sorted((folder / "sim/feeds").glob("*.npy"))}
            stats: dict = {}
            with step(f"ISA simulator: {len(prog)} instructions"):
                got = run_program(program, machine, prog, feeds, stats, image=image, makespan=int(makespan))
        except IsaError as e:
            what = "weights.bin" if isinstance(e, ImageError) else "program.bin"
            raise TapeoutError(f"{what}: {e}", file=str(folder)) from None
        checked, mismatches = compare_with_golden(got, gold_dir)
        r = {"engine": "isa", "checked": int(checked), "mismatches": mismatches, "cycles": stats["cycles"],
             "instructions": stats["instructions"], "per_opcode": stats["per_op"]}
        text = (f"isa: {len(prog)} instructions, {checked} values checked, {mismatches} mismatches, "
                f"{stats['cycles']} cycles")
        return r, 1 if mismatches else 0, text


TARGET = SystolicTarget()
