"""Implementations of the CLI commands (imported lazily by tapeout.cli)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tapeout import __version__
from tapeout.compiler.errors import TapeoutError, UnsupportedOps
from tapeout.compiler.frontend import fuse, import_graph
from tapeout.compiler.structure import recognise, render_summary
from tapeout.driver import (binding_from_args, check_ids, compile_model, load_program, open_folder, quant_options,
                            quantized, read_ids, text_ids_for)
from tapeout.output import OutputFolder, dumps_json, input_hashes, sha256_file, write_file_atomic
from tapeout.progress import Progress


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
    path, files, headline = compile_model(args, progress)
    print(f"wrote {path}/ ({files} files): {headline}")
    return 0


def _quantized(args: argparse.Namespace, progress: Progress):
    graph, qm, stats, _ = quantized(args, progress)
    return graph, qm, qm.config, stats


def cmd_quantize(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.compiler.quant import pack
    graph, qm, stats, calib = quantized(args, progress)
    config = qm.config
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
                    "options": {**quant_options(config, args), "calibration": calib},
                    "input": {"model": model.name, "sha256": input_hashes(model)}}
        path = out.commit(manifest)
    print(f"wrote {path}/: {len(qm.weights)} tensors in {config.fmt}, {report['bits_per_weight']:.3f} bits/weight "
          f"({report['bits_per_weight_with_head']:.3f} with the {report['head_format']} head)")
    return 0


def cmd_adapt(args: argparse.Namespace, progress: Progress) -> int:
    """A LoRA adapter for a compiled chip as an SRAM image (backends/maskrom/adapter.py)."""
    from tapeout.backends.maskrom import adapter as A
    from tapeout.compiler.bind import Binding
    from tapeout.driver import front_end
    chip = Path(args.chip)
    with progress.step("reading the chip (program, via layers)"):
        man, prog, roles, shapes = A.chip_linears(chip)
    meta = {"chip": chip.name, "chip_manifest_sha256": man["manifest_sha256"]}
    if args.adapter is not None:
        if args.rank is not None or args.targets is not None or args.calib or args.calib_tokens or args.plain_svd \
                or args.tokenizer:
            raise TapeoutError("--rank, --targets, --calib, --tokenizer and --plain-svd apply to --finetuned; a PEFT "
                               "adapter brings its own ranks and modules")
        with progress.step(f"reading the PEFT adapter {args.adapter}"):
            linears, rows, cfg = A.from_peft(args.adapter, roles, shapes)
        src = Path(args.adapter)
        meta.update(source="peft", base_model=cfg.get("base_model_name_or_path"), lora_alpha=cfg.get("lora_alpha"))
        inputs = {"adapter": src.name, "sha256": {n: sha256_file(src / n) for n in
                                                  ("adapter_config.json", "adapter_model.safetensors")}}
    else:
        rank = 8 if args.rank is None else args.rank
        if rank < 1:
            raise TapeoutError(f"--rank must be >= 1, not {rank}")
        ft = Path(args.finetuned)
        o = man["options"]
        binding = Binding(batch=o.get("batch") or 1, seq_len=o.get("seq_len"), past_len=o.get("past_len"),
                          dims=dict(o.get("dims") or {}))
        graph, _ = front_end(ft, binding, progress)
        stats, calib = None, None
        if not args.plain_svd:
            stats, calib = _adapt_calibration(args, chip, ft, graph, progress)
        what = "SVD" if stats is None else "output-weighted SVD"
        with progress.step(f"rank-{rank} {what} of (fine-tuned - ROM) per linear"):
            linears, rows = A.from_finetuned(prog, graph, roles, shapes, rank, args.targets, stats=stats)
        meta.update(source="finetuned", finetuned=ft.name, rank=rank, targets=args.targets or "all",
                    weighted=stats is not None, calibration=calib)
        inputs = {"model": ft.name, "sha256": input_hashes(ft)}
    with OutputFolder(args.out) as out:
        rep = A.write(out, linears, rows, meta, prog.config.act_bits)
        manifest = {"tool": "tapeout", "version": __version__, "command": "adapt",
                    "options": {"target": "maskrom", "chip_manifest_sha256": man["manifest_sha256"],
                                "source": meta["source"], "rank": meta.get("rank"), "targets": meta.get("targets"),
                                "weighted": meta.get("weighted"), "calibration": meta.get("calibration")},
                    "input": inputs}
        path = out.commit(manifest)
    print(f"wrote {path}/: {rep['linears']} linears, ranks {', '.join(map(str, rep['ranks']))}, "
          f"SRAM {rep['sram_bytes']:,} bytes ({rep['bits_per_adapted_weight']} bits per adapted ROM weight); "
          "via layers unchanged")
    return 0


def _adapt_calibration(args: argparse.Namespace, chip: Path, ft: Path, graph, progress: Progress):
    """Hessians of the fine-tuned model's linear inputs on the calibration text (for the
    output-weighted SVD of `adapt --finetuned`) and a record of the text."""
    from importlib import resources

    from tokenizers import Tokenizer

    from tapeout.compiler.qmodel import calibrate, seq_len_of, windows
    from tapeout.driver import text_ids
    from tapeout.output import sha256_file
    if args.calib_max_tokens < 1:
        raise TapeoutError(f"--calib-max-tokens must be >= 1, not {args.calib_max_tokens}")
    if args.calib_tokens:
        if args.calib:
            raise TapeoutError("--calib and --calib-tokens are two calibration sources: give one")
        source = args.calib_tokens
        ids = read_ids(source)
    else:
        cands = [Path(args.tokenizer)] if args.tokenizer else [chip / "tokenizer.json", ft.parent / "tokenizer.json"]
        cands = [c / "tokenizer.json" if c.is_dir() else c for c in cands]
        tok_path = next((c for c in cands if c.is_file()), None)
        if tok_path is None:
            raise TapeoutError("the output-weighted SVD calibrates on text and needs a tokenizer: pass --tokenizer "
                               "tokenizer.json, --calib-tokens IDS.npy or --plain-svd", file=str(args.tokenizer or chip))
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise TapeoutError(f"cannot load tokenizer: {e}", file=str(tok_path)) from None
        source = args.calib or str(resources.files("tapeout.compiler") / "data" / "calib.txt")
        ids = text_ids(source, tok)
    check_ids(ids, graph, "calibration", source)
    ids = ids[: args.calib_max_tokens]
    seq = seq_len_of(graph)
    wins = windows(ids, seq)
    if not wins:
        raise TapeoutError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq}", file=source)
    with progress.step(f"calibrating the fine-tuned model on {len(wins) * seq} tokens"):
        stats = calibrate(graph, wins, hessian=True)
    builtin = not (args.calib or args.calib_tokens)
    return stats, {"file": "(built-in calib.txt)" if builtin else Path(source).name,
                   "sha256": sha256_file(Path(source)), "tokens": len(wins) * seq}


def cmd_eval(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.compiler.evaluate import evaluate
    from tapeout.compiler.qmodel import seq_len_of
    progress.enabled = not args.json
    if args.max_tokens is not None and args.max_tokens < 2:
        raise TapeoutError(f"--max-tokens must be at least 2, not {args.max_tokens}")
    model = Path(args.model)
    if args.tokens:
        ids, source = read_ids(args.tokens), args.tokens
    else:
        ids, source = text_ids_for(args, model, args.text, "--text"), args.text
    graph, qm, config, stats = _quantized(args, progress)
    check_ids(ids, graph, "the scored text", source)
    seq = seq_len_of(graph)
    n = min(len(ids), args.max_tokens or len(ids))
    if n < seq:
        raise TapeoutError(f"{n} tokens to score, fewer than one window of the model's sequence length {seq}",
                           file=source)
    with progress.step(f"scoring {n // seq} windows of {seq} tokens ({args.path} path)"):
        result = evaluate(graph, qm, ids, seq, path=args.path, max_tokens=args.max_tokens)
    result["calibration_tokens"] = stats.tokens if stats else 0
    if args.per_layer:
        from tapeout.compiler.evaluate import per_layer
        start = time.perf_counter()

        def tick(i: int, total: int) -> None:      # a line per layer once scoring is slow
            if progress.enabled and time.perf_counter() - start > progress.delay:
                print(f"[tapeout] per-layer scoring: {i}/{total}", file=sys.stderr, flush=True)
        with progress.step("scoring one layer at a time"):
            result["per_layer"] = per_layer(graph, qm, ids, seq, max_tokens=args.max_tokens, progress=tick)
    if args.json:
        print(dumps_json(result), end="")
        return 0
    print(f"{result['format']} ({result['path']} path), {result['bits_per_weight']:.3f} bits/weight "
          f"({result['bits_per_weight_with_head']:.3f} with the LM head), {result['tokens']} tokens: "
          f"KLD mean {result['kld_mean']:.5f} p99 {result['kld_p99']:.4f}, top-1 {result['top1_agree']:.3f}, "
          f"ppl {result['ppl']:.3f} (float {result['ppl_ref']:.3f})")
    if args.per_layer:
        rows = result["per_layer"]
        print(f"\nonly one layer quantised (float path); share = KLD / sum over the layers\n"
              f"{'layer':16s} {'linears':>7s} {'weights':>9s} {'bits/w':>7s} {'KLD mean':>9s} "
              f"{'p99':>7s} {'top-1':>6s} {'share':>6s}")
        layers = [r for r in rows if not r["layer"].startswith("all ")]
        total = sum(r["kld_mean"] for r in layers) or 1.0
        for i, r in enumerate(rows):
            if i == len(layers):
                print()                                  # then the roles across all layers
            print(f"{r['layer']:16s} {r['linears']:7d} {r['weights']:9d} {r['bits_per_weight']:7.3f} "
                  f"{r['kld_mean']:9.5f} {r['kld_p99']:7.4f} {r['top1_agree']:6.3f} "
                  f"{r['kld_mean'] / total:6.1%}")
        print(f"sum over the layers {total:.5f} (all quantised together: {result['kld_mean']:.5f})")
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
    adapter = _adapter_of(args.a, args.b)
    kinds = [_folder_target(x) for x in (args.a, args.b)]
    if "maskrom" not in kinds and None not in kinds:
        return _diff_programs(args, progress)
    with tempfile.TemporaryDirectory(prefix="tapeout-diff-") as tmp:
        a = D.load_chip(_chip_folder(args.a, args, progress, Path(tmp)))
        # an adapted chip is its chip's via layers plus SRAM data: its layers are the chip's own
        b = a if adapter is not None else D.load_chip(_chip_folder(args.b, args, progress, Path(tmp)))
        with progress.step("comparing via layers"):
            r = D.diff_chips(a, b, force_shapes=args.force_shapes)
        if adapter is not None:
            r["adapter"] = adapter
        if args.png and r["base_identical"]:
            png = D.heatmap_png(r, a.base["tiles"])
            write_file_atomic(args.png, lambda t: t.write_bytes(png))
        if args.gds_xor:
            if not r["base_identical"]:
                raise TapeoutError("--gds-xor needs chips on the same base")
            try:
                tile = int(args.gds_xor[0])
            except ValueError:
                raise TapeoutError(f"--gds-xor TILE must be a tile number, not {args.gds_xor[0]!r}") from None
            r["gds_xor"] = {"tile": tile, "file": args.gds_xor[1],
                            "vias": write_file_atomic(args.gds_xor[1], lambda t: D.gds_xor(a, b, tile, t))}
    r.pop("_tile_changes", None)
    text = None if args.json else D.render_text(r)
    if adapter is not None and text is not None:
        text += (f"\n\nB is an adapter of A ({adapter['source']}): {adapter['linears']} linears, ranks "
                 f"{', '.join(map(str, adapter['ranks']))}, {adapter['sram_bytes']:,} SRAM bytes; "
                 "the via layers are A's (no new metal)")
    print(dumps_json(r), end="") if args.json else print(text)
    changed = not r["base_identical"] or r.get("changed_vias", 0) > 0
    return 1 if args.fail_on_change and changed else 0


def _adapter_of(a: str, b: str) -> dict | None:
    """When ``b`` is a `tapeout adapt` folder: its SRAM summary, after checking it was made for
    chip ``a`` (None when ``b`` is no adapter)."""
    pb = Path(b)
    if not (pb / "manifest.json").is_file():
        return None
    man_b, _ = open_folder(pb)
    if man_b.get("command") != "adapt":
        if (Path(a) / "manifest.json").is_file() and open_folder(Path(a))[0].get("command") == "adapt":
            raise TapeoutError("diff a chip against its adapter as `tapeout diff CHIP ADAPTER`", file=a)
        return None
    pa = Path(a)
    if not (pa / "manifest.json").is_file():
        raise TapeoutError("an adapter is diffed against the chip it was made for (a compile folder)", file=a)
    man_a, _ = open_folder(pa)
    if man_a.get("manifest_sha256") != man_b["options"].get("chip_manifest_sha256"):
        raise TapeoutError("this adapter was made for another chip (chip_manifest_sha256 differs); diff it "
                           "against that chip", file=b)
    try:
        rep = json.loads((pb / "report.json").read_text(encoding="utf-8"))
        return {"source": rep["source"], "linears": int(rep["linears"]), "ranks": list(rep["ranks"]),
                "sram_bytes": int(rep["sram_bytes"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TapeoutError(f"unreadable report.json: {type(e).__name__}: {e}", file=b) from None


def _folder_target(arg: str) -> str | None:
    """The target of a compile folder (None for an ONNX file or a folder without a manifest)."""
    p = Path(arg)
    if not (p / "manifest.json").is_file():
        return None
    man, target = open_folder(p)
    return target.name


def _diff_programs(args: argparse.Namespace, progress: Progress) -> int:
    """Two systolic/dataflow (or one of each, or --target none... with a program) folders: the
    model-level diff of their integer programs (hash-checked, read from the folders only)."""
    from tapeout.compiler.program import diff_programs, render_program_diff
    for x in (args.a, args.b):
        open_folder(x)
        if not (Path(x) / "program" / "program.json").is_file():
            raise TapeoutError("has no integer program (a --target none folder); compile with --target", file=x)
    if args.png or args.gds_xor:
        raise TapeoutError("--png and --gds-xor need mask-ROM folders (via layers); these are integer programs")
    with progress.step("comparing the integer programs"):
        r = diff_programs(load_program(args.a), load_program(args.b))
    print(dumps_json(r), end="") if args.json else print(render_program_diff(r))
    changed = not r["same_ops"] or r["codes_changed"] > 0 or bool(r["constants_changed"]) or not r["same_shapes"]
    return 1 if args.fail_on_change and changed else 0


# --- estimate ---------------------------------------------------------------------------------
def cmd_estimate(args: argparse.Namespace, progress: Progress) -> int:
    from tapeout.backends.maskrom import estimate as E
    progress.enabled = not args.json
    ctx = args.context if args.context is not None else 2048
    if args.clock is not None and not (math.isfinite(args.clock) and args.clock > 0):
        raise TapeoutError(f"--clock must be a positive frequency in Hz, not {args.clock}")
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
    arch = _arch_options(args.arch or [])
    if args.lora_targets is not None and args.lora_rank is None:
        raise TapeoutError("--lora-targets needs --lora-rank")
    targets = [t.strip() for t in (args.lora_targets or "q_proj,k_proj,v_proj,o_proj").split(",") if t.strip()]

    def lora(result) -> str:
        if args.lora_rank is None:
            return ""
        E.add_lora(result, shape, args.lora_rank, targets, args.tech, args.clock)
        return "\n" + "\n".join(E.lora_lines(result))
    if args.fabric == "parallel":
        if args.compare:
            raise TapeoutError("--compare applies to the row-serial fabric (--fabric rowserial)")
        result = E.estimate(shape, args.format, args.tech, context=ctx, clock_hz=args.clock, arch=arch)
        tail = lora(result)
        print(dumps_json(result), end="") if args.json else print(E.format_table(result) + tail)
        return 0
    from tapeout.backends.maskrom import rowchip
    result = rowchip.estimate_rowserial(shape, args.format, args.tech, context=ctx, clock_hz=args.clock, arch=arch)
    if args.compare:
        result["compare"] = rowchip.compare(result, args.compare)
    tail = lora(result)
    print(dumps_json(result), end="") if args.json else print(rowchip.format_rowserial(result) + tail)
    return 0


def _arch_options(items: list[str]) -> dict[str, int]:
    """--arch KEY=VALUE pairs (integer values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise TapeoutError(f"--arch takes KEY=INTEGER, not {item!r}") from None
        if not sep or not key.strip():
            raise TapeoutError(f"--arch takes KEY=INTEGER, not {item!r}")
    return out


# --- simulate ---------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace, progress: Progress) -> int:
    """Re-check a compile folder from its own files: the manifest names the target, the hashes
    prove the files are the compiled ones, the program and the target's artifacts are the input."""
    progress.enabled = not args.json
    man, target = open_folder(args.out)
    program = load_program(args.out) if target.needs_format and target.name != "maskrom" else None
    r, code, text = target.simulate(Path(args.out), program, man["options"], args, progress.step)
    print(dumps_json(r), end="") if args.json else print(text)
    return code


# --- run --------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, progress: Progress) -> int:
    """Generate tokens on a compiled mask-ROM chip (backends/maskrom/chipmodel.py)."""
    import numpy as np
    from tapeout.backends.maskrom import chipmodel as cm
    progress.enabled = not args.json
    folder = Path(args.out)
    with progress.step("reading the chip (program, via layers, sequencer)"):
        man, prog, layers, plan, seq = cm.load_chip(folder)
    adapter = None
    if args.adapter is not None:
        from tapeout.backends.maskrom import adapter as A
        adapter = A.load(args.adapter, man, prog)
    tok = None
    if args.prompt is not None or (folder / "tokenizer.json").is_file() or args.tokenizer:
        tok = _run_tokenizer(args, folder, required=args.prompt is not None)
    if args.prompt is not None:
        prompt = np.array(tok.encode(args.prompt).ids, np.int64)
    else:
        prompt = read_ids(args.tokens)
    vocab = prog.interface.vocab
    cm.check_prompt(prompt, args.new_tokens, vocab, seq.context)
    n = args.new_tokens
    if args.engine == "golden":
        with progress.step(f"golden: {n} tokens, one window of {seq.seq_len} positions each"):
            gen = cm.golden_generate(prog, prompt, n, context=seq.context, adapter=adapter)
        extra = sum(f.cycles for f in (adapter or {}).values())
        gen.cycles = [seq.cycles_at(len(prompt) - 1 + i) + extra for i in range(n)]
    elif args.engine == "verilator":
        from tapeout.backends.maskrom import chiprtl
        from tapeout.hdl.chip import ChipTop, run_tokens_verilator
        from tapeout.hdl.sim import verilator_available
        ok, why = verilator_available()
        if not ok:
            raise TapeoutError(f"--engine verilator: {why}")
        chiprtl.check_size(layers, plan)
        with progress.step("the whole chip's RTL (hdl/chip.py) from the via layers and the program"):
            top = ChipTop(chiprtl.build_spec(prog, layers, plan, seq, adapter))
        stats: dict = {}
        with progress.step(f"Verilator: build (cached by hash) and {len(prompt)} prompt + {n} new tokens"):
            import time as _time
            t0 = _time.perf_counter()
            toks, cycles = run_tokens_verilator(top, prompt, n, stats=stats) if n else ([], [])
            gen = cm.Generation(toks, [int(t) for t in prompt], "verilator",
                                cycles=cycles[len(prompt) - 1:] if cycles else [], seconds=_time.perf_counter() - t0)
    else:
        with progress.step(f"building the chip model ({len(layers.names)} linears' word-line images)"):
            chip = cm.ChipModel(prog, layers, plan, seq, adapter=adapter)
        with progress.step(f"chip model: {len(prompt)} prompt + {n} new tokens"):
            gen = chip.generate(prompt, n)
    clock = float(man.get("options", {}).get("clock_hz") or 1e9)
    mean = sum(gen.cycles) / len(gen.cycles) if gen.cycles else 0.0
    r = {"engine": args.engine, "chip": str(folder), "prompt": [int(t) for t in prompt], "tokens": gen.tokens,
         "cycles": gen.cycles, "cycles_per_token": mean, "clock_hz": clock,
         "tokens_per_s": clock / mean if mean else None, "context": seq.context, "seconds": round(gen.seconds, 3)}
    if adapter is not None:
        r["adapter"] = {"folder": str(args.adapter), "linears": len(adapter),
                        "lora_cycles_per_token": sum(f.cycles for f in adapter.values())}
    if tok is not None:
        r["text"] = tok.decode(gen.tokens)
        r["prompt_text"] = tok.decode(r["prompt"])
    if args.json:
        print(dumps_json(r), end="")
        return 0
    what = {"golden": "golden (integer reference, one window per token)",
            "chip": "chip (cycle model: via-layer row images, vector unit, KV cache)",
            "verilator": "verilator (the whole chip's RTL: sequencer, vector units, attention, KV cache, "
                         "row-serial linears)"}[args.engine]
    lines = [f"chip      {folder}  ({man['options'].get('format')}, {len(seq.attention)} layers, context {seq.context}, "
             f"{len(seq.instrs)} sequencer instructions)",
             f"engine    {what}",
             *([f"adapter   {args.adapter}: {len(adapter)} linears in SRAM, +{r['adapter']['lora_cycles_per_token']:,} "
                f"LoRA-unit cycles per token"] if adapter is not None else []),
             f"prompt    {len(prompt)} tokens" + (f": {r['prompt_text']!r}" if tok is not None else f": {r['prompt']}"),
             f"tokens    {gen.tokens}"]
    if tok is not None:
        lines.append(f"text      {r['text']!r}")
    if gen.cycles:
        lines.append(f"cycles    {mean:,.0f} per token (positions {len(prompt) - 1}..{len(prompt) + n - 2}: "
                     f"{min(gen.cycles):,}..{max(gen.cycles):,}), {clock / mean:,.0f} tokens/s at {clock / 1e9:g} GHz")
    lines.append(f"time      {gen.seconds:.2f} s on this machine")
    print("\n".join(lines))
    return 0


def _run_tokenizer(args: argparse.Namespace, folder: Path, required: bool):
    from tokenizers import Tokenizer
    cand = Path(args.tokenizer) if args.tokenizer else folder / "tokenizer.json"
    if cand.is_dir():
        cand = cand / "tokenizer.json"
    if not cand.is_file():
        if not required:
            return None
        raise TapeoutError("--prompt needs a tokenizer: the chip folder has no tokenizer.json (compile with "
                           "--tokenizer, or pass --tokenizer here, or give --tokens IDS.npy)", file=str(cand))
    try:
        return Tokenizer.from_file(str(cand))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise TapeoutError(f"cannot load tokenizer: {e}", file=str(cand)) from None
