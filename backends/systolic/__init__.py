"""Systolic-array backend: tiling, static schedule, microcode ISA, ISA simulator (docs/isa.md)."""
