"""The fuzz harness: seeded mutations of models, options, HF configs and compile folders, run
through every command, each outcome classified (spec: docs/fuzz.md).

Each case runs ``tapeout.cli.main(argv)`` in a forked child (the parent has imported the
package once, so a case costs its own work only) with stdout and stderr in a file and a wall
clock limit. The outcome of a case:

- ``clean``: exit 2 with exactly one ``tapeout: error:`` line (argparse's usage errors count);
- ``ok``: exit 0 on an input that may be valid (a mutation need not break a model);
- ``internal``: exit 1 with ``internal error``, any other exit code, a signal, a traceback;
- ``hang``: the case ran past its limit;
- ``accepted-invalid``: exit 0 on an input that is invalid by construction;
- ``damaged-accepted``: exit 0 on a compile folder with a damaged file;
- ``half-written``: a failed run left its output path changed or a temporary folder behind.

Cases are deterministic: the case list and every mutation come from ``random.Random(seed)``.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTCOMES = ("clean", "ok", "internal", "hang", "accepted-invalid", "damaged-accepted", "half-written")
BAD = ("internal", "hang", "accepted-invalid", "damaged-accepted", "half-written")


@dataclass
class Case:
    group: str                      # model | option | config | folder | adapter
    name: str                       # the mutation
    argv: list[str]
    invalid: bool = False           # exit 0 would be wrong
    damaged: bool = False           # a damaged compile folder: exit 0 would be wrong
    out: str | None = None          # an output path that a failure must leave as it was
    files: dict = field(default_factory=dict)   # rel path -> bytes, written in the case's folder first


@dataclass
class Result:
    case: Case
    outcome: str
    code: int
    secs: float
    line: str


# --- running one case ---------------------------------------------------------------------------
def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return ("file", path.read_bytes())
    m = path / "manifest.json"
    return ("dir", m.read_bytes() if m.is_file() else sorted(p.name for p in path.iterdir()))


def run_case(case: Case, work: Path, timeout: float) -> Result:
    """Fork, run the CLI on ``case.argv`` inside ``work`` (a fresh folder), classify."""
    job = start_case(case, work)
    while (r := poll_case(job, timeout)) is None:
        time.sleep(0.01)
    return r


@dataclass
class _Job:
    case: Case
    work: Path
    pid: int
    t0: float
    out: Path | None
    before: object


def start_case(case: Case, work: Path) -> _Job:
    work.mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    argv = [a.replace("{W}", str(work)) for a in case.argv]
    out = Path(case.out.replace("{W}", str(work))) if case.out else None
    before = _snapshot(out) if out else None
    log = work / ".fuzz.log"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:                                        # the child: never returns
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(work)
            import sys
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", 0), write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", 0), write_through=True)
            from tapeout.cli import main
            try:
                code = main(argv)
            except SystemExit as e:                    # argparse
                code = e.code if isinstance(e.code, int) else 2
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as e:                      # noqa: BLE001 - escaped main: a bug
            os.write(2, f"\nescaped: {type(e).__name__}: {e}\n".encode())
            code = 4
        os._exit(code if isinstance(code, int) else 3)
    return _Job(case, work, pid, t0, out, before)


def poll_case(job: _Job, timeout: float) -> Result | None:
    """The case's result once its child has ended (or been killed at ``timeout``), else None."""
    case, out = job.case, job.out
    done, status = os.waitpid(job.pid, os.WNOHANG)
    if not done:
        if time.perf_counter() - job.t0 < timeout:
            return None
        os.kill(job.pid, signal.SIGKILL)
        os.waitpid(job.pid, 0)
        return Result(case, "hang", -9, time.perf_counter() - job.t0, "")
    secs = time.perf_counter() - job.t0
    code = os.waitstatus_to_exitcode(status)
    log = job.work / ".fuzz.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("tapeout: error:") or ln.startswith("usage:")
            or ": error: " in ln]
    last = lines[-1] if lines else ""
    if code == 2 and "Traceback" not in text and errs:
        outcome = "clean"
        if sum(ln.startswith("tapeout: error:") for ln in lines) > 1:
            outcome = "internal"
        last = next((ln for ln in lines if "error" in ln), last)
    elif code == 0:
        outcome = "damaged-accepted" if case.damaged else "accepted-invalid" if case.invalid else "ok"
    else:
        outcome = "internal"
        last = next((ln for ln in lines if "internal error" in ln or "escaped" in ln), last)
    if outcome in ("clean", "internal") and out is not None:
        if _snapshot(out) != job.before:
            outcome, last = "half-written", f"{out.name} changed by a failed run; {last}"
    junk = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out else []
    if junk:
        outcome, last = "half-written", f"left {junk[0]}; {last}"
    return Result(case, outcome, code, secs, last[:300])


