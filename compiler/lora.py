"""LoRA adapters for a mask-ROM chip: low-rank corrections held in SRAM beside the ROM.

A linear ``y = W x`` of the chip becomes ``y = W x + B (A x)``: ``W`` stays in the via layers,
``A`` [r, in] and ``B`` [out, r] are data in an SRAM (spec: docs/lora.md, image format:
docs/formats.md "adapter/"). The integer arithmetic of one adapted linear, on the linear's
Q16 input ``x`` [T, in]:

1. ``x`` as MXINT (the linear's own input quantiser: ``act_bits`` elements, one shift per
   block of 32), scaled to the row's least shift: ``xs = elem << (shift - emin)``;
2. ``u = round(xs . A_codes^T * a_mult / 2**(a_shift - emin))``: Q16 [T, r] (``requant``:
   the shift clamped to [-31, 62], saturating);
3. ``u`` as MXINT over its ``r`` values (block ``mx_block(r)``), ``us``, ``emin_u`` as in 1;
4. ``d = round(us . B_codes^T * b_mult / 2**(b_shift - emin_u))``: Q16 [T, out];
5. ``y = saturate32(y_linear + d)``, ``y_linear`` the chip's (saturated) linear output.

``A_codes``, ``B_codes`` are int8 with one scale per row (``max|row| / 127``) held as a
15-bit multiplier and a shift; ``B``'s scales carry the adapter's ``alpha / r``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TapeoutError
from .golden import fixed as fx

FORMAT = "tapeout-lora-sram/1"
LORA_MACS = 1024     # int8 multiply-accumulates per cycle of the LoRA unit
LORA_LATENCY = 7     # start, an SRAM read per product, u's MXINT quantiser (3), ready (hdl/lora.py)
CODE_MAX = 127
# the arrays of one linear in the SRAM image, in order: (name, dtype)
FIELDS = (("a_codes", "<i1"), ("b_codes", "<i1"), ("a_mult", "<i2"), ("a_shift", "<i1"),
          ("b_mult", "<i2"), ("b_shift", "<i1"))


@dataclass(frozen=True)
class LoraLinear:
    """One adapted linear's SRAM contents."""

    op: str                  # the chip's linear op
    role: str                # its structural role, e.g. layers.3.q_proj
    a_codes: np.ndarray      # int [r, in]
    a_mult: np.ndarray       # int [r]
    a_shift: np.ndarray      # int [r]
    b_codes: np.ndarray      # int [out, r]
    b_mult: np.ndarray       # int [out]
    b_shift: np.ndarray      # int [out]

    @property
    def rank(self) -> int:
        return int(self.a_codes.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b_codes.shape[0]), int(self.a_codes.shape[1])

    @property
    def sram_bytes(self) -> int:
        return sum(getattr(self, f).size * np.dtype(dt).itemsize for f, dt in FIELDS)

    @property
    def cycles(self) -> int:
        return cycles(*self.shape, self.rank)

    def dense(self) -> np.ndarray:
        """The correction it stores, as a float [out, in] matrix (for reports)."""
        a = self.a_codes * (self.a_mult * np.exp2(-self.a_shift.astype(np.float64)))[:, None]
        b = self.b_codes * (self.b_mult * np.exp2(-self.b_shift.astype(np.float64)))[:, None]
        return b @ a


