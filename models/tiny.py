"""Tiny random-initialised Transformers exported to ONNX, for tests.

Families (built from `transformers` configs, seeded, deterministic):

    llama    LlamaForCausalLM    hidden 64, 2 layers, 4 heads, 2 KV heads (GQA), MLP 128, vocab 256, untied head
    gpt2     GPT2LMHeadModel     n_embd 64, 2 layers, 4 heads, vocab 256 (tied head)
    bert     BertForMaskedLM     hidden 64, 2 layers, 4 heads, MLP 128, vocab 256 (token types, erf GELU)
    qwen2    Qwen2ForCausalLM    as llama, with biased q/k/v projections
    mistral  MistralForCausalLM  as llama (sliding window longer than every tiny sequence)
    neox     GPTNeoXForCausalLM  hidden 64, 2 layers, 4 heads, parallel residual, rotary on 1/4 of
                                 each head, LayerNorm, GELU MLP 128 (Pythia's architecture)
    phi3     Phi3ForCausalLM     hidden 64, 2 layers, 4 heads, 2 KV heads, fused qkv_proj and gate_up_proj
    gemma    GemmaForCausalLM    hidden 64, 2 layers, 4 heads, 1 KV head, GeGLU (tanh GELU), embedding
                                 scaled by sqrt(hidden), RMSNorm with gain offset (1 + w), tied head

Exporters: ``dynamo`` (``torch.onnx.export(..., dynamo=True)``, default opset 20; 23 also works)
and ``legacy`` (TorchScript exporter, ``dynamo=False``, default opset 17).

Variants (all shapes static; batch 1 unless ``batch``, then a ``-b<batch>`` name suffix):

    prefill  input_ids[1, seq_len] (+ attention_mask[1, seq_len] with mask=True) -> logits[1, seq_len, vocab]
    decode   (causal families only) input_ids[1, 1] (+ attention_mask[1, past_len + 1] with mask=True),
             past_key_values.{i}.key / .value [1, kv_heads, past_len, head_dim]
             -> logits[1, 1, vocab], present.{i}.key / .value [1, kv_heads, past_len + 1, head_dim]

Without ``mask`` the graph has no mask input: the causal mask is fixed by the architecture, which is
what a chip implements. The legacy exporter needs an explicit all-ones mask for Llama and GPT-2 in
transformers 5; without a mask input it is built inside the wrapper (``torch.ones_like``).

Python API::

    path = export("llama", "dynamo", 20, "prefill", seq_len=16)
    feeds = sample_inputs(path)            # dict name -> np.ndarray, deterministic

CLI::

    python models/tiny.py --family llama --exporter dynamo --opset 23 --variant decode

Files land in ``<cache>/tiny/<family>-<exporter>-op<opset>-<variant>[-s<seq>][-p<past>][-mask].onnx``
where ``<cache>`` is ``$TAPEOUT_CACHE`` or ``<repo>/.cache/models``. The default sizes (seq_len 16,
past_len 8) give the plain name ``<family>-<exporter>-op<opset>-<variant>.onnx``. An existing file
is reused; writes are atomic (temporary folder + rename).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

FAMILIES = ("llama", "gpt2", "bert", "qwen2", "mistral", "neox", "phi3", "gemma")
CAUSAL = ("llama", "gpt2", "qwen2", "mistral", "neox", "phi3", "gemma")
EXPORTERS = ("dynamo", "legacy")
VARIANTS = ("prefill", "decode")
DEFAULT_OPSET = {"dynamo": 20, "legacy": 17}
DEFAULT_SEQ_LEN = 16
DEFAULT_PAST_LEN = 8
SEED = 0
VOCAB = 256


def cache_root() -> Path:
    """Root of the model cache: ``$TAPEOUT_CACHE`` or ``<repo>/.cache/models``."""
    env = os.environ.get("TAPEOUT_CACHE")
    return Path(env) if env else REPO / ".cache" / "models"


def default_out_dir() -> Path:
    return cache_root() / "tiny"


# --------------------------------------------------------------------------- model building


def build_model(family: str):
    """The tiny model of ``family``, random-initialised from a fixed seed, in eval mode."""
    import torch
    import transformers

    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        cls = transformers.LlamaForCausalLM
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4
        )
        cls = transformers.GPT2LMHeadModel
    elif family in ("qwen2", "mistral"):
        kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
        if family == "qwen2":
            config, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
        else:
            config, cls = transformers.MistralConfig(**kw, sliding_window=64), transformers.MistralForCausalLM
    elif family == "neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True,
            max_position_embeddings=128, tie_word_embeddings=False,
        )
        cls = transformers.GPTNeoXForCausalLM
    elif family == "phi3":
        config = transformers.Phi3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            original_max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False,
        )
        cls = transformers.Phi3ForCausalLM
    elif family == "gemma":
        config = transformers.GemmaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
            hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        cls = transformers.GemmaForCausalLM
    elif family == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        cls = transformers.BertForMaskedLM
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    with _fork_rng(torch):
        torch.manual_seed(SEED)
        model = cls(config)
    return model.eval()


@contextlib.contextmanager
def _fork_rng(torch):
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def make_wrapper(model, variant: str, mask: bool, internal_mask: bool):
    """A module with flat tensor inputs/outputs around a transformers model.

    ``mask``: attention_mask is a graph input. ``internal_mask``: no mask input, but an all-ones
    mask is passed to the model (the legacy exporter needs one for Llama / GPT-2).
    """
    import torch
    from transformers import DynamicCache

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None and internal_mask:
                attention_mask = torch.ones_like(input_ids)
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            return model(input_ids=input_ids, use_cache=False, **kwargs).logits

    class PrefillBert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None and internal_mask:
                attention_mask = torch.ones_like(input_ids)
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *rest):
            if mask:
                attention_mask, past = rest[0], rest[1:]
            else:
                attention_mask, past = None, rest
                if internal_mask:
                    n_past = past[0].shape[2]
                    attention_mask = torch.ones(
                        (input_ids.shape[0], n_past + input_ids.shape[1]), dtype=torch.long
                    )
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **kwargs)
            result = [out.logits]
            for layer in out.past_key_values.layers:
                result += [layer.keys, layer.values]
            return tuple(result)

    if variant == "prefill":
        return PrefillBert() if model.config.model_type == "bert" else Prefill()
    return Decode()


def example_args(model, variant: str, seq_len: int, past_len: int, mask: bool, seed: int = SEED,
                 batch: int = 1):
    """(args, input_names, output_names) for exporting ``make_wrapper(model, variant, ...)``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    if variant == "prefill":
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        args: list[Any] = [ids]
        names = ["input_ids"]
        if mask:
            args.append(torch.ones((batch, seq_len), dtype=torch.long))
            names.append("attention_mask")
        return tuple(args), names, ["logits"]
    layers, kv_heads, head_dim = kv_geometry(model.config)
    ids = torch.randint(0, vocab, (batch, 1), generator=gen)
    args = [ids]
    names = ["input_ids"]
    if mask:
        args.append(torch.ones((batch, past_len + 1), dtype=torch.long))
        names.append("attention_mask")
    outs = ["logits"]
    for i in range(layers):
        for kind in ("key", "value"):
            args.append(torch.randn((batch, kv_heads, past_len, head_dim), generator=gen))
            names.append(f"past_key_values.{i}.{kind}")
            outs.append(f"present.{i}.{kind}")
    return tuple(args), names, outs


