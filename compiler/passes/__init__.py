"""Passes over the Graph IR and the pipelines that compose them.

A pass is a frozen dataclass with a kebab-case ``name``; calling it on a Graph rewrites the
graph in place and returns whether it changed anything (honestly: a pass that reports a change
it did not make would make a fixpoint loop spin). :data:`PASSES` maps names to pass classes;
:data:`PIPELINES` lists the passes of each pipeline as a flat list of names.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

from ..ir import Graph, verify


class Pass(Protocol):
    name: ClassVar[str]

    def __call__(self, graph: Graph) -> bool: ...


PASSES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a pass class to :data:`PASSES` under its ``name``."""
    if cls.name in PASSES:
        raise ValueError(f"pass {cls.name!r} registered twice")
    PASSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class StepReport:
    name: str
    changed: bool
    seconds: float
    ops_after: int


def run_passes(graph: Graph, names: list[str], *, check: bool = True,
               on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """Run the named passes in order, verifying the IR after each; returns per-step reports."""
    _load()
    reports = []
    for name in names:
        t0 = time.perf_counter()
        changed = bool(PASSES[name]()(graph))
        if check:
            verify(graph)
        rep = StepReport(name, changed, time.perf_counter() - t0, len(graph))
        reports.append(rep)
        if on_step:
            on_step(rep)
    return reports


def run_pipeline(graph: Graph, pipeline: str = "fuse", **kwargs) -> list[StepReport]:
    """Run one of :data:`PIPELINES` by name."""
    return run_passes(graph, PIPELINES[pipeline], **kwargs)


PIPELINES: dict[str, list[str]] = {
    "canonicalize": ["fold-constants", "eliminate-no-ops", "dead-code"],
    "fuse": [
        "fold-constants", "eliminate-no-ops", "dead-code", "fold-position-tables", "dead-code",
        "fuse-linear", "fuse-rmsnorm", "fuse-layernorm", "fuse-gelu", "fuse-silu",
        "fuse-rope", "fuse-attention", "fuse-mask", "fuse-mlp", "dead-code",
    ],
}


def _load() -> None:
    from . import canonical, fuse  # noqa: F401  (registration side effect)