# --- the seeds the mutations start from -----------------------------------------------------------
@dataclass
class Seeds:
    model: Path                     # a tiny Llama prefill export (inline weights)
    folder: Path                    # its maskrom nvfp4 compile folder
    folder2: Path                   # a second folder (int8) for diff
    config: Path                    # an HF config.json
    tokens: Path                    # a valid prompt .npy
    peft: Path | None = None        # a PEFT LoRA folder for the seed chip (made with numpy)
    adapter: Path | None = None     # its `tapeout adapt` folder


def make_seeds(root: Path, model: Path, config: Path) -> Seeds:
    from tapeout.cli import main
    root.mkdir(parents=True, exist_ok=True)
    folder, folder2 = root / "chip-nvfp4", root / "chip-int8"
    for f, fmt in ((folder, "nvfp4"), (folder2, "int8")):
        if not (f / "manifest.json").is_file():
            code = _quiet(main, ["compile", str(model), "--target", "maskrom", "--format", fmt, "-o", str(f)])
            if code:
                raise RuntimeError(f"the seed compile of {model} ({fmt}) failed: exit {code}")
    tokens = root / "prompt.npy"
    np.save(tokens, np.array([1, 2, 3], np.int64))
    peft, adapter = root / "peft", root / "adapter"
    if not (adapter / "manifest.json").is_file():
        write_peft(peft, folder)
        code = _quiet(main, ["adapt", str(folder), "--adapter", str(peft), "-o", str(adapter)])
        if code:
            raise RuntimeError(f"the seed adapter of {folder} failed: exit {code}")
    return Seeds(model, folder, folder2, config, tokens, peft, adapter)


def write_peft(out: Path, chip: Path, rank: int = 4, seed: int = 0) -> None:
    """A PEFT-format LoRA folder (rank ``rank`` on every layer's q_proj and v_proj of ``chip``),
    random factors, written with safetensors as peft's save_pretrained lays it out."""
    from safetensors.numpy import save_file
    index = json.loads((chip / "layers" / "index.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for x in index["linears"]:
        role = x["role"]
        if role.endswith(("q_proj", "v_proj")):
            o, i = x["shape"]
            layer, name = role.split(".")[1], role.split(".")[2]
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = (rng.normal(size=(rank, i)) * 0.1).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.normal(size=(o, rank)) * 0.1).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "alpha_pattern": {},
        "base_model_name_or_path": None}, indent=2))


def _quiet(fn, argv):
    import contextlib
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(argv)


# --- model mutations ----------------------------------------------------------------------------
HUGE = (-1, -7, 0, 2**31, 2**40, 10**15)


def _save(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _mut_bytes_flip(rng, m, b):
    b = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] = rng.randrange(256)
    return bytes(b), False


def _mut_truncate(rng, m, b):
    return b[: rng.randrange(1, len(b))], True


def _mut_drop_node(rng, m, b):
    nodes = m.graph.node
    del nodes[rng.randrange(len(nodes))]
    return _save(m), True


def _mut_rewire(rng, m, b):
    names = [o for n in m.graph.node for o in n.output] + [i.name for i in m.graph.initializer]
    n = rng.choice([n for n in m.graph.node if n.input])
    k = rng.randrange(len(n.input))
    n.input[k] = rng.choice(names + ["no_such_tensor", ""])
    return _save(m), False


def _mut_dup_output(rng, m, b):
    a, c = rng.sample(range(len(m.graph.node)), 2)
    if m.graph.node[a].output and m.graph.node[c].output:
        m.graph.node[a].output[0] = m.graph.node[c].output[0]
    return _save(m), False


