"""The ``tapeout`` command line."""
from __future__ import annotations

import argparse
import sys
import traceback

from . import __version__
from .progress import Progress

EPILOG = """\
commands:
  inspect   what is in an ONNX model: op histogram, recognised transformer structure,
            parameter count, and every op tapeout cannot handle (all at once)
  compile   compile a model into an output folder (graph summary, manifest.json)

examples:
  tapeout inspect model.onnx
  tapeout inspect model.onnx --seq-len 32 --json
  tapeout compile model.onnx -o out/

Bad input (missing or corrupt files, unsupported ops, unbound dimensions) gives one line
on stderr and exit code 2; add --debug for the traceback.
"""


def _add_binding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dynamic dimensions (only needed when the model has them)")
    g.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    g.add_argument("--seq-len", type=int, metavar="N", help="tokens per step (the sequence dimension)")
    g.add_argument("--past-len", type=int, metavar="N", help="cached tokens (past key/value length)")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="bind a named dimension, e.g. --dim s0=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapeout", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a trained Transformer (ONNX) into hardware.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tapeout {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="show the ops and transformer structure of an ONNX model",
                       description="Import MODEL, fuse it to transformer-level ops and print what "
                                   "tapeout recognises: layers, heads, dims, parameters, op histogram "
                                   "and every unsupported op with its node name.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ops", action="store_true", help="also list every fused op")
    _add_binding_options(p)

    p = sub.add_parser("compile", help="compile a model into an output folder",
                       description="Import, canonicalise and fuse MODEL, then write OUT/ with "
                                   "graph.json, graph.txt, report.txt and manifest.json (sha256 "
                                   "of every artifact). The folder appears complete or not at all.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (replaced if it "
                   "is an earlier tapeout output)")
    _add_binding_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from tapeout.compiler.errors import TapeoutError
    progress = Progress()
    try:
        from . import commands
        return getattr(commands, f"cmd_{args.command}")(args, progress)
    except TapeoutError as e:
        progress.abort()
        if args.debug:
            traceback.print_exc()
        print(f"tapeout: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        progress.abort()
        print("tapeout: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line unless --debug
        progress.abort()
        if args.debug:
            traceback.print_exc()
        else:
            print(f"tapeout: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                  "traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