# --------------------------------------------------------------------------- exporting


@contextlib.contextmanager
def quiet():
    """Silence exporter chatter (warnings, progress prints, logging) unless TAPEOUT_VERBOSE is set."""
    if os.environ.get("TAPEOUT_VERBOSE"):
        yield
        return
    buf_out, buf_err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
                yield
    except BaseException:
        sys.stderr.write(buf_out.getvalue()[-4000:])
        sys.stderr.write(buf_err.getvalue()[-4000:])
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# node metadata the dynamo exporter adds that depends on where and how the script was loaded
# (absolute paths, line numbers, the wrapper's module name): dropped so that an export is
# byte-identical across checkouts; "pkg.torch.onnx.name_scopes" (module path such as
# "model.model.layers.0.self_attn.q_proj") is kept.
_VOLATILE_METADATA = (
    "pkg.torch.onnx.stack_trace",
    "pkg.torch.onnx.fx_node",
    "pkg.torch.onnx.class_hierarchy",
    "namespace",
)


def strip_node_metadata(ir_model) -> None:
    """Remove the load-location-dependent metadata from every node of an ``onnx_ir`` model."""
    for graph in (ir_model.graph, *ir_model.functions.values()):
        for node in graph.all_nodes():
            for key in _VOLATILE_METADATA:
                node.metadata_props.pop(key, None)


