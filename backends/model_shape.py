"""Model shapes and weight-format costs: what the estimates of every target start from.

``ModelShape`` is a Transformer's dimensions (from a Hugging Face config.json or from a fused
graph's structure summary); ``format_cost`` what a weight format costs in ROM; and
``kv_cache_bytes`` the one rule for the KV cache's size (int8 keys and values plus one shift
byte per 32-element block), used by the mask-ROM compile (its SRAM), the mask-ROM estimate
and the dataflow estimate. Spec: docs/estimates.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.quant.w3o6 import default_cap

KV_BLOCK = 32          # elements per shared shift byte of the int8 KV cache


def kv_cache_bytes(layers: list[tuple[int, int]], context: int) -> int:
    """int8 keys and values plus one shift byte per KV_BLOCK elements, for every layer given as
    (kv_heads, head_dim), at ``context`` positions."""
    total = 0
    for kv_heads, head_dim in layers:
        per_token = 2 * kv_heads * head_dim
        total += context * (per_token + per_token // KV_BLOCK)
    return total


# ----------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """What an estimate needs to know about a Transformer: its dimensions and its linears.

    ``linears`` lists every weight matrix the fabric holds as ``(name, out, in)``; when left
    empty it is derived from the dimensions (q, k, v, o and the MLP per layer, then lm_head).
    ``context`` sizes the KV cache; ``positions`` is the row count of a learned position
    embedding (GPT-2, BERT; 0 for rope models).
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    gated_mlp: bool = True
    context: int = 2048
    norm: str = "rmsnorm"
    positions: int = 0
    linears: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "context"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TapeoutError(f"model shape {self.name!r}: {key} must be a positive integer, not {value!r}")
        for key in ("intermediate", "vocab", "positions"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TapeoutError(f"model shape {self.name!r}: {key} must be a non-negative integer, not {value!r}")
        if self.heads % self.kv_heads:
            raise TapeoutError(f"model shape {self.name!r}: {self.heads} heads are not a multiple of "
                               f"{self.kv_heads} kv heads")
        if not self.linears:
            self.linears = derive_linears(self)

    @property
    def weights(self) -> int:
        """Weights held by the fabric (every linear, lm_head included)."""
        return sum(o * i for _, o, i in self.linears)


def derive_linears(s: ModelShape) -> list[tuple[str, int, int]]:
    """The linears of a Llama / GPT-2 / BERT-style stack of ``s.layers`` identical layers."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = [("q_proj", q, s.hidden), ("k_proj", kv, s.hidden), ("v_proj", kv, s.hidden),
                 ("o_proj", s.hidden, q)]
    if s.intermediate and s.gated_mlp:
        per_layer += [("gate_proj", s.intermediate, s.hidden), ("up_proj", s.intermediate, s.hidden),
                      ("down_proj", s.hidden, s.intermediate)]
    elif s.intermediate:
        per_layer += [("fc_in", s.intermediate, s.hidden), ("fc_out", s.hidden, s.intermediate)]
    out = [(f"L{i}.{role}", o, n) for i in range(s.layers) for role, o, n in per_layer]
    if s.vocab:
        out.append(("lm_head", s.vocab, s.hidden))
    return out


# model_type values whose transformers config class defaults tie_word_embeddings to False
_UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "olmo"}
_LEARNED_POSITIONS = {"gpt2", "bert", "roberta", "distilbert", "gpt_neo", "opt", "electra"}


MAX_CONFIG_SIZE = 1 << 24      # any one size in a config (16.7 M: 100x the largest published vocabularies)


def shape_from_hf_config(path: str | Path, *, context: int = 2048) -> ModelShape:
    """A :class:`ModelShape` from a HuggingFace ``transformers`` config.json (no weights).

    Reads Llama-style keys (hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings, head_dim,
    max_position_embeddings), GPT-2-style (n_embd, n_layer, n_head, n_inner, n_positions) and
    BERT-style configs; a multimodal config's ``text_config`` is used when present.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise TapeoutError("config file not found; pass a transformers config.json", file=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TapeoutError(f"not a JSON config ({err}); pass a transformers config.json", file=str(path)) from None
    if not isinstance(cfg, dict):
        raise TapeoutError("not a transformers config.json (expected a JSON object)", file=str(path))
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}

    def need(*keys: str, default=None) -> int:
        for k in keys:
            if cfg.get(k) is not None:
                value = cfg[k]
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONFIG_SIZE:
                    raise TapeoutError(f"config key {k!r} must be a positive integer up to {MAX_CONFIG_SIZE:,}, "
                                       f"not {value!r}", file=str(path))
                return value
        if default is not None:
            return default
        alt = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
        raise TapeoutError(f"not a transformer config: missing key {keys[0]!r}{alt}; pass the config.json "
                           "of a transformers decoder or encoder model", file=str(path))

    hidden = need("hidden_size", "n_embd", "d_model")
    layers = need("num_hidden_layers", "n_layer", "num_layers")
    heads = need("num_attention_heads", "n_head", "num_heads")
    vocab = need("vocab_size")
    kv_heads = need("num_key_value_heads", default=1 if cfg.get("multi_query") else heads)
    head_dim = need("head_dim", default=max(1, hidden // heads))
    intermediate = need("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    if heads % kv_heads:
        raise TapeoutError(f"config: {heads} attention heads are not a multiple of {kv_heads} key/value heads",
                           file=str(path))
    model_type = str(cfg.get("model_type", ""))
    act = str(cfg.get("hidden_act") or cfg.get("activation_function") or "")
    gated = act in ("silu", "swish", "swiglu") or model_type in _UNTIED_BY_DEFAULT
    tied = cfg.get("tie_word_embeddings", model_type not in _UNTIED_BY_DEFAULT)
    max_pos = need("max_position_embeddings", "n_positions", default=0) if any(
        cfg.get(k) not in (None, 0) for k in ("max_position_embeddings", "n_positions")) else 0
    norm = "layernorm" if model_type in _LEARNED_POSITIONS or "layer_norm_epsilon" in cfg \
        or "layer_norm_eps" in cfg else "rmsnorm"
    name = cfg.get("_name_or_path") or path.stem
    return ModelShape(name=str(name), hidden=hidden, layers=layers, heads=heads, kv_heads=int(kv_heads),
                      head_dim=int(head_dim), intermediate=int(intermediate), vocab=vocab,
                      tied_embeddings=bool(tied), gated_mlp=gated, context=context, norm=norm,
                      positions=int(max_pos) if model_type in _LEARNED_POSITIONS else 0)


def shape_from_summary(summary: dict, *, context: int = 2048, name: str | None = None) -> ModelShape:
    """A :class:`ModelShape` from ``tapeout.compiler.structure.recognise(graph)``.

    Dimensions come from the first recognised block; the linears are the graph's own (every
    block's roles, then the other linears such as lm_head), so non-uniform models are counted
    exactly. Tying and learned position embeddings are not visible in a summary: the shape says
    untied and no position table.
    """
    s = summary.get("structure", summary)
    blocks = s.get("blocks") or []
    model = name or summary.get("model") or "model"
    if not blocks:
        raise TapeoutError(f"{model}: no transformer layers recognised, so there is nothing to estimate "
                           "(see `tapeout inspect`)")
    b0 = blocks[0]
    hidden = s.get("hidden") or next(iter(b0["linears"].values()))["in"]
    mlp = b0.get("mlp")
    linears = [(f"L{b['index']}.{role}", int(x["out"]), int(x["in"]))
               for b in blocks for role, x in b["linears"].items()]
    linears += [(x.get("role") or x["op"], int(x["out"]), int(x["in"])) for x in s.get("other_linears", [])]
    return ModelShape(name=str(model), hidden=int(hidden), layers=len(blocks), heads=int(b0["heads"]),
                      kv_heads=int(b0["kv_heads"]), head_dim=int(b0["head_dim"]),
                      intermediate=int(mlp["intermediate"]) if mlp else 0, vocab=int(s.get("vocab") or 0),
                      tied_embeddings=False, gated_mlp=bool(mlp) and mlp["kind"] == "gated_mlp",
                      context=context, norm=s.get("norm") or "rmsnorm", linears=linears)


# ----------------------------------------------------------------------------------------------
# Formats: storage cost and code statistics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatCost:
    """What a weight format costs in ROM and how often its vias are present.

    ``coarse_zero`` and ``fine`` are the fractions of weights without a V_CODE via and with a
    V_FINE via, measured with tapeout's quantiser on Gaussian weights (docs/estimates.md);
    ``scale_mult_bits`` / ``scale_shift_stages`` size the per-(row, unit) group-scale datapath:
    the multiplier covers the scale's significant bits, the shifter its power-of-two part.
    """

    name: str
    group: int | None          # weights per scale group along the input; None = per channel
    coarse_zero: float
    fine: float
    scale_mult_bits: int
    scale_shift_stages: int

    def bits_per_weight(self, n_out: int, n_in: int, outlier_frac: float) -> float:
        """Storage-equivalent bits per weight: codes, scales and outlier bookkeeping (docs/formats.md)."""
        if self.name == "w3o6":
            g = min(64, n_in) if n_in % 64 else 64
            groups = n_out * (n_in // g)
            k = round(outlier_frac * n_out * n_in)
            cb = default_cap(k, groups, g).bit_length()
            return 3 + 8 / g + 16 / n_in + cb / g + outlier_frac * (math.ceil(math.log2(g)) + 3)
        if self.name == "nvfp4":
            return 4 + 8 / 16 + 32 / (n_out * n_in)
        if self.name == "mxfp4":
            return 4 + 8 / 32
        bits = int(self.name[3:])
        return bits + (8 / self.group if self.group else 0) + 16 / n_in


FORMATS: dict[str, FormatCost] = {
    "w3o6": FormatCost("w3o6", 64, coarse_zero=0.203, fine=0.75, scale_mult_bits=8, scale_shift_stages=0),
    "nvfp4": FormatCost("nvfp4", 16, coarse_zero=0.068, fine=0.0, scale_mult_bits=4, scale_shift_stages=4),
    "mxfp4": FormatCost("mxfp4", 32, coarse_zero=0.081, fine=0.0, scale_mult_bits=0, scale_shift_stages=5),
    "int4": FormatCost("int4", 128, coarse_zero=0.133, fine=0.0, scale_mult_bits=8, scale_shift_stages=0),
    "int8": FormatCost("int8", None, coarse_zero=0.168, fine=0.938, scale_mult_bits=0, scale_shift_stages=0),
}
# w3o6's ``fine`` is per outlier: an outlier c6 has a fine via unless c6 mod 4 == 0 (3 in 4)


def format_cost(fmt: str) -> FormatCost:
    if fmt not in FORMATS:
        raise TapeoutError(f"unknown format {fmt!r} for estimates; choose one of: {', '.join(FORMATS)}")
    return FORMATS[fmt]


