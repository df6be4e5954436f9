"""Quantising a fused graph: calibration statistics, the quantisation pass over ``linear``
weights, the float ("fake-quant") graph, and the integer golden model of the result."""
from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx
import numpy as np

from .errors import TapeoutError
from .golden.model import Golden, GoldenConfig
from .interp import run, run_op
from .ir import Graph, Op
from .program import IntegerProgram, Interface
from .quant import QuantTensor, quantize
from .quant.formats import W3O6_OUTLIER_FRAC, resolve_format
from .quant.gptq import DAMP, HessianFactor, check_damp
from .structure import recognise


# --- feeds ------------------------------------------------------------------------------------
def token_input(graph: Graph) -> str:
    """The name of the token-id input of a prefill graph; other inputs must be fillable."""
    return Interface.of(graph).require_tokens(graph)


def window_feeds(graph: Graph, window: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for one window of token ids: ids, an all-ones mask, positions 0..S-1."""
    return Interface.of(graph).window_feeds(graph, window)


def sample_feeds(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Golden feeds for a backend's self-check (see :meth:`Interface.sample_feeds`)."""
    return Interface.of(graph).sample_feeds(graph, seed)


def windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of ``seq_len`` tokens (a trailing partial window is dropped)."""
    ids = np.asarray(ids).reshape(-1)
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def seq_len_of(graph: Graph) -> int:
    return int(graph.tensors[token_input(graph)].shape[-1])


# --- calibration ------------------------------------------------------------------------------
@dataclass
class CalibStats:
    """Per linear-input tensor: mean of x^2 per feature (and X^T X / n when asked)."""

    act_sq: dict[str, np.ndarray] = field(default_factory=dict)
    hessian: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0


def linear_ops(graph: Graph) -> list[Op]:
    return [op for op in graph.ops if op.kind == "linear"]


CALIB_BATCH_TOKENS = 4096     # tokens whose activations calibration keeps alive at once
WORKERS = min(2, os.cpu_count() or 1)     # threads for calibration and quantisation (numpy and
                                          # BLAS release the GIL); results do not depend on it


def calibration_graph(graph: Graph, wanted: set[str]) -> Graph:
    """The ops of ``graph`` that the ``wanted`` tensors depend on (drops the LM head)."""
    needed: set[str] = set()
    for t in wanted:
        p = graph.producer.get(t)
        if p is not None and p not in needed:
            needed |= nx.ancestors(graph.nx, p) | {p}
    g = graph.copy()
    for name in [n for n in g.nx if n not in needed]:
        g.remove_op(name)
    g.outputs = []
    return g


def run_windows(graph: Graph, feeds: list[dict[str, np.ndarray]],
                keep: Callable[..., None], prepare: Callable[[str, np.ndarray], object] | None = None) -> None:
    """``interp.run`` on several feeds at once, op by op: each op runs on every feed while its
    weight is hot in cache (on WORKERS threads, each taking a share of the feeds), and a
    linear's weight is widened to float64 once (the kernel's own ``astype`` is then a no-op)
    instead of once per feed. Every value equals ``run``'s, and ``keep`` sees each tensor's
    values in feed order, on the calling thread: ``keep(name, value)``, or with ``prepare``
    ``keep(name, value, prepare(name, value))``, ``prepare`` running on the worker threads."""
    order = list(graph.ops)
    last_use = {t: i for i, op in enumerate(order) for t in op.inputs if t}
    consts, envs = graph.constants, [dict(f) for f in feeds]
    shares = [envs[k::WORKERS] for k in range(WORKERS) if envs[k::WORKERS]]
    with ThreadPoolExecutor(max(1, len(shares))) as pool:
        for i, op in enumerate(order):
            shared = {t: consts[t] for t in op.inputs if t in consts}
            w = shared.get(op.inputs[1]) if op.kind == "linear" else None
            if w is not None and w.dtype == np.float32:
                shared[op.inputs[1]] = w.astype(np.float64)

            def step(share: list[dict]) -> None:
                for env in share:
                    results = run_op(op, [shared[t] if t in shared else env[t] if t else None
                                          for t in op.inputs])
                    env.update((name, v) for name, v in zip(op.outputs, results) if name)
                    if prepare is not None:
                        env[_PREPARED] = [prepare(name, env[name]) if name else None for name in op.outputs]
            list(pool.map(step, shares))
            for env in envs:
                prepared = env.pop(_PREPARED, None)
                for j, name in enumerate(op.outputs):
                    if name:
                        keep(name, env[name]) if prepared is None else keep(name, env[name], prepared[j])
                for t in op.inputs:
                    if t and last_use[t] == i and t not in consts:
                        env.pop(t, None)


_PREPARED = "\0prepared"     # run_windows: an env slot no tensor name can take


class _Accumulator:
    """Per linear input: the sum of x^2 per feature (and of x x^T with ``hessian``), as the
    float graph runs; ``keep`` is the interpreter's callback. Each window's x^T x is a float32
    product (``prepare``, on run_windows' worker threads), summed in float64 in window order,
    so the result does not depend on the thread count."""

    def __init__(self, graph: Graph, hessian: bool) -> None:
        self.wanted = {op.inputs[0] for op in linear_ops(graph)}
        self.hessian = hessian
        self.sums: dict[str, np.ndarray] = {}
        self.hs: dict[str, np.ndarray] = {}

    def prepare(self, name: str, value: np.ndarray) -> tuple | None:
        """One window's sum of x^2 per feature (float64) and x^T x (float32): the per-window
        work, done on the worker threads; ``keep`` only adds it up, in window order."""
        if name not in self.wanted:
            return None
        x64 = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
        sq = np.sum(x64 * x64, axis=0)
        if not self.hessian:
            return sq, None
        x = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
        return sq, x.T @ x

    def keep(self, name: str, value: np.ndarray, prepared: tuple | None = None) -> None:
        if name not in self.wanted:
            return
        sq, gram = prepared if prepared is not None else self.prepare(name, value)
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq
        if gram is not None:
            if name not in self.hs:
                self.hs[name] = np.zeros(gram.shape)
            self.hs[name] += gram

    def stats(self, count: int) -> CalibStats:
        """The means (the sums divided in place: the Hessians of a 135M model are ~800 MB)."""
        stats = CalibStats()
        stats.tokens = count
        for v in self.sums.values():
            v /= count
        for v in self.hs.values():
            v /= count
        stats.act_sq, stats.hessian = self.sums, self.hs
        self.sums, self.hs = {}, {}
        return stats


def calibrate(graph: Graph, token_windows: Iterable[np.ndarray], *, hessian: bool = False,
              progress: Callable[[int], None] | None = None) -> CalibStats:
    """Run the float graph on calibration windows and collect linear-input statistics
    (windows are run CALIB_BATCH_TOKENS at a time, see :func:`run_windows`)."""
    acc = _Accumulator(graph, hessian)
    graph = calibration_graph(graph, acc.wanted)
    wins = list(token_windows)
    per = max(1, CALIB_BATCH_TOKENS // max((w.size for w in wins), default=1))
    for b in range(0, len(wins), per):
        run_windows(graph, [window_feeds(graph, w) for w in wins[b:b + per]], acc.keep, acc.prepare)
        if progress:
            for i in range(b, min(b + per, len(wins))):
                progress(i)
    count = sum(w.size for w in wins)
    if count == 0:
        raise TapeoutError("calibration text is shorter than one window of the model's sequence "
                           "length; give a longer --calib text", file=graph.meta.get("file"))
    return acc.stats(count)


DECODE_CALIB_STEPS = 512     # decode steps a decode export calibrates on (one token each)


def calibrate_decode(graph: Graph, ids: np.ndarray, *, hessian: bool = False,
                     progress: Callable[[int], None] | None = None) -> CalibStats:
    """Calibration for a decode export (one token in, a KV cache of fixed length P): the token
    ids are fed one step at a time, each step's ``present`` cache (oldest entry dropped) is the
    next step's past. The cache starts at zeros; with an ``attention_mask`` input, the slots not
    yet filled are masked, so the steps see exactly the tokens fed so far. At most
    DECODE_CALIB_STEPS tokens."""
    itf = Interface.of(graph)
    acc = _Accumulator(graph, hessian)
    ids = np.asarray(ids).reshape(-1)[:DECODE_CALIB_STEPS]
    if len(itf.kv_inputs) != len(itf.kv_outputs) or itf.tokens is None:
        raise TapeoutError("a decode export calibrates with its KV-cache outputs fed back as inputs; this "
                           f"one has inputs {graph.inputs} and outputs {graph.outputs}", file=graph.meta.get("file"))
    past = {n: np.zeros(graph.tensors[n].shape, np.float32) for n in itf.kv_inputs}
    p_len = itf.past
    count = 0
    for step, tok in enumerate(ids):
        feeds = dict(past)
        for name in graph.inputs:
            info = graph.tensors[name]
            if name == itf.tokens:
                feeds[name] = np.full(info.shape, tok, info.dtype)
            elif name == itf.mask:
                t = info.shape[-1]
                feeds[name] = np.broadcast_to(np.arange(t) >= t - 1 - min(step, p_len), info.shape).astype(info.dtype)
            elif name == itf.positions:
                feeds[name] = np.full(info.shape, p_len, info.dtype)
            elif name not in feeds:
                feeds[name] = np.zeros(info.shape, info.dtype)
        outs = run(graph, feeds, outputs=list(itf.kv_outputs), keep=acc.keep)
        past = {i: np.ascontiguousarray(outs[o][..., 1:, :]) for i, o in zip(itf.kv_inputs, itf.kv_outputs)}
        count += int(np.prod(graph.tensors[itf.tokens].shape))
        if progress:
            progress(step)
    if count == 0:
        raise TapeoutError("no calibration tokens", file=graph.meta.get("file"))
    return acc.stats(count)


# --- the quantisation pass --------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    """What to quantise and how. ``head_format`` applies to the LM head unless
    ``quantize_head`` puts it in ``fmt`` too; the embedding table stays as it is.

    Unset (None) options take the format's defaults, the best measured point
    (docs/formats.md): w3o6 holds W3O6_OUTLIER_FRAC of its weights at 6 bits and rounds with
    GPTQ (damping ``damp``); the other formats round to nearest without GPTQ."""

    fmt: str
    group_size: int | None = None
    bits: int | None = None
    outlier_frac: float | None = None
    gptq: bool | None = None
    rtn: bool = False                # plain round-to-nearest from absmax scales (the baselines)
    quantize_head: bool = False
    head_format: str = "int8"
    group_fallback: bool = False     # a group that does not divide a layer's inputs -> gcd(in, group)
    damp: float | None = None        # GPTQ: fraction of mean(diag H) added to H's diagonal
    outlier_cap: int | None = None   # w3o6: at most this many outliers per group (a chip's word slots)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", resolve_format(self.fmt, self.bits))
        object.__setattr__(self, "bits", None)
        if self.outlier_frac is None:
            object.__setattr__(self, "outlier_frac", W3O6_OUTLIER_FRAC)
        if self.gptq is None:
            object.__setattr__(self, "gptq", self.fmt == "w3o6" and not self.rtn)
        object.__setattr__(self, "damp", DAMP if self.damp is None else check_damp(self.damp, "--gptq-damp"))
        if not 0.0 <= self.outlier_frac <= 1.0:
            raise TapeoutError(f"--outlier-frac must be in [0, 1], not {self.outlier_frac}")
        if self.group_size is not None and self.group_size < 1:
            raise TapeoutError(f"--group must be a positive integer, not {self.group_size}")
        if self.outlier_cap is not None and (isinstance(self.outlier_cap, bool) or not isinstance(self.outlier_cap, int)
                                             or self.outlier_cap < 0):
            raise TapeoutError(f"the outlier cap must be a non-negative integer, not {self.outlier_cap!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.fmt == "w3o6" or self.gptq


def weight_matrix(graph: Graph, op: Op) -> np.ndarray:
    """The weight of a linear as [out, in] (a view; no copy)."""
    w = graph.constants[op.inputs[1]]
    return w if op.attr("trans_w", False) else w.T


@dataclass
class QuantizedModel:
    graph: Graph
    config: QuantConfig
    weights: dict[str, QuantTensor]
    roles: dict[str, str]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def program(self, config: GoldenConfig = GoldenConfig(), summary: dict | None = None) -> IntegerProgram:
        """The integer program of this model (built once per golden config)."""
        key = ("program", config)
        if key not in self._cache:
            quant = {k: v for k, v in self.report().items() if k != "tensors"}
            self._cache[key] = IntegerProgram.build(self.graph, self.weights, config, roles=self.roles,
                                                    summary=summary if summary is not None else recognise(self.graph),
                                                    quant=quant)
        return self._cache[key]

    def float_graph(self) -> Graph:
        """The graph with every linear weight replaced by its dequantised value (float path)."""
        g = self.graph.copy()
        for name, qt in self.weights.items():
            op = g.op(name)
            dq = qt.dequantize()
            new = g.fresh_name(f"{op.inputs[1]}_dq")
            g.add_constant(new, dq if op.attr("trans_w", False) else np.ascontiguousarray(dq.T))
            g.replace_op(op.replace(inputs=(op.inputs[0], new) + op.inputs[2:]))
        return g

    def golden(self, config: GoldenConfig = GoldenConfig()) -> Golden:
        return Golden(self.program(config))

    def report(self) -> dict:
        """Per tensor and total: format, bits per weight, outlier fraction, relative error."""
        if "report" not in self._cache:
            self._cache["report"] = self._report()
        return copy.deepcopy(self._cache["report"])

    def _report(self) -> dict:
        from concurrent.futures import ThreadPoolExecutor
        rows, total_bits, total_w, body_bits, body_w = [], 0, 0, 0, 0

        def row_of(item) -> dict:        # float64 error norms: on threads (numpy releases the GIL)
            name, qt = item
            w = np.asarray(weight_matrix(self.graph, self.graph.op(name)), np.float64)
            err = qt.dequantize().astype(np.float64) - w
            bits = int(qt.bits()["total"])
            return {"op": name, "role": self.roles.get(name, "other"), "format": qt.fmt,
                    "shape": list(qt.shape), "group_size": qt.group_size, "bits": bits,
                    "bits_per_weight": round(bits / w.size, 4),
                    "outlier_fraction": round(float(qt.outliers.mean()), 6) if qt.outliers is not None else 0.0,
                    "rel_error": float(np.linalg.norm(err) / max(np.linalg.norm(w), 1e-30))}

        with ThreadPoolExecutor(WORKERS) as pool:
            for row in pool.map(row_of, self.weights.items()):
                rows.append(row)
                n = int(np.prod(row["shape"]))
                total_bits += row["bits"]
                total_w += n
                if row["role"] != "lm_head":
                    body_bits += row["bits"]
                    body_w += n
        return {"format": self.config.fmt, "group_size": self.config.group_size,
                "outlier_frac": self.config.outlier_frac if self.config.fmt == "w3o6" else None,
                "head_format": self.config.fmt if self.config.quantize_head else self.config.head_format,
                "bits_per_weight": round(body_bits / max(body_w, 1), 4),
                "bits_per_weight_with_head": round(total_bits / max(total_w, 1), 4),
                "weights": body_w, "tensors": rows}


def linear_roles(graph: Graph, summary: dict | None = None) -> dict[str, str]:
    s = (summary or recognise(graph))["structure"]
    roles = {}
    for b in s["blocks"]:
        for role, info in b["linears"].items():
            roles[info["op"]] = f"layers.{b['index']}.{role}"
    for x in s["other_linears"]:
        roles[x["op"]] = x["role"]
    return roles


PROCESS_WEIGHTS = 1 << 22    # models this large quantise in forked processes (GPTQ's column loop
                             # holds the GIL); smaller ones on threads (no fork cost)
_JOBS: list = []             # the jobs of the running quantize_model, inherited by forked workers


def _quantise_job(i: int) -> QuantTensor:
    w, fmt, kwargs = _JOBS[i]
    return quantize(w, fmt, **kwargs)


@contextlib.contextmanager
def _quantise_pool(jobs: list):
    """WORKERS forked processes on Linux for a large model (they inherit the jobs; only the
    quantised tensors travel back), else WORKERS threads. Either gives the same tensors."""
    global _JOBS
    _JOBS = jobs
    big = sum(w.size for w, _, _ in jobs) >= PROCESS_WEIGHTS
    try:
        if WORKERS > 1 and big and sys.platform == "linux":
            with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork")) as pool:
                yield pool
        else:
            with ThreadPoolExecutor(WORKERS) as pool:
                yield pool
    finally:
        _JOBS = []


def quantize_model(graph: Graph, config: QuantConfig, stats: CalibStats | None = None,
                   progress: Callable[[int, int], None] | None = None, summary: dict | None = None) -> QuantizedModel:
    """Quantise every ``linear`` weight of ``graph`` (the LM head per ``config``).

    Tensors are independent, so WORKERS of them are quantised at once, largest first;
    results, progress and the first error come in op order, exactly as one at a time."""
    if config.needs_calibration and stats is None:
        raise TapeoutError(f"format {config.fmt} needs calibration statistics (activation-aware)")
    roles = linear_roles(graph, summary)
    ops = linear_ops(graph)
    jobs, factors = [], {}
    for op in ops:
        w = np.asarray(weight_matrix(graph, op), np.float32)
        head = roles.get(op.name) == "lm_head" and not config.quantize_head
        kwargs: dict = {}
        fmt = config.head_format if head else config.fmt
        if not head:
            group = config.group_size
            if group is not None and config.group_fallback and w.shape[1] % group:
                group = math.gcd(w.shape[1], group)
            kwargs = {"group_size": group, "bits": config.bits, "rtn": config.rtn or None}
            if fmt == "w3o6":
                kwargs["outlier_frac"] = config.outlier_frac
                kwargs["outlier_cap"] = config.outlier_cap
            if stats is not None and op.inputs[0] in stats.act_sq:
                kwargs["act_sq"] = stats.act_sq[op.inputs[0]]
                if config.gptq:
                    if op.inputs[0] not in stats.hessian:
                        raise TapeoutError(f"{config.fmt} with GPTQ needs the calibration Hessians "
                                           f"(calibrate(..., hessian=True)), or pass gptq=False",
                                           file=graph.meta.get("file"), node=op.name, op="linear")
                    if op.inputs[0] not in factors:
                        factors[op.inputs[0]] = HessianFactor(stats.hessian[op.inputs[0]], damp=config.damp)
                    kwargs.update(hessian=factors[op.inputs[0]], gptq=True)
        jobs.append((w, fmt, {k: v for k, v in kwargs.items() if v is not None}))
    if factors:     # each shared Hessian factored once, on threads, before forked workers
        with ThreadPoolExecutor(WORKERS) as pool:   # would each factor the ones they read
            list(pool.map(HessianFactor.get, factors.values()))
    weights = {}
    with _quantise_pool(jobs) as pool:
        futures = {i: pool.submit(_quantise_job, i)
                   for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][0].size)}
        try:
            for i, op in enumerate(ops):
                try:
                    weights[op.name] = futures[i].result()
                except TapeoutError as e:
                    raise TapeoutError(f"{e}", file=graph.meta.get("file"), node=op.name, op="linear") from None
                if progress:
                    progress(i, len(ops))
        finally:
            for f in futures.values():
                f.cancel()
    return QuantizedModel(graph, config, weights, roles)
