"""SmolLM2-135M-Instruct, fine-tuned: a real (small) full fine-tune of the model, exported to ONNX.

A second, genuinely trained checkpoint of the same architecture for ``tapeout diff`` tests: the
base model (``models/smollm2.py``, de-quantised from the GGUF Q4_1) is fine-tuned on a short
built-in product FAQ of an invented company (``FAQ_TEXT``) with AdamW, then exported exactly like
the base model (same wrapper, dynamo exporter, opset 20, external data). Every tensor moves a
little (Adam-sized steps, relative L2 change around 1e-3..1e-2), so the fine-tuned weights are
*off* the Q4_1 grid the base weights sit on: quantising the two gives different codes almost
everywhere, as a real fine-tune shipped after the base chip would.

Training: all parameters, AdamW (betas 0.9/0.999, no weight decay), constant learning rate,
``steps`` optimiser steps. The FAQ is tokenised (+ EOS) and cut into windows of at most
``TRAIN_WINDOW`` (128) tokens; each optimiser step is one pass over the whole FAQ, one window at
a time (micro-batch 1, gradients accumulated, token-weighted mean cross-entropy), so the loss
printed per step is the loss on the whole text and goes down step by step. Seeded, with
``torch.use_deterministic_algorithms(True)``; no dropout in this model, no shuffling. CPU float
results can still differ across machines / thread counts in the last bits.

Layout under ``<cache>/smollm2-ft/`` (``<cache>`` = ``$TAPEOUT_CACHE`` or ``<repo>/.cache/models``)::

    smollm2-135m-ft.onnx + .onnx.data      prefill, seq 16, dynamo, opset 20 (20 steps, lr 2e-5)
    smollm2-135m-ft-s<N>.onnx               other seq length
    smollm2-135m-ft[-s<N>]-n<K>-lr<X>.onnx  other steps / learning rate (suffix only if not default)
    <name>.train.json                       loss curve, weight-change stats, timings, settings
    tokenizer.json                          copy of the base tokenizer

Python API: ``export(seq_len=16, steps=20, lr=2e-5, force=False) -> Path`` (cached; written
atomically: the ``.onnx`` appears last; verified in onnxruntime after a fresh export).

CLI::

    python models/smollm2_finetune.py [--seq-len 16] [--steps 20] [--lr 2e-5] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np


def _load_smollm2() -> ModuleType:
    key = "tapeout_models_smollm2"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(
        key, Path(__file__).resolve().parent / "smollm2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


smollm2 = _load_smollm2()
tiny = smollm2.tiny

BASE_NAME = "smollm2-135m-ft"
DEFAULT_SEQ_LEN = smollm2.DEFAULT_SEQ_LEN
DEFAULT_STEPS = 20
DEFAULT_LR = 2e-5
TRAIN_WINDOW = 128
SEED = 0

# Original text written for this project (an invented company); the training data.
FAQ_TEXT = """\
Brackenfold Lanterns - Frequently Asked Questions

What is a Brackenfold lantern? A Brackenfold lantern is a rechargeable camping light made in \
Tarrow Bay from recycled aluminium and frosted glass. The Ridge model gives up to 400 lumens, \
the smaller Wren gives 180 lumens, and both have a warm amber mode that does not attract moths. \
How long does the battery last? On the lowest setting the Ridge runs for about 60 hours and the \
Wren for about 35 hours. A full charge over USB-C takes three hours. The battery can be swapped \
with a coin and no other tools, and spare cells are sold for twelve euros.

Is the lantern waterproof? Every lantern is rated IPX6: it survives heavy rain and splashing, \
but it should not be dropped into a lake. What does the warranty cover? We repair or replace \
any lantern that fails within five years, including the switch and the charging port. The \
battery is covered for two years. To start a claim, write to help@brackenfold.example with your \
order number and a photo of the lantern; we reply within two working days. Can I return a \
lantern I do not like? Yes. Send it back within 45 days, used or not, and we refund the full \
price, shipping included.
"""


def log(msg: str) -> None:
    print(f"[smollm2-ft] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``<cache>/smollm2-ft``."""
    return tiny.cache_root() / "smollm2-ft"


def model_name(seq_len: int = DEFAULT_SEQ_LEN, steps: int = DEFAULT_STEPS,
               lr: float = DEFAULT_LR) -> str:
    name = BASE_NAME
    if seq_len != DEFAULT_SEQ_LEN:
        name += f"-s{seq_len}"
    if steps != DEFAULT_STEPS or lr != DEFAULT_LR:
        name += f"-n{steps}-lr{lr:g}"
    return name + ".onnx"


def onnx_path(seq_len: int = DEFAULT_SEQ_LEN, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
              out_dir: Path | None = None) -> Path:
    """Where ``export`` with these arguments puts (or has put) the ``.onnx`` file."""
    d = Path(out_dir) if out_dir is not None else cache_dir()
    return d / model_name(seq_len, steps, lr)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- training


