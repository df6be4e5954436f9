"""Implementations of the CLI commands (imported lazily by tapeout.cli)."""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
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
        print(f"tapeout: error: {UnsupportedOps(args.model, problems)}", file=sys.stderr)
        return 2
    return 0


def cmd_compile(args: argparse.Namespace, progress: Progress) -> int:
    binding = binding_from_args(args)
    model = Path(args.model)
    if args.target == "systolic":
        from tapeout.backends.systolic.machine import Machine
        machine = Machine.from_options(args.machine)     # bad options fail before any work
    if args.target == "dataflow":
        from tapeout.backends.dataflow.machine import Machine as DataflowMachine
        machine = DataflowMachine.from_options(args.machine)
    if args.machine and args.target not in ("systolic", "dataflow"):
        raise TapeoutError("--machine applies to --target systolic and --target dataflow")
    if args.target in ("maskrom", "systolic", "dataflow"):
        if not args.format:
            raise TapeoutError(f"--target {args.target} needs --format (w3o6, nvfp4, mxfp4, int4, int8)")
        args.quantize_head = True        # one chip, one family: the LM head in the chip's format
        graph, qm, config, stats = _quantized(args, progress)
        reports = []
    else:
        graph, _ = import_graph(model, binding, step=progress.step)
        reports = fuse(graph, step=progress.step)
    summary = recognise(graph)
    with OutputFolder(args.out) as out:
        out.write_json("graph.json", summary)
        out.write_text("graph.txt", render_summary(summary, list_ops=True) + "\n")
        if reports:
            out.write_text("passes.txt", "".join(f"{r.name:20s} changed={str(r.changed):5s} ops={r.ops_after}\n"
                                                 for r in reports))
        options = {"batch": binding.batch, "seq_len": binding.seq_len, "past_len": binding.past_len,
                   "dims": dict(sorted(binding.dims.items())), "target": args.target}
        headline = summary["structure"]["headline"]
        if args.target == "maskrom":
            from tapeout.backends.maskrom.compile import compile_maskrom
            tiles = _tile_list(args.gds_tiles)
            report = compile_maskrom(qm, summary, out, base_name=args.base, context=args.context,
                                     gds_tiles=tiles, verify=args.verify, step=progress.step)
            report["quantization"] = {k: v for k, v in qm.report().items() if k != "tensors"}
            out.write_json("quant_report.json", qm.report())
            out.write_json("report.json", report)
            options.update(format=config.fmt, group=args.group, outlier_frac=args.outlier_frac,
                           gptq=args.gptq, rtn=args.rtn, base=args.base, context=args.context,
                           gds_tiles=args.gds_tiles, verify=args.verify)
            headline = (f"{report['base']} ({report['tiles_used']} of {report['tiles']} tiles), "
                        f"{report['vias']['V_CODE']} V_CODE + {report['vias']['V_FINE']} V_FINE vias, "
                        f"LVS {report['lvs']['values_compared']} values equal, fabric == golden "
                        f"({report['fabric_vs_golden']['mode']}) on {report['fabric_vs_golden']['values_checked']} outputs")
        if args.target == "systolic":
            from tapeout.backends.systolic.compile import compile_systolic
            report = compile_systolic(qm.golden(), out, machine, verify=args.verify != "none", step=progress.step)
            options.update(_requantize_options(args, config, model))
            sc = report["schedule"]
            iv = report.get("isa_vs_golden")
            rate = (f"decode step {report['cycles_per_token']} cycles/token" if report["mode"] == "decode" else
                    f"prefill {report['tokens_per_run']} tokens, {report['cycles_per_token']:g} cycles/token")
            headline = (f"{report['instructions']} instructions, makespan {sc['makespan']} cycles "
                        f"({sc['ratio']:.3f}x the lower bound {sc['lower_bound']}); {rate}, "
                        f"{report['tokens_per_s']:,.0f} tokens/s at {report['machine']['clock_hz'] / 1e9:g} GHz "
                        f"(weight-DMA roofline {report['memory_roofline']['cycles']} cycles)"
                        + (f"; ISA simulator == golden on {iv['checked']} outputs" if iv else ""))
        if args.target == "dataflow":
            from tapeout.backends.dataflow.compile import compile_dataflow
            report = compile_dataflow(qm.golden(), out, machine, verify=args.verify != "none", step=progress.step)
            options.update(_requantize_options(args, config, model))
            sc = report["schedule"]
            sv = report.get("sim_vs_golden")
            headline = (f"{report['chips']} chip(s), {report['instructions']} instructions, makespan {sc['makespan']} "
                        f"cycles ({sc['ratio']:.3f}x the lower bound {sc['lower_bound']}), "
                        f"{report['tokens_per_s_per_user']:.0f} tokens/s per user"
                        + (f", simulator == golden on {sv['checked']} outputs" if sv else ""))
        with progress.step("hashing inputs and artifacts"):
            manifest = {"tool": "tapeout", "version": __version__, "command": "compile", "options": options,
                        "input": {"model": model.name, "sha256": input_hashes(model)}}
            path = out.commit(manifest)
    print(f"wrote {path}/ ({len(out.files) + 1} files): {headline}")
    return 0


