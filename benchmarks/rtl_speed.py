"""RTL simulation speed: Amaranth's simulator vs Verilator on one SmolLM2-135M layer (issue 4).

    python benchmarks/rtl_speed.py CHIP [--layer layers.0] [--repeat 3]

CHIP: a `tapeout compile --target maskrom` folder of SmolLM2-135M (e.g.
`tapeout compile .cache/models/smollm2/...onnx --target maskrom --format nvfp4 -o CHIP`).
The RTL is the base die's tile with the via layers loaded as data (`tapeout simulate --rtl
base`), one build per base family. For every linear of the layer:

- Verilator runs the whole linear (every tile, golden's 16 tokens) and its outputs are
  compared with golden's, value by value; cycles/s is the median of ``--repeat`` runs.
- Amaranth's simulator runs the first column tile of every row block (its cycles/s does not
  depend on how many tiles it runs; the whole layer would take about an hour), and those
  partial results are compared with Verilator's for the same tiles.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from tapeout.backends.maskrom.layers import load_layers, via_maps
from tapeout.backends.maskrom.simulate import fabric_inputs, select
from tapeout.hdl.slots import make_slot, simulate_linear_slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chip", type=Path)
    ap.add_argument("--layer", default="layers.0")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    layers = load_layers(args.chip)
    chosen = select(layers, [args.layer])
    slot, build = None, {}
    rows = []
    for li in chosen:
        a = via_maps(layers, li)
        if slot is None:
            slot = make_slot(a)
            t0 = time.perf_counter()
            x0 = np.zeros((1, a["v_code"].shape[1]), np.int64)
            simulate_linear_slots(a, x0, np.zeros((1, x0.shape[1] // a["unit"]), np.int64), np.zeros(1, np.int64),
                                  engine="verilator", stats=build, slot=slot, max_column_tiles=1)
            build["wall_s"] = time.perf_counter() - t0
        x = np.load(args.chip / f"sim/{li:04d}.x.npy")
        gold = np.load(args.chip / f"sim/{li:04d}.y.npy")
        e, sh, emin = fabric_inputs(x, a["unit"], a["act_bits"])
        vrates = []
        for _ in range(args.repeat):
            st: dict = {}
            y, cyc = simulate_linear_slots(a, e, sh, emin, engine="verilator", stats=st, slot=slot)
            if not np.array_equal(y, gold):
                raise SystemExit(f"{layers.roles[li]}: Verilator differs from golden in "
                                 f"{int(np.count_nonzero(y != gold))} of {gold.size} values")
            vrates.append(st["cycles_per_s"])
        sv: dict = {}
        yv1, _ = simulate_linear_slots(a, e, sh, emin, engine="verilator", stats=sv, slot=slot, max_column_tiles=1)
        sa: dict = {}
        ya1, acyc = simulate_linear_slots(a, e, sh, emin, engine="amaranth", stats=sa, slot=slot, max_column_tiles=1)
        if not np.array_equal(ya1, yv1):
            raise SystemExit(f"{layers.roles[li]}: Amaranth and Verilator differ on the first column tile")
        rows.append(dict(role=layers.roles[li], shape=layers.shapes[li], tiles=st["tiles"], checked=gold.size,
                         vcyc=cyc, vrate=statistics.median(vrates), acyc=acyc, arate=sa["cycles_per_s"],
                         acompile=sa["build_s"]))
        print(f"  {layers.roles[li]}: done", flush=True)
    print(f"\nchip {args.chip.name}, base-die tile {slot.rows}x{slot.cols} (unit {slot.unit}, "
          f"{len(slot.coarse)} coarse + {len(slot.fine)} fine lines), 16 tokens per linear")
    print(f"Verilator build (once per base family, cached): {build['build_s']:.0f} s + "
          f"Verilog conversion {build['convert_s']:.0f} s")
    head = (f"{'linear':22s} {'shape':>10s} {'tiles':>5s} {'checked':>8s} {'verilator cyc':>13s} "
            f"{'cyc/s':>9s} {'amaranth cyc':>12s} {'cyc/s':>7s} {'ratio':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['role']:22s} {r['shape'][0]:>4d}x{r['shape'][1]:<5d} {r['tiles']:5d} {r['checked']:8d} "
              f"{r['vcyc']:13d} {r['vrate']:9.0f} {r['acyc']:12d} {r['arate']:7.1f} {r['vrate'] / r['arate']:5.0f}x")
    vc, ac = sum(r["vcyc"] for r in rows), sum(r["acyc"] for r in rows)
    vs = sum(r["vcyc"] / r["vrate"] for r in rows)
    as_ = sum(r["acyc"] / r["arate"] for r in rows)
    print(f"{'layer':22s} {'':>10s} {sum(r['tiles'] for r in rows):5d} {sum(r['checked'] for r in rows):8d} "
          f"{vc:13d} {vc / vs:9.0f} {ac:12d} {ac / as_:7.1f} {(vc / vs) / (ac / as_):5.0f}x")
    print(f"all {sum(r['checked'] for r in rows)} outputs of the layer equal golden under Verilator; "
          f"whole layer {vs:.1f} s of Verilator simulation; Amaranth would need ~{vc / (ac / as_) / 60:.0f} min")


if __name__ == "__main__":
    main()
