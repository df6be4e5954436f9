"""Systolic microcode tiles on the array RTL: Amaranth's simulator vs Verilator, partial sums
against the ISA simulator's and the cycle model's cycles against the RTL's (issue 6).

    python benchmarks/systolic_replay.py [MODEL.onnx] [--format nvfp4] [--n 16] [--tiles 64]

MODEL defaults to the SmolLM2-135M prefill-128 export (.cache/models/smollm2/smollm2-135m-s128.onnx).
For the first layer's q_proj, o_proj and down_proj (output tile 0, up to ``--tiles`` K tiles, all
tokens) and the first attention's Q.K^T (KV head group 0, key tile 0, every d-tile), both
engines replay the PRELOAD/MATMUL chain back to back; the table prints values checked,
mismatches, RTL cycles, the ISA cycle model's cycles, their relative error and cycles/s.
The Verilator build is cached under .cache/verilator/ (its time is printed separately).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tapeout.backends.systolic.machine import Machine
from tapeout.backends.systolic.replay import replay_tiles
from tapeout.compiler.frontend import frontend
from tapeout.compiler.qmodel import QuantConfig, quantize_model, sample_feeds

DEFAULT = Path(__file__).resolve().parents[1] / ".cache/models/smollm2/smollm2-135m-s128.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", default=DEFAULT)
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tiles", type=int, default=64)
    args = ap.parse_args()
    gm = quantize_model(frontend(args.model), QuantConfig(args.format, quantize_head=True), None).golden()
    feeds = sample_feeds(gm.graph)
    linears = [op.name for op in gm.order if op.kind == "linear"]
    attention = next(op.name for op in gm.order if op.kind == "attention")
    picks = [(linears[0], "q_proj"), (linears[3], "o_proj"), (linears[6], "down_proj"), (attention, "Q.K^T")]
    m = Machine(n=args.n)
    print(f"{'layer':10s} {'engine':9s} {'tiles':>5s} {'tokens':>6s} {'checked':>8s} {'mism':>4s} "
          f"{'rtl cyc':>8s} {'isa cyc':>8s} {'error':>6s} {'cycles/s':>11s}")
    for name, role in picks:
        for engine in ("amaranth", "verilator"):
            r = replay_tiles(gm, m, feeds, layer_name=name, tiles=args.tiles, engine=engine)
            print(f"{role:10s} {engine:9s} {r['tiles']:5d} {r['tokens']:6d} {r['checked']:8d} {r['mismatches']:4d} "
                  f"{r['rtl_cycles']:8d} {r['isa_cycles']:8d} {r['cycle_error']:6.1%} {r['cycles_per_s']:11,d}"
                  + (f"  (build {r['build_s']} s, cached {r['build_cached']})" if engine == "verilator" else ""))


if __name__ == "__main__":
    main()
