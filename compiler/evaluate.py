"""Scoring a quantised model against the float model (KLD as llama.cpp defines it)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .interp import run
from .ir import Graph
from .qmodel import QuantizedModel, window_feeds, windows

PATHS = ("float", "golden")


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def score(ref_logits: list[np.ndarray], q_logits: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    """Per position: KLD = sum p_ref (log p_ref - log p_q); top-1 agreement; perplexities.

    ``*_logits`` are [positions, vocab] per window; ``targets`` the next token of each position.
    """
    klds, agree, nll_q, nll_r = [], [], [], []
    for r, q, t in zip(ref_logits, q_logits, targets):
        lr, lq = log_softmax(r), log_softmax(q)
        klds.append(np.sum(np.exp(lr) * (lr - lq), axis=-1))
        agree.append(lr.argmax(-1) == lq.argmax(-1))
        idx = np.arange(len(t))
        nll_q.append(-lq[idx, t])
        nll_r.append(-lr[idx, t])
    kld = np.concatenate(klds)
    return {"tokens": int(kld.size), "kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
            "top1_agree": float(np.concatenate(agree).mean()),
            "ppl": float(np.exp(np.concatenate(nll_q).mean())),
            "ppl_ref": float(np.exp(np.concatenate(nll_r).mean()))}


def reference_logits(graph: Graph, wins: list[np.ndarray]) -> list[np.ndarray]:
    """Float-model logits of each window's positions but the last (they have a next token)."""
    out = graph.outputs[0]
    return [run(graph, window_feeds(graph, w))[out].reshape(len(w), -1)[:-1] for w in wins]


def layer_of(role: str) -> str:
    """The layer a linear's role belongs to: ``layers.3.q_proj`` -> ``layers.3``; roles
    outside the blocks (``lm_head``, ``other``) are layers of their own."""
    parts = role.split(".")
    return ".".join(parts[:2]) if len(parts) == 3 and parts[0] == "layers" else role


def only(qm: QuantizedModel, names: list[str]) -> QuantizedModel:
    """``qm`` with only the linears ``names`` quantised (the others keep their float weights)."""
    return QuantizedModel(qm.graph, qm.config, {n: qm.weights[n] for n in names}, qm.roles)


def per_layer(graph: Graph, qm: QuantizedModel, ids: np.ndarray, seq_len: int, *,
              max_tokens: int | None = None, refs: list[np.ndarray] | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """KLD contribution of each layer: the model scored with only that layer's linears
    quantised (float path), one row per layer in graph order, then one per linear role
    across all layers (``all q_proj``, ...)."""
    ids = np.asarray(ids).reshape(-1)[:max_tokens]
    if refs is None:
        refs = reference_logits(graph, windows(ids, seq_len))
    layers: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    for name in qm.weights:
        role = qm.roles.get(name, "other")
        layers.setdefault(layer_of(role), []).append(name)
        if layer_of(role) != role:
            kinds.setdefault("all " + role.split(".")[-1], []).append(name)
    subsets = list(layers.items()) + (list(kinds.items()) if len(kinds) and len(layers) > 1 else [])
    rows = []
    for i, (layer, names) in enumerate(subsets):
        part = only(qm, names)
        r = evaluate(graph, part, ids, seq_len, refs=refs)
        bits = sum(int(qm.weights[n].bits()["total"]) for n in names)
        n_w = sum(qm.weights[n].shape[0] * qm.weights[n].shape[1] for n in names)
        rows.append({"layer": layer, "linears": len(names), "weights": n_w,
                     "bits_per_weight": round(bits / n_w, 4), "kld_mean": r["kld_mean"],
                     "kld_p99": r["kld_p99"], "top1_agree": r["top1_agree"]})
        if progress:
            progress(i + 1, len(subsets))
    return rows


def evaluate(graph: Graph, qm: QuantizedModel, ids: np.ndarray, seq_len: int, *, path: str = "float",
             max_tokens: int | None = None, refs: list[np.ndarray] | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Score ``qm`` against ``graph`` on token ``ids`` in windows of ``seq_len``.

    Every position of a window but the last predicts the next token of the window. ``refs``
    (from :func:`reference_logits` on the same windows) saves recomputing the float model.
    """
    ids = np.asarray(ids).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    wins = windows(ids, seq_len)
    out = graph.outputs[0]
    q_run = qm.float_graph() if path == "float" else qm.golden()
    if refs is None:
        refs = reference_logits(graph, wins)
    qs, targets = [], []
    for i, w in enumerate(wins):
        feeds = window_feeds(graph, w)
        if path == "float":
            qs.append(run(q_run, feeds)[out].reshape(seq_len, -1)[:-1])
        else:
            qs.append(q_run.run(feeds)[out].reshape(seq_len, -1)[:-1] / 65536.0)
        targets.append(w[1:])
        if progress:
            progress(i + 1, len(wins))
    result = score(refs, qs, targets)
    report = qm.report()
    return {"format": qm.config.fmt, "path": path, "bits_per_weight": report["bits_per_weight"],
            "bits_per_weight_with_head": report["bits_per_weight_with_head"],
            "group_size": qm.config.group_size, "windows": len(wins), "seq_len": seq_len, **result}
