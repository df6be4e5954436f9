"""Scalar encodings shared by the formats: E2M1, E4M3, E8M0, bfloat16 row scales, bit streams.

Element conversions go through ``ml_dtypes`` (RNE, saturating). ``ml_dtypes`` converts from
float64 by way of float32, so every ratio that is rounded to an FP element is formed in
float32 first: the rounding is then a single, well-defined RNE step.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127
PACK_FIELDS = 1 << 20       # fields per slice of pack_bits (bounds its temporaries)


def e2m1_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to E2M1 (RNE, saturating at +-6); returns the values as float32."""
    x = np.clip(np.asarray(x, dtype=np.float32), -E2M1_MAX, E2M1_MAX)
    return x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)


def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Round float32 ratios to E2M1 and return the doubled values: int8 in {0, +-1, .., +-12}."""
    return (2 * e2m1_round(x)).astype(np.int8)


def e2m1_nibbles(codes: np.ndarray) -> np.ndarray:
    """Doubled E2M1 integers -> 4-bit patterns (sign, 2 exponent, 1 mantissa); zero is +0."""
    values = (np.asarray(codes, dtype=np.float32) / 2).astype(ml_dtypes.float4_e2m1fn)
    return values.view(np.uint8) & 0xF


def e2m1_from_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """4-bit E2M1 patterns -> doubled values (int8)."""
    values = (np.asarray(nibbles, dtype=np.uint8) & 0xF).view(ml_dtypes.float4_e2m1fn)
    return (2 * values.astype(np.float32)).astype(np.int8)


def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Round non-negative float32 values to E4M3 (RNE, saturating at 448); returns the bytes."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0, E4M3_MAX)
    return x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def e4m3_split(byte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive E4M3 byte -> (integer mantissa m in 0..15, exponent e) with value m * 2**e.

    Normals (E >= 1) are (8 + M) * 2**(E - 10); subnormals (E == 0) are M * 2**-9.
    """
    byte = np.asarray(byte, dtype=np.int32)
    biased, frac = (byte >> 3) & 0xF, byte & 7
    normal = biased > 0
    return np.where(normal, 8 + frac, frac), np.where(normal, biased - 10, -9)


def floor_log2(x: np.ndarray) -> np.ndarray:
    """floor(log2(x)) for positive finite x, exactly (via frexp, no log rounding)."""
    _, k = np.frexp(np.asarray(x, dtype=np.float64))
    return k.astype(np.int64) - 1


def bf16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest bfloat16 value >= x (x >= 0 finite), as float64. Row scales are stored this way."""
    x = np.asarray(x, dtype=np.float64)
    f = x.astype(np.float32)
    f = np.where(f < x, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    u = (u & 0xFFFF0000) + np.where((u & 0xFFFF) != 0, 0x10000, 0)
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16-representable float64 values -> their 16-bit patterns."""
    f = np.asarray(x, dtype=np.float64).astype(np.float32)
    if np.any(f.astype(np.float64) != x) or np.any(f.view(np.uint32) & 0xFFFF):
        raise ValueError("row scale is not a bfloat16 value")
    return (f.view(np.uint32) >> 16).astype(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned fields of ``width`` bits, field k at stream bits [k*width, (k+1)*width),
    stream bit j in bit (j % 8) of byte j // 8 (little-endian bitwise); zero-padded to a byte."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width, dtype=np.uint64)
    # PACK_FIELDS (a multiple of 8) fields at a time fill whole bytes: the pieces concatenate
    return b"".join(np.packbits(((values[a:a + PACK_FIELDS, None] >> shifts) & 1).astype(np.uint8).ravel(),
                                bitorder="little").tobytes() for a in range(0, values.size, PACK_FIELDS))


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned fields of ``width`` bits (uint64)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.uint64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * width]
    bits = bits.reshape(count, width).astype(np.uint64)
    return (bits << np.arange(width, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def to_twos(values: np.ndarray, width: int) -> np.ndarray:
    """Signed integers -> ``width``-bit two's complement fields."""
    return np.asarray(values, dtype=np.int64) & ((1 << width) - 1)


def from_twos(fields: np.ndarray, width: int) -> np.ndarray:
    """``width``-bit two's complement fields -> signed integers (int64)."""
    f = np.asarray(fields, dtype=np.int64)
    return np.where(f >= 1 << (width - 1), f - (1 << width), f)