def _mut_attr(rng, m, b):
    cands = [(n, a) for n in m.graph.node for a in n.attribute]
    if not cands:
        return _save(m), False
    n, a = rng.choice(cands)
    r = rng.random()
    if a.type == onnx.AttributeProto.INT or r < 0.3:
        a.type, a.i = onnx.AttributeProto.INT, rng.choice(HUGE + (1, 2, 3))
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
    elif a.type == onnx.AttributeProto.INTS:
        del a.ints[:]
        a.ints.extend(rng.choice(HUGE) for _ in range(rng.randint(0, 4)))
    elif a.type == onnx.AttributeProto.TENSOR:
        a.t.data_type = rng.choice([0, 8, 16, 999])
    else:
        a.type = rng.choice([0, 1, 2, 3, 4, 99])
    return _save(m), False


def _mut_dtype(rng, m, b):
    t = rng.choice(m.graph.initializer)
    t.data_type = rng.choice([0, 2, 3, 6, 7, 8, 9, 10, 11, 16, 17, 21, 999])
    return _save(m), False


def _mut_dims(rng, m, b):
    vi = rng.choice(list(m.graph.input) + list(m.graph.output))
    dims = vi.type.tensor_type.shape.dim
    if dims:
        d = rng.choice(dims)
        v = rng.choice(HUGE + (-1, -7))
        d.Clear()
        if rng.random() < 0.2:
            d.dim_param = rng.choice(["", "??", "batch"])
        else:
            d.dim_value = v
    invalid = vi in m.graph.output and any(x.dim_value < 0 for x in dims)
    return _save(m), invalid


def _mut_init_shape(rng, m, b):
    t = rng.choice([t for t in m.graph.initializer if t.dims])
    k = rng.randrange(len(t.dims))
    t.dims[k] = rng.choice([t.dims[k] + 1, max(0, t.dims[k] - 1), 2**40, -3])
    return _save(m), True


def _mut_opset(rng, m, b):
    m.opset_import[0].version = rng.choice([0, 1, 6, 10000, -5])
    if rng.random() < 0.2:
        m.opset_import[0].domain = "com.nope"
    return _save(m), m.opset_import[0].version in (10000, -5, 0)


def _mut_nonfinite(rng, m, b):
    t = rng.choice([t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT])
    a = numpy_helper.to_array(t).copy()
    a.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return _save(m), False


def _mut_sparse(rng, m, b):
    t = rng.choice(list(m.graph.initializer))
    a = numpy_helper.to_array(t).reshape(-1)
    idx = np.nonzero(a)[0][:8]
    vals = numpy_helper.from_array(a[idx].copy(), t.name)
    sp = onnx.SparseTensorProto(values=vals, indices=numpy_helper.from_array(idx.astype(np.int64), ""),
                                dims=list(t.dims))
    m.graph.initializer.remove(t)
    m.graph.sparse_initializer.append(sp)
    return _save(m), False


