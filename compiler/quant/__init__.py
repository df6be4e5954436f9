"""Weight quantisation formats (spec: docs/formats.md).

Every format is an exact integer decomposition of the weight matrix,
``value = codes * group_scale[:, i // group_size] * row_scale``, with integer codes and group
scales and one real factor per row, so the golden model accumulates in integers.
"""
from __future__ import annotations

from .formats import KNOWN_FORMATS, quantize
from .packing import pack, unpack
from .tensor import QuantTensor

# format name -> one-line description (for the CLI)
FORMATS: dict[str, str] = {
    "w3o6": "3-bit codes per group of 64 plus a chosen fraction of 6-bit outliers on a 4x finer "
            "grid, picked by activation-aware saliency (HC1-style)",
    "mxfp4": "OCP MX v1.0: E2M1 elements, blocks of 32, E8M0 power-of-two block scale",
    "nvfp4": "NVIDIA FP4: E2M1 elements, blocks of 16, E4M3 block scale, FP32 tensor scale",
    "int4": "symmetric 4-bit integers, per channel or per group (--group), RTN or clip search",
    "int8": "symmetric 8-bit integers, per channel or per group (--group), RTN or clip search",
}

__all__ = ["FORMATS", "KNOWN_FORMATS", "QuantTensor", "pack", "quantize", "unpack"]
