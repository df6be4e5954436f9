"""The front end as one call: import -> check support -> bind dims -> canonicalise and fuse."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

from .bind import Binding, bind
from .errors import UnsupportedOps
from .ir import Graph
from .onnx_import import load, unsupported_ops
from .passes import StepReport, run_pipeline

Step = Callable[[str], ContextManager[None]]


def _no_progress(label: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def import_graph(path: str | Path, binding: Binding = Binding(), *, step: Step = _no_progress,
                 strict: bool = True) -> tuple[Graph, list[tuple[str, str, str]]]:
    """Load and bind a model. With ``strict`` an unsupported op raises; otherwise the list of
    unsupported ops is returned and shape propagation is skipped when there are any."""
    name = Path(path).name
    with step(f"importing {name}"):
        graph = load(path)
    problems = unsupported_ops(graph)
    if problems and strict:
        raise UnsupportedOps(str(path), problems)
    if not problems:
        with step("binding dimensions and propagating shapes"):
            bind(graph, binding)
    return graph, problems


def fuse(graph: Graph, *, step: Step = _no_progress, pipeline: str = "fuse") -> list[StepReport]:
    with step("canonicalising and fusing"):
        return run_pipeline(graph, pipeline)


def frontend(path: str | Path, binding: Binding = Binding(), *, step: Step = _no_progress) -> Graph:
    """Import, bind and fuse ``path``; the graph every backend starts from."""
    graph, _ = import_graph(path, binding, step=step)
    fuse(graph, step=step)
    return graph
