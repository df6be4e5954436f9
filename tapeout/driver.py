"""The compile driver: one path from an ONNX file to a compile folder, for every target.

front end (import, bind, fuse; the pass log) -> structure -> the target's preflight checks ->
calibration and quantisation -> the integer program (built once) -> one OutputFolder that gets
graph.json, graph.txt, passes.txt, program/, quant_report.json, the target's artifacts and a
manifest recording every option that changes an artifact. ``simulate`` reads a folder back
through :func:`open_folder`: its manifest, its hashes and its program, never the source model.
"""
from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import numpy as np

from tapeout import __version__
from tapeout.backends import target as targets
from tapeout.compiler.bind import Binding
from tapeout.compiler.errors import TapeoutError
from tapeout.compiler.frontend import fuse, import_graph
from tapeout.compiler.structure import recognise, render_summary
from tapeout.output import MANIFEST, OutputFolder, input_hashes, manifest_digest, sha256_file
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


def front_end(model: Path, binding: Binding, progress: Progress):
    """Import, bind, fuse: the graph and the pass log."""
    graph, _ = import_graph(model, binding, step=progress.step)
    reports = fuse(graph, step=progress.step)
    return graph, reports


def pass_log(reports) -> str:
    return "".join(f"{r.name:20s} changed={str(r.changed):5s} ops={r.ops_after}\n" for r in reports)


# --- calibration inputs and quantisation ------------------------------------------------------------
def find_tokenizer(args: argparse.Namespace, model: Path) -> Path | None:
    """--tokenizer (a file or a folder holding tokenizer.json), else tokenizer.json beside the model."""
    cand = Path(args.tokenizer) if getattr(args, "tokenizer", None) else model.parent / "tokenizer.json"
    if cand.is_dir():
        cand = cand / "tokenizer.json"
    return cand if cand.is_file() else None


def _tokenizer(args: argparse.Namespace, model: Path, required_for: str):
    from tokenizers import Tokenizer
    cand = Path(args.tokenizer) if args.tokenizer else model.parent / "tokenizer.json"
    if cand.is_dir():
        cand = cand / "tokenizer.json"
    if not cand.is_file():
        hint = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"no tokenizer.json beside {model.name}"
        raise TapeoutError(f"{required_for} needs a tokenizer: {hint} not found; pass --tokenizer "
                           "tokenizer.json (or token ids with --calib-tokens / --tokens)", file=str(model))
    try:
        return Tokenizer.from_file(str(cand)), cand
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise TapeoutError(f"cannot load tokenizer: {e}", file=str(cand)) from None


def read_ids(path: str) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TapeoutError(f"cannot read token ids: {e}", file=path) from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TapeoutError(f"expected a 1-D integer array of token ids, got {ids.dtype}{list(ids.shape)}", file=path)
    return ids


def text_ids(path: str, tok) -> np.ndarray:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TapeoutError(f"cannot read text: {e}", file=path) from None
    return np.array(tok.encode(text).ids, dtype=np.int64)


def text_ids_for(args: argparse.Namespace, model: Path, path: str, required_for: str) -> np.ndarray:
    tok, _ = _tokenizer(args, model, required_for)
    return text_ids(path, tok)


def check_ids(ids, graph, what: str, file: str) -> None:
    vocab = graph.tensors[graph.outputs[0]].shape[-1]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise TapeoutError(f"{what} has token ids outside the model's vocabulary [0, {vocab})", file=file)


# quantisation options that only a quantising compile reads (calib_max_tokens has a default)
QUANT_OPTIONS = ("format", "group", "group_fallback", "outlier_frac", "gptq", "gptq_damp", "rtn", "quantize_head",
                 "calib", "calib_tokens")


def quant_config(args: argparse.Namespace):
    from tapeout.compiler.qmodel import QuantConfig
    if getattr(args, "calib_max_tokens", 1) < 1:
        raise TapeoutError(f"--calib-max-tokens must be a positive number of tokens, not {args.calib_max_tokens}")
    return QuantConfig(args.format, group_size=args.group, outlier_frac=args.outlier_frac, gptq=args.gptq,
                       rtn=args.rtn, quantize_head=args.quantize_head, group_fallback=args.group_fallback,
                       damp=getattr(args, "gptq_damp", None))


def quant_options(config, args: argparse.Namespace) -> dict:
    """The quantisation options a manifest records: the resolved values (defaults filled in)."""
    return {"format": config.fmt, "group": args.group, "group_fallback": args.group_fallback,
            "outlier_frac": config.outlier_frac if config.fmt == "w3o6" else None,
            "outlier_cap": config.outlier_cap if config.fmt == "w3o6" else None, "gptq": config.gptq,
            "gptq_damp": config.damp if config.gptq else None, "rtn": args.rtn,
            "quantize_head": config.quantize_head, "calib_max_tokens": args.calib_max_tokens}


