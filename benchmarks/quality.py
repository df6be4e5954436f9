"""Quantisation quality on SmolLM2-135M: every format side by side, then (``--techniques``) the
effect of each w3o6 technique, on two texts calibration never saw.

    python benchmarks/quality.py [--model PATH] [--techniques] [--eval-tokens N] [--json OUT]

Model: SmolLM2-135M exported with its attention mask (``models/smollm2.py --seq-len 128
--mask``), windows of 128 tokens. Calibration: the built-in text (compiler/data/calib.txt,
1920 tokens). Evaluation: benchmarks/data/eval.txt (a lighthouse history; the w3o6 defaults
were chosen on it) and benchmarks/data/eval2.txt (a bicycle-repair how-to and story, written
after the choice and used for nothing else). Both go through the model's own tokenizer. KLD
as llama.cpp defines it, per token sum p_ref (log p_ref - log p_q), against the float model.
bits/w counts every stored bit of the 210 layer linears (codes, scales, outlier counts,
indices and high bits); +head also counts the LM head (int8 per channel, tied to the
embedding, the same for every row).

SmolLM2's published weights come from a Q4_1 GGUF: they already sit on an asymmetric 4-bit
grid with blocks of 32. Any aligned asymmetric int4-g32 format would be artificially lossless
on them, so no such row appears here and no claim rests on one. The int baselines below are
symmetric.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))

TEXTS = ("eval.txt", "eval2.txt")
DEFAULT = "w3o6 default"
FORMATS = [  # name, QuantConfig keyword arguments
    ("int8 per-channel RTN", dict(fmt="int8", rtn=True)),
    ("int4-g128 RTN *", dict(fmt="int4", group_size=128, group_fallback=True, rtn=True)),
    ("int3-g64 RTN", dict(fmt="int3", group_size=64, rtn=True)),
    (DEFAULT, dict(fmt="w3o6")),
    ("mxfp4", dict(fmt="mxfp4")),
    ("nvfp4", dict(fmt="nvfp4")),
]
GOLDEN = (DEFAULT, "nvfp4")
ALPHABET = (-14, -9, -5, -2, 2, 5, 9, 14)    # a non-uniform symmetric base alphabet (fine steps)
TECHNIQUES = [  # name, QuantConfig keyword arguments, extra technique (None | "awq" | "alphabet")
    ("1% outliers, absmax scales", dict(fmt="w3o6", outlier_frac=0.01, rtn=True), None),
    ("+ clip search", dict(fmt="w3o6", outlier_frac=0.01, gptq=False), None),
    ("+ 3% outliers", dict(fmt="w3o6", outlier_frac=0.03, gptq=False), None),
    ("+ GPTQ, damp 0.01", dict(fmt="w3o6", outlier_frac=0.03, gptq=True, damp=0.01), None),
    ("+ damp 0.1", dict(fmt="w3o6", outlier_frac=0.03, gptq=True, damp=0.1), None),
    ("+ 4.4% outliers = default", dict(fmt="w3o6"), None),
    ("default + AWQ scales", dict(fmt="w3o6"), "awq"),
    ("default at g32, 2% outl.", dict(fmt="w3o6", group_size=32, outlier_frac=0.02), None),
    ("default + NU alphabet", dict(fmt="w3o6"), "alphabet"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="SmolLM2 ONNX export (default: models/smollm2.py --seq-len 128 --mask)")
    ap.add_argument("--techniques", action="store_true", help="also the table of w3o6 techniques")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="tokens per text (default 2048)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = ap.parse_args()

    import smollm2
    from tokenizers import Tokenizer

    from tapeout.compiler.quant import formats, smooth, w3o6  # noqa: F401  (loaded before any long run)

    from tapeout.compiler.evaluate import evaluate, reference_logits
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, seq_len_of, windows

    model = Path(args.model) if args.model else smollm2.export(seq_len=128, mask=True)
    tok = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    calib_ids = np.array(tok.encode((REPO / "compiler/data/calib.txt").read_text()).ids)[: args.calib_tokens]
    texts = {t: np.array(tok.encode((REPO / "benchmarks/data" / t).read_text()).ids)[: args.eval_tokens]
             for t in TEXTS}

    t0 = time.perf_counter()
    graph = frontend(model)
    seq = seq_len_of(graph)
    stats = calibrate(graph, windows(calib_ids, seq), hessian=True)
    refs = {t: reference_logits(graph, windows(ids, seq)) for t, ids in texts.items()}
    print(f"model {model.name}: windows of {seq}; calibration {stats.tokens} tokens (compiler/data/calib.txt); "
          + "; ".join(f"{t}: {len(r) * (seq - 1)} scored positions" for t, r in refs.items())
          + f"; setup {time.perf_counter() - t0:.0f} s", flush=True)

    def quantise(kw: dict, extra: str | None):
        """-> (quantised model, seconds): calibration statistics shared, quantisation timed."""
        t = time.perf_counter()
        if extra == "awq":
            qm = _awq(graph, stats, QuantConfig(**kw))
        elif extra == "alphabet":
            qm = _alphabet(graph, stats, QuantConfig(**kw))
        else:
            qm = quantize_model(graph, QuantConfig(**kw), stats)
        return qm, time.perf_counter() - t

    results = []
    head = (f"{'':26s} {'':6s} {'bits/w':>6s} {'+head':>5s} | {'eval.txt':^22s} | {'eval2.txt':^22s} | {'quant':>5s}\n"
            f"{'format':26s} {'path':6s} {'':6s} {'':5s} | {'KLD':>7s} {'p99':>6s} {'top-1':>6s} "
            f"| {'KLD':>7s} {'p99':>6s} {'top-1':>6s} | {'s':>5s}")

    def row(name: str, qm, path: str, seconds: float) -> dict:
        r = {"name": name, "path": path, "quantise_seconds": seconds}
        for t, ids in texts.items():
            e = evaluate(graph, qm, ids, seq, path=path, refs=refs[t])
            r.update(bits_per_weight=e["bits_per_weight"], bits_per_weight_with_head=e["bits_per_weight_with_head"])
            r[t] = {k: e[k] for k in ("kld_mean", "kld_p99", "top1_agree", "ppl", "ppl_ref", "tokens")}
        results.append(r)
        a, b = r[TEXTS[0]], r[TEXTS[1]]
        print(f"{name:26s} {path:6s} {r['bits_per_weight']:6.3f} {r['bits_per_weight_with_head']:5.2f} | "
              f"{a['kld_mean']:7.4f} {a['kld_p99']:6.3f} {a['top1_agree']:6.3f} | "
              f"{b['kld_mean']:7.4f} {b['kld_p99']:6.3f} {b['top1_agree']:6.3f} | {seconds:5.0f}", flush=True)
        return r

    print("\nformats (float path: dequantised weights in float; golden: the integer model)")
    print(head)
    print("-" * len(head.splitlines()[1]))
    for name, kw in FORMATS:
        qm, dt = quantise(kw, None)
        row(name, qm, "float", dt)
        if name in GOLDEN:
            row(name, qm, "golden", dt)
        del qm
    print(f"{'float reference':26s} {'float':6s} {32.0:6.3f} {'':5s} | "
          f"ppl {results[0][TEXTS[0]]['ppl_ref']:.2f} {'':12s}| ppl {results[0][TEXTS[1]]['ppl_ref']:.2f}")
    print("* SmolLM2's 576-wide inputs are not divisible by 128: those layers use g64 (gcd), the 1536-wide "
          "down_proj g128 (--group-fallback).")

    if args.techniques:
        print("\nw3o6 techniques, one step at a time (float path; 'quant s' is quantisation alone, "
              "calibration excluded)")
        print(head)
        print("-" * len(head.splitlines()[1]))
        for name, kw, extra in TECHNIQUES:
            qm, dt = quantise(kw, extra)
            row(name, qm, "float", dt)
            del qm
        print(f"NU alphabet: base levels {list(ALPHABET)} on the fine step instead of 4 * [-4..3]; "
              "AWQ: rms(x)^alpha input scales folded into the norm gains / up_proj rows, alpha per input "
              "from 0..1 by the weighted error of a w3o6 rounding.")

    def pick(name: str, path: str = "float") -> dict:
        return next(r for r in results if r["name"] == name and r["path"] == path)

    w, nv, mx, int4 = pick(DEFAULT), pick("nvfp4"), pick("mxfp4"), pick("int4-g128 RTN *")
    print("\nclaims:")
    print(f"  default w3o6 {w['bits_per_weight']:.4f} bits/weight (need <= 3.6): "
          f"{'ok' if w['bits_per_weight'] <= 3.6 else 'MISSED'}")
    for t in TEXTS:
        ok_k, ok_t = w[t]["kld_mean"] <= nv[t]["kld_mean"], w[t]["top1_agree"] >= nv[t]["top1_agree"]
        print(f"  {t}: KLD w3o6 {w[t]['kld_mean']:.4f} vs nvfp4 {nv[t]['kld_mean']:.4f} "
              f"({'ok' if ok_k else 'WORSE'}); top-1 {w[t]['top1_agree']:.3f} vs {nv[t]['top1_agree']:.3f} "
              f"({'ok' if ok_t else 'WORSE'}); vs int4-g128 RTN KLD {int4[t]['kld_mean']:.4f}; "
              f"nvfp4 vs mxfp4 {nv[t]['kld_mean']:.4f} vs {mx[t]['kld_mean']:.4f}")
    for name in GOLDEN:
        g, f = pick(name, "golden"), pick(name)
        ratios = [g[t]["kld_mean"] / f[t]["kld_mean"] for t in TEXTS]
        print(f"  golden/float KLD for {name}: " + ", ".join(f"{t} {x:.3f}x" for t, x in zip(TEXTS, ratios))
              + f" (need <= 1.05x: {'ok' if max(ratios) <= 1.05 else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _awq(graph, stats, config):
    """AWQ-style scales (compiler/quant/smooth.py) folded into the graph, then ``config``."""
    from tapeout.compiler.qmodel import linear_roles, quantize_model
    from tapeout.compiler.quant import quantize
    from tapeout.compiler.quant import smooth
    roles = linear_roles(graph)
    body = {n for n, r in roles.items() if r != "lm_head"}

    def quick(w, imp):       # the w3o6 rounding the scale search scores (no GPTQ: fast)
        return quantize(w, "w3o6", act_sq=imp, outlier_frac=config.outlier_frac, rtn=True).dequantize()
    g2, st2, _ = smooth.smooth_model(graph, stats, body, quick)
    return quantize_model(g2, config, st2)


def _alphabet(graph, stats, config):
    """w3o6 with the non-uniform base alphabet ALPHABET (a measurement: the packed format,
    golden's via layers and the fabric take the uniform alphabet only)."""
    from tapeout.compiler.qmodel import quantize_model
    from tapeout.compiler.quant import formats, w3o6
    plain = formats.plan_w3o6
    formats.plan_w3o6 = functools.partial(w3o6.plan_w3o6, levels=ALPHABET)
    try:
        return quantize_model(graph, config, stats)
    finally:
        formats.plan_w3o6 = plain


if __name__ == "__main__":
    main()
