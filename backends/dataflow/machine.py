"""The dataflow machine model: a TSP-like chip of functional slices joined by streams
(spec: docs/dataflow.md, "Machine").

One chip is a row of slices, west to east::

    MEM 0 .. MEM B/2-1 | VXM 0..V-1 | MXM 0..M-1 | SXM 0..X-1 | C2C | MEM B/2 .. MEM B-1

Every slice sits at one position; a stream carries one vector of ``lanes`` bytes per cycle and
takes ``hop_cycles`` per position it crosses. There are no caches, no arbiters and no DRAM:
weights, constants and activations live in the MEM banks' SRAM, and every instruction has an
absolute issue cycle fixed by the compiler.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from tapeout.compiler.errors import TapeoutError
from tapeout.backends.target import parse_machine

__all__ = ["Machine"]


@dataclass(frozen=True)
class Machine:
    """Parameters of one dataflow chip (and of the links between chips); every field is a
    ``--machine KEY=VALUE`` option.

    lanes : bytes per vector; a stream moves one vector per cycle (320 on Groq's TSP).
    streams : streams per chip, shared by every slice and allocated by the compiler.
    mem_banks, bank_kib : MEM slices and the SRAM of each (one read and one write port, one
        vector per cycle each). 88 x 2560 KiB = 220 MiB.
    act_banks : the banks nearest the compute slices, reserved for activations in flight
        (weights and constants fill the others).
    mxm, mxm_k, mxm_n, mxm_buffers, mxm_latency : matrix units; each multiplies a weight block
        of up to ``mxm_k`` x ``mxm_n`` codes, holds ``mxm_buffers`` installed blocks, and its
        results leave ``mxm_latency`` cycles after the last activation vector entered.
    vxm, vxm_latency : vector units (integer requantise, norms, softmax, rope, activations,
        attention), each processing ``lanes`` elements per cycle.
    sxm, sxm_latency : switch units (transpose, concat, slice, gather: data movement).
    hop_cycles : stream latency per slice crossed.
    chips : 0 = as many as the weights need; otherwise exactly this many.
    link_bytes_per_cycle, link_latency : the chip-to-chip link (C2C slice) of a pipeline.
    clock_hz : for tokens per second.
    """

    lanes: int = 320
    streams: int = 32
    mem_banks: int = 88
    bank_kib: int = 2560
    act_banks: int = 16
    mxm: int = 4
    mxm_k: int = 320
    mxm_n: int = 320
    mxm_buffers: int = 2
    mxm_latency: int = 20
    vxm: int = 4
    vxm_latency: int = 4
    sxm: int = 2
    sxm_latency: int = 2
    hop_cycles: int = 1
    chips: int = 0
    link_bytes_per_cycle: int = 32
    link_latency: int = 600
    clock_hz: float = 900e6

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "clock_hz":
                if not v > 0:
                    raise TapeoutError(f"machine option clock_hz must be > 0, not {v!r}")
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f.name in ("chips", "vxm_latency",
                                                                                     "sxm_latency") else 1):
                raise TapeoutError(f"machine option {f.name} must be a positive integer, not {v!r}")
        if self.mem_banks < 2 or self.mem_banks % 2:
            raise TapeoutError(f"machine option mem_banks must be even and >= 2 (two hemispheres), not {self.mem_banks}")
        if self.act_banks >= self.mem_banks:
            raise TapeoutError(f"machine option act_banks ({self.act_banks}) must leave banks for weights "
                               f"(mem_banks={self.mem_banks})")
        if self.mxm_k > self.lanes:
            raise TapeoutError(f"machine option mxm_k ({self.mxm_k}) must be <= lanes ({self.lanes}): one "
                               "activation vector per token feeds one weight block")
        if self.streams > 65535 or self.mem_banks + self.vxm + self.mxm + self.sxm + 1 > 65535:
            raise TapeoutError("machine: at most 65535 streams and units per chip (the queue format's fields)")

    # --- floorplan ------------------------------------------------------------------------------
    @cached_property
    def slices(self) -> list[tuple[str, int]]:
        """(kind, index) west to east; the list index is the position."""
        half = self.mem_banks // 2
        return ([("mem", b) for b in range(half)] + [("vxm", v) for v in range(self.vxm)]
                + [("mxm", m) for m in range(self.mxm)] + [("sxm", x) for x in range(self.sxm)]
                + [("c2c", 0)] + [("mem", b) for b in range(half, self.mem_banks)])

    @cached_property
    def pos(self) -> dict[tuple[str, int], int]:
        return {s: p for p, s in enumerate(self.slices)}

    @cached_property
    def act_pool(self) -> tuple[int, ...]:
        """Banks reserved for activations: the ``act_banks`` nearest the compute slices."""
        half = self.mem_banks // 2
        order = [b for pair in zip(range(half - 1, -1, -1), range(half, self.mem_banks)) for b in pair]
        return tuple(sorted(order[:self.act_banks]))

    @cached_property
    def store_pool(self) -> tuple[int, ...]:
        act = set(self.act_pool)
        return tuple(b for b in range(self.mem_banks) if b not in act)

    def hop(self, a: tuple[str, int], b: tuple[str, int]) -> int:
        return self.hop_cycles * abs(self.pos[a] - self.pos[b])

    @cached_property
    def reach_act(self) -> int:
        """Longest stream latency between a compute slice and an activation bank."""
        units = [s for s in self.slices if s[0] != "mem"]
        return max(self.hop(u, ("mem", b)) for u in units for b in self.act_pool)

    @cached_property
    def reach_all(self) -> int:
        """Longest stream latency between a compute slice and any bank."""
        units = [s for s in self.slices if s[0] != "mem"]
        return max(self.hop(u, ("mem", b)) for u in units for b in (0, self.mem_banks - 1))

    @property
    def store_bytes(self) -> int:
        """SRAM of one chip outside the activation banks (weights and constants)."""
        return len(self.store_pool) * self.bank_kib * 1024

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"sram_mib": self.mem_banks * self.bank_kib / 1024,
                                           "reach_act": self.reach_act, "reach_all": self.reach_all}

    @classmethod
    def from_options(cls, items: list[str] | None) -> "Machine":
        """``["mxm=8", "bank_kib=1024", ...]`` (the CLI's ``--machine K=V``)."""
        return parse_machine(cls, items, strings=())
