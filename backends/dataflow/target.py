"""``--target dataflow`` behind the target interface (backends/target.py)."""
from __future__ import annotations

import json
from pathlib import Path

from tapeout.backends.systolic.target import compare_with_golden, whole_model_only
from tapeout.backends.target import Target
from tapeout.compiler.errors import TapeoutError


class DataflowTarget(Target):
    name = "dataflow"
    needs_format = True
    takes_machine = True

    def options(self, args) -> dict:
        from .machine import Machine
        Machine.from_options(args.machine)
        return {"machine": sorted(args.machine or []), "verify": args.verify}

    def compile(self, program, out, opts: dict, step) -> tuple[dict, str]:
        from .compile import compile_dataflow
        from .machine import Machine
        report = compile_dataflow(program, out, Machine.from_options(opts["machine"]),
                                  verify=opts["verify"] != "none", step=step)
        sc, sv = report["schedule"], report.get("sim_vs_golden")
        headline = (f"{report['chips']} chip(s), {report['instructions']} instructions, makespan {sc['makespan']} "
                    f"cycles ({sc['ratio']:.3f}x the lower bound {sc['lower_bound']}), "
                    f"{report['tokens_per_s_per_user']:.0f} tokens/s per user"
                    + (f", simulator == golden on {sv['checked']} outputs" if sv else ""))
        return report, headline

    def simulate(self, folder, program, opts: dict, args, step) -> tuple[dict, int, str]:
        """Check OUT/queues.bin statically, run it on the cycle-accurate simulator with OUT/sim/feeds
        and the banks loaded from OUT/banks.bin, and compare every output with OUT/sim/golden."""
        import numpy as np

        from .banks import BankError
        from .check import check
        from .isa import QueueError, decode
        from .machine import Machine
        from .sim import run_queues
        whole_model_only(args, "dataflow")
        folder = Path(folder)
        gold_dir = folder / "sim/golden"
        if not gold_dir.is_dir():
            raise TapeoutError("no golden outputs in sim/ (compiled with --verify none)", file=str(folder))
        machine = Machine.from_options(opts["machine"])
        report = json.loads((folder / "report.json").read_text())
        try:
            queues = decode((folder / "queues.bin").read_bytes())
            memmap = json.loads((folder / "memory.json").read_text())["copies"]
            with step(f"checker: {sum(len(q) for q in queues.values())} instructions"):
                proof = check(machine, queues, memmap)
            feeds = {p.stem: np.load(p, allow_pickle=False) for p in sorted((folder / "sim/feeds").glob("*.npy"))}
            stats: dict = {}
            with step("cycle-accurate simulator"):
                got = run_queues(program, machine, queues, memmap, feeds, stats,
                                 image=(folder / "banks.bin").read_bytes())
        except QueueError as e:
            what = "banks.bin" if isinstance(e, BankError) else "queues.bin"
            raise TapeoutError(f"{what}: {e}", file=str(folder)) from None
        checked, mismatches = compare_with_golden(got, gold_dir)
        sc = report["schedule"]
        r = {"engine": "dataflow", "checked": int(checked), "mismatches": mismatches, "cycles": stats["cycles"],
             "makespan": sc["makespan"], "lower_bound_cycles": sc["lower_bound"],
             "critical_path": sc["critical_path"], "resource_bound": sc["resource_bound"],
             "instructions": stats["instructions"], "chips": report["chips"], "checker": proof}
        text = (f"dataflow: {r['instructions']} instructions on {r['chips']} chip(s), checker proved "
                f"{proof['transfers']} stream transfers, {checked} values checked, {mismatches} mismatches, "
                f"{r['cycles']} cycles (makespan {sc['makespan']}, lower bound {sc['lower_bound']})")
        return r, 1 if mismatches or stats["cycles"] != sc["makespan"] else 0, text


TARGET = DataflowTarget()
