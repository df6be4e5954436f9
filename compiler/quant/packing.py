"""Bit-exact storage of a :class:`QuantTensor` (layout: docs/formats.md, "Packed file").

``pack`` writes ``b"TQW1"``, a uint32 (little-endian) header length, a UTF-8 JSON header
(format, shape, group size, section names and byte lengths, w3o6 count width), then the
sections, each starting on a byte boundary. Fields inside a section are little-endian bitwise
(:func:`~.numerics.pack_bits`). ``unpack`` inverts it exactly.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from ..errors import TapeoutError
from .fp4 import mx_exponents_of, mx_plan_from_exponents, nv_block_bytes_of, nv_plan_from_bytes
from .numerics import (E8M0_BIAS, bf16_bits, bf16_from_bits, e2m1_from_nibbles, e2m1_nibbles,
                       from_twos, pack_bits, to_twos, unpack_bits)
from .tensor import (FP4_BLOCK, W3O6_HIGH_BITS, W3O6_RATIO, QuantTensor, index_bits, int_bits,
                     int_range)

MAGIC = b"TQW1"


def _sections(qt: QuantTensor) -> list[tuple[str, bytes]]:
    codes = qt.codes.astype(np.int64).ravel()
    if qt.fmt in FP4_BLOCK:
        secs = [("codes", pack_bits(e2m1_nibbles(codes), 4))]
        if qt.fmt == "mxfp4":
            e8m0 = (mx_exponents_of(qt) + E8M0_BIAS).astype(np.uint8)
            secs.append(("block_scales", e8m0.tobytes()))
        else:
            secs.append(("block_scales", nv_block_bytes_of(qt).tobytes()))
            secs.append(("tensor_scale", struct.pack("<f", qt.tensor_scale)))
        return secs
    scales = [("group_scales", qt.group_scale.astype(np.uint8).tobytes()),
              ("row_scales", bf16_bits(qt.row_scale).astype("<u2").tobytes())]
    if qt.fmt != "w3o6":
        b = int_bits(qt.fmt)
        return [("codes", pack_bits(to_twos(codes, b), b))] + scales[qt.per_channel:]
    mask = qt.outliers.ravel()
    fields = to_twos(codes, 6)
    slots = np.where(mask, fields & 7, to_twos(codes // W3O6_RATIO, 3))
    g, ib = qt.group_size, index_bits(qt.group_size)
    pos = np.flatnonzero(mask)
    entries = (pos % qt.shape[1]) % g | ((fields[pos] >> 3) << ib)
    return [("codes", pack_bits(slots, 3))] + scales + [
        ("outlier_counts", pack_bits(qt.outlier_counts().ravel(), qt.count_bits())),
        ("outlier_entries", pack_bits(entries, ib + W3O6_HIGH_BITS))]


def check_packable(qt: QuantTensor) -> None:
    """Raise ValueError if the decomposition is not one the format can store."""
    c = qt.codes
    if qt.fmt in FP4_BLOCK:
        if not np.array_equal(e2m1_from_nibbles(e2m1_nibbles(c)), c):
            raise ValueError("codes are not doubled E2M1 values")
    elif qt.fmt == "w3o6":
        base, out = ~qt.outliers, qt.outliers
        if np.any(c[base] % W3O6_RATIO) or np.any(c[base] < -4 * W3O6_RATIO) \
                or np.any(c[base] > 3 * W3O6_RATIO) or np.any(c[out] < -32) or np.any(c[out] > 31):
            raise ValueError("w3o6 codes out of range")
    else:
        lo, hi = int_range(int_bits(qt.fmt))
        if c.min() < lo or c.max() > hi:
            raise ValueError(f"{qt.fmt} codes outside [{lo}, {hi}]")
    if qt.group_scale.min() < 0 or (qt.fmt not in FP4_BLOCK and qt.group_scale.max() > 255):
        raise ValueError("group scales outside the stored range")


def pack(qt: QuantTensor) -> bytes:
    """Serialise ``qt`` to bytes (self-describing header + sections of docs/formats.md)."""
    check_packable(qt)
    secs = _sections(qt)
    header = {"fmt": qt.fmt, "shape": list(qt.shape), "group_size": qt.group_size,
              "sections": [[name, len(data)] for name, data in secs]}
    if qt.fmt == "w3o6":
        header["count_bits"] = qt.count_bits()
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(data for _, data in secs)


def unpack(data: bytes) -> QuantTensor:
    """Inverse of :func:`pack`: the exact codes, scales and outliers."""
    if data[:4] != MAGIC:
        raise TapeoutError("not a tapeout quantised weight (missing TQW1 magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    fmt, (out, n_in), g = header["fmt"], header["shape"], header["group_size"]
    secs, at = {}, 8 + n
    for name, size in header["sections"]:
        secs[name] = data[at:at + size]
        at += size
    count, ng = out * n_in, n_in // g
    if fmt in FP4_BLOCK:
        codes = e2m1_from_nibbles(unpack_bits(secs["codes"], 4, count).astype(np.uint8))
        scales = np.frombuffer(secs["block_scales"], dtype=np.uint8).reshape(out, ng)
        if fmt == "mxfp4":
            plan = mx_plan_from_exponents(scales.astype(np.int64) - E8M0_BIAS)
        else:
            plan = nv_plan_from_bytes(scales, struct.unpack("<f", secs["tensor_scale"])[0])
        return plan.finish(codes.reshape(out, n_in))
    row_scale = bf16_from_bits(np.frombuffer(secs["row_scales"], dtype="<u2"))
    if "group_scales" in secs:
        group_scale = np.frombuffer(secs["group_scales"], dtype=np.uint8).reshape(out, ng)
    else:
        group_scale = np.ones((out, 1), dtype=np.int32)
    group_scale = group_scale.astype(np.int32)
    if fmt != "w3o6":
        b = int_bits(fmt)
        codes = from_twos(unpack_bits(secs["codes"], b, count), b).reshape(out, n_in)
        return QuantTensor(fmt, (out, n_in), g, codes.astype(np.int8), group_scale, row_scale)
    slots = unpack_bits(secs["codes"], 3, count).astype(np.int64)
    counts = unpack_bits(secs["outlier_counts"], header["count_bits"], out * ng).astype(np.int64)
    ib = index_bits(g)
    entries = unpack_bits(secs["outlier_entries"], ib + W3O6_HIGH_BITS, int(counts.sum()))
    entries = entries.astype(np.int64)
    group = np.repeat(np.arange(out * ng), counts)
    pos = (group // ng) * n_in + (group % ng) * g + (entries & ((1 << ib) - 1))
    mask = np.zeros(count, dtype=bool)
    mask[pos] = True
    codes = W3O6_RATIO * from_twos(slots, 3)
    codes[pos] = from_twos(slots[pos] | ((entries >> ib) << 3), 6)
    return QuantTensor(fmt, (out, n_in), g, codes.reshape(out, n_in).astype(np.int8),
                       group_scale, row_scale, mask.reshape(out, n_in))