def torch_export(
    module,
    args: tuple,
    path: Path,
    *,
    exporter: str,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    external_data: bool,
) -> None:
    """Export ``module`` to ``path`` (external data beside it when ``external_data``)."""
    import torch

    path = Path(path)
    with torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                external_data=external_data,
                verbose=False,
                optimize=True,
            )
            strip_node_metadata(program.model)
            program.save(str(path), external_data=external_data)
        elif exporter == "legacy":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                do_constant_folding=True,
            )
            if external_data:
                import onnx

                m = onnx.load(str(path))
                onnx.save(
                    m,
                    str(path),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=path.name + ".data",
                    size_threshold=1024,
                )
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")


def atomic_export(final: Path, write) -> Path:
    """Call ``write(tmp_path)`` in a temporary folder beside ``final``, then move the results in.

    The ``.onnx`` file is moved last, so its presence means the export is complete. ``write``
    must name files after ``tmp_path`` (e.g. ``<name>.onnx.data`` beside ``<name>.onnx``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.stem}.", dir=final.parent))
    try:
        tmp = tmp_dir / final.name
        write(tmp)
        for f in sorted(tmp_dir.iterdir()):
            if f.name != final.name:
                os.replace(f, final.parent / f.name)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


def model_name(
    family: str, exporter: str, opset: int, variant: str, seq_len: int, past_len: int, mask: bool,
    batch: int = 1,
) -> str:
    name = f"{family}-{exporter}-op{opset}-{variant}"
    if batch != 1:
        name += f"-b{batch}"
    if variant == "prefill" and seq_len != DEFAULT_SEQ_LEN:
        name += f"-s{seq_len}"
    if variant == "decode" and past_len != DEFAULT_PAST_LEN:
        name += f"-p{past_len}"
    if mask:
        name += "-mask"
    return name + ".onnx"


def export(
    family: str,
    exporter: str = "dynamo",
    opset: int | None = None,
    variant: str = "prefill",
    seq_len: int = DEFAULT_SEQ_LEN,
    past_len: int = DEFAULT_PAST_LEN,
    out_dir: Path | None = None,
    *,
    mask: bool = False,
    batch: int = 1,
    force: bool = False,
) -> Path:
    """Export a tiny model to ONNX (cached) and return the path of the single ``.onnx`` file.

    ``opset`` defaults to 20 for ``dynamo`` and 17 for ``legacy``. ``seq_len`` is the prefill
    length; ``past_len`` the cached length of a decode step (which feeds one token). ``mask``
    adds an ``attention_mask`` graph input; ``batch`` the batch size. ``force`` re-exports even if the file exists.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if variant == "decode" and family not in CAUSAL:
        raise ValueError(f"variant 'decode' needs a causal family {CAUSAL}, not {family!r}")
    if seq_len < 1 or past_len < 1 or batch < 1:
        raise ValueError("seq_len, past_len and batch must be >= 1")
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    path = out_dir / model_name(family, exporter, opset, variant, seq_len, past_len, mask, batch)
    if path.exists() and not force:
        return path

    def write(tmp: Path) -> None:
        with quiet():
            model = build_model(family)
            internal_mask = exporter == "legacy" and not mask and family in CAUSAL
            wrapper = make_wrapper(model, variant, mask, internal_mask).eval()
            args, in_names, out_names = example_args(model, variant, seq_len, past_len, mask, batch=batch)
            torch_export(
                wrapper,
                args,
                tmp,
                exporter=exporter,
                opset=opset,
                input_names=in_names,
                output_names=out_names,
                external_data=False,
            )

    return atomic_export(path, write)