def _mut_recursive_function(rng, m, b):
    f = helper.make_function("local", "Loop1", ["x"], ["y"], [helper.make_node("Loop1", ["x"], ["y"], domain="local")],
                             [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    m.functions.append(f)
    m.opset_import.append(helper.make_opsetid("local", 1))
    n = m.graph.node[rng.randrange(len(m.graph.node))]
    if n.input and n.output:
        new = helper.make_node("Loop1", [n.input[0]], [n.input[0] + "_rec"], domain="local")
        m.graph.node.insert(0, new)
        n.input[0] = new.output[0]
    return _save(m), True


def _mut_string(rng, m, b):
    """A string field (op_type, name) replaced by bytes that are not UTF-8."""
    n = rng.choice(m.graph.node)
    target = n.op_type.encode()
    bb = bytearray(b)
    i = bb.find(target)
    if i >= 0:
        bb[i] = 0xFF
    return bytes(bb), False


MODEL_MUTATIONS = {
    "bytes-flip": _mut_bytes_flip, "truncate": _mut_truncate, "drop-node": _mut_drop_node,
    "rewire": _mut_rewire, "dup-output": _mut_dup_output, "attr": _mut_attr, "dtype": _mut_dtype,
    "dims": _mut_dims, "init-shape": _mut_init_shape, "opset": _mut_opset, "non-finite": _mut_nonfinite,
    "sparse-init": _mut_sparse, "recursive-function": _mut_recursive_function, "string": _mut_string,
}


def _external(rng, m: onnx.ModelProto) -> tuple[dict, bool]:
    """The model with its largest initializer in external data, the entry mutated."""
    from onnx.external_data_helper import set_external_data
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data) or numpy_helper.to_array(t).nbytes)
    a = numpy_helper.to_array(t)
    raw = a.tobytes()
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    set_external_data(t, location="m.bin", offset=0, length=len(raw))
    t.ClearField("raw_data")
    kind = rng.choice(["offset", "length", "location", "dtype", "missing-key", "short-file"])
    entries = {e.key: e for e in t.external_data}
    invalid = True
    if kind == "offset":
        entries["offset"].value = rng.choice(["-4", "1.5", "abc", str(2**62), "", " 0"])
    elif kind == "length":
        entries["length"].value = rng.choice(["-1", "1e3", str(2**62), str(len(raw) + 4), "0x10"])
    elif kind == "location":
        entries["location"].value = rng.choice(["m\x00.bin", "../m.bin", "/etc/passwd", "", ".", "sub/../m.bin",
                                                "nope.bin"])
        invalid = entries["location"].value != "sub/../m.bin"
    elif kind == "dtype":
        t.data_type = rng.choice([0, 999, TensorProto.STRING, TensorProto.UNDEFINED])
    elif kind == "missing-key":
        del t.external_data[:]
    files = {"m.onnx": m.SerializeToString(), "m.bin": raw if kind != "short-file" else raw[: len(raw) // 2]}
    return files, invalid


def model_cases(rng: random.Random, seeds: Seeds, n: int) -> list[Case]:
    base = onnx.load(str(seeds.model), load_external_data=True)
    base_bytes = base.SerializeToString()
    cmds = [["inspect", "{W}/m.onnx"],
            ["compile", "{W}/m.onnx", "-o", "{W}/out"],
            ["compile", "{W}/m.onnx", "--target", "maskrom", "--format", "nvfp4", "-o", "{W}/out"],
            ["compile", "{W}/m.onnx", "--target", "systolic", "--format", "int8", "-o", "{W}/out"],
            ["compile", "{W}/m.onnx", "--target", "dataflow", "--format", "int8", "-o", "{W}/out"],
            ["estimate", "{W}/m.onnx", "--format", "w3o6"]]
    names = sorted(MODEL_MUTATIONS) + ["external-data"]
    out = []
    for k in range(n):
        name = names[k % len(names)]
        m = copy.deepcopy(base)
        if name == "external-data":
            files, invalid = _external(rng, m)
        else:
            data, invalid = MODEL_MUTATIONS[name](rng, m, base_bytes)
            files = {"m.onnx": data}
        argv = rng.choice(cmds)
        out.append(Case("model", name, list(argv), invalid=invalid and argv[0] != "estimate",
                        out="{W}/out" if "-o" in argv else None, files=files))
    return out


# --- option mutations ----------------------------------------------------------------------------
def option_cases(rng: random.Random, seeds: Seeds, n: int) -> list[Case]:
    M, F, T = str(seeds.model), str(seeds.folder), str(seeds.tokens)
    empty = io.BytesIO()
    np.save(empty, np.zeros(0, np.int64))
    twod, floats, oov = io.BytesIO(), io.BytesIO(), io.BytesIO()
    np.save(twod, np.ones((2, 3), np.int64))
    np.save(floats, np.array([1.5, 2.5]))
    np.save(oov, np.array([10**9, -1], np.int64))
    npys = {"empty.npy": empty.getvalue(), "twod.npy": twod.getvalue(), "floats.npy": floats.getvalue(),
            "oov.npy": oov.getvalue(), "text.npy": b"not numpy", "pickle.npy": _pickle_npy()}
    comp = ["compile", M, "--target", "maskrom", "--format", "nvfp4", "-o", "{W}/out"]
    bad = [
        comp + ["--machine", "chips=1000"], comp + ["--machine", "nokey"], comp + ["--machine", "rows=-3"],
        comp + ["--context", "-5"], comp + ["--context", "0"], comp + ["--context", str(10**12)],
        comp + ["--arch", "vector_lanes=0"], comp + ["--arch", "vector_lanes=abc"], comp + ["--arch", "x=1"],
        comp + ["--arch", "attn_positions_per_cycle=-2"], comp + ["--base", "no-such-base"],
        comp + ["--gds-tiles", "bogus"], comp + ["--gds-tiles", "-1"], comp + ["--gds-tiles", str(10**9)],
        ["compile", M, "--target", "maskrom", "--format", "bogus", "-o", "{W}/out"],
        ["compile", M, "--format", "nvfp4", "-o", "{W}/out"], ["compile", M, "--calib", M, "-o", "{W}/out"], ["compile", M, "--target", "maskrom", "--format", "int4", "--group", "0", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "int4", "--group", "-3", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--outlier-frac", "2", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--outlier-frac", "nan", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--gptq-damp", "-1", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--gptq-damp", "inf", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--calib-max-tokens", "0", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--calib-max-tokens", "-1", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "w3o6", "--calib", "{W}/nothing.txt", "-o", "{W}/out"],
        ["compile", M, "--target", "maskrom", "--format", "nvfp4", "-o", "{W}/afile/out"],
        ["compile", M, "--target", "maskrom", "--format", "nvfp4", "-o", "/proc/tapeout-fuzz"],
        ["run", F, "--tokens", T, "--new-tokens", "-1"], ["run", F, "--tokens", T, "--new-tokens", str(10**9)],
        ["run", F, "--prompt", "hello", "--tokenizer", "{W}/nothing.json"],
        ["simulate", F, "--layer", "no_such_layer"], ["simulate", F, "--tokens", "-1"],
        ["simulate", F, "--tokens", str(10**9), "--layer", "lm_head"],
        ["eval", M, "--format", "nvfp4", "--tokens", T, "--max-tokens", "-4"],
        ["estimate", "--hf-config", str(seeds.config), "--format", "w3o6", "--context", "-1"],
        ["estimate", "--hf-config", str(seeds.config), "--format", "w3o6", "--clock", "nan"],
        ["estimate", "--hf-config", str(seeds.config), "--format", "w3o6", "--clock", "-1e9"],
        ["estimate", "--hf-config", str(seeds.config), "--format", "w3o6", "--tech", "n0"],
        ["estimate", "--hf-config", str(seeds.config), "--format", "w3o6", "--machine", "chips=1000"],
        ["diff", F, "{W}/nothing"], ["diff", F, M, "--base", "nope"],
    ]
    for name in sorted(npys):
        bad.append(["compile", M, "--target", "maskrom", "--format", "w3o6", "--calib-tokens", "{W}/" + name, "-o", "{W}/out"])
        bad.append(["run", F, "--tokens", "{W}/" + name, "--new-tokens", "2"])
        bad.append(["eval", M, "--format", "nvfp4", "--tokens", "{W}/" + name])
    out = []
    for k in range(n):
        argv = bad[k % len(bad)] if k < len(bad) else rng.choice(bad)
        files = dict(npys)
        files["afile"] = b"a file, not a folder\n"
        c = Case("option", " ".join(a for a in argv[2:] if not a.startswith(("{W}", "/"))) or argv[0], list(argv),
                 invalid=True, out="{W}/out" if "{W}/out" in argv else None, files=files)
        out.append(c)
    return out


def _pickle_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


# --- HF config mutations -------------------------------------------------------------------------
CONFIG_VALUES = (-1, 0, 10**15, 2**63, "abc", None, [], {}, 1.5, float("nan"), float("inf"), True)


def config_cases(rng: random.Random, seeds: Seeds, n: int) -> list[Case]:
    cfg = json.loads(seeds.config.read_text())
    keys = sorted(cfg)
    out = []
    for k in range(n):
        c = copy.deepcopy(cfg)
        key = rng.choice(keys)
        r = rng.random()
        if r < 0.1:
            text = json.dumps(c)[: rng.randrange(1, 40)]
        elif r < 0.2:
            del c[key]
            text = json.dumps(c)
        else:
            c[key] = rng.choice(CONFIG_VALUES)
            text = json.dumps(c)
        fmt = rng.choice(["w3o6", "nvfp4", "int8"])
        out.append(Case("config", f"{key}", ["estimate", "--hf-config", "{W}/config.json", "--format", fmt],
                        files={"config.json": text.encode()}))
    return out


# --- compile-folder damage ------------------------------------------------------------------------
def _damage(rng: random.Random, data: bytes, rel: str) -> tuple[bytes, str]:
    kinds = ["truncate", "flip", "empty", "append"]
    if rel.endswith(".json"):
        kinds += ["null", "list", "wrong-type"]
    kind = rng.choice(kinds)
    if kind == "truncate" and len(data) > 1:
        return data[: rng.randrange(1, len(data))], kind
    if kind == "flip" and data:
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b), kind
    if kind == "null":
        return b"null\n", kind
    if kind == "list":
        return b"[]\n", kind
    if kind == "wrong-type":
        try:
            obj = json.loads(data)
        except ValueError:
            return b"{}", kind
        if isinstance(obj, dict) and obj:
            key = rng.choice(sorted(obj))
            obj[key] = rng.choice(["x", -1, None, [], {"a": 1}, 10**20])
            return json.dumps(obj).encode(), kind
        return b"{}", kind
    if kind == "append":
        return data + b"\x00garbage", kind
    return b"", "empty"


def _damaged_copy(rng: random.Random, root: Path, rels: list[str], rel: str, prefix: str) -> tuple[dict, str]:
    """The files of folder ``root`` under ``prefix/``, with ``rel`` damaged (never left as it
    was), and the kind of damage."""
    data = (root / rel).read_bytes()
    bad, kind = _damage(rng, data, rel)
    files = {f"{prefix}/{r}": (root / r).read_bytes() for r in rels if r != rel}
    files[f"{prefix}/{rel}"] = bad if bad != data else data + b"\n"
    return files, kind


def folder_cases(rng: random.Random, seeds: Seeds, n: int) -> list[Case]:
    """Copy a compile folder, damage one file (or the manifest), run a command that reads it."""
    rels = sorted(str(p.relative_to(seeds.folder)) for p in seeds.folder.rglob("*") if p.is_file())
    cmds = [["simulate", "{W}/chip", "--layer", "lm_head", "--tokens", "1"],
            ["run", "{W}/chip", "--tokens", str(seeds.tokens), "--new-tokens", "2"],
            ["run", "{W}/chip", "--tokens", str(seeds.tokens), "--new-tokens", "1", "--engine", "golden"],
            ["diff", "{W}/chip", str(seeds.folder2)], ["diff", str(seeds.folder2), "{W}/chip", "--json"]]
    out = []
    for k in range(n):
        rel = "manifest.json" if k % 5 == 0 else rng.choice(rels)
        files, kind = _damaged_copy(rng, seeds.folder, rels, rel, "chip")
        deleted = rng.random() < 0.05 and rel != "manifest.json"
        if deleted:
            del files[f"chip/{rel}"]
        out.append(Case("folder", f"{'deleted' if deleted else kind} {rel}", list(rng.choice(cmds)), damaged=True,
                        files=files))
    return out


# --- adapters: PEFT folders into `adapt`, damaged adapter folders into `run` and `diff` ------------
_CONFIG_EDITS = [("r", [0, -4, "x", None, 4.5, 10**9]), ("lora_alpha", [0, -1, "x", None, float("inf"), 1e300]),
                 ("peft_type", ["IA3", None, 7]), ("use_dora", [True]), ("use_rslora", [True, "yes"]),
                 ("alpha_pattern", [{"q_proj": 3}, {"q_proj": "x"}, [], None])]


def adapter_cases(rng: random.Random, seeds: Seeds, n: int) -> list[Case]:
    peft = {p.name: p.read_bytes() for p in seeds.peft.iterdir()}
    arels = sorted(str(p.relative_to(seeds.adapter)) for p in seeds.adapter.rglob("*") if p.is_file())
    out = []
    for k in range(n):
        if k % 2 == 0:                              # a mutated PEFT folder into adapt
            files = {f"peft/{n_}": b for n_, b in peft.items()}
            which = rng.choice(["config", "config", "tensors", "damage"])
            if which == "config":
                cfg = json.loads(peft["adapter_config.json"])
                key, values = rng.choice(_CONFIG_EDITS)
                cfg[key] = rng.choice(values)
                files["peft/adapter_config.json"] = json.dumps(cfg).encode()
                name = f"config {key}={cfg[key]!r:.20}"
            elif which == "tensors":
                from safetensors.numpy import load, save
                t = load(peft["adapter_model.safetensors"])
                key = rng.choice(sorted(t))
                kind = rng.choice(["shape", "nan", "drop", "rename", "huge", "dtype"])
                if kind == "shape":
                    t[key] = np.zeros((t[key].shape[0] + 1, t[key].shape[1]), np.float32)
                elif kind == "nan":
                    t[key] = t[key].copy()
                    t[key].flat[rng.randrange(t[key].size)] = rng.choice([np.nan, np.inf])
                elif kind == "drop":
                    del t[key]
                elif kind == "rename":
                    t[key.replace("layers.", "layers.9")] = t.pop(key)
                elif kind == "huge":
                    t[key] = (t[key] * 1e30).astype(np.float32)
                else:
                    t[key] = t[key].astype(np.float16)
                files["peft/adapter_model.safetensors"] = save(t)
                name = f"tensors {kind}"
            else:
                rel = rng.choice(sorted(peft))
                bad, kind = _damage(rng, peft[rel], rel)
                files[f"peft/{rel}"] = bad
                name = f"{kind} {rel}"
            out.append(Case("adapter", name, ["adapt", str(seeds.folder), "--adapter", "{W}/peft", "-o", "{W}/out"],
                            out="{W}/out", files=files))
        else:                                       # a damaged adapter folder into run or diff
            rel = "manifest.json" if k % 6 == 1 else rng.choice(arels)
            files, kind = _damaged_copy(rng, seeds.adapter, arels, rel, "ad")
            cmd = rng.choice([["run", str(seeds.folder), "--adapter", "{W}/ad", "--tokens", str(seeds.tokens),
                               "--new-tokens", "1"],
                              ["run", str(seeds.folder), "--adapter", "{W}/ad", "--tokens", str(seeds.tokens),
                               "--new-tokens", "1", "--engine", "golden"],
                              ["diff", str(seeds.folder), "{W}/ad"]])
            out.append(Case("adapter", f"{kind} adapter {rel}", cmd, damaged=True, files=files))
    return out


# --- a campaign ---------------------------------------------------------------------------------
GROUPS = {"model": model_cases, "option": option_cases, "config": config_cases, "folder": folder_cases,
          "adapter": adapter_cases}
MIX = {"model": 0.45, "option": 0.15, "config": 0.12, "folder": 0.18, "adapter": 0.1}


def cases(seed: int, n: int, seeds: Seeds, groups=None) -> list[Case]:
    rng = random.Random(seed)
    groups = groups or list(GROUPS)
    share = {g: MIX[g] for g in groups}
    tot = sum(share.values())
    out = []
    for g in groups:
        out += GROUPS[g](random.Random(rng.random()), seeds, max(1, round(n * share[g] / tot)))
    return out[:n]


def campaign(seed: int, n: int, seeds: Seeds, work: Path, *, timeout: float = 60.0, groups=None,
             progress=None, jobs: int = 1) -> list[Result]:
    """Run the seeded cases, ``jobs`` forked children at a time; results in case order. The
    folders of bad outcomes stay in ``work`` for a look."""
    cs = cases(seed, n, seeds, groups)
    results: list[Result | None] = [None] * len(cs)
    running: dict[int, _Job] = {}
    nxt = finished = 0
    while finished < len(cs):
        while nxt < len(cs) and len(running) < max(1, jobs):
            d = work / f"case{nxt}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            running[nxt] = start_case(cs[nxt], d)
            nxt += 1
        for k, job in list(running.items()):
            r = poll_case(job, timeout)
            if r is None:
                continue
            del running[k]
            results[k] = r
            finished += 1
            if r.outcome not in BAD:
                shutil.rmtree(job.work, ignore_errors=True)
            if progress:
                progress(finished, len(cs), r)
        time.sleep(0.005)
    return results


def table(results: list[Result]) -> str:
    groups = sorted({r.case.group for r in results})
    lines = [f"{'group':8s} {'cases':>6s} " + " ".join(f"{o:>16s}" for o in OUTCOMES) + f" {'median s':>9s}"]
    for g in groups + ["all"]:
        rs = [r for r in results if g == "all" or r.case.group == g]
        cnt = {o: sum(r.outcome == o for r in rs) for o in OUTCOMES}
        med = float(np.median([r.secs for r in rs])) if rs else math.nan
        lines.append(f"{g:8s} {len(rs):6d} " + " ".join(f"{cnt[o]:16d}" for o in OUTCOMES) + f" {med:9.2f}")
    return "\n".join(lines)


def failures(results: list[Result]) -> list[str]:
    return [f"{r.outcome:16s} {r.case.group}/{r.case.name}: {' '.join(r.case.argv[:2])} -> {r.line}"
            for r in results if r.outcome in BAD]
