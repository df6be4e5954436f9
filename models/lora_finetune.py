"""LoRA fine-tunes made with ``peft``: the adapter folder (as ``save_pretrained`` writes it) and the
merged model exported to ONNX, for ``tapeout adapt`` tests and benchmarks.

- ``tiny(family="llama", rank=4)``: the tiny model of ``models/tiny.py`` with LoRA on its
  attention projections, trained ``steps`` AdamW steps on a fixed seeded token sequence;
- ``smollm2(rank=8)``: SmolLM2-135M-Instruct (``models/smollm2.py``) with rank-8 LoRA on
  q/k/v/o_proj, trained on the product FAQ of ``models/smollm2_finetune.py``.

Each writes, under ``<cache>/lora/<name>/``: ``adapter/`` (adapter_config.json +
adapter_model.safetensors), ``merged.onnx`` (+ ``.data`` for SmolLM2: the float fine-tune with
``B A * alpha / r`` merged into the weights, exported like the base model) and ``train.json``
(loss per step). Cached; ``force`` retrains. Seeded and deterministic on one machine.

CLI::

    python models/lora_finetune.py tiny [--family llama] [--rank 4]
    python models/lora_finetune.py smollm2 [--rank 8] [--steps 30] [--lr 1e-3] [--seq-len 16]
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _module(name: str):
    key = f"tapeout_models_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def log(msg: str) -> None:
    print(f"[lora] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return _module("tiny").cache_root() / "lora"


def _cached(folder: Path, force: bool, make) -> Path:
    """``folder`` if it holds a finished fine-tune, else ``make()`` under a file lock: one process
    at a time makes it (pytest-xdist workers ask for the same fine-tune)."""
    if (folder / "merged.onnx").exists() and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if (folder / "merged.onnx").exists() and not force:
                return folder
            return make()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train(model, windows: list[list[int]], *, rank: int, alpha: float, targets=ATTENTION, steps: int,
          lr: float, seed: int = 0):
    """``model`` wrapped with LoRA (peft) and trained: returns (peft model, losses per step)."""
    import peft
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    total = sum(len(w) - 1 for w in windows)
    losses = []
    pm.train()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for w in windows:
            ids = torch.tensor([w])
            logits = pm(input_ids=ids, use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            (loss / total).backward()
            loss_sum += float(loss.detach())
        opt.step()
        losses.append(loss_sum / total)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"step {step + 1}: loss {losses[-1]}")
        log(f"  step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    pm.eval()
    return pm, losses


def _save(pm, folder: Path, export_merged, report: dict) -> Path:
    tiny = _module("tiny")
    final = folder / "merged.onnx"

    def write(tmp: Path) -> None:
        pm.save_pretrained(str(tmp.parent / "adapter"))
        for extra in (tmp.parent / "adapter").iterdir():          # keep the two files peft defines
            if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
                extra.unlink() if extra.is_file() else shutil.rmtree(extra)
        merged = pm.merge_and_unload()
        export_merged(merged, tmp)
        (tmp.parent / "train.json").write_text(json.dumps(report, indent=1) + "\n")

    if (folder / "adapter").exists():
        shutil.rmtree(folder / "adapter")
    return tiny.atomic_export(final, write)


def tiny(family: str = "llama", rank: int = 4, steps: int = 8, lr: float = 1e-2, force: bool = False,
         seq_len: int | None = None) -> Path:
    """A LoRA fine-tune of a tiny model; returns its folder (adapter/, merged.onnx)."""
    t = _module("tiny")
    seq_len = seq_len or t.DEFAULT_SEQ_LEN
    folder = cache_dir() / f"tiny-{family}-r{rank}-n{steps}-s{seq_len}"
    return _cached(folder, force, lambda: _tiny(folder, t, family, rank, steps, lr, seq_len))


def _tiny(folder: Path, t, family: str, rank: int, steps: int, lr: float, seq_len: int) -> Path:
    import numpy as np
    with t.quiet():
        model = t.build_model(family)
        rng = np.random.default_rng(0)
        windows = [[int(v) for v in rng.integers(0, t.VOCAB, 32)] for _ in range(2)]
        targets = [m for m in ATTENTION if any(n.endswith(m) for n, _ in model.named_modules())] or ["qkv_proj"]
        pm, losses = train(model, windows, rank=rank, alpha=2 * rank, targets=targets, steps=steps, lr=lr)

    def export_merged(merged, tmp: Path) -> None:
        with t.quiet():
            wrapper = t.make_wrapper(merged, "prefill", False, False).eval()
            args, ins, outs = t.example_args(merged, "prefill", seq_len, t.DEFAULT_PAST_LEN, False)
            t.torch_export(wrapper, args, tmp, exporter="dynamo", opset=t.DEFAULT_OPSET["dynamo"], input_names=ins,
                           output_names=outs, external_data=False)
    return _save(pm, folder, export_merged, {"family": family, "rank": rank, "steps": steps, "lr": lr,
                                              "targets": targets, "loss_per_step": losses}).parent


def smollm2(rank: int = 8, steps: int = 30, lr: float = 1e-3, seq_len: int = 16, force: bool = False) -> Path:
    """A rank-``rank`` LoRA fine-tune of SmolLM2-135M on the FAQ text; returns its folder."""
    ft = _module("smollm2_finetune")
    sm = ft.smollm2
    folder = cache_dir() / f"smollm2-r{rank}-n{steps}-lr{lr:g}-s{seq_len}"
    return _cached(folder, force, lambda: _smollm2(folder, ft, sm, rank, steps, lr, seq_len))


def _smollm2(folder: Path, ft, sm, rank: int, steps: int, lr: float, seq_len: int) -> Path:
    t0 = time.perf_counter()
    gguf = sm.fetch()
    tokenizer = sm.load_tokenizer(gguf)
    model = sm.load_model(gguf)
    windows = ft.training_windows(tokenizer)
    before = ft.text_loss(model, windows)
    pm, losses = train(model, windows, rank=rank, alpha=2 * rank, steps=steps, lr=lr)
    after = ft.text_loss(pm, windows)
    log(f"FAQ loss {before:.4f} -> {after:.4f} after {steps} steps ({time.perf_counter() - t0:.0f} s)")

    def export_merged(merged, tmp: Path) -> None:
        sm.write_onnx(merged, tmp, "prefill", seq_len, exporter="dynamo")
        sm.save_tokenizer(tokenizer, tmp.parent)
        for extra in tmp.parent.iterdir():
            if extra.is_file() and extra.name not in (tmp.name, tmp.name + ".data", "tokenizer.json"):
                extra.unlink()
    return _save(pm, folder, export_merged, {"model": "SmolLM2-135M-Instruct", "rank": rank, "alpha": 2 * rank,
                                              "targets": list(ATTENTION), "steps": steps, "lr": lr,
                                              "loss_before": before, "loss_after": after,
                                              "loss_per_step": losses}).parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("tiny", "smollm2"))
    ap.add_argument("--family", default="llama")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    kw = {k: v for k, v in (("rank", a.rank), ("steps", a.steps), ("lr", a.lr), ("seq_len", a.seq_len)) if v}
    print(tiny(a.family, force=a.force, **kw) if a.which == "tiny" else smollm2(force=a.force, **kw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
