"""Pallas kernels used by the model (flash attention) and shared Triton-lowering helpers."""
