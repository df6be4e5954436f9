"""Bit strings of the weight images (systolic ``weights.bin``, dataflow ``banks.bin``).

One convention for both: value ``c`` of a row occupies bits ``c*bits .. c*bits + bits - 1``
of the row's bit string, least significant bit first, and bit ``b`` of the string is bit
``b % 8`` of byte ``b // 8``. Signed values are stored in two's complement.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pack_rows", "unpack_rows", "pack_signed", "unpack_signed"]

PACK_ROWS = 2048                 # rows packed at once (bounds the bit array of a large layer)


def _bits(u: np.ndarray, bits: int) -> np.ndarray:
    shifts = np.arange(bits, dtype=np.uint64)
    return ((u.astype(np.uint64)[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(*u.shape[:-1], -1)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned int [rows, n] (each < 2**bits) -> uint8 [rows, ceil(n * bits / 8)]."""
    values = np.asarray(values, np.int64)
    rows, n = values.shape
    out = np.zeros((rows, -(-n * bits // 8)), np.uint8)
    for r0 in range(0, rows, PACK_ROWS):
        out[r0:r0 + PACK_ROWS] = np.packbits(_bits(values[r0:r0 + PACK_ROWS], bits), axis=1, bitorder="little")
    return out


def unpack_rows(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    """The inverse of ``pack_rows``: uint8 [rows, row_bytes] -> unsigned int64 [rows, n]."""
    b = np.unpackbits(data, axis=1, bitorder="little")[:, :n * bits].reshape(len(data), n, bits)
    return b.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def pack_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed int [rows, n] in [-2**(bits-1), 2**(bits-1)) -> two's complement bit strings."""
    return pack_rows(np.asarray(values, np.int64) & ((1 << bits) - 1), bits)


def unpack_signed(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    u = unpack_rows(data, n, bits)
    return np.where(u >= 1 << (bits - 1), u - (1 << bits), u)
