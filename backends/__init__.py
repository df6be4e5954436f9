"""Backends: systolic, dataflow, maskrom."""