# --------------------------------------------------------------------------- sample inputs

_NP_DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
}


def graph_io(path: Path) -> tuple[list[tuple[str, list, int]], list[tuple[str, list, int]]]:
    """((name, shape, elem_type) of graph inputs, same for outputs); dims are int or str."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}

    def describe(vis):
        res = []
        for vi in vis:
            if vi.name in init:
                continue
            tt = vi.type.tensor_type
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tt.shape.dim
            ]
            res.append((vi.name, dims, tt.elem_type))
        return res

    return describe(model.graph.input), describe(model.graph.output)


def sample_inputs(
    path_or_family: str | Path,
    *,
    seed: int = SEED,
    seq_len: int = DEFAULT_SEQ_LEN,
    past_len: int | None = None,
    vocab_size: int | None = None,
    **export_kwargs,
) -> dict[str, np.ndarray]:
    """Deterministic valid feeds for an exported model, from its graph inputs.

    ``path_or_family``: an ``.onnx`` path, or a family name (then ``export(family, **export_kwargs,
    seq_len=..., past_len=...)`` supplies the path). Static dims are used as they are; a symbolic
    sequence dim takes ``seq_len`` (1 for decode graphs with past inputs), a symbolic past dim
    ``past_len``. Token ids are uniform in ``[0, vocab)`` (vocab from the logits output, else
    ``vocab_size``, else 256); masks are all ones; ``position_ids`` / ``cache_position`` count on
    from the past length; past key/values are standard normal.
    """
    p = Path(path_or_family)
    if p.suffix != ".onnx":
        kwargs = dict(export_kwargs)
        kwargs.setdefault("seq_len", seq_len)
        if past_len is not None:
            kwargs.setdefault("past_len", past_len)
        p = export(str(path_or_family), **kwargs)
    inputs, outputs = graph_io(p)
    rng = np.random.default_rng(seed)

    if vocab_size is None:
        vocab_size = VOCAB
        for name, dims, _ in outputs:
            if name == "logits" and dims and isinstance(dims[-1], int) and dims[-1] > 0:
                vocab_size = dims[-1]
                break

    past_inputs = [(n, d) for n, d, _ in inputs if n.startswith("past_key_values")]
    static_past = None
    if past_inputs and len(past_inputs[0][1]) == 4 and isinstance(past_inputs[0][1][2], int):
        static_past = past_inputs[0][1][2]
    n_past = static_past if static_past is not None else (past_len if past_len is not None else DEFAULT_PAST_LEN)

    # length of the new tokens
    n_new = None
    for name, dims, _ in inputs:
        if name == "input_ids" and len(dims) == 2 and isinstance(dims[1], int):
            n_new = dims[1]
    if n_new is None:
        n_new = 1 if past_inputs else seq_len

    def resolve(name: str, dims: list, axis: int) -> int:
        d = dims[axis]
        if isinstance(d, int) and d > 0:
            return d
        if len(dims) == 1:  # 1-D: cache_position / position ids of the new tokens
            return n_new
        if axis == 0:
            return 1
        if name.startswith("past_key_values"):
            return n_past
        if name == "attention_mask":
            return n_past + n_new if past_inputs else n_new
        return n_new

    feeds: dict[str, np.ndarray] = {}
    for name, dims, elem in inputs:
        dtype = _NP_DTYPES.get(elem, np.float32)
        shape = tuple(resolve(name, dims, a) for a in range(len(dims)))
        if name in ("input_ids",) or name.endswith("input_ids"):
            arr = rng.integers(0, vocab_size, size=shape)
        elif "mask" in name:
            arr = np.ones(shape)
        elif name in ("position_ids", "cache_position") or "position" in name:
            start = n_past if past_inputs else 0
            n = shape[-1] if shape else 1
            arr = np.broadcast_to(np.arange(start, start + n), shape) if shape else np.array(start)
        elif name in ("token_type_ids",):
            arr = np.zeros(shape)
        elif np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(size=shape)
        elif dtype is np.bool_:
            arr = np.ones(shape)
        else:
            arr = np.zeros(shape)
        feeds[name] = np.ascontiguousarray(np.asarray(arr).astype(dtype))
    return feeds


def torch_reference(family: str, variant: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the torch model (same wrapper as the export) on ``feeds``, in output order."""
    import torch

    model = build_model(family)
    mask = "attention_mask" in feeds
    wrapper = make_wrapper(model, variant, mask, internal_mask=False).eval()
    order = ["input_ids"] + (["attention_mask"] if mask else [])
    order += sorted(
        (k for k in feeds if k.startswith("past_key_values.")),
        key=lambda k: (int(k.split(".")[1]), k.split(".")[2] != "key"),
    )
    with torch.no_grad(), quiet():
        out = wrapper(*(torch.from_numpy(feeds[k]) for k in order))
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def check(path: Path, family: str | None = None, variant: str | None = None) -> float:
    """Run ``path`` in onnxruntime on ``sample_inputs`` and return max |ORT - torch| over outputs.

    ``family`` / ``variant`` default to the ones in the file name.
    """
    import onnxruntime as ort

    path = Path(path)
    parts = path.stem.split("-")
    family = family or parts[0]
    variant = variant or parts[3]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = sample_inputs(path)
    got = sess.run(None, feeds)
    want = torch_reference(family, variant, feeds)
    if len(got) != len(want):
        raise AssertionError(f"{path.name}: {len(got)} outputs, torch gives {len(want)}")
    err = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise AssertionError(f"{path.name}: shape {g.shape} != torch {w.shape}")
        err = max(err, float(np.max(np.abs(g.astype(np.float64) - w))))
    return err


