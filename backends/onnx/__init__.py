"""ONNX QDQ backend (ONNX Runtime)."""
