"""The quantised weight matrix: an exact integer decomposition plus its storage accounting."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# w3o6 grid: base codes c3 in [-4, 3] on step s, outliers c6 in [-32, 31] on step s / W3O6_RATIO.
# The integer each weight contributes is W3O6_RATIO * c3 or c6 (docs/formats.md says why 4).
W3O6_RATIO = 4
W3O6_BASE = (-4, 3)
W3O6_OUTLIER = (-32, 31)
W3O6_HIGH_BITS = 3          # outlier bits kept beside its index; the low 3 reuse the base slot

GROUP_SCALE_BITS = 8        # unsigned group scale of int-g and w3o6
ROW_SCALE_BITS = 16         # bfloat16 row scale of int and w3o6
FP4_BLOCK = {"mxfp4": 32, "nvfp4": 16}


def int_bits(fmt: str) -> int:
    """Code width of an ``int<b>`` format name."""
    return int(fmt[3:])


def int_range(bits: int) -> tuple[int, int]:
    """Full two's complement range [-2**(b-1), 2**(b-1) - 1] (the GPTQ 'sym' grid)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def index_bits(group_size: int) -> int:
    """Bits of an in-group outlier index."""
    return max(1, math.ceil(math.log2(group_size)))


@dataclass(frozen=True, eq=False)
class QuantTensor:
    """A quantised [out, in] weight: value = codes * group_scale[:, i // group_size] * row_scale.

    All integer except ``row_scale``, so an integer engine accumulates
    ``y[o] = row_scale[o] * sum_g group_scale[o, g] * sum_{i in g} codes[o, i] * x[i]`` exactly.
    ``tensor_scale`` is nvfp4's FP32 per-tensor scale (already folded into ``row_scale``; kept
    because the packed E4M3 block scales are relative to it).
    """

    fmt: str
    shape: tuple[int, int]
    group_size: int
    codes: np.ndarray
    group_scale: np.ndarray
    row_scale: np.ndarray
    outliers: np.ndarray | None = None
    tensor_scale: float | None = None

    @property
    def n_groups(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def per_channel(self) -> bool:
        return self.fmt.startswith("int") and self.group_size == self.shape[1]

    def step(self) -> np.ndarray:
        """float64 [out, in]: the value of one code unit, group_scale * row_scale, per weight."""
        gs = np.repeat(self.group_scale.astype(np.float64), self.group_size, axis=1)
        return gs * self.row_scale[:, None]

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]: codes * group_scale * row_scale, computed in float64 then cast."""
        return (self.codes.astype(np.float64) * self.step()).astype(np.float32)

    def outlier_counts(self) -> np.ndarray:
        """int [out, n_groups]: outliers per group (w3o6; zeros otherwise)."""
        if self.outliers is None:
            return np.zeros((self.shape[0], self.n_groups), dtype=np.int64)
        return self.outliers.reshape(self.shape[0], self.n_groups, self.group_size).sum(axis=2)

    def count_bits(self) -> int:
        """Width of each group's outlier count: enough for the largest count in this tensor."""
        return int(self.outlier_counts().max(initial=0)).bit_length()

    def bits(self) -> dict[str, int]:
        """Storage in bits per component (exactly the packed payload, without byte padding) and
        ``total``. The self-describing header of :func:`pack` is not counted."""
        out, n_in = self.shape
        n, groups = out * n_in, out * self.n_groups
        if self.fmt in FP4_BLOCK:
            b = {"codes": 4 * n, "block_scales": 8 * groups}
            if self.fmt == "nvfp4":
                b["tensor_scale"] = 32
        elif self.fmt == "w3o6":
            k = int(self.outliers.sum()) if self.outliers is not None else 0
            b = {"codes": 3 * n, "group_scales": GROUP_SCALE_BITS * groups,
                 "row_scales": ROW_SCALE_BITS * out,
                 "outlier_counts": self.count_bits() * groups,
                 "outlier_index": index_bits(self.group_size) * k,
                 "outlier_codes": W3O6_HIGH_BITS * k}
        else:
            b = {"codes": int_bits(self.fmt) * n}
            if not self.per_channel:
                b["group_scales"] = GROUP_SCALE_BITS * groups
            b["row_scales"] = ROW_SCALE_BITS * out
        b["total"] = sum(b.values())
        return b

    @property
    def bits_per_weight(self) -> float:
        return self.bits()["total"] / (self.shape[0] * self.shape[1])

    @property
    def outlier_fraction(self) -> float:
        if self.outliers is None:
            return 0.0
        return float(self.outliers.mean())
