"""tapeout: compile a trained Transformer (ONNX) into hardware.

Subpackages: ``tapeout.compiler`` (import, IR, passes, interpreter), ``tapeout.backends``
(systolic, dataflow, maskrom) and ``tapeout.hdl`` (Amaranth components).
"""
__version__ = "0.1.0"
