"""Sluice: gRPC streaming generation from a quantized Llama on onnxruntime, behind a moderation stage."""

__version__ = "0.1.0"