def quantize(graph, args: argparse.Namespace, model: Path, progress: Progress, config=None, summary=None):
    """Calibrate (when the format needs it) and quantise ``graph``. Returns the quantised model,
    the calibration statistics and a record of the calibration inputs (for the manifest)."""
    from tapeout.compiler.program import Interface
    from tapeout.compiler.qmodel import DECODE_CALIB_STEPS, calibrate, calibrate_decode, quantize_model, windows
    config = config or quant_config(args)
    stats, calib = None, None
    if config.needs_calibration:
        itf = Interface.of(graph)
        decode = bool(itf.kv_inputs)
        seq = 1 if decode else int(graph.tensors[itf.require_tokens(graph)].shape[-1])
        if args.calib_tokens:
            ids, source = read_ids(args.calib_tokens), args.calib_tokens
            calib = {"kind": "token ids", "file": Path(source).name, "sha256": sha256_file(Path(source))}
        else:
            builtin = not args.calib
            source = args.calib or str(resources.files("tapeout.compiler") / "data" / "calib.txt")
            tok, tok_path = _tokenizer(args, model, "calibration")
            ids = text_ids(source, tok)
            calib = {"kind": "text", "file": "(built-in calib.txt)" if builtin else Path(source).name,
                     "sha256": sha256_file(Path(source)), "tokenizer_sha256": sha256_file(tok_path)}
        check_ids(ids, graph, "calibration", source)
        ids = ids[: args.calib_max_tokens]
        if decode:                      # one token per step, the KV cache fed back (qmodel.calibrate_decode)
            ids = ids[:DECODE_CALIB_STEPS]
            with progress.step(f"calibrating on {len(ids)} decode steps"):
                stats = calibrate_decode(graph, ids, hessian=config.gptq)
            calib["tokens"] = int(len(ids))
        else:
            wins = windows(ids, seq)
            if not wins:
                raise TapeoutError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq}; "
                                   "give a longer --calib text", file=source)
            with progress.step(f"calibrating on {len(wins) * seq} tokens"):
                stats = calibrate(graph, wins, hessian=config.gptq)
            calib["tokens"] = int(len(wins) * seq)
    with progress.step(f"quantising to {config.fmt}"):
        qm = quantize_model(graph, config, stats, summary=summary)
    return qm, stats, calib


def quantized(args: argparse.Namespace, progress: Progress):
    """Front end + calibration + quantisation (``quantize`` and ``eval``)."""
    model = Path(args.model)
    graph, _ = front_end(model, binding_from_args(args), progress)
    qm, stats, calib = quantize(graph, args, model, progress)
    return graph, qm, stats, calib


# --- compile --------------------------------------------------------------------------------------
def compile_model(args: argparse.Namespace, progress: Progress) -> tuple[Path, int, str]:
    """``tapeout compile``: returns (folder, files written, headline)."""
    target = targets.get(args.target)
    binding = binding_from_args(args)
    model = Path(args.model)
    if args.machine and not target.takes_machine:
        takes = [n for n in targets.REGISTRY if targets.get(n).takes_machine]
        raise TapeoutError(f"--machine applies to {' and '.join('--target ' + n for n in takes)}")
    if target.needs_format and not args.format:
        raise TapeoutError(f"--target {args.target} needs --format (w3o6, nvfp4, mxfp4, int4, int8)")
    if not target.needs_format:
        given = [f"--{k.replace('_', '-')}" for k in QUANT_OPTIONS if getattr(args, k, None) not in (None, False)]
        if given:
            raise TapeoutError(f"{given[0]} applies to a compile that quantises (--target maskrom, systolic or "
                               f"dataflow); --target {args.target} only imports and fuses the model")

    topts = target.options(args)                       # bad options fail before any work
    config = None
    if target.needs_format:
        args.quantize_head = True                      # one chip, one family: the LM head in the chip's format
        config = target.quant_config(quant_config(args))
    graph, reports = front_end(model, binding, progress)
    summary = recognise(graph)
    program = qm = calib = None
    if target.needs_format:
        target.preflight(graph, summary, config.fmt, topts)
        qm, _, calib = quantize(graph, args, model, progress, config, summary)
        with progress.step("lowering to the integer program"):
            program = qm.program(summary=summary)
        quant_report = qm.report()
        # the target works from the program alone: the float weights and the quantised tensors
        # (about 8 bytes per weight for SmolLM2) are freed before its steps
        del qm
        graph = None
    options = {"batch": binding.batch, "seq_len": binding.seq_len, "past_len": binding.past_len,
               "dims": dict(sorted(binding.dims.items())), "target": args.target}
    if config is not None:
        options.update(quant_options(config, args), calibration=calib)
    options.update(topts)
    with OutputFolder(args.out) as out:
        out.write_json("graph.json", summary)
        out.write_text("graph.txt", render_summary(summary, list_ops=True) + "\n")
        out.write_text("passes.txt", pass_log(reports))
        headline = summary["structure"]["headline"]
        if program is not None:
            with progress.step("writing the integer program (program/)"):
                program.save(out)
            out.write_json("quant_report.json", quant_report)
            _, headline = target.compile(program, out, topts, progress.step)
            if target.name == "maskrom":
                tok = find_tokenizer(args, model)
                if tok is not None:           # `tapeout run --prompt` reads it from the chip folder
                    out.write_bytes("tokenizer.json", tok.read_bytes())
        with progress.step("hashing inputs and artifacts"):
            manifest = {"tool": "tapeout", "version": __version__, "command": "compile", "options": options,
                        "input": {"model": model.name, "sha256": input_hashes(model)}}
            path = out.commit(manifest)
    return path, len(out.files) + 1, headline


