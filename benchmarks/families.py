"""The family matrix: every tiny family x exporter x variant, exported with its attention mask,
through inspect, the float interpreter, golden and all three targets.

    python benchmarks/families.py [--only llama gpt2] [--formats nvfp4 w3o6] [--rtl] [--json OUT]

Variants: ``prefill`` (no mask input), ``prefill+mask`` and ``decode+mask`` (``attention_mask``
a graph input). Per row: the mask kind ``tapeout inspect`` reports; max |float interpreter -
onnxruntime| on a left-padded mask (rows holding a real token); golden's KLD to the float model on random tokens
(all-ones mask; decode: a random KV cache) per format; and per target and format whether
``tapeout simulate`` on the compiled folder reports 0 mismatches, with the values it checked
(maskrom: the compile's fabric-vs-golden check on the whole model, plus with ``--rtl`` the
Amaranth RTL of layer 0's linears). The mask-ROM target compiles prefill exports only; a
decode export's cell says "prefill only". Prints one table; takes about a minute per row on 2 cores.
"""
from __future__ import annotations

import argparse
import re
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _support import load_models_module  # noqa: E402

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3", "neox", "gpt2", "bert"]


def cli(*argv) -> tuple[int, str, str]:
    from tapeout.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:                       # noqa: PERF203
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsm(p_logits.astype(np.float64)), logsm(q_logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def float_vs_ort(path: Path, g) -> float:
    import onnxruntime as ort
    from tapeout.compiler.interp import run
    from tapeout.compiler.program import padded_mask
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "attention_mask":
            feeds[i.name] = padded_mask(tuple(i.shape), np.int64)
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = rng.standard_normal(i.shape).astype(np.float32)
        else:
            feeds[i.name] = rng.integers(0, 256, i.shape).astype(np.int64)
    want = sess.run(["logits"], feeds)[0]
    got = run(g, feeds)["logits"]
    causal = any(op.attr("causal", False) for op in g.ops if op.kind == "attention") or "past_key_values.0.key" in feeds
    live = feeds["attention_mask"][:, -got.shape[1]:].astype(bool) if causal and "attention_mask" in feeds \
        else np.ones(got.shape[:2], bool)
    return float(np.max(np.abs(got[live] - want[live])))


def golden_kld(g, fmt: str, calib: np.ndarray) -> float:
    from tapeout.compiler.golden import fixed as fx
    from tapeout.compiler.interp import run
    from tapeout.compiler.program import Interface
    from tapeout.compiler.qmodel import QuantConfig, calibrate, calibrate_decode, quantize_model, windows
    cfg = QuantConfig(fmt, quantize_head=False)
    stats = None
    if cfg.needs_calibration:
        itf = Interface.of(g)
        if itf.kv_inputs:
            stats = calibrate_decode(g, calib, hessian=cfg.gptq)
        else:
            stats = calibrate(g, windows(calib, g.tensors[itf.tokens].shape[-1]), hessian=cfg.gptq)
    qm = quantize_model(g, cfg, stats)
    gm = qm.golden()
    rng = np.random.default_rng(2)
    fl, gf = {}, {}
    for name in g.inputs:
        info = g.tensors[name]
        if name == "attention_mask":
            fl[name] = gf[name] = np.ones(info.shape, np.int64)
        elif np.dtype(info.dtype).kind == "f":
            fl[name] = rng.standard_normal(info.shape).astype(np.float32)
            gf[name] = fx.to_fixed(fl[name])
        else:
            fl[name] = gf[name] = rng.integers(0, 256, info.shape).astype(np.int64)
    ref = run(g, {k: (fx.to_fixed(v) / 2 ** 16).astype(np.float32) if v.dtype.kind == "f" else v
                  for k, v in fl.items()})["logits"]
    got = gm.run(gf)["logits"] / 2 ** 16
    return kld(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]))


