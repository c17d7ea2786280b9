"""Engines: the formats table and the backends that run a stored step (torch, ONNX Runtime,
TensorRT). The layer below exporters, analysis and runtime: the gate, evaluation, parity and
serving all look down to it."""