def _setup_determinism(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as e:  # pragma: no cover - depends on the torch build
        log(f"warning: torch.use_deterministic_algorithms(True) failed: {e}")


def training_windows(tokenizer, window: int = TRAIN_WINDOW) -> list[list[int]]:
    """``FAQ_TEXT`` (+ EOS) tokenised and cut into consecutive windows of at most ``window``."""
    ids = list(tokenizer(FAQ_TEXT)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    if len(windows) > 1 and len(windows[-1]) < 16:  # fold a tiny tail into the previous window
        tail = windows.pop()
        windows[-1] = windows[-1][len(tail):] + tail
    return windows


def text_loss(model, windows: list[list[int]], *, backward: bool = False) -> float:
    """Token-weighted mean next-token cross-entropy over all windows (accumulates grads if asked)."""
    import torch
    import torch.nn.functional as F

    total = sum(len(w) - 1 for w in windows)
    loss_sum = 0.0
    for w in windows:
        ids = torch.tensor([w])
        with torch.set_grad_enabled(backward):
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            if backward:
                (loss / total).backward()
        loss_sum += float(loss.detach())
    return loss_sum / total


def finetune(model, tokenizer, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
             seed: int = SEED) -> dict:
    """Fine-tune ``model`` in place (all parameters, AdamW); leave it in eval mode; return stats."""
    import torch

    _setup_determinism(seed)
    windows = training_windows(tokenizer)
    n_tokens = sum(len(w) for w in windows)
    log(f"training text: {n_tokens} tokens in {len(windows)} window(s) of <= {TRAIN_WINDOW}; "
        f"{steps} AdamW steps, lr {lr:g}, micro-batch 1, seed {seed}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = text_loss(model, windows, backward=True)
        if not math.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: loss is {loss}")
        opt.step()
        losses.append(loss)
        log(f"  step {step + 1:3d}/{steps}: loss {loss:.4f}  ({time.perf_counter() - t0:.1f}s)")
    opt.zero_grad(set_to_none=True)
    del opt  # free the Adam moments before exporting
    model.eval()
    final = text_loss(model, windows)
    log(f"loss {losses[0]:.4f} (before) -> {final:.4f} (after {steps} steps); "
        f"train {time.perf_counter() - t0:.1f}s, peak RSS {_peak_rss_mib():.0f} MiB")
    if not final < losses[0]:
        raise RuntimeError(f"fine-tuning did not lower the loss: {losses[0]:.4f} -> {final:.4f}")
    return {"loss_per_step": losses, "loss_after": final, "tokens": n_tokens,
            "windows": len(windows), "train_s": time.perf_counter() - t0}


def weight_change(model, original: dict) -> dict:
    """Per-tensor relative L2 change ``||W - W0|| / ||W0||`` (tied tensors counted once)."""
    import torch

    rel: dict[str, float] = {}
    unchanged = []
    with torch.no_grad():
        for name, p in model.named_parameters():  # named_parameters() de-duplicates tied weights
            w0 = original[name]
            diff = float(torch.linalg.vector_norm(p.detach() - w0))
            norm = float(torch.linalg.vector_norm(w0))
            rel[name] = diff / norm if norm > 0 else float("inf") if diff > 0 else 0.0
            if diff == 0.0:
                unchanged.append(name)
    values = np.array(list(rel.values()))
    imax = int(values.argmax())
    imin = int(values.argmin())
    return {
        "tensors": len(rel),
        "unchanged": unchanged,
        "rel_l2_median": float(np.median(values)),
        "rel_l2_max": float(values[imax]),
        "rel_l2_max_tensor": list(rel)[imax],
        "rel_l2_min": float(values[imin]),
        "rel_l2_min_tensor": list(rel)[imin],
        "rel_l2": rel,
    }


# --------------------------------------------------------------------------- export


def export(seq_len: int = DEFAULT_SEQ_LEN, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
           force: bool = False, *, out_dir: Path | None = None, verify: bool = True) -> Path:
    """Fine-tune SmolLM2-135M-Instruct and export it to ``<out_dir>/<name>.onnx`` (+ ``.data``).

    Cached: returns at once if the ``.onnx`` is present (unless ``force``). After a fresh export,
    ``verify`` runs it in onnxruntime against the fine-tuned torch model (raises if the greedy
    next token differs).
    """
    import torch

    if steps < 1:
        raise ValueError("steps must be >= 1")
    path = onnx_path(seq_len, steps, lr, out_dir)
    d = path.parent
    if path.exists() and (d / "tokenizer.json").exists() and not force:
        return path

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    gguf = smollm2.fetch()
    t0 = time.perf_counter()
    log("load tokenizer + base model (de-quantise GGUF Q4_1 to float32) ...")
    tokenizer = smollm2.load_tokenizer(gguf)
    model = smollm2.load_model(gguf)
    timings["load_s"] = time.perf_counter() - t0
    log(f"loaded in {timings['load_s']:.1f}s: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    train = finetune(model, tokenizer, steps=steps, lr=lr)
    timings["train_s"] = train.pop("train_s")
    # The base weights are re-loaded (not kept as a copy during training): lower peak memory.
    t0 = time.perf_counter()
    base = smollm2.load_model(gguf)
    change = weight_change(model, dict(base.named_parameters()))
    del base
    timings["compare_s"] = time.perf_counter() - t0
    log(f"weight change (relative L2 per tensor, {change['tensors']} tensors): "
        f"median {change['rel_l2_median']:.3e}, max {change['rel_l2_max']:.3e} "
        f"({change['rel_l2_max_tensor']}), min {change['rel_l2_min']:.3e} "
        f"({change['rel_l2_min_tensor']}); unchanged tensors: {len(change['unchanged'])}")

    log(f"export {path.name} (dynamo, opset {tiny.DEFAULT_OPSET['dynamo']}, prefill, "
        f"seq {seq_len}) ...")
    t0 = time.perf_counter()
    report = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised) + full fine-tune",
        "seq_len": seq_len, "steps": steps, "lr": lr, "seed": SEED, "optimizer": "AdamW",
        "weight_decay": 0.0, "train_window": TRAIN_WINDOW, "torch": torch.__version__,
        **train, "weight_change": change,
    }

    def write(tmp: Path) -> None:
        smollm2.write_onnx(model, tmp, "prefill", seq_len, exporter="dynamo")
        smollm2.save_tokenizer(tokenizer, tmp.parent)  # moved in by atomic_export, before .onnx
        for extra in tmp.parent.iterdir():  # keep only tokenizer.json of what save_pretrained wrote
            if extra.name not in (tmp.name, tmp.name + ".data", "tokenizer.json"):
                extra.unlink()
        (tmp.parent / (path.stem + ".train.json")).write_text(json.dumps(report, indent=1) + "\n")

    tiny.atomic_export(path, write)
    timings["export_s"] = time.perf_counter() - t0
    data = path.with_name(path.name + ".data")
    log(f"exported in {timings['export_s']:.1f}s: {path.name} {smollm2._mib(path)}, "
        f"{data.name} {smollm2._mib(data)}")

    if verify:
        t0 = time.perf_counter()
        smollm2.check(path, "prefill", model=model, tokenizer=tokenizer)
        _compare_with_base(path, model, tokenizer, seq_len)
        timings["verify_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f"; peak RSS {_peak_rss_mib():.0f} MiB")
    return path


def _compare_with_base(path: Path, model, tokenizer, seq_len: int) -> None:
    """onnxruntime: loss on the first ``seq_len`` FAQ tokens, fine-tuned vs base export (if the
    base export of that length is cached), and whether the two graphs differ only in weights."""
    import onnx
    import onnxruntime as ort
    import torch

    ids = training_windows(tokenizer)[0][:seq_len]
    if len(ids) < seq_len:
        return
    feed = {"input_ids": np.array([ids], dtype=np.int64)}

    def ce(logits: np.ndarray) -> float:
        x = logits[0, :-1].astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        return float(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(
        ["logits"], feed)[0]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits.numpy()
    log(f"  FAQ prefix ({seq_len} tokens): ORT fine-tuned loss {ce(got):.4f}, "
        f"max |ORT - torch| {float(np.abs(got - want).max()):.2e}")
    base = smollm2.onnx_path("prefill", seq_len)
    if not base.exists():
        log(f"  (base export {base.name} not cached: no comparison with the base model)")
        return
    got_base = ort.InferenceSession(str(base), opts, providers=["CPUExecutionProvider"]).run(
        ["logits"], feed)[0]
    log(f"  FAQ prefix: ORT base loss {ce(got_base):.4f}; "
        f"max |logits ft - base| {float(np.abs(got - got_base).max()):.3f}")
    a = onnx.load(str(path), load_external_data=False).graph
    b = onnx.load(str(base), load_external_data=False).graph
    same_nodes = [(n.op_type, list(n.input), list(n.output)) for n in a.node] == \
                 [(n.op_type, list(n.input), list(n.output)) for n in b.node]
    same_inits = sorted((t.name, tuple(t.dims), t.data_type) for t in a.initializer) == \
                 sorted((t.name, tuple(t.dims), t.data_type) for t in b.initializer)
    log(f"  graph vs base: nodes {'identical' if same_nodes else 'DIFFER'}, initializer names/"
        f"shapes {'identical' if same_inits else 'DIFFER'} ({len(a.initializer)} initializers)")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="re-train and re-export even if cached")
    ap.add_argument("--no-verify", action="store_true", help="skip verification after export")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = export(a.seq_len, a.steps, a.lr, a.force, out_dir=a.out_dir, verify=not a.no_verify)
    log(f"total {time.perf_counter() - t0:.1f}s")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