# --- reading a compile folder back ----------------------------------------------------------------
def open_folder(folder: str | Path) -> tuple[dict, "targets.Target"]:
    """A compile folder's manifest and target, after checking the manifest's schema and the
    sha256 of every artifact it lists (docs/formats.md, "manifest.json"): a damaged or edited
    folder is refused, naming the first damaged file, before any command reads it."""
    folder = Path(folder)
    mp = folder / MANIFEST
    if not folder.is_dir():
        raise TapeoutError("no such compile folder", file=str(folder))
    if not mp.is_file():
        raise TapeoutError("not a compile folder: no manifest.json (compile with `tapeout compile -o`)",
                           file=str(folder))
    try:
        man = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TapeoutError(f"damaged manifest: {type(e).__name__}: {e}", file=str(mp)) from None
    problem = manifest_problem(man)
    if problem:
        raise TapeoutError(f"damaged manifest: {problem}", file=str(mp))
    for rel, meta in sorted(man["artifacts"].items()):
        p = folder / rel
        if not p.is_file():
            raise TapeoutError(f"{rel} is missing (the manifest lists it)", file=str(folder))
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise TapeoutError(f"{rel} differs from its sha256 in manifest.json: the folder is damaged "
                               "or was edited; recompile", file=str(folder))
    try:
        return man, targets.get(man["options"]["target"])
    except TapeoutError:
        raise TapeoutError(f"damaged manifest: unknown target {man['options']['target']!r}", file=str(mp)) from None


def manifest_problem(man) -> str | None:
    """What is wrong with a parsed manifest.json, or None (the schema of docs/formats.md)."""
    if not isinstance(man, dict):
        return f"expected a JSON object, found {type(man).__name__}"
    for key, kind in (("tool", str), ("version", str), ("command", str), ("options", dict), ("artifacts", dict)):
        if not isinstance(man.get(key), kind):
            return f"{key!r} must be a {kind.__name__}, found {man.get(key)!r:.60}"
    if man["tool"] != "tapeout":
        return f"'tool' is {man['tool']!r}, not 'tapeout'"
    if man.get("manifest_sha256") != manifest_digest(man):
        return ("its manifest_sha256 does not match its contents (edited or damaged; a folder from a tapeout "
                "before manifest_sha256 must be recompiled)")
    if not isinstance(man["options"].get("target"), str):
        return "options.target must be a string"
    inp = man.get("input")
    if man["command"] in ("compile", "quantize") and not (isinstance(inp, dict) and isinstance(inp.get("model"), str)
                                                          and isinstance(inp.get("sha256"), dict)):
        return f"'input' must be {{'model': name, 'sha256': {{file: hash}}}}, found {inp!r:.60}"
    for rel, meta in man["artifacts"].items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\x00" in rel or rel == MANIFEST:
            return f"artifact path {rel!r} is not a plain path inside the folder"
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or len(meta["sha256"]) != 64 \
                or not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool) or meta["bytes"] < 0:
            return f"artifact {rel!r}: expected {{'sha256': 64 hex digits, 'bytes': int}}, found {meta!r:.80}"
    return None


def load_program(folder: str | Path):
    from tapeout.compiler.program import IntegerProgram
    return IntegerProgram.load(Path(folder) / "program")
