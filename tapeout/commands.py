"""Implementations of the CLI commands (imported lazily by tapeout.cli)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tapeout import __version__
from tapeout.compiler.bind import Binding
from tapeout.compiler.errors import TapeoutError, UnsupportedOps
from tapeout.compiler.frontend import fuse, import_graph
from tapeout.compiler.structure import recognise, render_summary
from tapeout.output import OutputFolder, dumps_json, input_hashes
from tapeout.progress import Progress


def binding_from_args(args: argparse.Namespace) -> Binding:
    dims = {}
    for item in args.dim:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise TapeoutError(f"--dim expects NAME=N, not {item!r}")
        dims[name.strip()] = int(value)
    for opt in ("batch", "seq_len", "past_len"):
        v = getattr(args, opt)
        if v is not None and v < (0 if opt == "past_len" else 1):
            raise TapeoutError(f"--{opt.replace('_', '-')} must be {'>= 0' if opt == 'past_len' else '>= 1'}, not {v}")
    return Binding(batch=args.batch, seq_len=args.seq_len, past_len=args.past_len, dims=dims)


def cmd_inspect(args: argparse.Namespace, progress: Progress) -> int:
    progress.enabled = not args.json
    graph, problems = import_graph(args.model, binding_from_args(args), step=progress.step, strict=False)
    if not problems:
        fuse(graph, step=progress.step)
    summary = recognise(graph)
    summary["unsupported"] = [{"node": n, "op": o, "why": w} for n, o, w in problems]
    if args.json:
        print(dumps_json(summary), end="")
    else:
        print(render_summary(summary, list_ops=args.ops))
    if problems:
        print(f"tapeout: error: {UnsupportedOps(args.model, problems)}", file=__import__("sys").stderr)
        return 2
    return 0


def cmd_compile(args: argparse.Namespace, progress: Progress) -> int:
    binding = binding_from_args(args)
    model = Path(args.model)
    graph, _ = import_graph(model, binding, step=progress.step)
    reports = fuse(graph, step=progress.step)
    summary = recognise(graph)
    with OutputFolder(args.out) as out:
        out.write_json("graph.json", summary)
        out.write_text("graph.txt", render_summary(summary, list_ops=True) + "\n")
        out.write_text("passes.txt", "".join(f"{r.name:20s} changed={str(r.changed):5s} ops={r.ops_after}\n"
                                             for r in reports))
        with progress.step("hashing inputs and artifacts"):
            manifest = {
                "tool": "tapeout", "version": __version__, "command": "compile",
                "options": {"batch": binding.batch, "seq_len": binding.seq_len,
                            "past_len": binding.past_len, "dims": dict(sorted(binding.dims.items()))},
                "input": {"model": model.name, "sha256": input_hashes(model)},
            }
            path = out.commit(manifest)
    print(f"wrote {path}/ ({len(out.files) + 1} files): {summary['structure']['headline']}")
    return 0
