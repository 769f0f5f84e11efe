"""Artifact writers: ONNX graphs (``onnx_export``) and, elsewhere in this package, safetensors."""
