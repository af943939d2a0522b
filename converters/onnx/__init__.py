"""ONNX graph helpers of the converter: graph simplification, per-layer sensitivity and bias correction
of QDQ graphs (the ONNX Runtime recipes in ``converters.recipes`` build on them)."""