# --------------------------------------------------------------------------- inventory


def op_inventory(path: Path) -> dict[str, Any]:
    """Op types (with domains), opset imports and model-local functions of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[str] = set()

    def walk(graph):
        for node in graph.node:
            ops.add(f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    function_ops: set[str] = set()
    for fn in model.functions:
        for node in fn.node:
            function_ops.add(f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
    return {
        "ops": sorted(ops),
        "opset_imports": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "functions": [f"{f.domain}::{f.name}" for f in model.functions],
        "function_ops": sorted(function_ops),
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "ir_version": model.ir_version,
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=FAMILIES, required=True)
    ap.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    ap.add_argument("--opset", type=int, default=None, help="default: 20 (dynamo), 17 (legacy)")
    ap.add_argument("--variant", choices=VARIANTS, default="prefill")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    ap.add_argument("--past-len", type=int, default=DEFAULT_PAST_LEN)
    ap.add_argument("--mask", action="store_true", help="make attention_mask a graph input")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="re-export even if cached")
    ap.add_argument("--check", action="store_true", help="run it in onnxruntime and print the op inventory")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = export(
        a.family, a.exporter, a.opset, a.variant, a.seq_len, a.past_len, a.out_dir,
        mask=a.mask, batch=a.batch, force=a.force,
    )
    dt = time.perf_counter() - t0
    if a.check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = sample_inputs(path)
        outs = sess.run(None, feeds)
        for o, v in zip(sess.get_outputs(), outs):
            print(f"# output {o.name} {v.shape} {v.dtype} finite={bool(np.isfinite(v).all())}", file=sys.stderr)
        print(f"# max |ORT - torch| = {check(path):.3g}", file=sys.stderr)
        inv = op_inventory(path)
        print(f"# {dt:.2f}s {inv}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
