"""Evaluation and deployment: the 10-fold verification protocol, embedding models (PyTorch
or ONNX), in-training verification, face alignment, ONNX export and plots."""