def target_cell(path: Path, target: str, fmt: str, calib_file: Path, tmp: Path, rtl: bool) -> str:
    out = tmp / f"{target}-{fmt}"
    extra = ["--calib-tokens", calib_file] if fmt == "w3o6" else []
    code, o, e = cli("compile", path, "--target", target, "--format", fmt, "-o", out, *extra)
    if code:
        line = (e.strip().splitlines() or ["?"])[-1]
        return "prefill only" if "needs a prefill export" in line else f"ERROR {line[-60:]}"
    if target == "maskrom":
        hit = re.search(r"fabric == golden \([a-z]+\) on (\d+)", o)   # the whole-model check's count
        ok, n = hit is not None, hit.group(1) if hit else "?"
        cell = f"eq {n}" if ok else "FAIL"
        if rtl:
            code, so, se = cli("simulate", out, "--layer", "layers.0", "--json")
            r = json.loads(so) if so.strip() else {}
            cell += f", rtl {r.get('checked')} {'eq' if code == 0 and r.get('mismatches') == 0 else 'FAIL'}"
        return cell
    code, so, se = cli("simulate", out, "--json")
    r = json.loads(so) if so.strip() else {}
    ok = code == 0 and r.get("mismatches") == 0 and r.get("checked", 0) > 0
    return f"{'eq' if ok else 'FAIL'} {r.get('checked')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="families")
    ap.add_argument("--exporters", nargs="*", default=["dynamo", "legacy"])
    ap.add_argument("--variants", nargs="*", default=["prefill", "prefill+mask", "decode+mask"],
                    help="prefill (no mask input), prefill+mask, decode+mask, decode")
    ap.add_argument("--formats", nargs="*", default=["nvfp4", "w3o6"])
    ap.add_argument("--rtl", action="store_true", help="also simulate layer 0's maskrom RTL (Amaranth)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.structure import mask_kind
    tiny = load_models_module("tiny")
    calib = (np.arange(256, dtype=np.int64) * 37 + 11) % 256
    tmp = Path(tempfile.mkdtemp(prefix="tapeout-families-"))
    calib_file = tmp / "calib.npy"
    np.save(calib_file, calib)
    rows = []
    fmts = args.formats
    head = (f"{'family':8s} {'exporter':8s} {'variant':12s} {'mask':15s} {'float-ORT':>9s} "
            + " ".join(f"{'KLD ' + f:>11s}" for f in fmts) + "  "
            + "  ".join(f"{t + ' ' + f:<22s}" for t in ("maskrom", "systolic", "dataflow") for f in fmts))
    print(head, flush=True)
    try:
        for fam in args.only or FAMILIES:
            for exp in args.exporters:
                for variant in args.variants:
                    var, mask = variant.split("+")[0], variant.endswith("+mask")
                    if var == "decode" and fam == "bert":
                        continue
                    t0 = time.perf_counter()
                    try:
                        path = tiny.export(fam, exp, None, var, mask=mask)
                    except Exception as e:          # an exporter that cannot handle the family
                        print(f"{fam:8s} {exp:8s} {variant:12s} export failed: {type(e).__name__}: {str(e)[:80]}")
                        rows.append({"family": fam, "exporter": exp, "variant": variant, "export": str(e)[:200]})
                        continue
                    g = frontend(path)
                    mk = sorted({mask_kind(op) for op in g.ops if op.kind == "attention"})
                    row = {"family": fam, "exporter": exp, "variant": variant, "mask": "/".join(mk),
                           "float_ort": float_vs_ort(path, g),
                           "kld": {f: golden_kld(g, f, calib) for f in fmts}, "targets": {}}
                    for t in ("maskrom", "systolic", "dataflow"):
                        for f in fmts:
                            d = tmp / f"{fam}-{exp}-{var}"
                            row["targets"][f"{t} {f}"] = target_cell(path, t, f, calib_file, d, args.rtl)
                            shutil.rmtree(d, ignore_errors=True)
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    print(f"{fam:8s} {exp:8s} {variant:12s} {row['mask']:15s} {row['float_ort']:9.1e} "
                          + " ".join(f"{row['kld'][f]:11.5f}" for f in fmts) + "  "
                          + "  ".join(f"{row['targets'][f'{t} {f}']:<22s}" for t in ("maskrom", "systolic", "dataflow")
                                      for f in fmts), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
