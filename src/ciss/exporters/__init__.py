"""Exporters: ONNX (with parity gate), INT8, TensorRT, Triton repository."""
