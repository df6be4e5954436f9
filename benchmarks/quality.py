"""Quantisation quality on SmolLM2-135M: one table, every format, float and golden paths.

    python benchmarks/quality.py [--model PATH] [--eval-tokens N] [--calib-tokens N] [--json OUT]

Calibration: the built-in text (compiler/data/calib.txt). Evaluation: benchmarks/data/eval.txt,
a disjoint text. Both go through the model's own tokenizer. Windows are the export's sequence
length (default export: 128 tokens, `models/smollm2.py --seq-len 128`). KLD as llama.cpp
defines it, per token sum p_ref (log p_ref - log p_q), against the float model.

SmolLM2's published weights come from a Q4_1 GGUF: they already sit on an asymmetric 4-bit
grid with blocks of 32. Any aligned asymmetric int4-g32 format would be artificially lossless
on them, so no such row appears here and no claim rests on one. The int baselines below are
symmetric.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))

ROWS = [  # name, QuantConfig keyword arguments, path
    ("int8 per-channel RTN", dict(fmt="int8", rtn=True), "float"),
    ("int4-g128 RTN *", dict(fmt="int4", group_size=128, group_fallback=True, rtn=True), "float"),
    ("int3-g64 RTN", dict(fmt="int3", group_size=64, rtn=True), "float"),
    ("w3o6 1% outliers", dict(fmt="w3o6", outlier_frac=0.01), "float"),
    ("w3o6 3% outliers GPTQ", dict(fmt="w3o6", outlier_frac=0.03, gptq=True), "float"),
    ("mxfp4", dict(fmt="mxfp4"), "float"),
    ("nvfp4", dict(fmt="nvfp4"), "float"),
    ("w3o6 1% outliers", dict(fmt="w3o6", outlier_frac=0.01), "golden"),
    ("nvfp4", dict(fmt="nvfp4"), "golden"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="SmolLM2 ONNX export (default: models/smollm2.py --seq-len 128)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = ap.parse_args()

    import smollm2
    from tokenizers import Tokenizer

    from tapeout.compiler.evaluate import evaluate, reference_logits
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, seq_len_of, windows

    model = Path(args.model) if args.model else smollm2.export(seq_len=128)
    tok = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    calib_ids = np.array(tok.encode((REPO / "compiler/data/calib.txt").read_text()).ids)[: args.calib_tokens]
    eval_ids = np.array(tok.encode((REPO / "benchmarks/data/eval.txt").read_text()).ids)[: args.eval_tokens]

    t0 = time.perf_counter()
    graph = frontend(model)
    seq = seq_len_of(graph)
    stats = calibrate(graph, windows(calib_ids, seq), hessian=True)
    wins = windows(eval_ids, seq)
    refs = reference_logits(graph, wins)
    print(f"model {model.name}: windows of {seq}; calibration {stats.tokens} tokens "
          f"(compiler/data/calib.txt), evaluation {len(wins) * (seq - 1)} scored positions "
          f"(benchmarks/data/eval.txt); setup {time.perf_counter() - t0:.0f} s", flush=True)

    results = []
    header = f"{'format':24s} {'path':6s} {'bits/w':>7s} {'+head':>6s} {'KLD mean':>9s} {'KLD p99':>8s} " \
             f"{'top-1':>6s} {'ppl':>8s} {'time s':>7s}"
    print(header)
    print("-" * len(header))
    ppl_ref = None
    cache = {}
    for name, kw, path in ROWS:
        t1 = time.perf_counter()
        key = json.dumps(kw, sort_keys=True)
        if key not in cache:
            cache[key] = quantize_model(graph, QuantConfig(**kw), stats)
        r = evaluate(graph, cache[key], eval_ids, seq, path=path, refs=refs)
        r.update(name=name, seconds=time.perf_counter() - t1)
        ppl_ref = r["ppl_ref"]
        results.append(r)
        print(f"{name:24s} {path:6s} {r['bits_per_weight']:7.3f} {r['bits_per_weight_with_head']:6.2f} "
              f"{r['kld_mean']:9.4f} {r['kld_p99']:8.3f} {r['top1_agree']:6.3f} {r['ppl']:8.2f} "
              f"{r['seconds']:7.0f}", flush=True)
    print(f"{'float reference':24s} {'float':6s} {32.0:7.3f} {'':6s} {0.0:9.4f} {0.0:8.3f} {1.0:6.3f} {ppl_ref:8.2f}")
    print("bits/w: the quantised linears (the 210 layer linears); +head: with the LM head (int8 per channel, "
          "tied to the embedding) counted too.")
    print("* SmolLM2's 576-wide inputs are not divisible by 128: those layers use g64 (gcd), the 1536-wide "
          "down_proj g128 (--group-fallback).")

    def row(name, path="float"):
        return next(r for r in results if r["name"] == name and r["path"] == path)

    w1, w3 = row("w3o6 1% outliers"), row("w3o6 3% outliers GPTQ")
    int3, int4 = row("int3-g64 RTN"), row("int4-g128 RTN *")
    print("\nclaims:")
    for w in (w1, w3):
        print(f"  {w['name']} at {w['bits_per_weight']:.3f} bits/w: KLD {int3['kld_mean'] / w['kld_mean']:.1f}x lower "
              f"than int3-g64 RTN (need >= 3x); vs int4-g128 RTN {w['kld_mean']:.4f} vs {int4['kld_mean']:.4f} "
              f"({'no worse' if w['kld_mean'] <= int4['kld_mean'] else 'WORSE'})")
    nv, mx = row("nvfp4"), row("mxfp4")
    print(f"  nvfp4 KLD {nv['kld_mean']:.4f} vs mxfp4 {mx['kld_mean']:.4f} "
          f"({'<=' if nv['kld_mean'] <= mx['kld_mean'] else 'WORSE: >'})")
    for name in ("w3o6 1% outliers", "nvfp4"):
        g, f = row(name, "golden"), row(name)
        print(f"  golden/float KLD for {name}: {g['kld_mean'] / f['kld_mean']:.2f}x (need <= 1.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
