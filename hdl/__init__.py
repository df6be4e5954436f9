"""Amaranth hardware components and their simulation."""
