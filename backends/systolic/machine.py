"""The systolic machine model (spec: docs/isa.md, "Machine")."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tapeout.compiler.errors import TapeoutError
from tapeout.backends.target import parse_machine

__all__ = ["Machine"]


@dataclass(frozen=True)
class Machine:
    """Parameters of one systolic-array accelerator; every field is a ``--machine`` option.

    n : the array is ``n x n`` int8 x int8 processing elements (weight-stationary: a PE holds
        one weight code; activations stream left to right, partial sums flow down).
    spad_kib : scratchpad for activations and weight strips (double-buffered).
    acc_kib : accumulator SRAM (int48 words) for the output tiles being accumulated.
    dram_bytes_per_cycle, dram_latency : the off-chip port (one DMA engine for loads, one for stores).
    vector_lanes : integer vector unit width (requantise, norms, softmax, rope, activations).
    array_latency : cycles from a token entering the array to its sums leaving (skew, the
        column of PEs, deskew); 0 means the RTL's ``2n - 1`` (hdl/systolic.py).
    clock_hz : for reporting tokens/s.
    """

    n: int = 16
    dataflow: str = "ws"
    spad_kib: int = 512
    acc_kib: int = 128
    dram_bytes_per_cycle: int = 64
    dram_latency: int = 100
    vector_lanes: int = 16
    array_latency: int = 0          # 0: the RTL's 2n - 1
    clock_hz: float = 1.0e9

    def __post_init__(self) -> None:
        for f in ("n", "spad_kib", "acc_kib", "dram_bytes_per_cycle", "vector_lanes"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TapeoutError(f"machine option {f} must be a positive integer, not {v!r}")
        if self.n > 256:
            raise TapeoutError(f"machine option n must be <= 256 (the ISA's field widths), not {self.n}")
        if self.dataflow != "ws":
            raise TapeoutError(f"machine option dataflow {self.dataflow!r} is not implemented; "
                               "only 'ws' (weight-stationary)")
        if self.dram_latency < 0 or self.array_latency < 0:
            raise TapeoutError("machine latencies must be >= 0")
        if not self.clock_hz > 0:
            raise TapeoutError(f"machine option clock_hz must be > 0, not {self.clock_hz!r}")

    @property
    def latency(self) -> int:
        return self.array_latency or 2 * self.n - 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"latency": self.latency}

    @classmethod
    def from_options(cls, items: list[str] | None) -> "Machine":
        """``["n=32", "dram_bytes_per_cycle=128", ...]`` (the CLI's ``--machine K=V``)."""
        return parse_machine(cls, items, strings=("dataflow",))
