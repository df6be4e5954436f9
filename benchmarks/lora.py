"""LoRA in SRAM on SmolLM2-135M: how much of a fine-tune an adapter recovers without new metal,
and how much of the ROM's own quantisation error a rank-R SRAM correction removes.

    python benchmarks/lora.py [--format w3o6] [--seq-len 16] [--eval-tokens 512] [--work DIR]

Models (all made by scripts in models/, cached):
- the base chip: SmolLM2-135M (models/smollm2.py, prefill, seq 16) compiled to maskrom;
- a peft LoRA fine-tune, rank 8 on q/k/v/o_proj, trained on the FAQ text of
  models/smollm2_finetune.py (models/lora_finetune.py smollm2): its adapter folder goes into the
  chip's SRAM (`tapeout adapt --adapter`); its merged float model is the reference;
- the LoRA fine-tune's merged model again, as `tapeout adapt --finetuned --rank 16` (the SVD of its
  weights minus the ROM's: the adapter and part of the ROM's error in one);
- the full fine-tune of models/smollm2_finetune.py: `tapeout adapt --finetuned --rank R`, with the
  plain SVD and with the default output-weighted one;
- the base model's own float weights: `tapeout adapt --finetuned BASE --rank R` for R = 4..32,
  plain and weighted.

Each chip is scored with golden (integer, the adapter in its SRAM) against the float model it
should match, on the first ``--eval-tokens`` tokens of benchmarks/data/eval.txt and (fine-tune
rows) on the FAQ text the fine-tunes learnt, in windows of the export's length: KLD as llama.cpp defines it, and top-1 agreement. "recovered" is
(KLD un-adapted - KLD adapted) / (KLD un-adapted - KLD of the fine-tune compiled from scratch).
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
sys.path.insert(0, str(REPO / "tests"))


def _cli(*argv) -> None:
    from tapeout.cli import main
    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"tapeout {' '.join(map(str, argv))}: exit {code}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="w3o6")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--full-rank", type=int, default=32, help="rank of the --finetuned adapter of the full fine-tune")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench-lora"))
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    from _support import load_models_module
    from tokenizers import Tokenizer

    from tapeout.backends.maskrom import adapter as A
    from tapeout.compiler.evaluate import reference_logits
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.qmodel import windows
    from tapeout.driver import load_program, open_folder

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sm, ftm, lf = (load_models_module(n) for n in ("smollm2", "smollm2_finetune", "lora_finetune"))
    t0 = time.perf_counter()
    base = sm.export("prefill", seq_len=a.seq_len)
    full = ftm.export(seq_len=a.seq_len)
    peft_dir = lf.smollm2(rank=8, seq_len=a.seq_len)
    print(f"[lora] models ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def chip(name: str, model: Path) -> Path:
        out = work / f"{name}-{a.format}-s{a.seq_len}"
        if not (out / "manifest.json").is_file():
            t = time.perf_counter()
            _cli("compile", model, "--target", "maskrom", "--format", a.format, "--verify", "linears", "-o", out)
            print(f"[lora] compiled {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return out

    base_chip = chip("base", base)
    scratch = {"lora": chip("lora-merged", peft_dir / "merged.onnx"), "full": chip("full-ft", full)}
    tok = Tokenizer.from_file(str(base_chip / "tokenizer.json"))
    ids = np.array(tok.encode((REPO / "benchmarks" / "data" / "eval.txt").read_text()).ids[:a.eval_tokens], np.int64)
    prog, man = load_program(base_chip), open_folder(base_chip)[0]

    def adapt(name: str, *args) -> tuple[dict, dict]:
        out = work / f"adapter-{name}"
        if not (out / "manifest.json").is_file():
            t = time.perf_counter()
            _cli("adapt", base_chip, *args, "-o", out)
            print(f"[lora] adapter {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return A.load(out, man, prog), json.loads((out / "report.json").read_text())

    faq = work / "faq.txt"
    faq.write_text(ftm.FAQ_TEXT)
    texts = {"eval.txt": ids, "FAQ": np.array(tok.encode(ftm.FAQ_TEXT).ids, np.int64)}
    r_ft = a.full_rank
    specs = [  # label, reference float model, adapt arguments, adapter name, scratch compile
        ("peft LoRA r8 (--adapter)", peft_dir / "merged.onnx", ("--adapter", peft_dir / "adapter"), "lora", "lora"),
        ("LoRA merged, --finetuned r16", peft_dir / "merged.onnx", ("--finetuned", peft_dir / "merged.onnx", "--rank", 16),
         "lora-w-r16", "lora"),
        (f"full FT, --finetuned r{r_ft} plain", full, ("--finetuned", full, "--rank", r_ft, "--plain-svd"), "full", "full"),
        (f"full FT, --finetuned r{r_ft}", full, ("--finetuned", full, "--rank", r_ft), f"full-w-r{r_ft}", "full"),
    ]
    rows, own = [], []
    refs_of: dict = {}
    base_kld: dict = {}
    for label, ref_model, args, key, sk in specs:
        ad, rep = adapt(key, *args)
        for tname, tids in texts.items():
            ck = (str(ref_model), tname)
            if ck not in refs_of:
                ref = frontend(ref_model)
                refs_of[ck] = (ref, reference_logits(ref, windows(tids, a.seq_len)))
            ref, refs = refs_of[ck]
            if ck not in base_kld:
                base_kld[ck] = (A.kld(prog, ref, tids, refs=refs), A.kld(load_program(scratch[sk]), ref, tids, refs=refs))
            un, fresh = base_kld[ck]
            ok = A.kld(prog, ref, tids, ad, refs=refs)
            gap = un["kld_mean"] - fresh["kld_mean"]
            rows.append({"fine_tune": label, "text": tname, "sram_bytes": rep["sram_bytes"], "linears": rep["linears"],
                         "kld_unadapted": un["kld_mean"], "kld_adapted": ok["kld_mean"], "kld_scratch": fresh["kld_mean"],
                         "top1_unadapted": un["top1_agree"], "top1_adapted": ok["top1_agree"],
                         "top1_scratch": fresh["top1_agree"],
                         "recovered": (un["kld_mean"] - ok["kld_mean"]) / gap if gap > 0 else None})
            print(f"[lora] {label} on {tname}: {rows[-1]['kld_adapted']:.4f}", file=sys.stderr)
    refs_of.clear()
    ref = frontend(base)
    refs = reference_logits(ref, windows(ids, a.seq_len))
    plain = A.kld(prog, ref, ids, refs=refs)
    for r in a.ranks:
        for kind, extra in (("plain", ("--plain-svd",)), ("weighted", ())):
            ad, rep = adapt(f"own-{kind}-r{r}", "--finetuned", base, "--rank", r, *extra)
            k = A.kld(prog, ref, ids, ad, refs=refs)
            own.append({"rank": r, "svd": kind, "sram_bytes": rep["sram_bytes"], "sram_mib": rep["sram_mib"],
                        "kld": k["kld_mean"], "top1": k["top1_agree"], "kld_removed": 1 - k["kld_mean"] / plain["kld_mean"]})

    n = len(windows(ids, a.seq_len))
    print(f"SmolLM2-135M, {a.format} chip, prefill seq {a.seq_len}; KLD and top-1 against each row's float fine-tune, "
          f"on eval.txt ({n} windows) and the FAQ text the fine-tunes learnt ({len(windows(texts['FAQ'], a.seq_len))} windows)")
    print(f"{'fine-tune':32s} {'text':9s} {'SRAM MiB':>9s} {'un-adapted':>11s} {'adapted':>9s} {'scratch':>9s} "
          f"{'recovered':>10s}   top-1 un/ad/scratch")
    for r in rows:
        rec = "n/a" if r["recovered"] is None else f"{100 * r['recovered']:.0f} %"
        print(f"{r['fine_tune']:32s} {r['text']:9s} {r['sram_bytes'] / 2**20:9.2f} {r['kld_unadapted']:11.4f} "
              f"{r['kld_adapted']:9.4f} {r['kld_scratch']:9.4f} {rec:>10s}   {r['top1_unadapted']:.3f}/"
              f"{r['top1_adapted']:.3f}/{r['top1_scratch']:.3f}")
    print()
    print(f"the base chip corrected toward its own float weights (--finetuned BASE), eval.txt: {a.format} alone "
          f"KLD {plain['kld_mean']:.4f}, top-1 {plain['top1_agree']:.3f}")
    print(f"{'rank':>5s} {'SVD':>9s} {'SRAM MiB':>9s} {'KLD':>8s} {'removed':>8s} {'top-1':>6s}")
    for r in own:
        print(f"{r['rank']:5d} {r['svd']:>9s} {r['sram_mib']:9.2f} {r['kld']:8.4f} {100 * r['kld_removed']:7.1f}% "
              f"{r['top1']:6.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"finetunes": rows, "own": own, "plain": plain}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
