"""The interface every compile target implements, and the registry the CLI reads.

A target is a small object with

* ``options(args) -> dict``: parse and check the target's own options before any work (a bad
  ``--machine`` or ``--gds-tiles`` fails here); the dict is what the manifest records;
* ``preflight(graph, summary, fmt, opts)``: checks that need the fused graph but not the
  quantised weights (the base die fits, the GDS tiles exist), run before quantisation;
* ``compile(program, out, opts, step) -> (report, headline)``: write the target's artifacts
  into ``out`` (an OutputFolder owned by the compile driver);
* ``simulate(folder, program, opts, args, step) -> (result, exit code, text)``: re-check a
  compile folder from its own files only.

``get(name)`` imports the target's module on first use (the CLI stays fast to start).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from tapeout.compiler.errors import TapeoutError

# target name -> module defining TARGET
REGISTRY = {
    "none": "tapeout.backends.target",
    "maskrom": "tapeout.backends.maskrom.target",
    "systolic": "tapeout.backends.systolic.target",
    "dataflow": "tapeout.backends.dataflow.target",
}


class Target:
    """Defaults: no options, no preflight; subclasses override what they need."""

    name = "none"
    needs_format = False        # compiles a quantised integer program (--format required)
    takes_machine = False       # accepts --machine KEY=VALUE

    def options(self, args) -> dict:
        return {}

    def preflight(self, graph, summary: dict, fmt: str, opts: dict) -> None:
        return None

    def quant_config(self, config):
        """The quantisation the target's hardware can hold (default: as asked)."""
        return config

    def compile(self, program, out, opts: dict, step) -> tuple[dict, str]:
        raise NotImplementedError

    def simulate(self, folder, program, opts: dict, args, step) -> tuple[dict, int, str]:
        raise TapeoutError("a --target none folder has no hardware to simulate", file=str(folder))


TARGET = Target()


def get(name: str) -> Target:
    if name not in REGISTRY:
        raise TapeoutError(f"unknown target {name!r}; one of {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).TARGET


def parse_machine(cls, items: list[str] | None, *, strings: tuple[str, ...] = (),
                  floats: tuple[str, ...] = ("clock_hz",)) -> Any:
    """A machine dataclass from ``--machine KEY=VALUE`` items (ints unless named in ``floats``
    or ``strings``); one actionable line for an unknown key or a non-number."""
    kw: dict = {}
    fields = [f.name for f in dataclasses.fields(cls)]
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or key not in fields:
            raise TapeoutError(f"--machine expects KEY=VALUE with KEY one of {', '.join(sorted(fields))}, "
                               f"not {item!r}")
        try:
            kw[key] = val if key in strings else float(val) if key in floats else int(val)
        except ValueError:
            raise TapeoutError(f"--machine {key}: {val!r} is not a number") from None
    return cls(**kw)