def _requantize_options(args: argparse.Namespace, config, model: Path) -> dict:
    """What `simulate` needs to re-quantise the model exactly as compiled (systolic, dataflow)."""
    return dict(format=config.fmt, group=args.group, outlier_frac=args.outlier_frac, gptq=args.gptq,
                rtn=args.rtn, machine=sorted(args.machine or []), verify=args.verify,
                model_path=str(model.resolve()), group_fallback=args.group_fallback,
                calib=args.calib and str(Path(args.calib).resolve()),
                calib_tokens=args.calib_tokens and str(Path(args.calib_tokens).resolve()),
                calib_max_tokens=args.calib_max_tokens, tokenizer=args.tokenizer)


def _tile_list(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        tiles = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TapeoutError(f"--gds-tiles expects tile numbers like 0,5,17 or 'all', not {text!r}") from None
    if not tiles or min(tiles) < 0:
        raise TapeoutError(f"--gds-tiles expects non-negative tile numbers, not {text!r}")
    return tiles


# --- quantisation -----------------------------------------------------------------------------
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
        return Tokenizer.from_file(str(cand))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise TapeoutError(f"cannot load tokenizer: {e}", file=str(cand)) from None


def _read_ids(path: str) -> "np.ndarray":
    import numpy as np
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TapeoutError(f"cannot read token ids: {e}", file=path) from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TapeoutError(f"expected a 1-D integer array of token ids, got {ids.dtype}{list(ids.shape)}", file=path)
    return ids


def _text_ids(path: str, tok) -> "np.ndarray":
    import numpy as np
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TapeoutError(f"cannot read text: {e}", file=path) from None
    return np.array(tok.encode(text).ids, dtype=np.int64)


def _check_ids(ids, graph, what: str, file: str) -> None:
    vocab = graph.tensors[graph.outputs[0]].shape[-1]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise TapeoutError(f"{what} has token ids outside the model's vocabulary [0, {vocab})", file=file)


def _quantized(args: argparse.Namespace, progress: Progress):
    """Front end + calibration + quantisation shared by `quantize` and `eval`."""
    from tapeout.compiler.frontend import frontend
    from tapeout.compiler.qmodel import QuantConfig, calibrate, quantize_model, seq_len_of, windows
    config = QuantConfig(args.format, group_size=args.group, outlier_frac=args.outlier_frac,
                         gptq=args.gptq, rtn=args.rtn, quantize_head=args.quantize_head,
                         group_fallback=args.group_fallback)
    model = Path(args.model)
    graph = frontend(model, binding_from_args(args), step=progress.step)
    stats = None
    if config.needs_calibration:
        if any(str(graph.tensors[n].dtype).startswith("float") for n in graph.inputs):
            raise TapeoutError(f"{config.fmt} calibrates on prefill windows, and this is a decode export (KV-cache "
                               "inputs); compile a prefill export, or use a format without calibration "
                               "(nvfp4, mxfp4, int4, int8)", file=str(model))
        seq = seq_len_of(graph)
        if args.calib_tokens:
            ids, source = _read_ids(args.calib_tokens), args.calib_tokens
        else:
            source = args.calib or str(resources.files("tapeout.compiler") / "data" / "calib.txt")
            ids = _text_ids(source, _tokenizer(args, model, "calibration"))
        _check_ids(ids, graph, "calibration", source)
        ids = ids[: args.calib_max_tokens]
        wins = windows(ids, seq)
        if not wins:
            raise TapeoutError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq}; "
                               "give a longer --calib text", file=source)
        with progress.step(f"calibrating on {len(wins) * seq} tokens"):
            stats = calibrate(graph, wins, hessian=config.gptq)
    with progress.step(f"quantising to {config.fmt}"):
        qm = quantize_model(graph, config, stats)
    return graph, qm, config, stats


