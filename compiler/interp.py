"""Float interpreter: runs any Graph in numpy, op by op, with one kernel per op kind.

Kernels are registered in :data:`KERNELS` with :func:`kernel`. A kernel is called as
``fn(op, *inputs)`` where an omitted optional input is ``None``, and returns one array or a
tuple of arrays (one per op output). ONNX kernels live in ``kernels_onnx``; the fused
transformer-level ops in ``kernels_fused``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .ir import Graph, Op, TensorInfo

Kernel = Callable[..., "np.ndarray | tuple[np.ndarray, ...]"]
KERNELS: dict[str, Kernel] = {}


def kernel(*kinds: str) -> Callable[[Kernel], Kernel]:
    """Register ``fn`` as the float kernel for each op kind in ``kinds``."""
    def register(fn: Kernel) -> Kernel:
        for k in kinds:
            KERNELS[k] = fn
        return fn
    return register


_loaded = False


def _load_kernels() -> dict[str, Kernel]:
    """Import the kernel modules once (registration is their import side effect)."""
    global _loaded
    if not _loaded:
        from . import kernels_fused, kernels_onnx  # noqa: F401
        _loaded = True
    return KERNELS


class OpError(Exception):
    """An op failed while running; carries the op so callers can name node and kind."""

    def __init__(self, op: Op, reason: str) -> None:
        self.op, self.reason = op, reason
        super().__init__(f"node {op.name!r} ({op.kind}): {reason}")


def run_op(op: Op, inputs: list[np.ndarray | None]) -> tuple[np.ndarray, ...]:
    """Run one op on concrete inputs; returns one array per output."""
    fn = _load_kernels().get(op.kind)
    if fn is None:
        raise OpError(op, f"no float kernel for op {op.kind}")
    try:
        out = fn(op, *inputs)
    except OpError:
        raise
    except (ValueError, IndexError, TypeError, KeyError, NotImplementedError, ZeroDivisionError,
            OverflowError, MemoryError) as e:
        raise OpError(op, f"{type(e).__name__}: {e}") from e
    if not isinstance(out, tuple):
        out = (out,)
    return out


def run(graph: Graph, feeds: Mapping[str, np.ndarray], *, outputs: list[str] | None = None,
        keep: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
    """Evaluate ``graph`` on ``feeds`` (graph input name -> array).

    Returns the requested ``outputs`` (default: the graph outputs). Intermediates are dropped
    as soon as their last consumer ran; ``keep(name, value)`` sees every computed tensor.
    """
    wanted = list(graph.outputs if outputs is None else outputs)
    missing = [i for i in graph.inputs if i not in feeds]
    if missing:
        raise ValueError(f"missing graph inputs: {missing}")
    env: dict[str, np.ndarray] = dict(graph.constants)
    env.update({k: np.asarray(v) for k, v in feeds.items()})
    order = list(graph.ops)
    last_use: dict[str, int] = {}
    for i, op in enumerate(order):
        for t in op.inputs:
            if t:
                last_use[t] = i
    pinned = set(wanted) | set(graph.constants) | set(feeds)
    for i, op in enumerate(order):
        args = [env[t] if t else None for t in op.inputs]
        results = run_op(op, args)
        for name, value in zip(op.outputs, results):
            if name:
                env[name] = value
                if keep is not None:
                    keep(name, value)
        for t in op.inputs:
            if t and last_use.get(t) == i and t not in pinned:
                env.pop(t, None)
    return {t: env[t] for t in wanted}


def dummy_feeds(graph: Graph) -> dict[str, np.ndarray]:
    """Inputs of the bound shapes: ones for integer/bool inputs (ids, masks), zeros for floats."""
    feeds = {}
    for name in graph.inputs:
        info = graph.tensors[name]
        if not info.static:
            raise ValueError(f"input {name!r} has unbound shape {info}")
        dt = np.dtype(info.dtype)
        fill = 0 if dt.kind == "f" else 1
        feeds[name] = np.full(info.shape, fill, dtype=dt)
    return feeds


def infer_shapes(graph: Graph, check: Callable[[str, np.ndarray], None] | None = None) -> None:
    """Give every tensor a static TensorInfo by running the graph once on dummy inputs.

    Requires every graph input to be bound. Robust against shape arithmetic that symbolic
    inference cannot follow (Shape -> Gather -> Concat -> Reshape chains of the exporters).
    ``check(name, value)`` sees each computed tensor (a size limit raises from it).
    """
    def record(name: str, value: np.ndarray) -> None:
        if check is not None:
            check(name, value)
        graph.tensors[name] = TensorInfo(tuple(int(d) for d in value.shape), value.dtype)

    with np.errstate(all="ignore"):
        run(graph, dummy_feeds(graph), keep=record)
