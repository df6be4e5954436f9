"""Recognise transformer structure in a fused graph: layers, heads, dims, roles of linears."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any


from .ir import Graph, Op

PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "rope", "Cast", "Split",
                "Slice", "Expand", "Identity", "Mul", "Div", "Add", "Gather"}
WEIGHT_OPS = {"linear", "rmsnorm", "layernorm", "Gather", "MatMul", "Gemm", "LayerNormalization",
              "RMSNormalization"}


def _trace_back(graph: Graph, tensor: str, limit: int = 12) -> Op | None:
    """Nearest ``linear`` upstream of ``tensor`` through shape/rope ops (breadth first)."""
    queue, seen = deque([(tensor, 0)]), set()
    while queue:
        t, depth = queue.popleft()
        op = graph.producer_op(t)
        if op is None or op.name in seen or depth > limit:
            continue
        seen.add(op.name)
        if op.kind == "linear":
            return op
        if op.kind in PASS_THROUGH:
            # through Concat (kv cache) every operand; elsewhere the data operand only
            srcs = op.inputs if op.kind == "Concat" else op.inputs[:1]
            queue.extend((i, depth + 1) for i in srcs if i)
    return None


def _trace_forward(graph: Graph, tensor: str, limit: int = 8) -> Op | None:
    queue, seen = deque([(tensor, 0)]), set()
    while queue:
        t, depth = queue.popleft()
        for op in graph.consumer_ops(t):
            if op.name in seen or depth > limit:
                continue
            seen.add(op.name)
            if op.kind == "linear":
                return op
            if op.kind in PASS_THROUGH:
                queue.extend((o, depth + 1) for o in op.outputs if o)
    return None


def linear_dims(graph: Graph, op: Op) -> tuple[int, int]:
    w = graph.tensors[op.inputs[1]].shape
    return (int(w[1]), int(w[0])) if op.attr("trans_w", False) else (int(w[0]), int(w[1]))


def _linear_info(graph: Graph, op: Op) -> dict[str, Any]:
    d_in, d_out = linear_dims(graph, op)
    return {"op": op.name, "weight": op.inputs[1], "in": d_in, "out": d_out,
            "bias": len(op.inputs) > 2 and bool(op.inputs[2])}


def parameter_count(graph: Graph) -> tuple[int, int]:
    """(parameters, bytes) of the float constants that ops use as weights."""
    names = set()
    for op in graph.ops:
        if op.kind in WEIGHT_OPS:
            names.update(t for t in op.inputs if t and graph.is_constant(t)
                         and graph.constants[t].dtype.kind == "f")
    count = sum(int(graph.constants[n].size) for n in names)
    nbytes = sum(int(graph.constants[n].nbytes) for n in names)
    return count, nbytes


def find_layers(graph: Graph) -> list[dict[str, Any]]:
    """One record per attention op (in order) with the linears of its block by role."""
    ops = list(graph.ops)
    position = {op.name: i for i, op in enumerate(ops)}
    attn_ops = [op for op in ops if op.kind == "attention"]
    layers: list[dict[str, Any]] = []
    assigned: set[str] = set()
    for idx, att in enumerate(attn_ops):
        q_shape = graph.tensors[att.inputs[0]].shape
        k_shape = graph.tensors[att.inputs[1]].shape
        layer: dict[str, Any] = {
            "index": idx, "attention": att.name,
            "heads": int(q_shape[1]), "kv_heads": int(k_shape[1]), "head_dim": int(q_shape[-1]),
            "causal": bool(att.attr("causal", False)),
            "mask": len(att.inputs) > 3 and bool(att.inputs[3]),
            "mask_kind": mask_kind(att),
            "mask_input": att.inputs[3] if att.attr("key_mask", False) else None,
            "linears": {},
        }
        qkv = [_trace_back(graph, t) for t in att.inputs[:3]]
        if qkv[0] is not None and all(q is qkv[0] for q in qkv):
            layer["linears"]["qkv_proj"] = qkv[0]
        else:
            for role, op in zip(("q_proj", "k_proj", "v_proj"), qkv):
                if op is not None:
                    layer["linears"][role] = op
        o = _trace_forward(graph, att.outputs[0])
        if o is not None:
            layer["linears"]["o_proj"] = o
        layers.append(layer)
        assigned.update(op.name for op in layer["linears"].values())
    # MLP: the linears between one block's o_proj and the next attention's projections
    prev_end = 0
    for idx, layer in enumerate(layers):
        # from the end of the previous block: a parallel-residual MLP (GPT-NeoX) may sort before
        # this block's attention projections
        start = prev_end if idx else 0
        end = min((position[op.name] for op in layers[idx + 1]["linears"].values()), default=len(ops)) \
            if idx + 1 < len(layers) else len(ops)
        gmlp = next((op for op in ops[start:end] if op.kind == "gated_mlp"), None)
        mlp_linears = [op for op in ops[start:end] if op.kind == "linear" and op.name not in assigned]
        if gmlp is not None:
            layer["mlp"] = {"kind": "gated_mlp", "activation": gmlp.attr("activation", "silu")}
            gate, up = graph.producer_op(gmlp.inputs[0]), graph.producer_op(gmlp.inputs[1])
            down = _trace_forward(graph, gmlp.outputs[0], limit=2)
            for role, op in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                if op is not None and op.kind == "linear":
                    layer["linears"][role] = op
        elif len(mlp_linears) >= 2 and idx + 1 < len(layers) or len(mlp_linears) >= 2 and \
                linear_dims(graph, mlp_linears[1])[1] == linear_dims(graph, mlp_linears[0])[0]:
            act = next((op.kind for op in ops[position[mlp_linears[0].name]:position[mlp_linears[1].name]]
                        if op.kind in ("gelu", "silu", "Relu", "Tanh")), "none")
            if linear_dims(graph, mlp_linears[0])[1] == 2 * linear_dims(graph, mlp_linears[1])[0]:
                # one linear makes gate and up, split in two (Phi-3's gate_up_proj)
                layer["mlp"] = {"kind": "gated_mlp", "activation": act, "fused_gate_up": True}
                layer["linears"]["gate_up_proj"], layer["linears"]["down_proj"] = mlp_linears[0], mlp_linears[1]
            else:
                layer["mlp"] = {"kind": "mlp", "activation": act}
                layer["linears"]["fc_in"], layer["linears"]["fc_out"] = mlp_linears[0], mlp_linears[1]
        else:
            layer["mlp"] = None
        if layer["mlp"] is not None:
            inter = next(linear_dims(graph, op)[1] // (2 if r == "gate_up_proj" else 1)
                         for r, op in layer["linears"].items() if r in ("gate_proj", "up_proj", "fc_in", "gate_up_proj"))
            layer["mlp"]["intermediate"] = inter
        assigned.update(op.name for op in layer["linears"].values())
        prev_end = max([position[op.name] + 1 for op in layer["linears"].values()] + [position[layer["attention"]] + 1])
        layer["linears"] = {r: _linear_info(graph, op) for r, op in layer["linears"].items()}
    return layers


def recognise(graph: Graph) -> dict[str, Any]:
    """A JSON-ready summary: interface, histogram, parameters, recognised layers, headline."""
    params, nbytes = parameter_count(graph)
    layers = find_layers(graph)
    in_layers = {info["op"] for layer in layers for info in layer["linears"].values()}
    other = [_linear_info(graph, op) for op in graph.ops if op.kind == "linear" and op.name not in in_layers]
    norms = [op.kind for op in graph.ops if op.kind in ("rmsnorm", "layernorm")]
    embed = next((op for op in graph.ops if op.kind == "Gather" and graph.is_constant(op.inputs[0])
                  and graph.constants[op.inputs[0]].ndim == 2 and not graph.is_constant(op.inputs[1])), None)
    hidden = vocab = None
    if embed is not None:
        vocab, hidden = (int(d) for d in graph.constants[embed.inputs[0]].shape)
    elif layers and layers[0]["linears"]:
        hidden = next(iter(layers[0]["linears"].values()))["in"]
    structure: dict[str, Any] = {
        "layers": len(layers), "hidden": hidden, "vocab": vocab,
        "norm": norms[0] if norms else None, "norms": len(norms),
        "blocks": layers, "other_linears": other,
    }
    structure["headline"] = _headline(structure, params)
    for x in other:
        x["role"] = "lm_head" if vocab and x["out"] == vocab else "other"
    return {
        "model": Path(graph.meta.get("file") or graph.name).name, "producer": graph.meta.get("producer"),
        "opsets": graph.meta.get("opsets"), "bindings": graph.meta.get("bindings", {}),
        "inputs": [{"name": n, "type": str(graph.tensors[n])} for n in graph.inputs],
        "outputs": [{"name": n, "type": str(graph.tensors.get(n, '?'))} for n in graph.outputs],
        "histogram": graph.histogram(), "ops": len(graph),
        "parameters": params, "weight_bytes": nbytes, "structure": structure,
    }


def _headline(s: dict[str, Any], params: int) -> str:
    blocks = s["blocks"]
    if not blocks:
        return f"no transformer layers recognised; {params / 1e6:.2f}M parameters"
    b = blocks[0]
    uniform = all((x["heads"], x["kv_heads"], x["head_dim"], bool(x["mlp"]) and x["mlp"]["kind"],
                   len(x["linears"])) == (b["heads"], b["kv_heads"], b["head_dim"],
                                          bool(b["mlp"]) and b["mlp"]["kind"], len(b["linears"]))
                  for x in blocks)
    mlp = b["mlp"]
    mlp_txt = f"{mlp['kind']} {mlp['activation']} {mlp['intermediate']}" if mlp else "no MLP"
    kv = f"/{b['kv_heads']} kv" if b["kv_heads"] != b["heads"] else ""
    text = (f"{s['layers']} layers x (attention {b['heads']}{kv} heads x {b['head_dim']} + {mlp_txt}; "
            f"{len(b['linears'])} linears)")
    if not uniform:
        text += " [layers differ]"
    dims = [f"hidden {s['hidden']}"] if s["hidden"] else []
    if s["vocab"]:
        dims.append(f"vocab {s['vocab']}")
    if s["norm"]:
        dims.append(s["norm"])
    return f"{text}, {', '.join(dims)}, {params / 1e6:.2f}M parameters"


def mask_kind(att) -> str:
    """How an attention masks its scores: causal, padding (a runtime key mask such as
    ``attention_mask``), causal+padding, explicit (another mask tensor), or none."""
    causal = bool(att.attr("causal", False))
    has = len(att.inputs) > 3 and bool(att.inputs[3])
    other = "padding" if att.attr("key_mask", False) else "explicit" if has else ""
    return "+".join(k for k in ("causal" if causal else "", other) if k) or "none"


def render_summary(summary: dict[str, Any], list_ops: bool = False) -> str:
    """The human-readable text of ``tapeout inspect``."""
    s = summary["structure"]
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted((summary["opsets"] or {}).items()))
    lines = [f"model     {summary['model']}  ({summary['producer'] or 'unknown producer'}, opsets {opsets})"]
    for key in ("inputs", "outputs"):
        lines.append(f"{key:9s} " + ", ".join(f"{x['name']}: {x['type']}" for x in summary[key]))
    if summary["bindings"]:
        lines.append("bound     " + ", ".join(f"{k}={v}" for k, v in summary["bindings"].items()))
    lines.append(f"params    {summary['parameters']:,} ({summary['weight_bytes'] / 2**20:.1f} MiB of weights)")
    lines.append(f"structure {s['headline']}")
    kinds = sorted({(b["mask_kind"], b["mask_input"]) for b in s["blocks"]}, key=str)
    if kinds:
        lines.append("mask      " + "; ".join(k + (f" (runtime input {i!r})" if i else "") for k, i in kinds))
    lines.append("")
    if s["blocks"]:
        lines.append("layer  attention (heads/kv x dim)   mlp                    linears (in->out)")
        for b in s["blocks"]:
            mlp = f"{b['mlp']['kind']} {b['mlp']['activation']}" if b["mlp"] else "-"
            lin = " ".join(f"{r}:{x['in']}->{x['out']}" for r, x in b["linears"].items())
            lines.append(f"{b['index']:5d}  {b['heads']:>3d}/{b['kv_heads']:<3d} x {b['head_dim']:<4d}"
                         f"{' ' + b['mask_kind'] if b['mask_kind'] != 'none' else '':16s}{mlp:21s}  {lin}")
        for x in s["other_linears"]:
            lines.append(f"{x['role']:7s} linear {x['op']}: {x['in']}->{x['out']}")
        lines.append("")
    lines.append(f"ops ({summary['ops']} after fusion): " +
                 ", ".join(f"{k} {v}" for k, v in summary["histogram"].items()))
    for u in summary.get("unsupported", []):
        lines.append(f"UNSUPPORTED node {u['node']!r} ({u['op']}): {u['why']}")
    return "\n".join(lines)