def cmd_quantize(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.compiler.quant import pack
    graph, qm, config, stats = _quantized(args, progress)
    report = qm.report()
    report["calibration_tokens"] = stats.tokens if stats else 0
    model = Path(args.model)
    with OutputFolder(args.out) as out:
        index = []
        for i, (name, qt) in enumerate(qm.weights.items()):
            rel = f"weights/{i:04d}.qt"
            out.write_bytes(rel, pack(qt))
            index.append({"file": rel, "op": name, "role": qm.roles.get(name, "other"),
                          "weight": graph.op(name).inputs[1], "format": qt.fmt, "shape": list(qt.shape)})
        out.write_json("weights/index.json", index)
        out.write_json("quant_report.json", report)
        manifest = {"tool": "tapeout", "version": __version__, "command": "quantize",
                    "options": {k: getattr(args, k) for k in ("format", "group", "group_fallback", "outlier_frac",
                                                              "gptq", "rtn", "quantize_head", "calib_max_tokens")},
                    "input": {"model": model.name, "sha256": input_hashes(model)}}
        path = out.commit(manifest)
    print(f"wrote {path}/: {len(qm.weights)} tensors in {config.fmt}, {report['bits_per_weight']:.3f} bits/weight "
          f"({report['bits_per_weight_with_head']:.3f} with the {report['head_format']} head)")
    return 0


def cmd_eval(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.compiler.evaluate import evaluate
    from tapeout.compiler.qmodel import seq_len_of
    progress.enabled = not args.json
    if args.max_tokens is not None and args.max_tokens < 2:
        raise TapeoutError(f"--max-tokens must be at least 2, not {args.max_tokens}")
    model = Path(args.model)
    if args.tokens:
        ids, source = _read_ids(args.tokens), args.tokens
    else:
        ids, source = _text_ids(args.text, _tokenizer(args, model, "--text")), args.text
    graph, qm, config, stats = _quantized(args, progress)
    _check_ids(ids, graph, "the scored text", source)
    seq = seq_len_of(graph)
    n = min(len(ids), args.max_tokens or len(ids))
    if n < seq:
        raise TapeoutError(f"{n} tokens to score, fewer than one window of the model's sequence length {seq}",
                           file=source)
    with progress.step(f"scoring {n // seq} windows of {seq} tokens ({args.path} path)"):
        result = evaluate(graph, qm, ids, seq, path=args.path, max_tokens=args.max_tokens)
    result["calibration_tokens"] = stats.tokens if stats else 0
    if args.json:
        print(dumps_json(result), end="")
    else:
        print(f"{result['format']} ({result['path']} path), {result['bits_per_weight']:.3f} bits/weight, "
              f"{result['tokens']} tokens: KLD mean {result['kld_mean']:.5f} p99 {result['kld_p99']:.4f}, "
              f"top-1 {result['top1_agree']:.3f}, ppl {result['ppl']:.3f} (float {result['ppl_ref']:.3f})")
    return 0


# --- diff -------------------------------------------------------------------------------------
def _chip_folder(arg: str, args: argparse.Namespace, progress: Progress, tmp: Path) -> Path:
    """A compile folder as it is, or an ONNX file compiled to maskrom in ``tmp``."""
    p = Path(arg)
    if p.is_dir():
        return p
    if p.suffix != ".onnx" or not p.is_file():
        raise TapeoutError("expected a `compile --target maskrom` folder or an .onnx file", file=arg)
    if not args.format:
        raise TapeoutError("diffing ONNX files compiles them: pass --format (and the other compile options)")
    out = tmp / p.stem
    ns = argparse.Namespace(**vars(args))
    ns.model, ns.out, ns.target, ns.context, ns.gds_tiles, ns.verify = str(p), str(out), "maskrom", 2048, "0", "linears"
    with progress.step(f"compiling {p.name}"):
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            cmd_compile(ns, progress)
    return out


def cmd_diff(args: argparse.Namespace, progress: Progress) -> int:
    import tempfile

    from tapeout.backends.maskrom import diff as D
    progress.enabled = not args.json
    with tempfile.TemporaryDirectory(prefix="tapeout-diff-") as tmp:
        a = D.load_chip(_chip_folder(args.a, args, progress, Path(tmp)))
        b = D.load_chip(_chip_folder(args.b, args, progress, Path(tmp)))
        with progress.step("comparing via layers"):
            r = D.diff_chips(a, b, force_shapes=args.force_shapes)
        if args.png and r["base_identical"]:
            Path(args.png).write_bytes(D.heatmap_png(r, a.base["tiles"]))
        if args.gds_xor:
            if not r["base_identical"]:
                raise TapeoutError("--gds-xor needs chips on the same base")
            try:
                tile = int(args.gds_xor[0])
            except ValueError:
                raise TapeoutError(f"--gds-xor TILE must be a tile number, not {args.gds_xor[0]!r}") from None
            r["gds_xor"] = {"tile": tile, "file": args.gds_xor[1],
                            "vias": D.gds_xor(a, b, tile, Path(args.gds_xor[1]))}
    r.pop("_tile_changes", None)
    print(dumps_json(r), end="") if args.json else print(D.render_text(r))
    changed = not r["base_identical"] or r.get("changed_vias", 0) > 0
    return 1 if args.fail_on_change and changed else 0


# --- estimate ---------------------------------------------------------------------------------
def cmd_estimate(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.backends.maskrom import estimate as E
    progress.enabled = not args.json
    ctx = args.context if args.context is not None else 2048
    if args.hf_config:
        shape = E.shape_from_hf_config(args.hf_config, context=ctx)
    else:
        graph, _ = import_graph(args.model, binding_from_args(args), step=progress.step)
        fuse(graph, step=progress.step)
        shape = E.shape_from_summary(recognise(graph), context=ctx, name=Path(args.model).stem)
    if args.target == "dataflow":
        from tapeout.backends.dataflow.estimate import estimate_dataflow, format_dataflow
        from tapeout.backends.dataflow.machine import Machine
        opts = list(args.machine or []) + ([f"clock_hz={args.clock}"] if args.clock else [])
        result = estimate_dataflow(shape, args.format, Machine.from_options(opts))
        print(dumps_json(result), end="") if args.json else print(format_dataflow(result))
        return 0
    if args.machine:
        raise TapeoutError("--machine applies to --target dataflow")
    result = E.estimate(shape, args.format, args.tech, context=ctx, clock_hz=args.clock)
    print(dumps_json(result), end="") if args.json else print(E.format_table(result))
    return 0


# --- simulate ---------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.backends.maskrom.simulate import simulate_chip
    progress.enabled = not args.json
    manifest = Path(args.out) / "manifest.json"
    target = json.loads(manifest.read_text()).get("options", {}).get("target") if manifest.exists() else None
    if target == "systolic":
        return _simulate_systolic(args, progress)
    if target == "dataflow":
        return _simulate_dataflow(args, progress)
    r = simulate_chip(args.out, args.layer, args.engine, progress=progress.step, rtl=args.rtl)
    if args.json:
        print(dumps_json(r), end="")
    else:
        for x in r["per_linear"]:
            print(f"{x['role']:24s} {x['shape'][0]:6d}x{x['shape'][1]:<6d} {x['rtl']:6s} {x['checked']:8d} checked "
                  f"{x['mismatches']:4d} mismatches {x['cycles']:6d} cycles")
        print(f"{r['engine']}: {r['linears']} linears, {r['checked']} values checked, {r['mismatches']} "
              f"mismatches, {r['cycles']} cycles, {r['seconds']} s")
    return 1 if r["mismatches"] else 0


def _simulate_systolic(args: argparse.Namespace, progress: Progress) -> int:
    """Decode OUT/program.bin, run it on the ISA simulator with OUT/sim/feeds, compare with
    OUT/sim/golden. The weights come from re-quantising the recorded model (its sha256 must
    match the manifest) with the recorded options."""
    import numpy as np

    from tapeout.backends.systolic.isa import IsaError, decode
    from tapeout.backends.systolic.isasim import run_program
    from tapeout.backends.systolic.machine import Machine
    if args.engine != "amaranth" or args.layer or args.rtl != "auto":
        raise TapeoutError("a systolic folder is simulated whole on the ISA simulator: --engine, --layer and "
                           "--rtl apply to mask-ROM chips")
    out = Path(args.out)
    feeds_dir, gold_dir = out / "sim/feeds", out / "sim/golden"
    if not gold_dir.is_dir():
        raise TapeoutError("no golden outputs in sim/ (compiled with --verify none)", file=str(out))
    qm, opt = _recompiled(args, out, progress)
    machine = Machine.from_options(opt["machine"])
    try:
        prog = decode((out / "program.bin").read_bytes())
        feeds = {p.stem: np.load(p) for p in sorted(feeds_dir.glob("*.npy"))}
        stats: dict = {}
        with progress.step(f"ISA simulator: {len(prog)} instructions"):
            got = run_program(qm.golden(), machine, prog, feeds, stats)
    except IsaError as e:
        raise TapeoutError(f"program.bin: {e}", file=str(out)) from None
    checked, mismatches = _compare_with_golden(got, gold_dir)
    r = {"engine": "isa", "checked": int(checked), "mismatches": mismatches, "cycles": stats["cycles"],
         "instructions": stats["instructions"], "per_opcode": stats["per_op"]}
    if args.json:
        print(dumps_json(r), end="")
    else:
        print(f"isa: {len(prog)} instructions, {checked} values checked, {mismatches} mismatches, "
              f"{stats['cycles']} cycles")
    return 1 if mismatches else 0


def _recompiled(args: argparse.Namespace, out: Path, progress: Progress):
    """The quantised model a compiled folder was made from: its recorded model (sha256 checked
    against the manifest) re-quantised with the recorded options."""
    man = json.loads((out / "manifest.json").read_text())
    opt = man["options"]
    model = Path(opt["model_path"])
    if not model.exists() or input_hashes(model) != man["input"]["sha256"]:
        raise TapeoutError(f"the compiled model {model} is missing or changed since compile (sha256 differs)",
                           file=str(out))
    ns = argparse.Namespace(**{**vars(args), "model": str(model), "format": opt["format"], "group": opt["group"],
                               "outlier_frac": opt["outlier_frac"], "gptq": opt["gptq"], "rtn": opt["rtn"],
                               "quantize_head": True, "seq_len": opt["seq_len"], "past_len": opt["past_len"],
                               "batch": opt["batch"], "dim": [f"{k}={v}" for k, v in opt["dims"].items()],
                               "group_fallback": opt["group_fallback"], "calib": opt["calib"],
                               "calib_tokens": opt["calib_tokens"], "calib_max_tokens": opt["calib_max_tokens"],
                               "tokenizer": opt["tokenizer"], "json": True})
    _, qm, _, _ = _quantized(ns, progress)
    return qm, opt


def _compare_with_golden(got: dict, gold_dir: Path) -> tuple[int, int]:
    """(values checked, mismatches) of a simulation's outputs against OUT/sim/golden/*.npy."""
    import numpy as np
    checked = mismatches = 0
    for p in sorted(gold_dir.glob("*.npy")):
        g = np.load(p)
        checked += g.size
        mismatches += int(np.count_nonzero(got[p.stem] != g))
    if checked == 0:
        raise TapeoutError("simulated nothing: no values were checked")
    return int(checked), mismatches


def _simulate_dataflow(args: argparse.Namespace, progress: Progress) -> int:
    """Check OUT/queues.bin statically, run it on the cycle-accurate simulator with OUT/sim/feeds
    and compare every output with OUT/sim/golden."""
    import numpy as np

    from tapeout.backends.dataflow.check import check
    from tapeout.backends.dataflow.isa import QueueError, decode
    from tapeout.backends.dataflow.machine import Machine
    from tapeout.backends.dataflow.sim import run_queues
    if args.engine != "amaranth" or args.layer or args.rtl != "auto":
        raise TapeoutError("a dataflow folder is simulated whole on the cycle-accurate simulator: --engine, "
                           "--layer and --rtl apply to mask-ROM chips")
    out = Path(args.out)
    gold_dir = out / "sim/golden"
    if not gold_dir.is_dir():
        raise TapeoutError("no golden outputs in sim/ (compiled with --verify none)", file=str(out))
    qm, opt = _recompiled(args, out, progress)
    machine = Machine.from_options(opt["machine"])
    report = json.loads((out / "report.json").read_text())
    try:
        queues = decode((out / "queues.bin").read_bytes())
        memmap = json.loads((out / "memory.json").read_text())["copies"]
        with progress.step(f"checker: {sum(len(q) for q in queues.values())} instructions"):
            proof = check(machine, queues, memmap)
        feeds = {p.stem: np.load(p) for p in sorted((out / "sim/feeds").glob("*.npy"))}
        stats: dict = {}
        with progress.step("cycle-accurate simulator"):
            got = run_queues(qm.golden(), machine, queues, memmap, feeds, stats)
    except QueueError as e:
        raise TapeoutError(f"queues.bin: {e}", file=str(out)) from None
    checked, mismatches = _compare_with_golden(got, gold_dir)
    sc = report["schedule"]
    r = {"engine": "dataflow", "checked": int(checked), "mismatches": mismatches, "cycles": stats["cycles"],
         "makespan": sc["makespan"], "lower_bound_cycles": sc["lower_bound"],
         "critical_path": sc["critical_path"], "resource_bound": sc["resource_bound"],
         "instructions": stats["instructions"], "chips": report["chips"], "checker": proof}
    if args.json:
        print(dumps_json(r), end="")
    else:
        print(f"dataflow: {r['instructions']} instructions on {r['chips']} chip(s), checker proved "
              f"{proof['transfers']} stream transfers, {checked} values checked, {mismatches} mismatches, "
              f"{r['cycles']} cycles (makespan {sc['makespan']}, lower bound {sc['lower_bound']})")
    return 1 if mismatches or stats["cycles"] != sc["makespan"] else 0