def cycles(o_dim: int, i_dim: int, rank: int, macs: int = LORA_MACS) -> int:
    """Cycles one adapted linear adds per token (hdl/lora.py's LoraUnit): ``A x`` a group of
    ``macs // in`` rank rows a cycle (a row in ``ceil(in / macs)`` cycles when wider), then
    ``B u`` a group of ``macs // r`` output rows a cycle, plus ``LORA_LATENCY``. It runs after
    the fabric's output (u needs all of x; B u needs all of u)."""
    ca = -(-rank // (macs // i_dim)) if i_dim <= macs else rank * -(-i_dim // macs)
    cb = -(-o_dim // (macs // rank)) if rank <= macs else o_dim * -(-rank // macs)
    return ca + cb + LORA_LATENCY


def sram_bytes(o_dim: int, i_dim: int, rank: int) -> int:
    """SRAM bytes of one adapted linear: int8 A and B, an int16 multiplier and an int8 shift per row."""
    return rank * (i_dim + o_dim) + 3 * (rank + o_dim)


def _rows_int8(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a float matrix as int8 codes and one (multiplier, shift) scale per row."""
    m = np.asarray(m, np.float64)
    amax = np.abs(m).max(axis=1)
    scale = np.where(amax > 0, amax / CODE_MAX, 0.0)
    codes = np.where(scale[:, None] > 0, np.round(m / np.where(scale > 0, scale, 1)[:, None]), 0)
    mult, shift = fx.multiplier(scale)
    if (shift < -128).any() or (shift > 127).any():
        raise TapeoutError("a LoRA factor row's scale is outside 2**-127..2**128; the factors are not usable")
    return np.clip(codes, -CODE_MAX, CODE_MAX).astype(np.int64), mult, shift


def quantize(op: str, role: str, a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> LoraLinear:
    """Float factors ``a`` [r, in], ``b`` [out, r] (correction ``scale * b @ a``) as SRAM data."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64) * float(scale)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise TapeoutError(f"LoRA factors of {role} have shapes A {list(a.shape)}, B {list(b.shape)}: "
                           "expected A [r, in] and B [out, r] with r >= 1")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise TapeoutError(f"LoRA factors of {role} hold a non-finite value")
    # balance the two factors' row norms (the product is unchanged): int8 rows of both keep precision
    na, nb = np.abs(a).max(axis=1), np.abs(b).max(axis=0)
    g = np.where((na > 0) & (nb > 0), np.sqrt(nb / np.where(na > 0, na, 1)), 1.0)
    a, b = a * g[:, None], b / g[None, :]
    ac, am, ash = _rows_int8(a)
    bc, bm, bsh = _rows_int8(b)
    return LoraLinear(op, role, ac, am, ash, bc, bm, bsh)


def _mx_scaled(x: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MXINT elements of Q16 ``x`` [T, D] shifted to each row's least block shift, and that shift."""
    elems, sh = fx.mx_quantize(x, bits, block)
    blk = fx.mx_block(x.shape[-1], block)
    emin = sh.min(axis=1)
    return elems << np.repeat(sh - emin[:, None], blk, axis=1), emin


def delta(f: LoraLinear, x: np.ndarray, bits: int = 8, block: int = fx.MX_BLOCK) -> np.ndarray:
    """The integer correction ``B (A x)`` in Q16 for Q16 ``x`` [..., in] (steps 1-4 above)."""
    o_dim, i_dim = f.shape
    lead = x.shape[:-1]
    X = np.asarray(x, np.int64).reshape(-1, i_dim)
    xs, emin = _mx_scaled(X, bits, block)
    acc = fx.check_acc(fx.int_matmul(xs, f.a_codes.T.astype(np.int64)), f"LoRA A of {f.op}")
    u = requant(acc, f.a_mult, f.a_shift, emin)
    us, emin_u = _mx_scaled(u, bits, block)
    acc = fx.check_acc(fx.int_matmul(us, f.b_codes.T.astype(np.int64)), f"LoRA B of {f.op}")
    return requant(acc, f.b_mult, f.b_shift, emin_u).reshape(*lead, o_dim)


SHIFT_MIN, SHIFT_MAX = -31, 62


def requant(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, emin: np.ndarray) -> np.ndarray:
    """``sat32(round(acc * mult / 2**k))``, ``k = shift - emin`` clamped to [-31, 62] (k < -31 or
    > 62 give the same saturated or rounded result for |acc * mult| < 2**62); a left shift
    saturates instead of wrapping: the value is first clamped to +-2**31."""
    v = np.asarray(acc, np.int64) * np.asarray(mult, np.int64)[None, :]
    k = np.clip(np.asarray(shift, np.int64)[None, :] - np.asarray(emin, np.int64)[:, None], SHIFT_MIN, SHIFT_MAX)
    right = fx.rshift_round(v, np.maximum(k, 0))
    left = np.left_shift(np.clip(v, -(1 << 31), 1 << 31), np.maximum(-k, 0))
    return fx.saturate32(np.where(k > 0, right, left))


def apply(y: np.ndarray, f: LoraLinear, x: np.ndarray, bits: int = 8, block: int = fx.MX_BLOCK) -> np.ndarray:
    """Step 5: the adapted linear's output from its ROM output ``y`` and input ``x``."""
    return fx.saturate32(np.asarray(y, np.int64) + delta(f, x, bits, block))


# --- the SRAM image ------------------------------------------------------------------------------
def image(linears: list[LoraLinear]) -> tuple[bytes, list[dict]]:
    """The SRAM image (bytes) and its index rows (docs/formats.md, "adapter/")."""
    out, rows, off = bytearray(), [], 0
    for f in linears:
        row = {"op": f.op, "role": f.role, "rank": f.rank, "shape": list(f.shape), "offset": off}
        for name, dt in FIELDS:
            data = np.ascontiguousarray(getattr(f, name), dtype=dt).tobytes()
            row[name] = [off, len(data)]
            out += data
            off += len(data)
        row["bytes"] = off - row["offset"]
        rows.append(row)
    return bytes(out), rows


def read_image(index: dict, data: bytes, file: str) -> list[LoraLinear]:
    """The adapted linears of an SRAM image, every field checked against the index."""
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("linears"), list):
        raise TapeoutError(f"not a {FORMAT} index", file=file)
    out = []
    for k, row in enumerate(index["linears"]):
        try:
            o, i = (int(v) for v in row["shape"])
            r = int(row["rank"])
            shapes = {"a_codes": (r, i), "b_codes": (o, r), "a_mult": (r,), "a_shift": (r,),
                      "b_mult": (o,), "b_shift": (o,)}
            arrays = {}
            for name, dt in FIELDS:
                off, n = (int(v) for v in row[name])
                want = math.prod(shapes[name]) * np.dtype(dt).itemsize
                if off < 0 or n != want or off + n > len(data):
                    raise ValueError(f"{name} at {off}+{n} does not hold {list(shapes[name])} in {len(data)} bytes")
                arrays[name] = np.frombuffer(data, dt, count=n // np.dtype(dt).itemsize, offset=off) \
                    .astype(np.int64).reshape(shapes[name])
            out.append(LoraLinear(str(row["op"]), str(row["role"]), **arrays))
        except (KeyError, TypeError, ValueError) as e:
            raise TapeoutError(f"adapter linear {k}: {type(e).__name__}: {e}", file=file) from None
    return out


# --- PEFT adapters -------------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(?:[A-Za-z0-9_]+\.)*?([A-Za-z0-9_]+)$")


def role_of_module(module: str) -> str | None:
    """The chip role of a PEFT/transformers module name: ``model.layers.3.self_attn.q_proj`` ->
    ``layers.3.q_proj``; ``lm_head`` -> ``lm_head``; None if it names no layer."""
    module = module.removeprefix("base_model.model.")
    m = _LAYER.search(module)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}"
    return "lm_head" if module.split(".")[-1] == "lm_head" else None


def read_peft(folder: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """A PEFT LoRA adapter folder: (its config, module -> (A [r, in], B [out, r], scale))."""
    folder = Path(folder)
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise TapeoutError(f"no {p.name}: an adapter folder is what peft's save_pretrained writes "
                               "(adapter_config.json + adapter_model.safetensors)", file=str(folder))
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TapeoutError(f"unreadable adapter config: {type(e).__name__}: {e}", file=str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise TapeoutError("the adapter config is not a JSON object", file=str(cfg_path))
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise TapeoutError(f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters go into the SRAM",
                           file=str(cfg_path))
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise TapeoutError(f"{key} must be true or false, not {cfg[key]!r:.40}", file=str(cfg_path))
    if cfg.get("use_dora"):
        raise TapeoutError("a DoRA adapter (use_dora) rescales the ROM weights' columns; the chip adds B(Ax) only",
                           file=str(cfg_path))
    alpha, r0 = cfg.get("lora_alpha", 8), cfg.get("r", 8)
    for key, v in (("lora_alpha", alpha), ("r", r0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise TapeoutError(f"{key} must be a positive number, not {v!r}", file=str(cfg_path))
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:                                     # pragma: no cover - a dependency
        raise TapeoutError("reading a PEFT adapter needs the safetensors package (pip install safetensors)") from None
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise TapeoutError(f"unreadable safetensors file: {e}", file=str(st_path)) from None
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight", key)
        if m is None:
            raise TapeoutError(f"tensor {key!r} is not a lora_A/lora_B weight (LoRA biases, embeddings and "
                               "modules_to_save are not supported)", file=str(st_path))
        pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(t, np.float32)
    out = {}
    patterns = {}
    for key in ("alpha_pattern", "rank_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                            or not math.isfinite(v) or v <= 0 for v in pat.values()):
            raise TapeoutError(f"{key} must map module names to positive numbers, not {pat!r:.60}", file=str(cfg_path))
        patterns[key] = pat
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise TapeoutError(f"module {module!r} has lora_{next(iter(ab))} but no lora_{'AB'[next(iter(ab)) == 'A']}",
                               file=str(st_path))
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise TapeoutError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                               "[r, in] and [out, r]", file=str(st_path))
        r = a.shape[0]
        want = next((v for k, v in patterns["rank_pattern"].items() if module.endswith(k)), r0)
        if want != r:
            raise TapeoutError(f"module {module!r}: lora_A has rank {r}, the config says r={want!r}", file=str(cfg_path))
        al = next((float(v) for k, v in patterns["alpha_pattern"].items() if module.endswith(k)), float(alpha))
        scale = al / (math.sqrt(r) if cfg.get("use_rslora") is True else r)
        out[module] = (a, b, scale)
    if not out:
        raise TapeoutError("the adapter holds no LoRA weights", file=str(st_path))
    return cfg, out


def rom_weight(L) -> np.ndarray:
    """The float weights [out, in] a chip's integer linear (golden's IntLinear) stands for:
    ``codes * group_scale * mult * 2**-shift``."""
    o_dim, i_dim = L.codes.shape
    gs = np.repeat(np.asarray(L.group_scale, np.float64), L.group_size, axis=1)[:, :i_dim]
    row = np.asarray(L.mult, np.float64) * np.exp2(-np.asarray(L.shift, np.float64))
    return np.asarray(L.codes, np.float64) * gs * row[:, None]


def low_rank(d: np.ndarray, rank: int, hessian: np.ndarray | None = None, damp: float = 0.01
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """Rank-``rank`` factors of ``d`` [out, in]: (A [r, in], B [out, r], the fraction of the error
    left). Without ``hessian``: the truncated SVD, the fraction of ||d||_F left. With the input
    statistics ``hessian`` = X^T X / n [in, in] of the linear: the factors that minimise the
    *output* error ||(d - B A) X^T|| (SVD of d L, L the Cholesky factor of the damped H, then
    A = S^1/2 V^T L^-1), and the fraction of that output error left."""
    d = np.asarray(d, np.float64)
    if hessian is None:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        r = min(rank, len(s))
        root = np.sqrt(s[:r])
        total, rest = float(np.sum(s ** 2)), float(np.sum(s[r:] ** 2))
        return root[:, None] * vt[:r], u[:, :r] * root[None, :], (math.sqrt(rest / total) if total > 0 else 0.0)
    h = np.asarray(hessian, np.float64)
    h = h + (damp * max(float(np.mean(np.diag(h))), 1e-12)) * np.eye(h.shape[0])
    low = np.linalg.cholesky(h)
    u, s, vt = np.linalg.svd(d @ low, full_matrices=False)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    a = np.linalg.solve(low.T, (root[:, None] * vt[:r]).T).T          # S^1/2 V^T L^-1
    total, rest = float(np.sum(s ** 2)), float(np.sum(s[r:] ** 2))
    return a, u[:, :r] * root[None, :], (math.sqrt(rest / total) if total > 0 else 0.0)
