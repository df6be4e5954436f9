"""Front end and middle end: ONNX import, Graph IR, passes, float interpreter."""
