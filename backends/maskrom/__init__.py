"""Mask-ROM backend: a fixed base die plus two customised via layers per model (docs/layout.md)."""
